"""The TL;DR-style study's settings, in groups (each gin-configurable).

  tldr_style.models = @TldrModels()          SFT, reward model, PG (a factory), DPO; lengths
  tldr_style.training = @TldrTraining()      steps and optimizers of each, the trainer config
  tldr_style.pairs = @TldrPairs()            the preference pairs: synthetic or human
  tldr_style.evaluation = @StudyEvaluation() prompts, samples, batch, split, seed
  tldr_style.comparison = @TldrComparison()  base beta, the lambda grid, the judge's seed
  tldr_style.options = @StudyOptions()       compilation cache, progress bars

Each group checks itself (`check`) before any compute; `check_all` adds what
spans groups.
"""

import dataclasses
from typing import Callable, Optional, Sequence

from realign_jax.data import tldr
from realign_jax.decoding.lambda_grid import LambdaGrid
from realign_jax.plumbing.errors import UserError
from realign_jax.experiments import stages
from realign_jax.experiments.config import check_beta, check_counts
from realign_jax.training import trainer as trainer_lib
from realign_jax.training.dpo import DPO
from realign_jax.training.reward_model import RewardModel
from realign_jax.training.sft import SFT

FAMILIES = ("pg", "dpo")


def run_name(family: str, beta: float) -> str:
  """The stage (and run directory) of a family's run at `beta`: pg_beta0.1."""
  return f"{family}_beta{beta:g}"


@dataclasses.dataclass(frozen=True)
class TldrModels:
  """The algorithms, and the lengths of every sample the study draws.

  sft, reward_model, dpo: the algorithms (their INIT_CHECKPOINT and data files
    are set by the study, to the SFT stage and the preference stage).
  pg: the policy-gradient class as a factory (gin `@PG`, not `@PG()`): its
    reward is the reward model this study trains, so it is built here as
    pg(reward=..., init_checkpoint=..., beta=..., task=..., input_length=...,
    max_new_tokens=...).
  input_length, max_new_tokens: prompt length and response limit of every
    sample the study draws (pairs, rollouts, evaluation).
  with_dpo: also the DPO half of the study (Figure 7).
  """
  sft: SFT
  reward_model: RewardModel
  pg: Callable
  dpo: DPO
  input_length: int = 96
  max_new_tokens: int = 24
  with_dpo: bool = True

  def check(self) -> None:
    check_counts("TldrModels", input_length=self.input_length,
                 max_new_tokens=self.max_new_tokens)
    if not callable(self.pg) or isinstance(self.pg, trainer_lib.Algorithm):
      raise UserError("TldrModels.pg must be the PG factory (gin: `TldrModels.pg = @PG`, "
                      "without parentheses): its reward is the reward model trained here")
    if self.reward_model.model.output_head != "scalar":
      raise UserError("TldrModels.reward_model needs a model with output_head 'scalar' "
                      "(e.g. RewardModel.model = @rm/LanguageModel())")
    for what, alg in (("RewardModel", self.reward_model), ("DPO", self.dpo)):
      if alg.model.config != self.sft.model.config:
        raise UserError(f"{what}.model must have the SFT model's config (it starts from SFT)")
      if alg.input_length != self.input_length:
        raise UserError(f"{what}.input_length is {alg.input_length} but "
                        f"TldrModels.input_length is {self.input_length}; the pairs are "
                        f"prompts of that length")
      if alg.target_length < self.max_new_tokens + 1:
        raise UserError(f"{what}.target_length is {alg.target_length}; it must be at least "
                        f"TldrModels.max_new_tokens + 1 = {self.max_new_tokens + 1} so "
                        f"sampled responses are not cut")

  @property
  def families(self) -> tuple:
    """The aligned families compared: PG on the learned reward and, with_dpo, DPO."""
    return FAMILIES if self.with_dpo else ("pg",)


@dataclasses.dataclass(frozen=True)
class TldrTraining:
  """The training budget: steps and optimizer of SFT, the reward model, every PG and DPO run."""
  sft_steps: int
  reward_model_steps: int
  pg_steps: int
  dpo_steps: int
  sft_optimizer: stages.OptimizerSpec
  reward_model_optimizer: stages.OptimizerSpec
  pg_optimizer: stages.OptimizerSpec
  dpo_optimizer: stages.OptimizerSpec
  trainer_config: trainer_lib.TrainerConfig = trainer_lib.TrainerConfig()

  def check(self) -> None:
    check_counts("TldrTraining", sft_steps=self.sft_steps,
                 reward_model_steps=self.reward_model_steps, pg_steps=self.pg_steps,
                 dpo_steps=self.dpo_steps)

  def of(self, family: str) -> tuple:
    """(steps, optimizer) of a family's runs."""
    return {"pg": (self.pg_steps, self.pg_optimizer),
            "dpo": (self.dpo_steps, self.dpo_optimizer)}[family]


@dataclasses.dataclass(frozen=True)
class TldrPairs:
  """The preference pairs that train the reward model and DPO, and the held-out ones.

  comparisons_dir None: synthetic pairs, two SFT samples per prompt (the first
  `num_train_prompts` of the train split, `num_heldout_prompts` of
  `heldout_split`, sampled with `seed`), the gold reward picks `chosen`. Else
  human preference data as the paper uses it: the TL;DR comparisons release
  (`tldr_comparisons`, data/tldr.py) in this directory; its train split (the
  first `num_train_prompts` pairs) trains the reward model and DPO, and
  `heldout_split` (the first `num_heldout_prompts` pairs) measures pairwise
  accuracy.
  """
  num_train_prompts: int = 512
  num_heldout_prompts: int = 128
  heldout_split: str = "validation"
  seed: int = 0
  comparisons_dir: Optional[str] = None

  def check(self) -> None:
    check_counts("TldrPairs", num_train_prompts=self.num_train_prompts,
                 num_heldout_prompts=self.num_heldout_prompts)
    if self.comparisons_dir:
      # NOTE: before any compute: at full scale the pairs are needed after SFT.
      tldr.comparison_files(self.comparisons_dir)


@dataclasses.dataclass(frozen=True)
class TldrComparison:
  """DeRa against retraining: each family at `beta`, DeRa at every lambda, retrained at
  beta / lambda (lambda = 1: the base run); win rates judged with `judge_seed`."""
  beta: float = 0.1
  lambdas: Sequence[float] = (0.5, 2 / 3, 1.0, 2.0, 5.0, 10.0)
  judge_seed: int = 0

  def grid(self) -> LambdaGrid:
    return LambdaGrid.of(self.lambdas, "TldrComparison.lambdas", minimum=0.0, inclusive=False,
                         why="beta / lambda is retrained")

  def check(self) -> None:
    lambdas = self.grid().list()
    beta = check_beta("TldrComparison", self.beta)
    if len({run_name("pg", beta / lam) for lam in lambdas}) != len(lambdas):
      raise UserError(f"TldrComparison.lambdas {lambdas} give retrained betas that print alike")


def check_all(models: TldrModels, training: TldrTraining, pairs: TldrPairs, evaluation,
              comparison: TldrComparison) -> None:
  """Every setting of the study, before any compute."""
  comparison.check()
  training.check()
  pairs.check()
  evaluation.check()
  models.check()
