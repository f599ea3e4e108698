"""Model sizes by name: the gin fragments under `gin/models/` are the source of truth."""

import os

import gin

from realign_jax.plumbing import paths
from realign_jax.plumbing.errors import UserError
from realign_jax.models.config import ModelConfig

SIZES_DIR = os.path.join(paths.REPO_ROOT, "gin", "models")


def available() -> list:
  return sorted(f[:-4] for f in os.listdir(SIZES_DIR) if f.endswith(".gin"))


def load(name: str, **overrides) -> ModelConfig:
  """Parses gin/models/NAME.gin and returns its MODEL_CONFIG (fields overridable).

  NOTE: this clears the global gin config; call it before parsing a run config.
  """
  path = name if name.endswith(".gin") else os.path.join(SIZES_DIR, f"{name}.gin")
  if not os.path.isfile(path):
    raise UserError(f"unknown model size {name!r}; available: {', '.join(available())}")
  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings([path], [], finalize_config=True)
  except (ValueError, KeyError, SyntaxError, TypeError, IOError) as e:
    raise UserError(f"gin: {path}: {str(e).strip().splitlines()[0]}") from e
  config = gin.query_parameter("MODEL_CONFIG/macro.value").scoped_configurable_fn()
  gin.clear_config()
  return config.__class__(**{**config.__dict__, **overrides}) if overrides else config
