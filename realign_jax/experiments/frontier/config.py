"""The frontier study's settings, in groups (each gin-configurable).

  frontier.models = @FrontierModels()        the SFT and PPO algorithms (PPO's reward: the task's)
  frontier.training = @FrontierTraining()    steps and optimizers; the value models' settings
  frontier.methods = @FrontierMethods()      which methods, and each one's grid
  frontier.evaluation = @StudyEvaluation()   prompts, samples, batch, split, seed
  frontier.options = @StudyOptions()         compilation cache, progress bars

Each group checks itself (`check`) before any compute; `check_all` adds what
spans groups. A message names the gin parameter (`FrontierMethods.cd_betas`).
"""

import dataclasses
import math
from typing import Sequence, Union

from realign_jax.decoding import controlled
from realign_jax.decoding.lambda_grid import LambdaGrid
from realign_jax.decoding.transfer_q import ALPHA_CONVENTIONS
from realign_jax.plumbing.errors import UserError
from realign_jax.experiments import stages
from realign_jax.experiments.config import check_counts
from realign_jax.training import trainer as trainer_lib
from realign_jax.training.ppo import PPO
from realign_jax.training.sft import SFT

METHODS = ("best_of_n", "ppo", "dera", "cd_token_fudge", "cd_token_q", "cd_block", "tq_direct",
           "args")


def check_grid(what: str, values, *, positive: bool = False, integer: bool = False,
               nonneg: bool = False) -> list:
  """A grid of a method's setting (not lambdas: `LambdaGrid`): distinct finite numbers."""
  vals = list(values)
  if not vals:
    raise UserError(f"{what} is empty")
  for v in vals:
    if integer and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
      raise UserError(f"{what} must hold integers >= 1, got {v!r}")
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
      raise UserError(f"{what} must hold finite numbers, got {v!r}")
    if positive and not v > 0:
      raise UserError(f"{what} must hold numbers > 0, got {v!r}")
    if nonneg and v < 0:
      raise UserError(f"{what} must hold numbers >= 0, got {v!r}")
  if len(set(vals)) != len(vals):
    raise UserError(f"{what} holds duplicates: {vals}")
  return vals


@dataclasses.dataclass(frozen=True)
class FrontierModels:
  """sft: SFT on the task (the reference p); ppo: PPO from it with the task reward.

  PPO's reward is every method's: PPO trains on it, the value models regress
  on it, Transfer Q* and ARGS score with it, best-of-n ranks by it. Its task,
  prompt length, response limit and sampling are every decode's.
  """
  sft: SFT
  ppo: PPO

  def check(self) -> None:
    if self.ppo.model.config != self.sft.model.config:
      raise UserError("SFT.model and PPO.model must be the same model config (PPO starts from "
                      "SFT)")
    if self.ppo.kl_target is not None:
      raise UserError("the frontier sweeps a fixed beta: set PPO.kl_target = None")


@dataclasses.dataclass(frozen=True)
class FrontierTraining:
  """The training budget: steps and optimizers of SFT, the PPO runs and the value models.

  The value models (CD-FUDGE's scalar head, CD-Q's Q-head) train on
  `value_batch_size` prompts a step; CD-Q copies its target network every
  `cdq_target_period` steps, with output head `cdq_output_head` and advantage
  shrinkage `cdq_advantage_l2` (see training/value.py).
  """
  sft_steps: int
  ppo_steps: int
  value_steps: int
  sft_optimizer: stages.OptimizerSpec
  ppo_optimizer: stages.OptimizerSpec
  value_optimizer: stages.OptimizerSpec
  trainer_config: trainer_lib.TrainerConfig = trainer_lib.TrainerConfig()
  value_batch_size: int = 32
  cdq_target_period: int = 10
  cdq_output_head: str = "lm+scalar:dueling"
  cdq_advantage_l2: float = 3e-2

  def check(self) -> None:
    check_counts("FrontierTraining", sft_steps=self.sft_steps, ppo_steps=self.ppo_steps,
                 value_steps=self.value_steps, value_batch_size=self.value_batch_size,
                 cdq_target_period=self.cdq_target_period)


@dataclasses.dataclass(frozen=True)
class FrontierMethods:
  """The methods compared (`methods`, from METHODS) and the grid of each.

  ppo: PPO at every beta of `betas`; dera: DeRa between p and the PPO model at
  `aligned_beta` at every lambda; best_of_n: every n of `best_of_n`;
  cd_token_fudge / cd_token_q: token-wise CD at every beta of `cd_betas`, over
  the top `cd_top_k` of p (FUDGE) or each of `cd_q_top_k` (Q-head; 0 = the
  whole vocabulary); cd_block: blockwise CD with each K of `block_candidates`
  blocks of `block_length` tokens; tq_direct: Transfer Q* (baseline: the PPO
  model at `aligned_beta`) at every alpha of `tq_alphas` in
  `tq_alpha_convention` ('paper': p exp(Q / alpha); 'authors': log p + alpha
  Q), top `tq_top_k`, rollouts of `tq_horizon` tokens; args: ARGS at every
  weight of `args_weights` over the top `args_top_k`.
  """
  methods: Sequence[str] = METHODS
  betas: Sequence[float] = (0.3, 0.1, 0.03)
  aligned_beta: float = 0.1
  lambdas: Sequence[float] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
  best_of_n: Sequence[int] = (1, 2, 4, 8, 16, 32)
  cd_betas: Sequence[float] = (3.0, 1.0, 0.3)
  cd_top_k: int = 10
  cd_q_top_k: Union[Sequence[int], int] = (10, 0)
  block_candidates: Sequence[int] = (2, 4, 8)
  block_length: int = 4
  tq_alphas: Sequence[float] = (10.0, 10 / 3, 1.0)
  tq_alpha_convention: str = "paper"
  tq_top_k: int = 10
  tq_horizon: int = 16
  args_weights: Sequence[float] = (0.3, 1.0, 3.0)
  args_top_k: int = 10

  def checked(self, vocab_size: int) -> "FrontierMethods":
    """These settings with every grid checked and normalised (lists; best_of_n sorted)."""
    owner = "FrontierMethods"
    methods = list(self.methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods or len(set(methods)) != len(methods):
      raise UserError(f"{owner}.methods must be distinct names from {METHODS}, got {methods}")
    betas = check_grid(f"{owner}.betas", self.betas, positive=True)
    lambdas = LambdaGrid.of(self.lambdas, f"{owner}.lambdas", minimum=0.0,
                            why="lambda = 0 is the SFT model").list()
    best_of_n = sorted(check_grid(f"{owner}.best_of_n", self.best_of_n, integer=True))
    cd_betas = check_grid(f"{owner}.cd_betas", self.cd_betas, positive=True)
    blocks = check_grid(f"{owner}.block_candidates", self.block_candidates, integer=True)
    if self.tq_alpha_convention not in ALPHA_CONVENTIONS:
      raise UserError(f"{owner}.tq_alpha_convention must be one of {ALPHA_CONVENTIONS}, got "
                      f"{self.tq_alpha_convention!r}")
    # NOTE: under 'paper' alpha divides Q (the KL weight), so 0 is not a setting.
    tq_alphas = check_grid(f"{owner}.tq_alphas", self.tq_alphas,
                           positive=self.tq_alpha_convention == "paper", nonneg=True)
    args_weights = check_grid(f"{owner}.args_weights", self.args_weights)
    controlled.check_top_k(self.cd_top_k, vocab_size, f"{owner}.cd_top_k")
    q_top_ks = self.q_top_ks
    if not q_top_ks or len(set(q_top_ks)) != len(q_top_ks):
      raise UserError(f"{owner}.cd_q_top_k must be distinct candidate counts (0 = the whole "
                      f"vocabulary), got {self.cd_q_top_k!r}")
    for k in q_top_ks:
      if k != 0:
        controlled.check_top_k(k, vocab_size, f"{owner}.cd_q_top_k")
    controlled.check_top_k(self.tq_top_k, vocab_size, f"{owner}.tq_top_k")
    controlled.check_top_k(self.args_top_k, vocab_size, f"{owner}.args_top_k")
    controlled.check_at_least_one(f"{owner}.block_length (M)", self.block_length)
    controlled.check_at_least_one(f"{owner}.tq_horizon (H)", self.tq_horizon)
    if self.uses_aligned(methods) and self.aligned_beta not in betas:
      raise UserError(f"{owner}.aligned_beta = {self.aligned_beta} (the DeRa and Transfer Q* "
                      f"baseline) is not one of {owner}.betas {betas}")
    return dataclasses.replace(
        self, methods=methods, betas=betas, lambdas=lambdas, best_of_n=best_of_n,
        cd_betas=cd_betas, block_candidates=blocks, tq_alphas=tq_alphas,
        args_weights=args_weights)

  @property
  def q_top_ks(self) -> list:
    """The Q-head's candidate counts: one or several; 0 = the whole vocabulary."""
    k = self.cd_q_top_k
    return [k] if isinstance(k, int) else list(k)

  @staticmethod
  def uses_aligned(methods) -> bool:
    """Whether the methods decode with the PPO model at aligned_beta (DeRa, Transfer Q*)."""
    return "dera" in methods or "tq_direct" in methods


def check_all(models: FrontierModels, training: FrontierTraining, methods: FrontierMethods,
              evaluation) -> FrontierMethods:
  """Every setting of the study, before any compute; returns the methods' checked grids."""
  checked = methods.checked(models.sft.model.vocab_size)
  training.check()
  evaluation.check()
  models.check()
  return checked
