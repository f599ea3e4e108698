"""Gin surface of the rewards package (imported by `gin_utils.register()`)."""

import gin


def register() -> None:
  # NOTE: lazy: the package loads only when a binary registers it (gin_utils.register()).
  from realign_jax.rewards import length
  gin.external_configurable(length.LengthReward, "LengthReward")
  # A trained reward model (configs/reward/) as a reward.
  from realign_jax.rewards import learned
  gin.external_configurable(learned.LearnedReward, "LearnedReward")
