r"""Synthetic preference pairs: two samples per prompt from a policy, labelled by a gold reward.

For toy studies where no human labels exist: each prompt is prefilled once,
two responses are drawn with the one sampler (`sampler.generate`,
num_samples=2), both are scored by a gold reward `(prompts, responses) ->
scores`, and the higher-scoring one becomes `chosen`. Pairs whose scores tie,
whose texts are identical, or with an empty response are skipped and counted.
The output is a preference JSONL (`preferences.py` schema), written
atomically.

Row i of the output depends only on (seed, prompt index), not on the batch
size: a prompt's two samples use row seeds 2 * index and 2 * index + 1. The
batches go through the decode binary's loop (`decode.decode_batches`): on
several hosts each samples its share of them, every host gets every pair, and
process 0 alone writes the file, the one a single process writes.

A binary (prompts from a task's splits, the policy from a run directory), so it
sits on the binaries' floor beside decode.py, whose loading it shares:

  python -m realign_jax.synthetic_preferences \
      --gin_file=configs/data/synthetic_preferences_tiny.gin \
      --gin.POLICY_CHECKPOINT="'SFT_DIR'" --gin.OUTPUT_DIR="'P'"
"""

from realign_jax import cli

cli.precheck(__name__)  # NOTE: before the heavy imports (see cli.py)

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from absl import logging
import numpy as np

from realign_jax import decode_methods as methods_lib
from realign_jax.data import pipeline
from realign_jax.data import preferences
from realign_jax.data import vocab as vocab_lib
from realign_jax.decoding import sampler
from realign_jax.errors import UserError

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


def encode_prompts(vocab, prompts: Sequence[str], input_length: int) -> np.ndarray:
  """[N, input_length] prompt ids (`pipeline.fit_prompts`); over-long prompts are cut (warned)."""
  ids = vocab_lib.encode_many(vocab, list(prompts))
  too_long = sum(len(x) > input_length - 1 for x in ids)
  if too_long:
    logging.warning("%d of %d prompts are longer than input_length - 1 = %d tokens and were "
                    "truncated", too_long, len(ids), input_length - 1)
  return pipeline.fit_prompts(ids, input_length, vocab_lib.special_tokens(vocab))


@functools.lru_cache(maxsize=8)
def _pair_sampler(lm, config: sampler.SamplingConfig):
  """A jitted `(params, inputs, seeds, rng) -> (tokens, lengths)`: two samples per prompt.

  `seeds` are the prompts' indices; sample j of prompt i draws with row seed
  2 * i + j, so a pair does not depend on the batch (or process) it falls in.
  """
  def run(params, inputs, seeds, rng):
    row_ids = (seeds[:, None] * 2 + jnp.arange(2, dtype=seeds.dtype)[None]).reshape(-1)
    out = sampler.generate(lm, params, inputs, rng, config, num_samples=2, row_ids=row_ids)
    return out.tokens, out.lengths  # NOTE: only what the rows need crosses hosts
  return jax.jit(run)


@dataclasses.dataclass
class PairSampling(methods_lib.DecodeMethod):
  """The pair sampler as a decode method, so that `decode.decode_batches` runs its batches.

  Its rows are one per prompt, {index, texts (the two responses), length};
  they are labelled (`label_pairs`) after the loop, in prompt order.
  """
  lm: Any
  params: Any
  config: sampler.SamplingConfig

  name = "synthetic pairs"

  def runners(self, comps, rewards, sampling, num_samples) -> list:
    return [methods_lib.Runner(_pair_sampler(self.lm, self.config), (self.params,))]

  def rows(self, batch, prompts, vocab, n, seed, sampling) -> list:
    tokens, lengths = batch.outs[0]
    b = len(batch.idx)
    tokens = np.asarray(tokens).reshape(-1, 2, tokens.shape[-1])[:b]
    lengths = np.asarray(lengths).reshape(-1, 2)[:b]
    return [{"index": int(i), "texts": [vocab_lib.decode(vocab, t) for t in pair],
             "length": int(lens.sum())}
            for i, pair, lens in zip(batch.idx, tokens, lengths)]


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
  stats, rows = _sample_and_label(
      lm=lm, params=params, prompts=prompts, gold_reward=gold_reward, output_file=output_file,
      sampling=sampling, input_length=input_length, batch_size=batch_size, seed=seed,
      vocab_path=vocab_path)
  _write(output_file, rows, stats)
  return stats


def _write(output_file: str, rows: list, stats: BuildStats) -> None:
  """Process 0 writes the pairs (atomically); every process logs the counts."""
  if jax.process_index() == 0:
    preferences.write_preference_jsonl(output_file, rows)
  log = logging.warning if stats.skipped else logging.info
  log("%s: %d pairs from %d prompts; skipped %d ties, %d identical, %d empty", output_file,
      stats.pairs, stats.prompts, stats.ties, stats.identical, stats.empty)


def _sample_and_label(*, lm, params, prompts, gold_reward, output_file, sampling, input_length,
                      batch_size, seed, vocab_path) -> tuple:
  """(stats, rows): the labelled pairs of `build_synthetic_preferences`, not yet written."""
  if not prompts:
    raise UserError("no prompts to build synthetic preferences from")
  if batch_size < 1:
    raise UserError(f"batch_size must be >= 1, got {batch_size}")
  vocab = vocab_lib.load_vocabulary(vocab_path)
  vocab_lib.check_model_tokens(vocab, lm.config, "the policy")
  inputs = encode_prompts(vocab, prompts, input_length)
  # NOTE: the decode binary's batch loop: on several processes each samples its
  # share of the batches and every process gets every pair, in prompt order.
  from realign_jax.decode import decode_batches  # pylint: disable=g-import-not-at-top
  method = PairSampling(lm, params, sampling)
  pairs, timing = decode_batches(method, method.runners({}, {}, sampling, 2), inputs, prompts,
                                 vocab, n=2, batch_size=batch_size, seed=seed, sampling=sampling,
                                 progress=False)
  stats, rows = BuildStats(prompts_here=timing["prompts_here"]), []
  # NOTE: labelled batch_size prompts at a time, as they were sampled: a learned
  # gold reward scores batches of the size it was set up for.
  for start in range(0, len(pairs), batch_size):
    chunk = pairs[start:start + batch_size]
    rows += label_pairs([prompts[p["index"]] for p in chunk], [p["texts"][0] for p in chunk],
                        [p["texts"][1] for p in chunk], gold_reward, stats)
  if not rows:
    raise UserError(f"no usable pairs from {stats.prompts} prompts ({stats.ties} ties, "
                    f"{stats.identical} identical, {stats.empty} empty); nothing written to "
                    f"{output_file}")
  return stats, rows


# ---- the builder binary ---------------------------------------------------------
def build_preference_dir(
    *, policy_checkpoint: str, output_dir: str, gold_reward: Any,
    task: str = "builtin_summarize", data_dir: Optional[str] = None,
    num_prompts: Optional[dict] = None,
    sampling: sampler.SamplingConfig = sampler.SamplingConfig(), input_length: int = 96,
    batch_size: int = 32, seed: int = 0, vocab_path: Optional[str] = None) -> dict:
  """Writes OUTPUT_DIR/{train,validation,test}.jsonl for the `preferences` task.

  Prompts are the `inputs` of `task`'s splits (the first num_prompts[split]);
  responses come from the policy run directory `policy_checkpoint`;
  `gold_reward` is a `rewards.base.Reward` or a plain
  `(prompts, responses) -> scores` callable.
  """
  import flax.linen as nn
  from realign_jax.decode import host_mesh, load_component
  from realign_jax.parallel import partitioning
  from realign_jax.rewards import base

  num_prompts = dict(num_prompts or {"train": 512, "validation": 128, "test": 128})
  unknown = sorted(set(num_prompts) - {"train", "validation", "test"})
  if unknown:
    raise UserError(f"num_prompts has unknown splits {unknown}; use train, validation, test")
  if isinstance(gold_reward, base.Reward):
    reward = gold_reward
    gold_reward = lambda p, r: base.score_texts(reward, p, r)
  elif not callable(gold_reward):
    raise UserError(f"gold_reward must be a Reward or a callable, got {type(gold_reward).__name__}")
  # NOTE: on several hosts each samples its share of the prompt batches on its
  # own devices (see decode.host_mesh, decode.decode_batches); every host labels
  # every pair and process 0 alone writes the files.
  mesh, rules = host_mesh(), partitioning.logical_axis_rules()
  # NOTE: every split is sampled and labelled before any file is written, so a
  # split without usable pairs leaves no other split's file behind.
  stats, built = {}, {}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    policy = load_component(policy_checkpoint, mesh, rules)
    for split, n in num_prompts.items():
      prompts = [e["inputs"] for e in pipeline.text_examples(task, split, data_dir=data_dir,
                                                             limit=n)]
      out = f"{output_dir}/{split}.jsonl"
      stats[split], built[split] = _sample_and_label(
          lm=policy.lm, params=policy.params, prompts=prompts, gold_reward=gold_reward,
          output_file=out, sampling=sampling, input_length=input_length,
          batch_size=batch_size, seed=seed, vocab_path=vocab_path)
  for split, rows in built.items():
    _write(f"{output_dir}/{split}.jsonl", rows, stats[split])
  return stats


def main(argv: list) -> int:
  from realign_jax import gin_utils
  stats = gin_utils.call(gin_utils.configure_binary(
      argv, "build_preference_dir", build_preference_dir,
      extra=[(sampler.SamplingConfig, "SamplingConfig")]))
  for split, s in stats.items():
    if jax.process_count() > 1:
      print(f"{split}: process {jax.process_index()} of {jax.process_count()} sampled "
            f"{s.prompts_here} of {s.prompts} prompts")
    print(f"{split}: {s.pairs} pairs from {s.prompts} prompts (skipped {s.ties} ties, "
          f"{s.identical} identical, {s.empty} empty)")
  return 0


if __name__ == "__main__":
  from realign_jax import gin_utils as _gin_utils
  _gin_utils.run_main(main)
