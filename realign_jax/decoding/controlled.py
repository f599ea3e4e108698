"""Controlled decoding (CD): token-wise and blockwise control with a value model.

Both decoders are steps composed for THE sampler (`sampler.sample_loop`);
neither has a loop of its own.

Value convention (documented once, used everywhere): a value model is a
`LanguageModel` with output_head "scalar" (or "lm+scalar"). Its teacher-forced
`forward(inputs, targets)["values"][:, t]` is computed from the prompt and
targets[:, :t], i.e. it is V([x, y^{<t}]), the value of the prefix of length t
BEFORE token t; V([x, y^{<=t}]) is at index t + 1. Incrementally, the output
of `step_outputs` after consuming a token is the value of the prefix that
ENDS with that token (after the first token of prefill: the empty response).
A Q-head model (output_head "lm") reads its logits as Q(s)[z] = V([s, z]) for
every next token z in one step. A dueling Q-model (output_head
"lm+scalar:dueling", see training/value.py) has Q(s)[z] = logits[z] + c(s):
token-wise CD reads its logits as a Q-head (a constant per state changes no
distribution) and blockwise CD reads its scalar V(s) as a value head.

Token-wise CD (Theorem 2 of the controlled-decoding talk):
  pi(z | s) proportional to p(z | s) exp(V([s, z]) / beta)
over the top-k candidates of p (the scalar-head value model scores the k
candidates in ONE batched step on its cache forked k ways: the prefix is never
recomputed) or over the whole vocabulary with a Q-head (one step). The step
returns `MixedLogits` with the policy as component 0, so the sampler reports
the exact per-token KL to p.

Blockwise CD (best-of-n++): K candidate blocks of M tokens from p, each drawn
by `sample_loop` on the policy's cache forked K ways; the block with the
highest V([s, z^M]) is kept, together with ITS policy cache, and emitted
token by token; repeat until EOS. With K = n and M = the maximum length it is
best-of-n scored by V.
"""

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from realign_jax.decoding import sampler
from realign_jax.decoding.dera import Component
from realign_jax.plumbing.errors import UserError
from realign_jax.models.heads import DUELING_Q

POLICY, VALUE = 0, 1


# ---- validation (all before any compute) ---------------------------------------
def check_same_vocab(policy: Component, other: Component, what: str = "value model") -> None:
  if other.lm.vocab_size != policy.lm.vocab_size:
    raise UserError(f"the {what} has vocabulary size {other.lm.vocab_size} but the policy has "
                    f"{policy.lm.vocab_size}; they must share one vocabulary")


def check_top_k(k: int, vocab_size: int, what: str = "top_k") -> int:
  if not isinstance(k, int) or k < 1:
    raise UserError(f"{what} must be an integer >= 1, got {k!r}")
  if k > vocab_size:
    raise UserError(f"{what} = {k} is larger than the vocabulary ({vocab_size} tokens)")
  return k


def check_positive(name: str, x) -> float:
  x = float(x)
  if not x > 0 or x == float("inf"):
    raise UserError(f"{name} must be a finite number > 0, got {x}")
  return x


def check_at_least_one(name: str, x) -> int:
  if not isinstance(x, int) or x < 1:
    raise UserError(f"{name} must be an integer >= 1, got {x!r}")
  return x


def head_kind(value: Component, *, blockwise: bool = False) -> str:
  """'q' for a Q-head (logits read as Q-values), 'v' for a scalar value head.

  A dueling Q-model is 'q' token-wise (its logits are Q up to a constant per
  state) and 'v' blockwise (blocks from different states are compared by V).
  """
  head = getattr(value.lm, "output_head", "scalar")
  if head == "lm":
    return "q"
  if head == DUELING_Q:
    return "v" if blockwise else "q"
  if head in ("scalar", "lm+scalar"):
    return "v"
  raise UserError(f"a value model needs output_head 'scalar', 'lm+scalar', 'lm' (Q-head) or "
                  f"{DUELING_Q!r}, got {head!r}")


# ---- caches ----------------------------------------------------------------------
def take_rows(cache, rows):
  """Selects batch rows [N] of every batched cache leaf (scalars are shared)."""
  return jax.tree_util.tree_map(lambda x: x[rows] if x.ndim else x, cache)


def prefill(components: Sequence[Component], inputs, max_new_tokens: Sequence[int]):
  """Prefills each model once with its own capacity; layout as `dera.prefill`."""
  caches, firsts = [], []
  for c, n in zip(components, max_new_tokens):
    cache, first = c.lm.prefill(c.params, inputs, n)
    caches.append(cache)
    firsts.append(first)
  return {"models": tuple(caches), "first": jnp.stack(firsts), "t": jnp.zeros((), jnp.int32)}


def repeat(cache, n: int):
  """Each prompt's state shared by n consecutive rows (extra keys repeated too)."""
  out = dict(cache)
  out["models"] = tuple(sampler.repeat_cache(c, n) for c in cache["models"])
  out["first"] = jnp.repeat(cache["first"], n, axis=1)
  for k, v in cache.items():
    if k not in ("models", "first", "t"):
      out[k] = jnp.repeat(v, n, axis=0)
  return out


def feed_tokens(cache, tokens):
  """[M, B] the token each model consumes now: its prefill token at t = 0."""
  return jnp.where(cache["t"] == 0, cache["first"], tokens[None].astype(jnp.int32))


def scatter_scores(indices, values, vocab_size: int):
  """[B, k] candidate ids and scores -> [B, V] logits, -inf off the candidates."""
  b = indices.shape[0]
  full = jnp.full((b, vocab_size), -jnp.inf, jnp.float32)
  return full.at[jnp.arange(b)[:, None], indices].set(values.astype(jnp.float32))


def candidate_values(value: Component, vcache, candidates):
  """V([s, z]) for candidates [B, k] from the value model's cache at s.

  The cache is forked k ways and the k candidates go through ONE batched
  step; the forks are discarded.
  """
  b, k = candidates.shape
  out, _ = value.lm.step_outputs(value.params, candidates.reshape(-1),
                                 sampler.repeat_cache(vcache, k))
  return out["values"].astype(jnp.float32).reshape(b, k)


# ---- token-wise CD ---------------------------------------------------------------
def tokenwise_step(policy: Component, value: Component, *, beta: float, top_k: int = 0):
  """Sampler step for pi(z | s) ~ p(z | s) exp(V([s, z]) / beta).

  top_k = 0 means the whole vocabulary (with a scalar head that forks the
  value cache V ways: use a Q-head for that).
  """
  kind = head_kind(value)
  vocab = policy.lm.vocab_size
  k = top_k or vocab

  def step(tokens, cache):
    tok = feed_tokens(cache, tokens)
    pc, vc = cache["models"]
    logits, pc = policy.lm.step(policy.params, tok[POLICY], pc)
    logits = logits.astype(jnp.float32)
    # NOTE: p without pad, as the sampler samples and reports it: the top-k
    # candidates are then k real tokens.
    logp = jax.nn.log_softmax(sampler.mask_pad(logits, sampler.tokens_of(policy.lm).pad_id),
                              axis=-1)  # [B, V]
    v_out, vc = value.lm.step_outputs(value.params, tok[VALUE], vc)
    if kind == "q":
      scores = logp + v_out["logits"].astype(jnp.float32) / beta  # [B, V]
      if k < vocab:
        kth = jax.lax.top_k(logp, k)[0][:, -1:]
        scores = jnp.where(logp < kth, -jnp.inf, scores)
    else:
      top_lp, top_idx = jax.lax.top_k(logp, k)  # [B, k]
      v = candidate_values(value, vc, top_idx)
      scores = scatter_scores(top_idx, top_lp + v / beta, vocab)
    new = dict(cache, models=(pc, vc), t=cache["t"] + 1)
    return sampler.MixedLogits(scores, logits[None]), new
  return step


def tokenwise_cd(policy: Component, value: Component, inputs, rng,
                 config: sampler.SamplingConfig, *, beta: float, top_k: int = 0,
                 num_samples: int = 1, row_ids=None) -> sampler.SampleOutput:
  """Token-wise CD samples (call inside jit); component 0 = the policy p, KL exact.

  `config` should sample at temperature 1 without truncation for the exact
  CD distribution (the candidate restriction is `top_k` here).
  """
  # NOTE: at the last step (T - 1) the value cache holds T tokens (the prefill
  # token, y_0 .. y_{T-2}) and a scalar head scores each candidate as one token
  # more: T + 1 slots. With T, dynamic_update_slice clamps the candidate's write
  # onto the last prefix token and the last step is scored wrongly.
  config = sampler.with_tokens(config, sampler.tokens_of(policy.lm))
  t = config.max_new_tokens
  cache = repeat(prefill([policy, value], inputs, [t, t + 1]), num_samples)
  b = inputs.shape[0] * num_samples
  return sampler.sample_loop(tokenwise_step(policy, value, beta=beta, top_k=top_k), cache,
                             jnp.zeros((b,), jnp.int32), rng, config, row_ids=row_ids,
                             reference_index=POLICY, with_components=True)


def validate_tokenwise(policy: Component, value: Component, beta, top_k: int) -> None:
  check_same_vocab(policy, value)
  head_kind(value)
  check_positive("beta", beta)
  if top_k:
    check_top_k(top_k, policy.lm.vocab_size)


# ---- blockwise CD ----------------------------------------------------------------
def block_values(value: Component, vcache, first, blocks, lengths):
  """Scores K candidate blocks per row with the value model.

  Args:
    value: scalar-head or Q-head value model.
    vcache: [N] value cache at the prefix s (the token `first` not consumed yet).
    first: [N] the pending token.
    blocks: [N, M] candidate tokens, pad after EOS.
    lengths: [N] tokens in each block (EOS included).

  Returns:
    (V([s, z^len]) [N], the value cache after consuming first, z_1..z_{M-1}),
    the latter matching the policy cache a `sample_loop` over M tokens leaves.
  """
  n, m = blocks.shape
  seq = jnp.concatenate([first[:, None].astype(jnp.int32), blocks], axis=1)  # [N, M + 1]
  kind = head_kind(value, blockwise=True)
  key = "logits" if kind == "q" else "values"

  def body(c, tok):
    out, c = value.lm.step_outputs(value.params, tok, c)
    return c, out[key].astype(jnp.float32)
  vcache, outs = jax.lax.scan(body, vcache, seq[:, :m].T)  # outs [M, N(, V)]
  last, _ = value.lm.step_outputs(value.params, seq[:, m], vcache)
  outs = jnp.concatenate([outs, last[key].astype(jnp.float32)[None]], axis=0)  # [M + 1, ...]
  rows = jnp.arange(n)
  if kind == "v":
    # the output after consuming z_len (= seq[len]) is V([s, z^len])
    return outs[lengths, rows], vcache
  # Q(after z_{len-1})[z_len] = V([s, z^len])
  return outs[lengths - 1, rows, seq[rows, lengths]], vcache


def blockwise_step(policy: Component, value: Component, *, num_blocks: int, block_len: int,
                   rng, row_ids, proposal: sampler.SamplingConfig):
  """Sampler step of blockwise CD: a new block every `block_len` steps.

  At a block boundary (under `lax.cond`, so only then) the policy cache is
  forked `num_blocks` ways and `sample_loop` draws the blocks; the winner's
  cache replaces the policy cache. In between the step only emits the chosen
  block's tokens (one-hot logits), so SampleOutput.logprobs are 0 there:
  blockwise CD has no per-token distribution. The chosen tokens' log-probs
  under p itself go into cache["ref_lp"], those under the proposal (p after
  `proposal`'s temperature / top-k / top-p, what the blocks are drawn from)
  into cache["proposal_lp"].
  """
  kk, m = num_blocks, block_len
  vocab = policy.lm.vocab_size
  pcfg = dataclasses.replace(proposal, max_new_tokens=m)

  def propose(tokens, cache):
    tok = feed_tokens(cache, tokens)
    pc, vc = cache["models"]
    b = tok.shape[1]
    ids = (row_ids[:, None] * kk + jnp.arange(kk)[None]).reshape(-1)
    brng = jax.random.fold_in(rng, cache["t"] // m)
    def pstep(t_, c_):
      lg, c_ = policy.lm.step(policy.params, t_, c_)
      # NOTE: p's raw logits ride along as the one component, so the loop also
      # reports each token's log-prob under p itself (temperature 1, no
      # truncation), not only under the proposal it was drawn from.
      return sampler.MixedLogits(lg, lg[None]), c_
    out, pck = sampler.sample_loop(pstep, sampler.repeat_cache(pc, kk),
                                   jnp.repeat(tok[POLICY], kk), brng, pcfg, row_ids=ids,
                                   with_components=True, return_cache=True)
    v, vck = block_values(value, sampler.repeat_cache(vc, kk), jnp.repeat(tok[VALUE], kk),
                          out.tokens, jnp.maximum(out.lengths, 1))
    v = v.reshape(b, kk)
    best = jnp.argmax(v, axis=1)  # ties: the lowest index, as best_of_n
    sel = jnp.arange(b) * kk + best
    return dict(cache, models=(take_rows(pck, sel), take_rows(vck, sel)),
                block=out.tokens[sel], block_lp=out.model_logprobs[0][sel],
                block_proposal_lp=out.logprobs[sel], block_value=v[jnp.arange(b), best])

  def step(tokens, cache):
    t = cache["t"]
    j = t % m
    cache = jax.lax.cond(j == 0, propose, lambda _, c: c, tokens, cache)
    tok = cache["block"][:, j]
    logits = jnp.where(jnp.arange(vocab)[None] == tok[:, None], 0.0, -jnp.inf)
    ref_lp = cache["ref_lp"].at[:, t].set(cache["block_lp"][:, j])
    proposal_lp = cache["proposal_lp"].at[:, t].set(cache["block_proposal_lp"][:, j])
    return logits, dict(cache, t=t + 1, ref_lp=ref_lp, proposal_lp=proposal_lp)
  return step


def blockwise_cd(policy: Component, value: Component, inputs, rng,
                 config: sampler.SamplingConfig, *, num_blocks: int, block_len: int,
                 num_samples: int = 1, row_ids=None,
                 proposal: Optional[sampler.SamplingConfig] = None) -> sampler.SampleOutput:
  """Blockwise CD (call inside jit).

  Returns a SampleOutput whose `model_logprobs` [2, B, T] are the log-probs
  of the emitted tokens under p itself ([0]: temperature 1, no truncation)
  and under the proposal the blocks were drawn from ([1]: p after
  `proposal`'s temperature / top-k / top-p; the same numbers when it has
  none), and whose `kl` is None (no per-token distribution exists). Block j
  of row r draws with key fold_in(rng, j) and row seeds r * K + k, exactly
  as `generate(..., num_samples=K)` with that key.
  `proposal` (default: `config`) sets temperature/top-k/top-p of the blocks.
  """
  proposal = sampler.with_tokens(proposal or config, sampler.tokens_of(policy.lm))
  config = sampler.with_tokens(config, sampler.tokens_of(policy.lm))
  t = config.max_new_tokens
  b = inputs.shape[0] * num_samples
  if row_ids is None:
    row_ids = jnp.arange(b, dtype=jnp.int32)
  cache = repeat(prefill([policy, value], inputs, [t + block_len, t + block_len + 1]),
                 num_samples)
  cache.update(block=jnp.zeros((b, block_len), jnp.int32),
               block_lp=jnp.zeros((b, block_len), jnp.float32),
               block_proposal_lp=jnp.zeros((b, block_len), jnp.float32),
               block_value=jnp.zeros((b,), jnp.float32),
               ref_lp=jnp.zeros((b, t), jnp.float32),
               proposal_lp=jnp.zeros((b, t), jnp.float32))
  step = blockwise_step(policy, value, num_blocks=num_blocks, block_len=block_len, rng=rng,
                        row_ids=row_ids, proposal=proposal)
  emit = dataclasses.replace(config, greedy=True)
  out, final = sampler.sample_loop(step, cache, jnp.zeros((b,), jnp.int32), rng, emit,
                                   row_ids=row_ids, return_cache=True)
  live = jnp.arange(t)[None] < out.lengths[:, None]
  lps = jnp.stack([final["ref_lp"], final["proposal_lp"]])
  return out._replace(model_logprobs=jnp.where(live[None], lps, 0.0))


def validate_blockwise(policy: Component, value: Component, num_blocks, block_len) -> None:
  check_same_vocab(policy, value)
  head_kind(value)
  check_at_least_one("the number of candidate blocks K", num_blocks)
  check_at_least_one("the block length M", block_len)


def num_blocks_used(lengths, block_len: int) -> Any:
  """Blocks each row needed: ceil(length / M)."""
  return -(-jnp.asarray(lengths) // block_len)
