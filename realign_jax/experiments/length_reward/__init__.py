"""The length-reward study (DeRa paper, section 5.2, Figure 2).

  config.py    its settings, in frozen groups (gin-configurable)
  pipeline.py  its stage graph and the entry point `length_reward(model_dir=..., ...)`
  results.py   the numbers it computes from the stages' outputs
  report.py    report.md and the figures
  __main__.py  `python -m realign_jax.experiments.length_reward --gin_file=...`
"""


def __getattr__(name: str):
  # NOTE: the entry point, imported on first use: `python -m` imports this package
  # before __main__'s argument precheck, which must come before the heavy imports.
  if name == "length_reward":
    from realign_jax.experiments.length_reward.pipeline import length_reward
    return length_reward
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
