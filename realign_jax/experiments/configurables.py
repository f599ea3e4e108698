"""Gin surface of the experiments package (imported by `gin_utils.register()`)."""

import gin


def register() -> None:
  from realign_jax.experiments import length_reward, stages
  gin.external_configurable(stages.OptimizerSpec, "OptimizerSpec")
  gin.external_configurable(length_reward.length_reward, "length_reward")
  # The TL;DR-style study (DeRa paper, Figures 3, 6, 7).
  from realign_jax.experiments import tldr_style
  gin.external_configurable(tldr_style.tldr_style, "tldr_style")
  # The reward-vs-KL frontier of every method (controlled decoding and Transfer Q* included).
  from realign_jax.experiments import frontier
  gin.external_configurable(frontier.frontier, "frontier")
