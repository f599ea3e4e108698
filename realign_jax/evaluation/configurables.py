"""Gin surface of the evaluation package (imported by `gin_utils.register()`)."""

import gin


def register() -> None:
  from realign_jax.evaluation import judges
  gin.external_configurable(judges.RewardJudge, "RewardJudge")
  gin.external_configurable(judges.LLMJudge, "LLMJudge")
