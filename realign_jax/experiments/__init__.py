"""realign_jax.experiments: the studies, each a package of the same shape.

  config.py    its settings, in frozen groups (gin-configurable, checked before any compute)
  pipeline.py  its stage graph and its entry point (model_dir and a few groups)
  results.py   the numbers it computes from the stages' outputs
  report.py    report.md and the figures
  __main__.py  `python -m realign_jax.experiments.<study> --gin_file=...`

on what they share: the stage machinery (`stages`), the evaluation and run
options (`config`), the samples (`samples`), statistics and figures (`report`).
"""


def entry_point(package: str, name: str):
  """A study package's module `__getattr__` naming its entry point `pipeline.<name>`.

  NOTE: imported on first use: `python -m` imports the package before its
  __main__'s argument precheck, which must come before the heavy imports (the
  sweep binary looks the entry point up on the package by name).
  """
  def __getattr__(attr: str):
    if attr == name:
      import importlib
      return getattr(importlib.import_module(f"{package}.pipeline"), name)
    raise AttributeError(f"module {package!r} has no attribute {attr!r}")
  return __getattr__
