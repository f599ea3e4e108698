"""Pairwise accuracy, eq. (14) of the DeRa paper.

PairAcc(pi; D) = E_{(x, y_w, y_l) ~ D} 1( log pi(y_w|x) / |y_w| > log pi(y_l|x) / |y_l| ):
how often the length-normalised log-likelihood of the chosen response is
above the rejected one's (a strict inequality, so an exact tie counts as a
miss). |y| counts the response's tokens including its EOS, whose probability
is part of log pi(y|x).

`pairwise_accuracy` works on given log-probs (numpy); `make_pair_logprob_fn`
computes them with `LanguageModel`s in one jitted forward pass per side, for a
single model or a DeRa logit mixture sum_m w_m logits_m (e.g. w = (1 - lam, lam)
over (reference, aligned)); `pairwise_accuracy_on_rows` runs it over
preference rows.
"""

import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from realign_jax.data import pipeline
from realign_jax.data import vocab as vocab_lib
from realign_jax.decoding import sampler
from realign_jax.plumbing.errors import UserError
from realign_jax.evaluation import stats


def pairwise_accuracy(chosen_logprob, chosen_length, rejected_logprob, rejected_length) -> dict:
  """Eq. (14) from sequence log-likelihoods [N] and token counts [N].

  Returns:
    {"pairwise_accuracy", "pairwise_accuracy_se", "num_pairs"}.
  """
  lc, nc = np.asarray(chosen_logprob, np.float64), np.asarray(chosen_length, np.float64)
  lr, nr = np.asarray(rejected_logprob, np.float64), np.asarray(rejected_length, np.float64)
  if not lc.shape == nc.shape == lr.shape == nr.shape or lc.ndim != 1:
    raise ValueError("pairwise accuracy needs four [N] arrays of one shape")
  if lc.size == 0:
    raise UserError("pairwise accuracy over an empty set of pairs")
  if np.any(nc < 1) or np.any(nr < 1):
    raise UserError("pairwise accuracy: every response needs at least one token")
  if not (np.all(np.isfinite(lc)) and np.all(np.isfinite(lr))):
    raise UserError("pairwise accuracy: non-finite log-likelihoods")
  hits = (lc / nc > lr / nr).astype(np.float64)
  acc, se = stats.mean_and_stderr(hits)
  return {"pairwise_accuracy": acc, "pairwise_accuracy_se": se, "num_pairs": int(hits.size)}


def pairwise_accuracy_from_token_logprobs(chosen_lp, chosen_mask, rejected_lp,
                                          rejected_mask) -> dict:
  """Eq. (14) from per-token log-probs [N, T] and masks [N, T] (True at response tokens)."""
  cm, rm = np.asarray(chosen_mask, bool), np.asarray(rejected_mask, bool)
  return pairwise_accuracy(np.sum(np.where(cm, chosen_lp, 0.0), -1), cm.sum(-1),
                           np.sum(np.where(rm, rejected_lp, 0.0), -1), rm.sum(-1))


def make_pair_logprob_fn(lms: Sequence):
  """A jitted `fn(params_list, weights, inputs, chosen, rejected)` for models `lms`.

  Args (of fn):
    params_list: one params tree per model, in the order of `lms`.
    weights: [M] or [M, B] float32 logit-mixing weights (one model: [1.0]).
    inputs: [B, Li] prompts; chosen, rejected: [B, Lt] responses ending in EOS,
      right-padded with 0.

  Returns (of fn):
    (chosen log pi [B], chosen length [B], rejected log pi [B], rejected length [B]),
    log pi the sum of the mixture's per-token log-probs over real tokens.
  """
  lms = tuple(lms)
  if not lms:
    raise ValueError("make_pair_logprob_fn needs at least one model")
  sizes = {lm.vocab_size for lm in lms}
  if len(sizes) != 1:
    raise UserError(f"models have different vocabulary sizes {sorted(sizes)}; logits cannot "
                    f"be mixed")

  def side(params_list, w, inputs, targets):
    logits = [lm.forward(p, inputs, targets)["logits"].astype(jnp.float32)
              for lm, p in zip(lms, params_list)]  # M x [B, T, V]
    # NOTE: the same weighted sum of raw logits as decoding's mixed_step, without
    # pad as the sampler, so the scored distribution is exactly the one DeRa samples from.
    mixed = sum(w[m][:, None, None] * logits[m] for m in range(len(lms)))
    pad = sampler.tokens_of(lms[0]).pad_id
    logp = jax.nn.log_softmax(sampler.mask_pad(mixed, pad), axis=-1)
    tok = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, T]
    mask = targets != pad
    return jnp.sum(jnp.where(mask, tok, 0.0), -1), jnp.sum(mask, -1)

  def fn(params_list, weights, inputs, chosen, rejected):
    w = jnp.asarray(weights, jnp.float32)
    w = jnp.broadcast_to(w[:, None], (w.shape[0], inputs.shape[0])) if w.ndim == 1 else w
    lc, nc = side(params_list, w, inputs, chosen)
    lr, nr = side(params_list, w, inputs, rejected)
    return lc, nc, lr, nr

  return jax.jit(fn)


def pairwise_accuracy_on_rows(fn, params_list, weights, vocab, rows: Sequence[dict], *,
                              input_length: int, target_length: int, batch_size: int = 32,
                              where: str = "preference rows") -> dict:
  """Eq. (14) over {prompt, chosen, rejected} rows with `fn` from `make_pair_logprob_fn`.

  Every batch is padded to `batch_size` rows so `fn` compiles once. Responses
  longer than target_length - 1 tokens are truncated (their log-likelihood is
  then that of the prefix plus EOS); the count is in the result and logged.
  """
  if not rows:
    raise UserError(f"{where}: no preference rows")
  if batch_size < 1:
    raise UserError(f"batch_size must be >= 1, got {batch_size}")
  for i, r in enumerate(rows, 1):
    for field in ("prompt", "chosen", "rejected"):
      if not isinstance(r.get(field), str):
        raise UserError(f"{where} row {i}: missing field {field!r} (a string)")
  chosen_ids = vocab_lib.encode_many(vocab, [r["chosen"] for r in rows])
  rejected_ids = vocab_lib.encode_many(vocab, [r["rejected"] for r in rows])
  truncated = sum(len(c) > target_length - 1 or len(r) > target_length - 1
                  for c, r in zip(chosen_ids, rejected_ids))
  if truncated:
    logging.warning("%s: %d of %d pairs have a response longer than target_length - 1 = %d "
                    "tokens; scored on their truncation", where, truncated, len(rows),
                    target_length - 1)
  tokens = vocab_lib.special_tokens(vocab)
  inputs = pipeline.fit_prompts(vocab_lib.encode_many(vocab, [r["prompt"] for r in rows]),
                                input_length, tokens)
  chosen = pipeline.fit(chosen_ids, target_length, tokens)
  rejected = pipeline.fit(rejected_ids, target_length, tokens)
  outs = [[], [], [], []]
  n = len(rows)
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    full = np.concatenate([idx, np.full(batch_size - idx.size, idx[0])])
    res = jax.device_get(fn(params_list, weights, inputs[full], chosen[full], rejected[full]))
    for acc, r in zip(outs, res):
      acc.append(np.asarray(r)[:idx.size])
  lc, nc, lr, nr = (np.concatenate(o) for o in outs)
  out = pairwise_accuracy(lc, nc, lr, nr)
  out["num_truncated"] = int(truncated)
  return out
