"""The TL;DR-style study (DeRa paper, section 5.3 and appendix D.3: Figures 3, 6, 7).

  config.py    its settings, in frozen groups (gin-configurable)
  pipeline.py  its stage graph and the entry point `tldr_style(model_dir=..., ...)`
  gold.py      the gold reward (ROUGE-L F against the reference summary)
  pairs.py     the preference pairs (synthetic, or the human TL;DR comparisons)
  results.py   the numbers it computes from the stages' outputs
  report.py    report.md and the figures
  __main__.py  `python -m realign_jax.experiments.tldr_style --gin_file=...`
"""


def __getattr__(name: str):
  # NOTE: the entry point, imported on first use: `python -m` imports this package
  # before __main__'s argument precheck, which must come before the heavy imports.
  if name == "tldr_style":
    from realign_jax.experiments.tldr_style.pipeline import tldr_style
    return tldr_style
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
