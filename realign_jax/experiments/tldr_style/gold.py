"""The TL;DR-style study's gold reward: ROUGE-L F against the prompt's reference summary.

The gold reward, standing for summary quality, is the ROUGE-L F-measure of a
response against the reference summary of its prompt (the built-in corpus
pairs each docstring body with its human-written summary line; for TL;DR the
reference TL;DR). It is deterministic and independent of every trained model,
so it judges the policies without being the thing they optimise: PG optimises
the learned reward model, DPO the preference pairs, and the win rates are by
the gold judge (`evaluation.judges.RewardJudge`, higher ROUGE-L wins, equal
scores tie and count 1/2, the pair order randomised and swapped back).
"""

from typing import Callable, Sequence

import jax
import numpy as np

from realign_jax.plumbing.errors import UserError
from realign_jax.evaluation import judges, text_metrics

GOLD_NAME = "ROUGE-L F against the reference summary"


def gold_scores(references: Sequence[str], responses: Sequence[str]) -> np.ndarray:
  """r*(x, y) = ROUGE-L F(y, reference(x)): [N] references, [N] responses -> [N] float64."""
  if len(references) != len(responses):
    raise UserError(f"gold reward: {len(references)} references for {len(responses)} responses")
  return np.array([text_metrics.rouge_l(y, ref) for ref, y in zip(references, responses)],
                  np.float64)


def gold_judge() -> judges.RewardJudge:
  """The judge of every win rate; its `prompts` are the prompts' reference summaries."""
  return judges.RewardJudge(gold_scores, name="rouge_l_f")


def prompt_gold_fn(examples: Sequence[dict]) -> Callable:
  """(prompt texts, responses) -> gold scores, the reference looked up by prompt text."""
  refs = {e["inputs"]: e["targets"] for e in examples}

  def fn(prompts, responses):
    missing = [p for p in prompts if p not in refs]
    if missing:
      raise UserError(f"gold reward: no reference summary for prompt {missing[0][:60]!r}")
    return gold_scores([refs[p] for p in prompts], responses)
  return fn


class JittedReward:
  """A reward whose `score_tokens` runs compiled (decode rows score outside the sampler's jit)."""

  def __init__(self, reward):
    self.reward = reward
    self.score_tokens = jax.jit(reward.score_tokens)

  def params(self):
    return self.reward.params()
