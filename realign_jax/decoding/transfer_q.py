"""Transfer Q* (direct and indirect) and ARGS, as steps composed for THE sampler.

Transfer Q* (Chakraborty et al. 2024, Algorithm 1). At prefix s = [x, y^t],
for each of the top-k tokens z of the reference p(. | s), the aligned
baseline rho_BL is rolled out from [s, z] to EOS or H tokens; Q(s, z) is the
target reward of the rollout(s), and the decoder samples (or takes the argmax
of) a tilt of p(. | s) by Q over the k candidates. `alpha_convention` says
what alpha means:
  "paper"    (default; Remarks 1-2 of Section 3.3 of the paper) alpha is the KL
             weight: pi(z | s) ~ p(z | s) exp(Q(s, z) / alpha), scores
             logits / T + Q / alpha at sampling temperature T (T = 1 when
             greedy). Larger alpha = more conservative (smaller KL to p); alpha > 0.
  "authors"  the authors' released code: scores log p(z | s) + alpha * Q(s, z)
             (then / T), so alpha multiplies Q and larger alpha moves FURTHER
             from p; alpha = 0 is p restricted to its top k.
At T = 1, alpha_paper = 1 / alpha_authors gives the same policy. alpha_traj (the
trajectory-level weight of indirect transfer) follows the same convention.

Rollouts run `sampler.sample_loop` on the baseline's KV cache FORKED k * m
ways from the cache of the prefix (which the decoder keeps up to date one
token per step): the prompt and prefix are never recomputed. For the speed
comparison (and as the reference of the equality test) `rollouts=
"recompute"` re-generates each rollout from scratch without a KV cache, as
the authors' code does, and "refeed" re-encodes the prompt and re-feeds the
prefix for every rollout before sampling it with a KV cache.

Direct transfer: rho_BL is aligned to the target reward itself,
  Q(s, z) = (1/m) sum_i r(tau_i).
Indirect transfer: rho_BL is aligned to another reward r_BL. Both rho_BL and
the target's optimum are KL-regularised optima over the same SFT model, so
rho_target(y | x) ~ rho_BL(y | x) exp((r(x, y) - r_BL(x, y)) / alpha_traj)
(eq. 15 of the paper; exp(alpha_traj * (r - r_BL)) under "authors"), and with
m baseline rollouts tau_i
  "self_normalized":  Q = sum_i w_i r(tau_i) / sum_i w_i,
                      w_i = exp((r(tau_i) - r_BL(tau_i)) / alpha_traj)
(consistent as m grows; with m = 1 it is just r(tau_1), the weight cancels);
  "unnormalized":     Q = (1/m) sum_i w_i r(tau_i)
(what the authors' code computes; unbiased for E_BL[w r], which is the
target expectation times the unknown ratio of partition functions Z_BL/Z,
the same for every z of a prefix but not across prefixes, and it grows
with exp(r / alpha_traj), so it also rescales alpha).
Use two distinct reward models for r and r_BL.

ARGS (Khanov et al. 2024): log p(z | s) + w * r(x, [s, z]) over the top-k,
the reward applied to the partial response.

Rewards are token rewards `(inputs [N, Li], responses [N, L], lengths [N]) -> [N]`
(traceable); `token_reward(reward, params)` adapts a `rewards.base.Reward`.
"""

import dataclasses
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from realign_jax.decoding import controlled, sampler
from realign_jax.decoding.dera import Component, shared_tokens
from realign_jax.plumbing.errors import UserError
from realign_jax.models.config import SpecialTokens

TokenReward = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
REF, BASELINE = 0, 1
MODES = ("direct", "indirect")
# How rollouts get the baseline's state at [s, z]:
#   "fork"      the baseline's KV cache of the prefix, forked k * m ways (this project);
#   "refeed"    per rollout: prefill the prompt again, re-feed the prefix token by token,
#               then sample with a KV cache;
#   "recompute" per rollout token: a full teacher-forced forward over the prompt and
#               everything generated so far, no KV cache (what the authors' code does).
# All three give the same rollouts; the last two exist for the benchmark and the test.
ROLLOUTS = ("fork", "refeed", "recompute")
WEIGHTINGS = ("self_normalized", "unnormalized")
# What alpha and alpha_traj mean (see the module docstring): "paper" divides Q (and
# r - r_BL) by them, "authors" multiplies.
ALPHA_CONVENTIONS = ("paper", "authors")


def token_reward(reward, params=None) -> TokenReward:
  """A `rewards.base.Reward` (+ its frozen params) as a traceable token reward."""
  return lambda inputs, responses, lengths: reward.score_tokens(params, inputs, responses,
                                                                lengths)


@dataclasses.dataclass(frozen=True)
class TQConfig:
  """Static Transfer Q* settings."""
  top_k: int = 10
  horizon: int = 20  # H: rollout tokens after the candidate
  alpha: float = 1.0  # "paper": KL weight, p exp(Q / alpha); "authors": log p + alpha Q
  num_rollouts: int = 1  # m per candidate
  mode: str = "direct"
  weighting: str = "self_normalized"  # indirect only
  alpha_traj: float = 1.0  # trajectory-level weight of eq. 15 (indirect only), same convention
  alpha_convention: str = "paper"  # or "authors" (see ALPHA_CONVENTIONS)
  rollout: sampler.SamplingConfig = sampler.SamplingConfig(max_new_tokens=1)  # temperature etc.
  rollouts: str = "fork"  # or "refeed" / "recompute": from scratch (see ROLLOUTS)


def check_alpha(name: str, alpha, convention: str) -> float:
  """alpha > 0 under "paper" (it divides), >= 0 under "authors"; finite; one UserError line."""
  alpha = float(alpha)
  if convention == "paper" and not (math.isfinite(alpha) and alpha > 0):
    raise UserError(f"{name} must be a finite number > 0 under alpha_convention 'paper' (the KL "
                    f"weight: p exp(Q / {name})), got {alpha}; alpha_convention='authors' "
                    f"takes the multiplier log p + {name} * Q")
  if not math.isfinite(alpha) or alpha < 0:
    raise UserError(f"{name} must be a finite number >= 0, got {alpha}")
  return alpha


def q_coefficient(cfg: TQConfig, temperature: float = 1.0) -> float:
  """c of the candidate scores log p(z | s) + c * Q(s, z) that the sampler divides by T.

  "paper": c = T / alpha, so the sampler sees logits / T + Q / alpha, i.e.
  pi ~ p^(1/T) exp(Q / alpha): alpha stays the KL weight at any temperature.
  "authors": c = alpha, (log p + alpha * Q) / T, as the authors' code.
  """
  if cfg.alpha_convention == "authors":
    return float(cfg.alpha)
  return float(temperature) / float(cfg.alpha)


def validate_tq(ref: Component, baseline: Component, cfg: TQConfig,
                baseline_reward: Optional[TokenReward] = None) -> None:
  """Every bad setting as one UserError line, before any compute."""
  controlled.check_same_vocab(ref, baseline, "baseline model")
  controlled.check_top_k(cfg.top_k, ref.lm.vocab_size, "top_k (candidates per step)")
  controlled.check_at_least_one("the rollout horizon H", cfg.horizon)
  controlled.check_at_least_one("the number of rollouts m", cfg.num_rollouts)
  if cfg.mode not in MODES:
    raise UserError(f"Transfer Q* mode must be one of {MODES}, got {cfg.mode!r}")
  if cfg.rollouts not in ROLLOUTS:
    raise UserError(f"Transfer Q* rollouts must be one of {ROLLOUTS}, got {cfg.rollouts!r}")
  if cfg.weighting not in WEIGHTINGS:
    raise UserError(f"Transfer Q* weighting must be one of {WEIGHTINGS}, got {cfg.weighting!r}")
  if cfg.alpha_convention not in ALPHA_CONVENTIONS:
    raise UserError(f"Transfer Q* alpha_convention must be one of {ALPHA_CONVENTIONS}, got "
                    f"{cfg.alpha_convention!r}")
  check_alpha("alpha", cfg.alpha, cfg.alpha_convention)
  if cfg.mode == "indirect":
    check_alpha("alpha_traj", cfg.alpha_traj, cfg.alpha_convention)
    if baseline_reward is None:
      raise UserError("indirect Transfer Q* needs the baseline's reward r_BL (baseline_reward)")


def assemble(prefix, t, cand, cont, tokens: SpecialTokens = SpecialTokens()):
  """Responses [s, z, continuation] with s = prefix[:, :t] (t traced).

  Args:
    prefix: [N, T] tokens (only the first t are used).
    t: scalar, the prefix length.
    cand: [N] the candidate token.
    cont: [N, H] continuation tokens, pad after EOS (ignored if cand is EOS).
    tokens: the models' special ids (default T5's).

  Returns:
    (responses [N, T + 1 + H], lengths [N]).
  """
  n, tmax = prefix.shape
  h = cont.shape[1]
  cont = jnp.where((cand == tokens.eos_id)[:, None], tokens.pad_id, cont)
  pos = jnp.arange(tmax + 1 + h)[None]
  from_prefix = jnp.take_along_axis(prefix, jnp.minimum(pos, tmax - 1).repeat(n, 0), axis=1)
  from_cont = jnp.take_along_axis(cont, jnp.clip(pos - t - 1, 0, h - 1).repeat(n, 0), axis=1)
  resp = jnp.where(pos < t, from_prefix, jnp.where(pos == t, cand[:, None], from_cont))
  cont_len = jnp.sum(cont != tokens.pad_id, axis=1)
  return resp.astype(jnp.int32), (t + 1 + cont_len).astype(jnp.int32)


def combine(r_target, r_base, cfg: TQConfig):
  """[N, m] rollout rewards -> [N] Q estimates (see the module docstring)."""
  if cfg.mode == "direct":
    return jnp.mean(r_target, axis=-1)
  if cfg.alpha_convention == "authors":
    logw = cfg.alpha_traj * (r_target - r_base)
  else:
    logw = (r_target - r_base) / cfg.alpha_traj
  if cfg.weighting == "self_normalized":
    return jnp.sum(jax.nn.softmax(logw, axis=-1) * r_target, axis=-1)
  return jnp.mean(jnp.exp(logw) * r_target, axis=-1)


def _rollout_refeed(baseline: Component, inputs, prefix, t, first, cand, rng, row_ids, cfg,
                     capacity):
  """Every rollout from scratch: prefill the prompt, re-feed the prefix, then sample."""
  cache, _ = baseline.lm.prefill(baseline.params, inputs, capacity)

  def feed(i, c):
    tok = jnp.where(i == 0, first, prefix[:, jnp.maximum(i - 1, 0)])
    return baseline.lm.step(baseline.params, tok, c)[1]
  cache = jax.lax.fori_loop(0, t + 1, feed, cache)
  return sampler.sample_loop(lambda tk, c: baseline.lm.step(baseline.params, tk, c), cache, cand,
                             rng, cfg, row_ids=row_ids)


def _rollout_recompute(baseline: Component, inputs, prefix, t, cand, rng, row_ids, cfg):
  """Every rollout token from a full forward pass over [prompt, response so far]."""
  n, tmax = prefix.shape
  width = tmax + 1 + cfg.max_new_tokens
  pad = sampler.tokens_of(baseline.lm).pad_id
  buf = jnp.where(jnp.arange(width)[None] < t,
                  jnp.pad(prefix, ((0, 0), (0, width - tmax)), constant_values=pad), pad)

  def step(tok, c):
    buf = jax.lax.dynamic_update_slice(c["buf"], tok[:, None].astype(jnp.int32), (0, c["pos"]))
    logits = baseline.lm.forward(baseline.params, inputs, buf)["logits"]  # [N, W, V]
    nxt = jax.lax.dynamic_index_in_dim(logits, c["pos"] + 1, axis=1, keepdims=False)
    return nxt, {"buf": buf, "pos": c["pos"] + 1}
  return sampler.sample_loop(step, {"buf": buf, "pos": jnp.asarray(t, jnp.int32)}, cand, rng,
                             cfg, row_ids=row_ids)


def q_values(baseline: Component, bcache, inputs, prefix, t, first, candidates, rng, row_ids,
             cfg: TQConfig, reward: TokenReward, baseline_reward: Optional[TokenReward],
             capacity: int):
  """Q(s, z) [B, k] from m baseline rollouts per candidate.

  Args:
    bcache: the baseline's cache at s ([B] rows; prefix consumed).
    inputs: [B, Li] prompts; prefix: [B, T] and t: the prefix s.
    first: [B] the baseline's prefill token (for re-generation from scratch).
    candidates: [B, k].
    row_ids: [B] per-row seeds; rollout (b, i, j) draws with seed
      (row_ids[b] * k + i) * m + j.
  """
  b, k = candidates.shape
  m = cfg.num_rollouts
  n = b * k * m
  cand = jnp.repeat(candidates.reshape(-1), m)  # [(b, i, j)]
  ids = ((row_ids[:, None, None] * k + jnp.arange(k)[None, :, None]) * m
         + jnp.arange(m)[None, None, :]).reshape(-1)
  rcfg = sampler.with_tokens(dataclasses.replace(cfg.rollout, max_new_tokens=cfg.horizon),
                             sampler.tokens_of(baseline.lm))
  rep = lambda x: jnp.repeat(x, k * m, axis=0)
  if cfg.rollouts == "fork":
    out = sampler.sample_loop(lambda tk, c: baseline.lm.step(baseline.params, tk, c),
                              sampler.repeat_cache(bcache, k * m), cand, rng, rcfg, row_ids=ids)
  elif cfg.rollouts == "refeed":
    out = _rollout_refeed(baseline, rep(inputs), rep(prefix), t, rep(first), cand, rng, ids,
                          rcfg, capacity)
  else:
    out = _rollout_recompute(baseline, rep(inputs), rep(prefix), t, cand, rng, ids, rcfg)
  resp, lengths = assemble(rep(prefix), t, cand, out.tokens, sampler.tokens_of(baseline.lm))
  x = rep(inputs)
  r_t = reward(x, resp, lengths).astype(jnp.float32).reshape(b * k, m)
  r_b = (baseline_reward(x, resp, lengths).astype(jnp.float32).reshape(b * k, m)
         if cfg.mode == "indirect" else jnp.zeros_like(r_t))
  return combine(r_t, r_b, cfg).reshape(b, k), out


def _append(prefix, t, tokens):
  """Writes the token consumed at step t (>= 1) at prefix position t - 1."""
  upd = jax.lax.dynamic_update_slice(prefix, tokens[:, None].astype(jnp.int32),
                                     (0, jnp.maximum(t - 1, 0)))
  return jnp.where(t > 0, upd, prefix)


def tq_step(ref: Component, baseline: Component, inputs, cfg: TQConfig, reward: TokenReward, *,
            rng, row_ids, baseline_reward: Optional[TokenReward] = None, capacity: int,
            temperature: float = 1.0):
  """Sampler step: log p(z | s) + c * Q(s, z) over the top-k of p, c = `q_coefficient`.

  `temperature`: the T the sampler divides the scores by (1 when greedy).
  """
  vocab = ref.lm.vocab_size
  coef = q_coefficient(cfg, temperature)

  def step(tokens, cache):
    t = cache["t"]
    tok = controlled.feed_tokens(cache, tokens)
    rc, bc = cache["models"]
    prefix = _append(cache["prefix"], t, tokens)
    logits, rc = ref.lm.step(ref.params, tok[REF], rc)
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(sampler.mask_pad(logits, sampler.tokens_of(ref.lm).pad_id),
                              axis=-1)  # NOTE: as sampled: no pad
    _, bc = baseline.lm.step(baseline.params, tok[BASELINE], bc)  # the baseline now holds s
    top_lp, top_idx = jax.lax.top_k(logp, cfg.top_k)  # [B, k]
    q, _ = q_values(baseline, bc, inputs, prefix, t, cache["first"][BASELINE], top_idx,
                    jax.random.fold_in(rng, t), row_ids, cfg, reward, baseline_reward, capacity)
    bad = cache["nonfinite"] | jnp.any(~jnp.isfinite(q) & jnp.isfinite(top_lp), axis=1)
    scores = controlled.scatter_scores(top_idx, top_lp + coef * jnp.nan_to_num(q), vocab)
    new = dict(cache, models=(rc, bc), prefix=prefix, t=t + 1, nonfinite=bad)
    return sampler.MixedLogits(scores, logits[None]), new
  return step


def transfer_q(ref: Component, baseline: Component, inputs, rng,
               config: sampler.SamplingConfig, cfg: TQConfig, reward: TokenReward, *,
               baseline_reward: Optional[TokenReward] = None, num_samples: int = 1,
               row_ids=None):
  """Transfer Q* decoding (call inside jit; validate with `validate_tq` first).

  `config` decodes (greedy, or sampled at its temperature); component 0 of
  the output is the reference p, so the sampler's `kl` is the exact
  per-token KL to p. Returns (SampleOutput, nonfinite [B]): rows where some
  reward was not finite (their Q was replaced by 0; the caller raises).
  """
  config = sampler.with_tokens(config, shared_tokens([ref, baseline]))
  t = config.max_new_tokens
  b = inputs.shape[0] * num_samples
  if row_ids is None:
    row_ids = jnp.arange(b, dtype=jnp.int32)
  capacity = t + cfg.horizon
  cache = controlled.repeat(controlled.prefill([ref, baseline], inputs, [t, capacity]),
                            num_samples)
  cache.update(prefix=jnp.full((b, t), config.pad, jnp.int32), nonfinite=jnp.zeros((b,), bool))
  x = jnp.repeat(inputs, num_samples, axis=0)
  step = tq_step(ref, baseline, x, cfg, reward, rng=jax.random.fold_in(rng, 0x7a),
                 row_ids=row_ids, baseline_reward=baseline_reward, capacity=capacity,
                 # NOTE: process_logits ignores the temperature when greedy.
                 temperature=1.0 if config.greedy else config.temperature)
  out, final = sampler.sample_loop(step, cache, jnp.zeros((b,), jnp.int32), rng, config,
                                   row_ids=row_ids, reference_index=REF, with_components=True,
                                   return_cache=True)
  return out, final["nonfinite"]


# ---- ARGS ----------------------------------------------------------------------------
def args_step(ref: Component, inputs, reward: TokenReward, *, top_k: int, weight: float):
  """Sampler step: log p(z | s) + w * r(x, [s, z]) over the top-k of p."""
  vocab = ref.lm.vocab_size

  def step(tokens, cache):
    t = cache["t"]
    tok = controlled.feed_tokens(cache, tokens)
    prefix = _append(cache["prefix"], t, tokens)
    logits, rc = ref.lm.step(ref.params, tok[REF], cache["models"][REF])
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(sampler.mask_pad(logits, sampler.tokens_of(ref.lm).pad_id),
                              axis=-1)  # NOTE: as sampled: no pad
    top_lp, top_idx = jax.lax.top_k(logp, top_k)
    b = top_idx.shape[0]
    cand = top_idx.reshape(-1)
    resp, lengths = assemble(jnp.repeat(prefix, top_k, axis=0), t, cand,
                             jnp.zeros((b * top_k, 1), jnp.int32))
    r = reward(jnp.repeat(inputs, top_k, axis=0), resp, lengths).astype(jnp.float32)
    r = r.reshape(b, top_k)
    bad = cache["nonfinite"] | jnp.any(~jnp.isfinite(r) & jnp.isfinite(top_lp), axis=1)
    scores = controlled.scatter_scores(top_idx, top_lp + weight * jnp.nan_to_num(r), vocab)
    new = dict(cache, models=(rc,), prefix=prefix, t=t + 1, nonfinite=bad)
    return sampler.MixedLogits(scores, logits[None]), new
  return step


def args_decode(ref: Component, inputs, rng, config: sampler.SamplingConfig,
                reward: TokenReward, *, top_k: int = 10, weight: float = 1.0,
                num_samples: int = 1, row_ids=None):
  """ARGS decoding (call inside jit). Returns (SampleOutput, nonfinite [B])."""
  config = sampler.with_tokens(config, sampler.tokens_of(ref.lm))
  t = config.max_new_tokens
  b = inputs.shape[0] * num_samples
  cache = controlled.repeat(controlled.prefill([ref], inputs, [t]), num_samples)
  cache.update(prefix=jnp.full((b, t), config.pad, jnp.int32), nonfinite=jnp.zeros((b,), bool))
  step = args_step(ref, jnp.repeat(inputs, num_samples, axis=0), reward, top_k=top_k,
                   weight=weight)
  out, final = sampler.sample_loop(step, cache, jnp.zeros((b,), jnp.int32), rng, config,
                                   row_ids=row_ids, reference_index=REF, with_components=True,
                                   return_cache=True)
  return out, final["nonfinite"]


def validate_args(ref: Component, top_k: int, weight: float) -> None:
  controlled.check_top_k(top_k, ref.lm.vocab_size, "top_k (candidates per step)")
  if not math.isfinite(weight):
    raise UserError(f"the ARGS reward weight w must be finite, got {weight}")


def check_reward_finite(reward: TokenReward, inputs, what: str = "reward",
                        tokens: SpecialTokens = SpecialTokens()) -> None:
  """Probes a reward on the prompts with an EOS-only and a one-token response.

  Raises one UserError line when a score is not finite, before any decoding.
  `tokens`: the models' special ids (the one token is the first ordinary id).
  """
  n = inputs.shape[0]
  ordinary = min(set(range(4)) - {tokens.pad_id, tokens.eos_id, tokens.bos_id})
  resp = jnp.stack([jnp.full((n,), tokens.eos_id, jnp.int32),
                    jnp.full((n,), ordinary, jnp.int32)], axis=1)
  lengths = jnp.ones((n,), jnp.int32)
  for r, ln in ((resp[:, :1], lengths), (resp[:, 1:], lengths)):
    s = jnp.asarray(reward(jnp.asarray(inputs), r, ln))
    if not bool(jnp.all(jnp.isfinite(s))):
      bad = int(jnp.argmax(~jnp.isfinite(s)))
      raise UserError(f"{what} returned a non-finite score ({float(s[bad])}) for prompt {bad}; "
                      f"refusing to decode")
