"""The length-reward study's settings, in groups (each gin-configurable).

  length_reward.models = @LengthRewardModels()          the SFT and PPO algorithms
  length_reward.training = @LengthRewardTraining()      steps, optimizers, trainer configs
  length_reward.evaluation = @StudyEvaluation()         prompts, samples, batch, split, seed
  length_reward.comparison = @LengthRewardComparison()  base beta and the lambda grid
  length_reward.options = @StudyOptions()               compilation cache, progress bars

Each group checks itself (`check`) before any compute; `check_all` adds what
spans groups.
"""

import dataclasses
from typing import Optional, Sequence

from realign_jax.decoding.lambda_grid import LambdaGrid
from realign_jax.plumbing.errors import UserError
from realign_jax.experiments import stages
from realign_jax.experiments.config import check_beta, check_counts
from realign_jax.rewards.length import LengthReward
from realign_jax.training import trainer as trainer_lib
from realign_jax.training.ppo import PPO
from realign_jax.training.sft import SFT


def beta_name(beta: float) -> str:
  """The stage (and run directory) of PPO at `beta`: ppo_beta0.1."""
  return f"ppo_beta{beta:g}"


@dataclasses.dataclass(frozen=True)
class LengthRewardModels:
  """sft: SFT on the task (the reference pi_ref); ppo: PPO with the length reward, from it.

  PPO's `beta` and INIT_CHECKPOINT are set by the study (`LengthRewardComparison`,
  the SFT stage); its task, prompt length, response limit, sampling and reward
  are every decode's.
  """
  sft: SFT
  ppo: PPO

  def check(self) -> None:
    if not isinstance(self.ppo.reward, LengthReward):
      raise UserError(f"length_reward needs PPO.reward = @LengthReward(), got "
                      f"{type(self.ppo.reward).__name__}")
    if self.ppo.model.config != self.sft.model.config:
      raise UserError("SFT.model and PPO.model must be the same model config (PPO starts from "
                      "SFT)")
    lo, hi = self.window
    if hi >= self.ppo.max_new_tokens:
      raise UserError(f"the rewarded window [{lo}, {hi}] must end below "
                      f"PPO.max_new_tokens = {self.ppo.max_new_tokens} (EOS included)")

  @property
  def window(self) -> tuple:
    """The rewarded lengths [min, max] in tokens (eq. 10)."""
    return (self.ppo.reward.min_length, self.ppo.reward.max_length)


@dataclasses.dataclass(frozen=True)
class LengthRewardTraining:
  """The training budget: steps and optimizer of SFT and of every PPO run.

  `ppo_trainer_config` (default `trainer_config`) trains the PPO runs: with
  `eval_every` and `stop_window` each runs to convergence, `ppo_steps` steps
  at most, its curve of J on `PPO.max_eval_examples` held-out prompts kept.
  """
  sft_steps: int
  ppo_steps: int
  sft_optimizer: stages.OptimizerSpec
  ppo_optimizer: stages.OptimizerSpec
  trainer_config: trainer_lib.TrainerConfig = trainer_lib.TrainerConfig()
  ppo_trainer_config: Optional[trainer_lib.TrainerConfig] = None

  @property
  def ppo_trainer(self) -> trainer_lib.TrainerConfig:
    return self.ppo_trainer_config or self.trainer_config

  def check(self, ppo: PPO) -> None:
    check_counts("LengthRewardTraining", sft_steps=self.sft_steps, ppo_steps=self.ppo_steps)
    tc = self.ppo_trainer
    if tc.stop_window and not (tc.eval_every and ppo.max_eval_examples):
      raise UserError("the PPO runs' stopping rule (stop_window) needs eval_every > 0 and "
                      "PPO.max_eval_examples > 0 (the held-out prompts it evaluates J on)")


@dataclasses.dataclass(frozen=True)
class LengthRewardComparison:
  """DeRa against retraining: PPO at `beta`, DeRa at every lambda, PPO retrained at beta / lambda.

  lambda = 0 is the SFT model itself (beta = infinity); lambda = 1 retrains at
  the base beta with the same seed, i.e. the base run, unless
  `retrain_at_base_beta` trains it again. The SFT samples must fall in the
  rewarded window less often than `max_sft_in_range` (else the reward would
  ask nothing of PPO).
  """
  beta: float = 0.1
  lambdas: Sequence[float] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
  max_sft_in_range: float = 0.3
  retrain_at_base_beta: bool = False

  def grid(self) -> LambdaGrid:
    return LambdaGrid.of(self.lambdas, "LengthRewardComparison.lambdas", minimum=0.0,
                         why="lambda = 0 is the SFT model")

  def check(self) -> None:
    self.grid()
    check_beta("LengthRewardComparison", self.beta)


def check_all(models: LengthRewardModels, training: LengthRewardTraining, evaluation,
              comparison: LengthRewardComparison) -> None:
  """Every setting of the study, before any compute."""
  comparison.check()
  models.check()
  training.check(models.ppo)
  evaluation.check()
