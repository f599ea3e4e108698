"""Synthetic preference pairs: two samples per prompt from a policy, labelled by a gold reward.

For toy studies where no human labels exist: two responses per prompt are
drawn with the one sampler (`PolicySampling`, num_samples=2), both are
scored by a gold reward `(prompts, responses) -> scores`, and the
higher-scoring one becomes `chosen`. Pairs whose scores tie, whose texts are
identical, or with an empty response are skipped and counted. The output is
a preference JSONL (`data/preferences.py` schema), written atomically.

Row i of the output depends only on (seed, prompt index), not on the batch
size: a prompt's two samples use row seeds 2 * index and 2 * index + 1. The
batches go through the one loop (`loop.decode_batches`): on several hosts
each samples its share of them, every host gets every pair, and process 0
alone writes the file, the one a single process writes. The builder binary
is `realign_jax.synthetic_preferences`; the TL;DR study calls
`build_synthetic_preferences` directly.
"""

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from absl import logging

from realign_jax.data import preferences
from realign_jax.data import vocab as vocab_lib
from realign_jax.decoding import sampler
from realign_jax.plumbing.errors import UserError
from realign_jax.inference import loop
from realign_jax.inference.methods_policy import PolicySampling
from realign_jax.inference.prompts import encode_prompts
from realign_jax.rewards import base as rewards_base

RewardFn = Callable[[Sequence[str], Sequence[str]], Any]  # (prompts, responses) -> [N] scores


@dataclasses.dataclass
class BuildStats:
  prompts: int = 0
  pairs: int = 0
  ties: int = 0  # equal gold scores, different texts
  identical: int = 0  # both samples decode to the same text
  empty: int = 0  # a sample decodes to empty text (EOS first)
  prompts_here: int = 0  # prompts this process sampled (all of them on one process)

  @property
  def skipped(self) -> int:
    return self.ties + self.identical + self.empty


def gold_reward_fn(gold_reward: Any) -> RewardFn:
  """A `rewards.base.Reward` or a `(prompts, responses) -> scores` callable, as the callable."""
  if isinstance(gold_reward, rewards_base.Reward):
    reward = gold_reward
    return lambda p, r: rewards_base.score_texts(reward, p, r)
  if not callable(gold_reward):
    raise UserError(f"gold_reward must be a Reward or a callable, got {type(gold_reward).__name__}")
  return gold_reward


def label_pairs(prompts: Sequence[str], first: Sequence[str], second: Sequence[str],
                gold_reward: RewardFn, stats: BuildStats) -> list:
  """Preference rows from two responses per prompt; skips (and counts) unusable pairs."""
  n = len(prompts)
  scores = np.asarray(gold_reward([p for p in prompts for _ in range(2)],
                                  [r for pair in zip(first, second) for r in pair]),
                      np.float64).reshape(-1)
  if scores.shape[0] != 2 * n:
    raise UserError(f"gold reward returned {scores.shape[0]} scores for {2 * n} responses")
  bad = np.flatnonzero(~np.isfinite(scores))
  if bad.size:
    raise UserError(f"gold reward returned {scores[bad[0]]} for response {bad[0] % 2} of prompt "
                    f"{bad[0] // 2} ({prompts[bad[0] // 2][:60]!r})")
  scores = scores.reshape(n, 2)
  rows = []
  for p, a, b, (sa, sb) in zip(prompts, first, second, scores):
    stats.prompts += 1
    if not a.strip() or not b.strip():
      stats.empty += 1
    elif a == b:
      stats.identical += 1
    elif sa == sb:
      stats.ties += 1
    else:
      chosen, rejected = (a, b) if sa > sb else (b, a)
      rows.append({"prompt": p, "chosen": chosen, "rejected": rejected})
      stats.pairs += 1
  return rows


def build_synthetic_preferences(
    *, lm, params, prompts: Sequence[str], gold_reward: RewardFn, output_file: str,
    sampling: sampler.SamplingConfig = sampler.SamplingConfig(), input_length: int = 96,
    batch_size: int = 32, seed: int = 0, vocab_path: Optional[str] = None) -> BuildStats:
  """Samples two responses per prompt from (lm, params), labels them, writes a JSONL.

  Call inside the mesh and logical-axis rules the params live on
  (`loop.host_mesh()` on several hosts: each samples its own batches).

  Args:
    lm: the policy's `LanguageModel`.
    params: its params.
    prompts: prompt texts.
    gold_reward: `(prompts, responses) -> scores` on texts, higher is better.
    output_file: the preference JSONL to write (atomically, when complete).
    sampling: the sampler settings (temperature 1, no truncation by default).
    input_length: prompt length in tokens (longer prompts are cut).
    batch_size: prompts per sampler call (the last batch is padded).
    seed: sampling seed.
    vocab_path: sentencepiece model (None: the built-in one).

  Returns:
    Counts of prompts, written pairs and skipped ones (ties, identical, empty).
  """
  stats, rows = sample_and_label(
      lm=lm, params=params, prompts=prompts, gold_reward=gold_reward, output_file=output_file,
      sampling=sampling, input_length=input_length, batch_size=batch_size, seed=seed,
      vocab_path=vocab_path)
  write_pairs(output_file, rows, stats)
  return stats


def write_pairs(output_file: str, rows: list, stats: BuildStats) -> None:
  """Process 0 writes the pairs (atomically); every process logs the counts."""
  if jax.process_index() == 0:
    preferences.write_preference_jsonl(output_file, rows)
  log = logging.warning if stats.skipped else logging.info
  log("%s: %d pairs from %d prompts; skipped %d ties, %d identical, %d empty", output_file,
      stats.pairs, stats.prompts, stats.ties, stats.identical, stats.empty)


def sample_and_label(*, lm, params, prompts, gold_reward, output_file, sampling, input_length,
                     batch_size, seed, vocab_path) -> tuple:
  """(stats, rows): the labelled pairs of `build_synthetic_preferences`, not yet written."""
  if not prompts:
    raise UserError("no prompts to build synthetic preferences from")
  if batch_size < 1:
    raise UserError(f"batch_size must be >= 1, got {batch_size}")
  vocab = vocab_lib.load_vocabulary(vocab_path)
  vocab_lib.check_model_tokens(vocab, lm.config, "the policy")
  inputs = encode_prompts(vocab, prompts, input_length)
  method = PolicySampling(lm, params)
  samples, timing = loop.decode_batches(
      method, method.runners({}, {}, sampling, 2), inputs, prompts, vocab, n=2,
      batch_size=batch_size, seed=seed, sampling=sampling, progress=False)
  stats, rows = BuildStats(prompts_here=timing["prompts_here"]), []
  # NOTE: labelled batch_size prompts at a time, as they were sampled: a learned
  # gold reward scores batches of the size it was set up for.
  for start in range(0, len(samples) // 2, batch_size):
    chunk = samples[2 * start:2 * (start + batch_size)]
    rows += label_pairs([prompts[s["prompt_index"]] for s in chunk[::2]],
                        [s["response"] for s in chunk[::2]], [s["response"] for s in chunk[1::2]],
                        gold_reward, stats)
  if not rows:
    raise UserError(f"no usable pairs from {stats.prompts} prompts ({stats.ties} ties, "
                    f"{stats.identical} identical, {stats.empty} empty); nothing written to "
                    f"{output_file}")
  return stats, rows
