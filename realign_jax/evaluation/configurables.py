"""Gin surface of the evaluation package (imported by `gin_utils.register()`)."""

import gin


def register() -> None:
  # NOTE: lazy: the package loads only when a binary registers it (gin_utils.register()).
  from realign_jax.evaluation import judges
  gin.external_configurable(judges.RewardJudge, "RewardJudge")
  gin.external_configurable(judges.LLMJudge, "LLMJudge")
