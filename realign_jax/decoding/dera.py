"""Decoding-time realignment (DeRa, Liu et al. 2024, Algorithm 1) as step composition.

Logit mixing: next-token logits `sum_m w_m h_m` (DeRa: w = (1 - lam, lam) over
(reference, aligned); several aligned models, Appendix B of the paper:
w = (1 - sum_i lam_i, lam_1, ..., lam_M), `multi_sweep`), mixed in float32
whatever the params' dtype, with the weights given PER ROW, so a sweep over K
lambdas (or weight vectors) is one batched call.
By Proposition 1 of the paper the sampled distribution is
normalise(p_ref * (p_aligned / p_ref) ** lam).

Weight mixing: params `lam * theta_aligned + (1 - lam) * theta_ref`.
"""

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from realign_jax.decoding import sampler
from realign_jax.plumbing.errors import UserError
from realign_jax.models.api import LanguageModel

REF, ALIGNED = 0, 1


@dataclasses.dataclass(frozen=True)
class Component:
  """One model of a mixture: its LanguageModel and params."""
  lm: LanguageModel
  params: Any


def check_lambdas(lambdas: Sequence[float]) -> list:
  out = []
  for lam in lambdas:
    lam = float(lam)
    if not math.isfinite(lam):
      raise UserError(f"lambda must be a finite real number, got {lam}")
    out.append(lam)
  if not out:
    raise UserError("the lambda list is empty")
  return out


def check_vocabularies(components: Sequence[Component]) -> None:
  """All mixed models must share one vocabulary: checked before any compute."""
  sizes = [c.lm.vocab_size for c in components]
  for i, s in enumerate(sizes[1:], 1):
    if s != sizes[0]:
      raise UserError(f"models have different vocabulary sizes: model 0 has {sizes[0]}, "
                      f"model {i} has {s}; logits cannot be mixed")


def dera_weights(lam) -> jax.Array:
  """[B] lambdas -> [2, B] weights over (reference, aligned)."""
  lam = jnp.asarray(lam, jnp.float32)
  return jnp.stack([1.0 - lam, lam])


def check_lambda_vectors(vectors: Sequence[Sequence[float]], num_aligned: int) -> list:
  """Appendix B weight vectors: finite, one weight per aligned model, distinct; one-line errors."""
  if isinstance(vectors, (str, bytes)) or not isinstance(vectors, Sequence):
    raise UserError(f"lambda_vectors must be a list of weight lists, got {vectors!r}")
  out = []
  for i, vec in enumerate(vectors):
    if isinstance(vec, (str, bytes)) or not isinstance(vec, Sequence):
      raise UserError(f"lambda_vectors[{i}] must be a list of {num_aligned} weights (one per "
                      f"aligned model), got {vec!r}")
    if len(vec) != num_aligned:
      raise UserError(f"lambda_vectors[{i}] = {list(vec)} has {len(vec)} weights but there are "
                      f"{num_aligned} aligned models: give one weight per aligned model")
    try:
      out.append(check_lambdas(vec))
    except (TypeError, ValueError) as e:
      raise UserError(f"lambda_vectors[{i}] must hold numbers, got {list(vec)!r}") from e
  if not out:
    raise UserError("the lambda_vectors list is empty")
  dup = [v for i, v in enumerate(out) if v in out[:i]]
  if dup:
    raise UserError(f"lambda_vectors has duplicates: {dup[0]}")
  return out


def multi_weights(lambda_rows) -> jax.Array:
  """[B, M] per-row weights of M aligned models -> [1 + M, B] over (reference, aligned...).

  Appendix B of the paper: h = sum_i lam_i h_i + (1 - sum_i lam_i) h_ref. With
  M = 1 this is `dera_weights`.
  """
  lam = jnp.asarray(lambda_rows, jnp.float32)
  return jnp.concatenate([(1.0 - jnp.sum(lam, axis=1))[None], lam.T], axis=0)


def prefill(components: Sequence[Component], inputs, max_new_tokens: int):
  """Prefills every model once. Returns the mixture's cache (first tokens included)."""
  caches, firsts = [], []
  for c in components:
    cache, first = c.lm.prefill(c.params, inputs, max_new_tokens)
    caches.append(cache)
    firsts.append(first)
  return {"models": tuple(caches), "first": jnp.stack(firsts), "t": jnp.zeros((), jnp.int32)}


def repeat(cache, n: int):
  """Shares each prompt's prefilled state among n consecutive rows."""
  return {"models": tuple(sampler.repeat_cache(c, n) for c in cache["models"]),
          "first": jnp.repeat(cache["first"], n, axis=1), "t": cache["t"]}


def mixed_step(components: Sequence[Component], weights):
  """A sampler step over the weighted sum of the components' logits.

  Args:
    components: the models (same vocabulary).
    weights: [M] or [M, B] float weights (per row for sweeps).

  Returns:
    `step(tokens [B], cache) -> (MixedLogits, cache)`; the first call feeds each
    model its own first token from prefill (T5 and decoder-only can be mixed).
  """
  weights = jnp.asarray(weights, jnp.float32)

  def step(tokens, cache):
    new_caches, logits = [], []
    for m, (c, mc) in enumerate(zip(components, cache["models"])):
      tok = jnp.where(cache["t"] == 0, cache["first"][m], tokens)
      lg, mc = c.lm.step(c.params, tok, mc)
      logits.append(lg.astype(jnp.float32))
      new_caches.append(mc)
    comps = jnp.stack(logits)  # [M, B, V]
    w = weights if weights.ndim == 2 else weights[:, None]
    # NOTE: an explicit weighted sum, not a dot: with w = (1, 0) the result is
    # bit-identical to the first model's logits.
    mixed = sum(w[m][:, None] * comps[m] for m in range(comps.shape[0]))
    return sampler.MixedLogits(mixed, comps), {"models": tuple(new_caches),
                                                "first": cache["first"], "t": cache["t"] + 1}
  return step


def shared_tokens(components: Sequence[Component]):
  """The special ids every component records (one line naming both sets when they differ)."""
  first = sampler.tokens_of(components[0].lm)
  for i, c in enumerate(components[1:], 1):
    if sampler.tokens_of(c.lm) != first:
      raise UserError(f"the models being combined record different special token ids: "
                      f"{first.describe()} (model 0) vs {sampler.tokens_of(c.lm).describe()} "
                      f"(model {i})")
  return first


def sample_mixture(components: Sequence[Component], weights, inputs, rng,
                   config: sampler.SamplingConfig, *, num_samples: int = 1, row_ids=None,
                   reference_index: Optional[int] = REF, with_components: bool = True):
  """Samples from softmax(sum_m w_m h_m): prefill once, then one while_loop (call in jit).

  `weights` is [M] or [M, B * num_samples]. The ids are the models' own
  (`shared_tokens`, `sampler.with_tokens`).
  """
  config = sampler.with_tokens(config, shared_tokens(components))
  cache = prefill(components, inputs, config.max_new_tokens)
  cache = repeat(cache, num_samples)
  b = inputs.shape[0] * num_samples
  step = mixed_step(components, weights)
  return sampler.sample_loop(step, cache, jnp.zeros((b,), jnp.int32), rng, config,
                             row_ids=row_ids, reference_index=reference_index,
                             with_components=with_components)


def dera_sweep(ref: Component, aligned: Component, inputs, lambdas, rng,
               config: sampler.SamplingConfig, *, seeds=None, num_samples: int = 1):
  """All lambdas in ONE batched call.

  Rows are ordered (prompt b, sample j, lambda k) -> (b * n + j) * K + k. Each
  prompt is prefilled once and shared by its n * K rows. Row (b, j, k) draws
  with row seed `seeds[b] * n + j` (default seeds[b] = b), exactly as row
  b * n + j of a separate call with lambda k, so the sweep reproduces K
  separate calls token for token.
  """
  lambdas = jnp.asarray(lambdas, jnp.float32)
  return multi_sweep(ref, [aligned], inputs, lambdas[:, None], rng, config, seeds=seeds,
                     num_samples=num_samples)


def multi_sweep(ref: Component, aligned: Sequence[Component], inputs, lambda_vectors, rng,
                config: sampler.SamplingConfig, *, seeds=None, num_samples: int = 1):
  """Multi-model DeRa (Appendix B): all K weight vectors in ONE batched call.

  `lambda_vectors` [K, M] holds one weight per aligned model; row (b, j, k)
  samples from softmax(sum_i lam_ki h_i + (1 - sum_i lam_ki) h_ref), with
  the row order and row seeds of `dera_sweep` (the M = 1 case). The output's
  components are (reference, aligned_1, ..., aligned_M); the KL is to the reference.
  """
  lambda_vectors = jnp.asarray(lambda_vectors, jnp.float32)
  k = lambda_vectors.shape[0]
  b = inputs.shape[0]
  seeds = jnp.arange(b, dtype=jnp.int32) if seeds is None else jnp.asarray(seeds, jnp.int32)
  sample_ids = (seeds[:, None] * num_samples + jnp.arange(num_samples)[None, :]).reshape(-1)
  lam_rows = jnp.tile(lambda_vectors, (b * num_samples, 1))  # [B * n * K, M]
  row_ids = jnp.repeat(sample_ids, k)
  return sample_mixture([ref, *aligned], multi_weights(lam_rows), inputs, rng, config,
                        num_samples=k * num_samples, row_ids=row_ids)


# ---- weight mixing ------------------------------------------------------------
def check_same_architecture(a, b, names=("aligned", "reference")) -> None:
  """UserError naming the first parameter whose path or shape differs."""
  fa = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(a)[0]}
  fb = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(b)[0]}
  for key in sorted(set(fa) | set(fb)):
    if key not in fa or key not in fb:
      missing = names[0] if key not in fa else names[1]
      raise UserError(f"weight mixing needs one architecture: parameter {key} is missing "
                      f"from the {missing} model")
    if tuple(fa[key].shape) != tuple(fb[key].shape):
      raise UserError(f"weight mixing needs one architecture: parameter {key} has shape "
                      f"{tuple(fa[key].shape)} in the {names[0]} model and "
                      f"{tuple(fb[key].shape)} in the {names[1]} model")


def mix_weights(aligned_params, ref_params, lam: float):
  """theta = lam * theta_aligned + (1 - lam) * theta_ref, computed in float32."""
  check_same_architecture(aligned_params, ref_params)
  lam = float(check_lambdas([lam])[0])
  return jax.tree_util.tree_map(
      lambda a, r: (lam * a.astype(jnp.float32) + (1.0 - lam) * r.astype(jnp.float32)
                    ).astype(a.dtype), aligned_params, ref_params)

