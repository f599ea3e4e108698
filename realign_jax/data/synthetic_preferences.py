"""Moved: the synthetic-preference builder is a binary, `realign_jax.synthetic_preferences`.

It decodes with the decode binary's loading, so it sits on the binaries' floor;
this module only forwards the old name (`python -m realign_jax.data.synthetic_preferences`
and `from realign_jax.data import synthetic_preferences`) to it. It defines
nothing of its own: tests/test_layering.py allows this one forwarding import up.
"""

import sys

if __name__ == "__main__":
  import runpy
  runpy.run_module("realign_jax.synthetic_preferences", run_name="__main__", alter_sys=True)
else:
  from realign_jax import synthetic_preferences as _moved
  sys.modules[__name__] = _moved
