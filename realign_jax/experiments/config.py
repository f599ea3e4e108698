"""The settings every study shares: its evaluation and its run options, and their checks.

Each study's entry point takes `model_dir` and a few frozen groups of
settings (its own `config.py`: the models, the training budget, the grid it
compares on), plus these two:

  length_reward.evaluation = @StudyEvaluation()
  StudyEvaluation.num_prompts = 128
  length_reward.options = @StudyOptions()

Every group is gin-configurable (`experiments/configurables.py`) and is
checked before any compute; a message names the gin parameter
(`StudyEvaluation.num_prompts must be an integer >= 1, got 0`).
"""

import dataclasses
import math

from realign_jax.plumbing.errors import UserError


def check_counts(owner: str, **counts) -> None:
  """Each count an integer >= 1, else a UserError naming `owner.name`."""
  for name, v in counts.items():
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise UserError(f"{owner}.{name} must be an integer >= 1, got {v!r}")


def check_beta(owner: str, beta: float) -> float:
  """A base KL weight: a finite number > 0."""
  if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (
      beta > 0 and math.isfinite(beta)):
    raise UserError(f"{owner}.beta must be a finite number > 0, got {beta}")
  return float(beta)


@dataclasses.dataclass(frozen=True)
class StudyEvaluation:
  """What every decode of a study shares.

  The first `num_prompts` prompts of `split`, `num_samples` samples each,
  decoded `batch_size` prompts at a time with row seeds from `seed`: every
  model of the study is sampled on the same prompts with the same seeds.
  """
  num_prompts: int = 64
  num_samples: int = 2
  batch_size: int = 32
  split: str = "validation"
  seed: int = 0

  def check(self) -> None:
    check_counts("StudyEvaluation", num_prompts=self.num_prompts,
                 num_samples=self.num_samples, batch_size=self.batch_size)


@dataclasses.dataclass(frozen=True)
class StudyOptions:
  """How a study runs, not what it computes (no stage records these).

  compilation_cache: keep compiled programs in MODEL_DIR/jax_cache (see
    `stages.enable_compilation_cache`); progress: the decodes' progress bars.
  """
  compilation_cache: bool = True
  progress: bool = True

  def start(self, model_dir: str) -> None:
    """What a study does first, once its settings are checked."""
    from realign_jax.experiments import stages  # NOTE: lazy: JAX and orbax
    if self.compilation_cache:
      stages.enable_compilation_cache(stages.compilation_cache_dir(model_dir))


def check_model_dir(model_dir: str) -> None:
  if not model_dir:
    raise UserError("MODEL_DIR is empty")


def describe_model(algorithm) -> str:
  """`T5Config(vocab_size=..., ...)`: the model config of an algorithm, as reports print it."""
  c = algorithm.model.config
  return f"{type(c).__name__}({', '.join(f'{k}={v}' for k, v in dataclasses.asdict(c).items())})"
