"""The studies' samples: their evaluation prompts, a policy's (or DeRa's) rows, rows by key.

Every decode of a study goes through the one batch loop of
`realign_jax.inference` (`loop.sample` with `PolicySampling`): the same
prompts, the same row seeds, the reference's KL and the reward on each row.
"""

import dataclasses
import os
from typing import Any, Optional, Sequence

import numpy as np

from realign_jax.data import pipeline
from realign_jax.plumbing.errors import UserError
from realign_jax.experiments import stages
from realign_jax.experiments.config import StudyEvaluation
from realign_jax.inference import components, loop
from realign_jax.inference.methods_policy import PolicySampling

SAMPLES = "samples.jsonl"


def samples_file(result: dict) -> list:
  """A decode stage's output files (`StageRunner.run`'s `files`)."""
  del result
  return [SAMPLES]


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """What every decode of a study shares, as its stages record it."""
  task: str
  split: str
  num_prompts: int
  num_samples: int
  batch_size: int
  seed: int
  input_length: int
  max_new_tokens: int

  @classmethod
  def of(cls, evaluation: StudyEvaluation, *, task: str, input_length: int,
         max_new_tokens: int) -> "EvalSettings":
    return cls(task=task, split=evaluation.split, num_prompts=evaluation.num_prompts,
               num_samples=evaluation.num_samples, batch_size=evaluation.batch_size,
               seed=evaluation.seed, input_length=input_length, max_new_tokens=max_new_tokens)


def eval_inputs(ev: EvalSettings, vocab, data_dir=None) -> np.ndarray:
  """[num_prompts, input_length] ids of the first prompts of the eval split."""
  ex = pipeline.text_examples(ev.task, ev.split, data_dir=data_dir, limit=ev.num_prompts)
  if len(ex) < ev.num_prompts:
    raise UserError(f"StudyEvaluation.num_prompts is {ev.num_prompts} but task {ev.task} "
                    f"split {ev.split} holds only {len(ex)} examples")
  return pipeline.encode_batch(vocab, ex, input_length=ev.input_length,
                               target_length=ev.max_new_tokens)["inputs"]


@dataclasses.dataclass
class PolicySampler:
  """A study's policies sampled against its reference, on its evaluation prompts.

  `mesh` holds the decoded params (`loop.host_mesh()`: on several processes
  each decodes its own batches); every process gets every row.
  """
  lm: Any  # the LanguageModel of the reference and of every policy
  reference_dir: str
  inputs: np.ndarray  # [num_prompts, input_length]
  vocab: Any
  ev: EvalSettings
  sampling: Any  # the SamplingConfig
  reward: Any
  mesh: Any
  rules: Any
  progress: bool = True

  def rows(self, policy_dir: str, desc: str,
           lambdas: Optional[Sequence[float]] = None) -> list:
    """Rows of the policy in `policy_dir` (with `lambdas`: DeRa of the reference and it)."""
    ref = components.load_lm_params(self.reference_dir, self.lm, self.mesh, self.rules)
    pol = components.load_lm_params(policy_dir, self.lm, self.mesh, self.rules)
    method = PolicySampling(self.lm, pol, reference=ref, reward=self.reward, lambdas=lambdas)
    return loop.sample(method, self.inputs, self.vocab, num_samples=self.ev.num_samples,
                       batch_size=self.ev.batch_size, seed=self.ev.seed,
                       sampling=self.sampling, mesh=self.mesh, rules=self.rules,
                       progress=self.progress, desc=desc)


def write_samples(stage_dir: str, rows: list) -> None:
  stages.write_jsonl(os.path.join(stage_dir, SAMPLES), rows)


def read_samples(runner: stages.StageRunner, name: str) -> list:
  return stages.read_jsonl(os.path.join(runner.stage_dir(name), SAMPLES))


def rows_at(rows: Sequence[dict], lam: float) -> list:
  """The rows of a DeRa sweep at one lambda (none is an error)."""
  out = [r for r in rows if r["lam"] == lam]
  if not out:
    raise UserError(f"the DeRa sweep holds no rows at lambda {lam}")
  return out


def keyed(rows: Sequence[dict]) -> dict:
  """Rows by (prompt_index, sample): the same key is the same prompt and row seed."""
  return {(r["prompt_index"], r["sample"]): r for r in rows}


def identical_fraction(rows_a: Sequence[dict], rows_b: Sequence[dict]) -> float:
  """The share of rows_a whose tokens equal those of rows_b's row with the same key.

  NOTE: DeRa at lambda = 1 samples the aligned model with the same row seeds
  (at lambda = 0 the reference): identical tokens are a check of the pipeline.
  """
  a, b = keyed(rows_a), keyed(rows_b)
  return float(np.mean([a[k]["tokens"] == (b[k]["tokens"] if k in b else None) for k in a]))
