"""Gin surface of the models package (imported by `gin_utils.register()`)."""

import gin


def register() -> None:
  # NOTE: lazy: the package loads only when a binary registers it (gin_utils.register()).
  from realign_jax.models import api
  # NOTE: T5Config, DecoderConfig and SpecialTokens decorate themselves (gin files
  # import models.config by name); importing it registers them.
  from realign_jax.models import config  # noqa: F401
  gin.external_configurable(api.LanguageModel, "LanguageModel")
