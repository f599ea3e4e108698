"""Best-of-n: n samples per prompt in one call, scored by any reward callable.

The sampler function must prefill each prompt once and share that state among
its n rows (`sampler.generate` and `dera.sample_mixture` both do), so the
prompt is never re-encoded per sample.
"""

from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np

from realign_jax.decoding import sampler
from realign_jax.plumbing.errors import UserError

RewardFn = Callable[[Sequence[Any], Sequence[Any]], Any]  # (prompts, responses) -> scores


class BestOfNResult(NamedTuple):
  best_tokens: np.ndarray  # [B, T]
  best_index: np.ndarray  # [B] which of the n samples won
  scores: np.ndarray  # [B, n]
  samples: sampler.SampleOutput  # all B * n rows, prompt-major


def trim(tokens: np.ndarray, eos_id: int = sampler.EOS_ID, pad_id: int = sampler.PAD_ID) -> list:
  """Token ids up to (excluding) the first EOS or pad (the model's ids; default T5's)."""
  out = []
  for t in np.asarray(tokens).tolist():
    if t in (eos_id, pad_id):
      break
    out.append(t)
  return out


def best_of_n(sample_fn: Callable[..., sampler.SampleOutput], inputs, rng, *, n: int,
              reward_fn: RewardFn, prompts: Optional[Sequence[Any]] = None,
              detokenize: Optional[Callable[[list], Any]] = None,
              eos_id: int = sampler.EOS_ID, pad_id: int = sampler.PAD_ID) -> BestOfNResult:
  """Draws n samples per prompt and keeps the highest-scoring one.

  Args:
    sample_fn: `sample_fn(inputs, rng, num_samples) -> SampleOutput` with
      B * num_samples rows, row b * n + j being sample j of prompt b.
    inputs: [B, Li] prompt ids.
    rng: PRNG key.
    n: samples per prompt (>= 1).
    reward_fn: `(prompts, responses) -> scores`, one score per response.
    prompts: what reward_fn receives as prompts (default: the prompt id rows).
    detokenize: maps a trimmed token list to what reward_fn receives as a
      response (default: the token list itself).
    eos_id, pad_id: the model's ids (`config.tokens`; default T5's), for `trim`.

  Returns:
    BestOfNResult; ties go to the lowest sample index.
  """
  if not isinstance(n, (int, np.integer)) or n < 1:
    raise UserError(f"best-of-n needs n >= 1, got {n}")
  out = sample_fn(inputs, rng, int(n))
  tokens = np.asarray(out.tokens)
  b = np.asarray(inputs).shape[0]
  if prompts is None:
    prompts = [trim(row, eos_id, pad_id) for row in np.asarray(inputs)]
  if len(prompts) != b:
    raise UserError(f"best-of-n got {len(prompts)} prompts for {b} input rows")
  responses = [trim(row, eos_id, pad_id) for row in tokens]
  if detokenize is not None:
    responses = [detokenize(r) for r in responses]
  rep_prompts = [p for p in prompts for _ in range(n)]
  scores = np.asarray(reward_fn(rep_prompts, responses), np.float64).reshape(-1)
  if scores.shape[0] != b * n:
    raise UserError(f"reward returned {scores.shape[0]} scores for {b * n} responses")
  if not np.all(np.isfinite(scores)):
    bad = int(np.flatnonzero(~np.isfinite(scores))[0])
    raise UserError(f"reward returned a non-finite score ({scores[bad]}) for response {bad}")
  scores = scores.reshape(b, n)
  best = np.argmax(scores, axis=1)
  best_tokens = tokens.reshape(b, n, -1)[np.arange(b), best]
  return BestOfNResult(best_tokens, best, scores, out)
