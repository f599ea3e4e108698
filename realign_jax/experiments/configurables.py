"""Gin surface of the experiments package (imported by `gin_utils.register()`).

Each study's entry point and each group of its settings, registered once under
its own name (`length_reward`, `LengthRewardModels`, `StudyEvaluation`, ...).
"""

import gin


def register() -> None:
  # NOTE: lazy: the package loads only when a binary registers it (gin_utils.register()).
  from realign_jax.experiments import config, stages
  from realign_jax.experiments.frontier import config as frontier
  from realign_jax.experiments.frontier.pipeline import frontier as frontier_study
  from realign_jax.experiments.length_reward import config as length_reward
  from realign_jax.experiments.length_reward.pipeline import length_reward as length_study
  from realign_jax.experiments.tldr_style import config as tldr_style
  from realign_jax.experiments.tldr_style.pipeline import tldr_style as tldr_study
  classes = (stages.OptimizerSpec, config.StudyEvaluation, config.StudyOptions,
             # The length-reward study (DeRa paper, Figure 2).
             length_reward.LengthRewardModels, length_reward.LengthRewardTraining,
             length_reward.LengthRewardComparison,
             # The reward-vs-KL frontier of every method (controlled decoding and Transfer Q*).
             frontier.FrontierModels, frontier.FrontierTraining, frontier.FrontierMethods,
             # The TL;DR-style study (DeRa paper, Figures 3, 6, 7).
             tldr_style.TldrModels, tldr_style.TldrTraining, tldr_style.TldrPairs,
             tldr_style.TldrComparison)
  for cls in classes:
    gin.external_configurable(cls, cls.__name__)
  for fn, name in ((length_study, "length_reward"), (frontier_study, "frontier"),
                   (tldr_study, "tldr_style")):
    gin.external_configurable(fn, name)
