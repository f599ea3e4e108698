"""Gin surface of the training package (imported by `gin_utils.register()`)."""

import gin


def register() -> None:
  # NOTE: lazy: the package loads only when a binary registers it (gin_utils.register()).
  from realign_jax.training import optim, sft, trainer
  gin.external_configurable(sft.SFT, "SFT")
  gin.external_configurable(optim.make_optimizer, "make_optimizer")
  gin.external_configurable(trainer.TrainerConfig, "TrainerConfig")
  from realign_jax.training import pg, ppo
  gin.external_configurable(ppo.PPO, "PPO")
  gin.external_configurable(pg.PG, "PG")
  # Preference-based alignment: Bradley-Terry reward model, DPO and IPO.
  from realign_jax.training import dpo, reward_model
  gin.external_configurable(reward_model.RewardModel, "RewardModel")
  gin.external_configurable(dpo.DPO, "DPO")
  # Value functions for controlled decoding: CD-FUDGE and CD-Q.
  from realign_jax.training import value
  gin.external_configurable(value.FudgeValue, "FudgeValue")
  gin.external_configurable(value.CDQValue, "CDQValue")
