"""The one sampler: a jit-compiled `lax.while_loop` over a cached step callable.

`step(tokens [B], cache) -> (logits, cache)` is all the loop knows about a
model. `logits` is either an array [B, V] or a `MixedLogits` carrying the
per-model logits a mixture was built from (DeRa, several models), so the loop
can report each constituent's log-probs and the exact per-step KL to the
reference without a second pass.

Randomness is per row: row i at step t draws with
`fold_in(fold_in(rng, row_ids[i]), t)`, so a row's sample does not depend on
which other rows share the batch (a lambda sweep batched as one call gives the
same tokens as separate calls).

The pad id is never sampled (`mask_pad`): every distribution the loop samples
from or reports (log-probs, each component's log-probs, the KL) is over the
vocabulary without pad, renormalised.

Special ids: `SamplingConfig.eos_id` / `pad_id` are the model's
(`with_tokens(config, lm.config.tokens)`, which every decoder built on a model
applies: `generate`, DeRa, controlled decoding, TQ*, ARGS); None in a bare
`sample_loop` call means T5's (pad 0, eos 1).
"""

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from realign_jax.plumbing.errors import UserError
from realign_jax.models.config import SpecialTokens

# NOTE: T5's ids, the defaults of SpecialTokens (a model's own are config.tokens).
PAD_ID = SpecialTokens().pad_id
EOS_ID = SpecialTokens().eos_id


class MixedLogits(NamedTuple):
  """What a mixing step returns instead of a bare array."""
  logits: jax.Array  # [B, V] float32, the distribution to sample from (pre-temperature)
  components: jax.Array  # [M, B, V] float32, each model's logits


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static decoding settings (hashable: used as a jit static argument)."""

  max_new_tokens: int = 32
  temperature: float = 1.0
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1.0 = off
  greedy: bool = False
  eos_id: Optional[int] = None  # None: the model's (`with_tokens`)
  pad_id: Optional[int] = None

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise UserError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if not self.temperature > 0 or self.temperature != self.temperature:
      raise UserError(f"temperature must be > 0, got {self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise UserError(f"top_k must be >= 0, got {self.top_k}")

  @property
  def eos(self) -> int:
    return EOS_ID if self.eos_id is None else self.eos_id

  @property
  def pad(self) -> int:
    return PAD_ID if self.pad_id is None else self.pad_id


def tokens_of(lm) -> SpecialTokens:
  """A model's special ids (`lm.config.tokens`); T5's for a step-only model without a config."""
  return getattr(getattr(lm, "config", None), "tokens", None) or SpecialTokens()


def with_tokens(config: SamplingConfig, tokens: SpecialTokens) -> SamplingConfig:
  """`config` with the model's eos and pad ids; an explicit other id is a UserError."""
  for name in ("eos_id", "pad_id"):
    mine = getattr(config, name)
    if mine is not None and mine != getattr(tokens, name):
      raise UserError(f"SamplingConfig.{name}={mine} but the model's {name} is "
                      f"{getattr(tokens, name)} ({tokens.describe()}); leave it unset")
  return dataclasses.replace(config, eos_id=tokens.eos_id, pad_id=tokens.pad_id)


class SampleOutput(NamedTuple):
  tokens: jax.Array  # [B, T] int32, pad after EOS (and only there: pad is never sampled)
  logprobs: jax.Array  # [B, T] log q(y_t) under the sampled distribution; 0 after EOS
  lengths: jax.Array  # [B] number of generated tokens, EOS included
  model_logprobs: Optional[jax.Array]  # [M, B, T] each component's log p_m(y_t) (T = 1)
  kl: Optional[jax.Array]  # [B, T] full-vocabulary KL(q_t || p_ref,t); 0 after EOS


def mask_pad(logits, pad_id: int = PAD_ID):
  """[..., V] logits -> float32 with the pad id at -inf: padding is never a token.

  NOTE: a response ends at EOS and pad only fills what follows; the
  decoder-only teacher-forced pass masks `tokens != pad` and `best_of_n.trim`
  stops at pad. Every distribution a response is sampled from, scored under
  (`training.policy.logprobs_from_logits`) or compared with (KL) therefore
  excludes pad, so they all agree with what was sampled.
  """
  return logits.astype(jnp.float32).at[..., pad_id].set(-jnp.inf)


def process_logits(logits, config: SamplingConfig):
  """Temperature, top-k and top-p: [B, V] -> [B, V] float32 (-inf = excluded)."""
  logits = logits.astype(jnp.float32)
  if config.greedy:
    return logits
  logits = logits / config.temperature
  if config.top_k:
    kth = jax.lax.top_k(logits, config.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if config.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always).
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = before < config.top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def process_logits_rows(logits, temperature, top_p, greedy):
  """`process_logits` with the settings PER ROW (the server's slots): [B, V] -> [B, V] float32.

  temperature, top_p: [B] float32; greedy: [B] bool. A row gives what
  `process_logits` gives it with the same settings as a static config, bit for
  bit (top-p is applied only where top_p < 1, as there; no top-k).
  """
  logits = logits.astype(jnp.float32)
  scaled = logits / temperature[:, None]
  sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  keep = before < top_p[:, None]
  threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  nucleus = jnp.where(scaled < threshold, -jnp.inf, scaled)
  out = jnp.where((top_p < 1.0)[:, None], nucleus, scaled)
  return jnp.where(greedy[:, None], logits, out)


def step_keys(row_keys, t):
  """Each row's key at step t (scalar, or [B] per row): fold_in(row key, t)."""
  if jnp.ndim(t) == 0:
    return jax.vmap(lambda k: jax.random.fold_in(k, t))(row_keys)
  return jax.vmap(jax.random.fold_in)(row_keys, t)


def draw_rows(keys, logq, greedy):
  """`_draw` with greedy PER ROW ([B] bool): the argmax where greedy, a sample elsewhere."""
  return jnp.where(greedy, jnp.argmax(logq, axis=-1).astype(jnp.int32),
                   _draw(keys, logq, False))


def exact_kl(logq, logp):
  """Full-vocabulary KL(q || p) per row: [B, V] log-probs -> [B] (the loop's per-step KL)."""
  return _kl(logq, logp)


def _kl(logq, logp):
  """Full-vocabulary KL(q || p) per row, safe where q = 0: [B, V] -> [B]."""
  q = jnp.exp(logq)
  terms = jnp.where(q > 0, q * (logq - jnp.where(q > 0, logp, 0.0)), 0.0)
  return jnp.sum(terms, axis=-1)


def _draw(keys, logq, greedy):
  """One token per row from log-probs [B, V].

  NOTE: inverse-CDF sampling with ONE uniform per row (not Gumbel-max with V
  of them): drawing B x V random numbers per step dominated the step time
  of small models on a CPU.
  """
  if greedy:
    return jnp.argmax(logq, axis=-1).astype(jnp.int32)
  u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)  # [B]
  cdf = jnp.cumsum(jnp.exp(logq), axis=-1)
  # first index whose cdf exceeds u * total (total ~ 1; scaling guards rounding)
  idx = jnp.sum(cdf < (u * cdf[:, -1])[:, None], axis=-1)
  # never land on a zero-probability token (e.g. filtered by top-k) through rounding
  idx = jnp.minimum(idx, logq.shape[-1] - 1)
  ok = jnp.take_along_axis(logq, idx[:, None], axis=1)[:, 0] > -jnp.inf
  return jnp.where(ok, idx, jnp.argmax(logq, axis=-1)).astype(jnp.int32)


def sample_loop(step: Callable[[jax.Array, Any], tuple], cache: Any, first_token: jax.Array,
                rng: jax.Array, config: SamplingConfig, *, row_ids: Optional[jax.Array] = None,
                reference_index: Optional[int] = None, with_components: bool = False,
                return_cache: bool = False) -> SampleOutput:
  """Samples up to `max_new_tokens` tokens; call inside jit.

  Args:
    step: `step(tokens [B], cache) -> (logits or MixedLogits, cache)`.
    cache: the step's initial cache (after prefill).
    first_token: [B] the token to feed first (from prefill).
    rng: a PRNG key.
    config: static sampling settings.
    row_ids: [B] int32 per-row seeds (default arange(B)).
    reference_index: component index of the reference for the per-step KL
      (requires a step returning MixedLogits); None = no KL.
    with_components: also return each component's per-token log-probs.
    return_cache: also return the step's cache after the loop (controlled
      decoding keeps the cache of a chosen candidate block, and reads the
      side outputs a composed step writes into its cache).

  Returns:
    SampleOutput, or (SampleOutput, final cache) with `return_cache`.
  """
  b = first_token.shape[0]
  t_max = config.max_new_tokens
  if row_ids is None:
    row_ids = jnp.arange(b, dtype=jnp.int32)
  row_keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(row_ids)

  # Probe the step's output structure (shapes only; no compute).
  probe = jax.eval_shape(step, first_token, cache)[0]
  mixed = isinstance(probe, MixedLogits)
  n_comp = probe.components.shape[0] if mixed else 0
  if (reference_index is not None or with_components) and not mixed:
    raise ValueError("KL or component log-probs need a step returning MixedLogits")

  def body(state):
    t, tok, cache, done, lengths, toks, lps, comp_lps, kls = state
    out, cache = step(tok, cache)
    raw = mask_pad(out.logits if mixed else out, config.pad)
    logits = process_logits(raw, config)
    logq = jax.nn.log_softmax(logits, axis=-1)
    keys = step_keys(row_keys, t)
    new = _draw(keys, logq, config.greedy)
    new = jnp.where(done, config.pad, new)
    live = ~done
    lp = jnp.take_along_axis(logq, new[:, None], axis=1)[:, 0]
    toks = toks.at[:, t].set(new)
    lps = lps.at[:, t].set(jnp.where(live, lp, 0.0))
    if mixed:
      # NOTE: each model's distribution without pad too, so the KL and the
      # component log-probs compare like with like.
      comps = mask_pad(out.components, config.pad)  # [M, B, V]
    if with_components:
      comp_logp = jax.nn.log_softmax(comps, axis=-1)
      clp = jnp.take_along_axis(comp_logp, jnp.broadcast_to(new[None, :, None], (n_comp, b, 1)),
                                axis=2)[..., 0]
      comp_lps = comp_lps.at[:, :, t].set(jnp.where(live[None], clp, 0.0))
    if reference_index is not None:
      logp_ref = jax.nn.log_softmax(comps[reference_index], axis=-1)
      kls = kls.at[:, t].set(jnp.where(live, _kl(logq, logp_ref), 0.0))
    lengths = lengths + live.astype(jnp.int32)
    done = done | (new == config.eos)
    return t + 1, new, cache, done, lengths, toks, lps, comp_lps, kls

  def cond(state):
    t, done = state[0], state[3]
    return (t < t_max) & ~jnp.all(done)

  init = (jnp.zeros((), jnp.int32), first_token.astype(jnp.int32), cache,
          jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32),
          jnp.full((b, t_max), config.pad, jnp.int32),
          jnp.zeros((b, t_max), jnp.float32),
          jnp.zeros((n_comp if with_components else 0, b, t_max), jnp.float32),
          jnp.zeros((b, t_max) if reference_index is not None else (b, 0), jnp.float32))
  _, _, final_cache, _, lengths, toks, lps, comp_lps, kls = jax.lax.while_loop(cond, body, init)
  out = SampleOutput(toks, lps, lengths, comp_lps if with_components else None,
                     kls if reference_index is not None else None)
  return (out, final_cache) if return_cache else out


def repeat_cache(cache, n: int):
  """Repeats every batched cache leaf n times along batch (prompt state shared, not recomputed)."""
  if n == 1:
    return cache
  return jax.tree_util.tree_map(lambda x: jnp.repeat(x, n, axis=0) if x.ndim else x, cache)


def generate(lm, params, inputs, rng, config: SamplingConfig, *, num_samples: int = 1,
             row_ids=None) -> SampleOutput:
  """Samples `num_samples` continuations per prompt from one model (call inside jit).

  The prompt is prefilled once and its cache repeated, so rows
  [b * num_samples, (b + 1) * num_samples) continue prompt b. The ids are
  the model's (`with_tokens`).
  """
  config = with_tokens(config, tokens_of(lm))
  cache, first = lm.prefill(params, inputs, config.max_new_tokens)
  cache = repeat_cache(cache, num_samples)
  first = jnp.repeat(first, num_samples, axis=0)
  return sample_loop(lambda tok, c: lm.step(params, tok, c), cache, first, rng, config,
                     row_ids=row_ids)
