"""The reward-vs-KL frontier of every alignment method of the project, on one task.

  config.py    its settings, in frozen groups (gin-configurable)
  pipeline.py  its stage graph and the entry point `frontier(model_dir=..., ...)`
  results.py   the numbers it computes from the stages' outputs
  report.py    report.md and the figures
  __main__.py  `python -m realign_jax.experiments.frontier --gin_file=...`
"""


def __getattr__(name: str):
  # NOTE: the entry point, imported on first use: `python -m` imports this package
  # before __main__'s argument precheck, which must come before the heavy imports.
  if name == "frontier":
    from realign_jax.experiments.frontier.pipeline import frontier
    return frontier
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
