"""Controlled decoding against enumeration on a tiny MDP, and on real tiny models.

The tiny MDP: vocabulary {0 pad, 1 EOS, 2, 3, 4}, responses of at most 4
tokens (EOS included). `TabularLM` is a model whose step is a lookup table
over all prefixes (its cache holds the prefix), so p, V* and pi*_beta are
computable exactly by enumerating the 40 responses. The helpers here are
shared with test_transfer_q.py and test_value.py.
"""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realign_jax.decoding import best_of_n as bon
from realign_jax.decoding import controlled, sampler
from realign_jax.decoding.dera import Component
from realign_jax.plumbing.errors import UserError
from realign_jax.models.api import LanguageModel
from realign_jax.models.heads import DUELING_Q
from tests.helpers import TINY_SHALLOW, random_batch

VOCAB, MAX_LEN, EOS = 5, 4, 1
WORDS = (2, 3, 4)


# ---- the tabular model -----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TabularLM:
  """Duck-types `LanguageModel` with tables indexed by the response prefix.

  Prefix (y_0 .. y_{l-1}) has index sum_i y_i V^i (tokens are >= 1, so
  prefixes of different lengths never collide). params: [V^L, V] logits
  (output_head "lm") or [V^L] values ("scalar"). Token 0 (the prefill token,
  or pad after EOS) is not appended to the prefix.
  """
  vocab_size: int = VOCAB
  max_len: int = MAX_LEN
  output_head: str = "lm"
  family: str = "table"

  @property
  def size(self) -> int:
    return self.vocab_size ** self.max_len

  def init(self, rng):
    del rng
    if self.output_head == DUELING_Q:  # advantages [V^L, V] and values [V^L]
      params = {"table": jnp.zeros((self.size, self.vocab_size), jnp.float32),
                "values": jnp.zeros((self.size,), jnp.float32)}
      return params, {k: jax.sharding.PartitionSpec() for k in params}
    shape = (self.size, self.vocab_size) if self.output_head == "lm" else (self.size,)
    return {"table": jnp.zeros(shape, jnp.float32)}, {"table": jax.sharding.PartitionSpec()}

  def _out(self, params, idx):
    if self.output_head == DUELING_Q:
      return {"logits": params["table"][idx], "values": params["values"][idx]}
    key = "logits" if self.output_head == "lm" else "values"
    return {key: params["table"][idx]}

  def prefill(self, params, inputs, max_new_tokens):
    del params, max_new_tokens
    b = inputs.shape[0]
    return ({"prefix": jnp.zeros((b, self.max_len), jnp.int32), "len": jnp.zeros((b,), jnp.int32)},
            jnp.zeros((b,), jnp.int32))

  def step_outputs(self, params, tokens, cache):
    n = cache["len"]
    add = (tokens != 0) & (n < self.max_len)
    prefix = jnp.where(add[:, None] & (jnp.arange(self.max_len)[None] == n[:, None]),
                       tokens[:, None], cache["prefix"])
    n = n + add
    idx = index(prefix * (jnp.arange(self.max_len)[None] < n[:, None]))
    return self._out(params, idx), {"prefix": prefix, "len": n}

  def step(self, params, tokens, cache):
    out, cache = self.step_outputs(params, tokens, cache)
    return out["logits"], cache

  def forward(self, params, inputs, targets, *, dropout_rng=None):
    del inputs, dropout_rng
    t = targets.shape[1]
    powers = VOCAB ** jnp.minimum(jnp.arange(t), self.max_len - 1)
    digits = jnp.where(jnp.arange(t)[None] < self.max_len, targets, 0) * powers[None]
    idx = jnp.cumsum(digits, axis=1) - digits  # exclusive: the prefix BEFORE token t
    return self._out(params, idx)


def index(prefix):
  """[..., L] token prefixes (0 = absent) -> [...] table index."""
  prefix = jnp.asarray(prefix)
  return jnp.sum(prefix * VOCAB ** jnp.arange(prefix.shape[-1]), axis=-1)


def np_index(seq) -> int:
  return int(sum(t * VOCAB ** i for i, t in enumerate(seq)))


# ---- the MDP and its enumeration ---------------------------------------------------
def all_responses():
  """The 40 complete responses: up to 3 words then EOS."""
  out = []
  for n in range(MAX_LEN):
    out += [tuple(w) + (EOS,) for w in itertools.product(WORDS, repeat=n)]
  return out


def all_states():
  """Non-terminal prefixes (where a token is chosen)."""
  return [tuple(w) for n in range(MAX_LEN) for w in itertools.product(WORDS, repeat=n)]


class TinyMDP:
  """A random policy table, reward table and everything enumerable from them."""

  def __init__(self, seed=0, temperature=1.0, reward_offset=0.0, rare_token=None):
    """rewards ~ U[0, 1] + reward_offset; `rare_token` gets logit -16 everywhere (p ~ 1e-7)."""
    rng = np.random.default_rng(seed)
    size = VOCAB ** MAX_LEN
    logits = np.full((size, VOCAB), -np.inf, np.float32)
    for s in all_states():
      row = rng.normal(size=VOCAB) * temperature
      row[0] = -np.inf
      if rare_token is not None:
        row[rare_token] = -16.0
      if len(s) == MAX_LEN - 1:
        row[2:] = -np.inf  # the 4th token must be EOS
      logits[np_index(s)] = row
    self.logits = logits
    self.logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1), np.float64)
    self.reward = np.zeros(size, np.float64)
    for y in all_responses():
      self.reward[np_index(y)] = rng.uniform() + reward_offset
    self.responses = all_responses()
    # V*(prefix) = E_p[r | prefix] for every prefix, terminal ones included.
    self.value = np.zeros(size, np.float64)
    for y in self.responses:
      self.value[np_index(y)] = self.reward[np_index(y)]
    for s in sorted(all_states(), key=len, reverse=True):
      i = np_index(s)
      self.value[i] = sum(np.exp(self.logp[i, z]) * self.value[np_index(s + (z,))]
                          for z in range(1, VOCAB) if np.isfinite(self.logp[i, z]))

  def prob(self, y, table=None) -> float:
    logp = self.logp if table is None else table
    return float(np.exp(sum(logp[np_index(y[:i]), y[i]] for i in range(len(y)))))

  def q_table(self) -> np.ndarray:
    """Q*(s)[z] = V*([s, z]) for every state (0 elsewhere)."""
    q = np.zeros((VOCAB ** MAX_LEN, VOCAB), np.float32)
    for s in all_states():
      for z in range(1, VOCAB):
        q[np_index(s), z] = self.value[np_index(s + (z,))]
    return q

  def cd_logp(self, beta: float, top_k: int = 0) -> np.ndarray:
    """log pi*_beta(z | s) ~ log p(z | s) + V*([s, z]) / beta (Theorem 2), per state."""
    out = np.full_like(self.logp, -np.inf)
    for s in all_states():
      i = np_index(s)
      scores = np.array([self.logp[i, z] + (self.value[np_index(s + (z,))] / beta
                                             if z else 0.0) for z in range(VOCAB)])
      if top_k:
        kth = np.sort(self.logp[i])[::-1][top_k - 1]
        scores = np.where(self.logp[i] < kth, -np.inf, scores)
      m = np.max(scores)
      out[i] = scores - m - np.log(np.sum(np.exp(scores - m)))
    return out

  # components and rewards
  def policy(self) -> Component:
    return Component(TabularLM(output_head="lm"), {"table": jnp.asarray(self.logits)})

  def value_model(self, values=None) -> Component:
    v = self.value if values is None else values
    return Component(TabularLM(output_head="scalar"), {"table": jnp.asarray(v, jnp.float32)})

  def q_model(self) -> Component:
    return Component(TabularLM(output_head="lm"), {"table": jnp.asarray(self.q_table())})

  def token_reward(self, table=None):
    """Jittable token reward (inputs [N, Li], responses [N, L], lengths [N]) -> [N]."""
    tab = jnp.asarray(self.reward if table is None else table, jnp.float32)

    def reward(inputs, responses, lengths):
      del inputs, lengths
      r = responses[:, :MAX_LEN]
      return tab[index(r)]
    return reward


PROMPTS = np.array([[3, 1]], np.int32)  # the tabular models ignore the prompt


@pytest.fixture(scope="module")
def mdp():
  return TinyMDP(seed=0)


def _logq(out, rows=None):
  return np.asarray(out.logprobs).sum(axis=1)


# ---- token-wise CD = Theorem 2 -----------------------------------------------------
@pytest.mark.parametrize("head", ["scalar", "q"])
def test_tokenwise_cd_with_vstar_reproduces_pi_star(mdp, head):
  beta = 0.3
  value = mdp.value_model() if head == "scalar" else mdp.q_model()
  cfg = sampler.SamplingConfig(max_new_tokens=MAX_LEN)
  inputs = jnp.asarray(np.repeat(PROMPTS, 400, axis=0))
  out = jax.jit(lambda r: controlled.tokenwise_cd(mdp.policy(), value, inputs, r, cfg,
                                                  beta=beta))(jax.random.PRNGKey(0))
  cd = mdp.cd_logp(beta)
  tokens = np.asarray(out.tokens)
  seen = set()
  for row, lq in zip(tokens, _logq(out)):
    y = tuple(int(t) for t in row if t)
    seen.add(y)
    assert y[-1] == EOS
    assert abs(lq - np.log(mdp.prob(y, cd))) < 1e-5
  assert len(seen) > 20  # the check covered most of the 40 responses
  # pi*_beta is a distribution over complete responses that tilts p toward reward
  pi = np.array([mdp.prob(y, cd) for y in mdp.responses])
  p = np.array([mdp.prob(y) for y in mdp.responses])
  r = np.array([mdp.reward[np_index(y)] for y in mdp.responses])
  assert abs(pi.sum() - 1) < 1e-6 and pi @ r > p @ r
  # the sampler's KL is the exact per-token KL(pi*_beta || p) along the sample
  y = tuple(int(t) for t in tokens[0] if t)
  kl = 0.0
  for i in range(len(y)):
    q, lp = cd[np_index(y[:i])], mdp.logp[np_index(y[:i])]
    live = np.isfinite(q)
    kl += float(np.sum(np.exp(q[live]) * (q[live] - lp[live])))
  assert abs(float(np.asarray(out.kl)[0].sum()) - kl) < 1e-5


def test_tokenwise_cd_top_k_restricts_candidates(mdp):
  beta, k = 0.5, 2
  cfg = sampler.SamplingConfig(max_new_tokens=MAX_LEN)
  inputs = jnp.asarray(np.repeat(PROMPTS, 64, axis=0))
  for value in (mdp.value_model(), mdp.q_model()):
    out = jax.jit(lambda r, v=value: controlled.tokenwise_cd(mdp.policy(), v, inputs, r, cfg,
                                                             beta=beta, top_k=k))(
        jax.random.PRNGKey(1))
    cd = mdp.cd_logp(beta, top_k=k)
    for row, lq in zip(np.asarray(out.tokens), _logq(out)):
      y = tuple(int(t) for t in row if t)
      assert abs(lq - np.log(mdp.prob(y, cd))) < 1e-5


# ---- blockwise CD -------------------------------------------------------------------
def test_blockwise_with_whole_response_blocks_is_best_of_n(mdp):
  """K = n and M = the maximum length: blockwise CD with V* picks best-of-n by reward."""
  n, b = 4, 16
  cfg = sampler.SamplingConfig(max_new_tokens=MAX_LEN)
  inputs = jnp.asarray(np.repeat(PROMPTS, b, axis=0))
  policy = mdp.policy()
  rng = jax.random.PRNGKey(3)
  out = jax.jit(lambda r: controlled.blockwise_cd(policy, mdp.value_model(), inputs, r, cfg,
                                                  num_blocks=n, block_len=MAX_LEN))(rng)
  sample_fn = jax.jit(lambda x, r, k: sampler.generate(policy.lm, policy.params, x, r, cfg,
                                                       num_samples=k), static_argnums=2)
  reward = lambda prompts, responses: [mdp.reward[np_index(tuple(y) + (EOS,))]
                                       for y in responses]
  best = bon.best_of_n(sample_fn, inputs, jax.random.fold_in(rng, 0), n=n, reward_fn=reward)
  np.testing.assert_array_equal(np.asarray(out.tokens), best.best_tokens)
  assert len({tuple(r) for r in best.best_tokens.tolist()}) > 3
  # the reported log-probs are those of the emitted tokens under p
  for row, lp in zip(np.asarray(out.tokens), np.asarray(out.model_logprobs[0])):
    y = tuple(int(t) for t in row if t)
    assert abs(lp.sum() - np.log(mdp.prob(y))) < 1e-5
  assert out.kl is None


def test_blockwise_short_blocks_keep_the_best_block(mdp):
  """M = 1 with V*: every token is the argmax of V*([s, z]) among K draws from p."""
  k, b = 3, 32
  cfg = sampler.SamplingConfig(max_new_tokens=MAX_LEN)
  inputs = jnp.asarray(np.repeat(PROMPTS, b, axis=0))
  out = jax.jit(lambda r: controlled.blockwise_cd(mdp.policy(), mdp.value_model(), inputs, r, cfg,
                                                  num_blocks=k, block_len=1))(
      jax.random.PRNGKey(4))
  # re-draw each block's K candidates with the sampler, as the decoder does
  lm = mdp.policy().lm
  cfg1 = sampler.SamplingConfig(max_new_tokens=1)

  @jax.jit
  def draw(prefix, n, key, ids):
    cache = {"prefix": jnp.broadcast_to(prefix, (k, MAX_LEN)), "len": jnp.full((k,), n)}
    return sampler.sample_loop(lambda tok, c: lm.step(mdp.policy().params, tok, c), cache,
                               jnp.zeros((k,), jnp.int32), key, cfg1, row_ids=ids).tokens[:, 0]
  tokens = np.asarray(out.tokens)
  checked = 0
  for t in range(MAX_LEN):
    key = jax.random.fold_in(jax.random.PRNGKey(4), t)
    for i in range(b):
      if t and tokens[i, t - 1] in (EOS, 0):
        continue
      s = tuple(int(x) for x in tokens[i, :t])
      prefix = jnp.asarray(list(s) + [0] * (MAX_LEN - t), jnp.int32)
      cands = np.asarray(draw(prefix, t, key, i * k + jnp.arange(k)))
      vals = [mdp.value[np_index(s + (int(z),))] for z in cands]
      assert tokens[i, t] == cands[int(np.argmax(vals))]
      checked += 1
  assert checked > b


# ---- real tiny models: incremental scores = teacher-forced scores at every step ----------
FAMILIES = ["t5", "decoder"]
REAL_PROMPTS = random_batch(np.random.default_rng(0), 4, 6, 4, 64)[0]  # [4, 6]


def _tiny(family, head, seed):
  """A random tiny model, one layer per stack (these tests are about the caches)."""
  lm = LanguageModel(TINY_SHALLOW[family], output_head=head)
  params = lm.init(jax.random.PRNGKey(seed))[0]
  if "scalar" in head:
    # NOTE: ScalarHead starts at zero, and V = 0 everywhere would hide any cache error.
    kernel = jax.random.normal(jax.random.PRNGKey(seed + 1), params["scalar_head"]["kernel"].shape)
    params = dict(params, scalar_head=dict(params["scalar_head"], kernel=kernel))
  return Component(lm, params)


def _consumed(family, index) -> int:
  """Tokens a value cache has consumed since prefill, from its "index"."""
  return int(index) - (0 if family == "t5" else REAL_PROMPTS.shape[1] - 1)


def _record(monkeypatch, name, keep):
  """Wraps controlled.<name> so that keep(args, result) reaches the host at every call."""
  records, inner = [], getattr(controlled, name)

  def wrapped(*args):
    res = inner(*args)
    jax.debug.callback(lambda *xs: records.append([np.asarray(x) for x in xs]),
                       *keep(args, res))
    return res
  monkeypatch.setattr(controlled, name, wrapped)
  return records


def _values_tf(value, inputs, prefixes, width):
  """Teacher-forced V([x_n, s_n]) [N] for prompts [N, Li] and prefixes (token lists)."""
  targets = np.zeros((len(prefixes), width), np.int32)
  for i, s in enumerate(prefixes):
    targets[i, :len(s)] = s
  v = jax.jit(lambda x, y: value.lm.forward(value.params, x, y)["values"])(
      jnp.asarray(inputs), jnp.asarray(targets))
  return np.asarray(v)[np.arange(len(prefixes)), [len(s) for s in prefixes]]


def _logp_tf(policy, inputs, tokens):
  """Teacher-forced log p(. | x, y^{<t}) [B, T, V] without the pad id, in float64."""
  forward = jax.jit(policy.lm.forward)  # NOTE: eager, every op is compiled on its own
  logits = np.asarray(forward(policy.params, jnp.asarray(inputs),
                              jnp.asarray(tokens))["logits"], np.float64)
  logits[..., sampler.PAD_ID] = -np.inf
  m = logits.max(-1, keepdims=True)
  return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def _max_error_per_step(steps, err) -> dict:
  steps = np.asarray(steps)
  return {int(t): float(err[steps == t].max()) for t in sorted(set(steps.tolist()))}


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenwise_cd_scalar_values_equal_teacher_forced_at_every_step(family, monkeypatch):
  """Every candidate's V([s, z]) from the forked value cache = a teacher-forced pass.

  The last step scores [x, y^{<T-1}, z], one token more than the response
  length T, so the value cache needs T + 1 slots.
  """
  policy, value = _tiny(family, "lm", 0), _tiny(family, "scalar", 1)
  beta, k, t_max, n = 1.0, 4, 5, 2
  records = _record(monkeypatch, "candidate_values",
                    lambda args, v: (args[1]["index"], args[2], v))
  cfg = sampler.SamplingConfig(max_new_tokens=t_max)
  out = jax.jit(lambda r: controlled.tokenwise_cd(policy, value, jnp.asarray(REAL_PROMPTS), r, cfg,
                                                  beta=beta, top_k=k, num_samples=n))(
      jax.random.PRNGKey(0))
  jax.effects_barrier()
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  x = np.repeat(REAL_PROMPTS, n, axis=0)
  keys, prefixes, got = [], [], []
  for index, cands, v in records:
    t = _consumed(family, index) - 1  # the step consumed its own token first
    for b in range(tokens.shape[0]):
      if t < lengths[b]:
        for z, vz in zip(cands[b].tolist(), v[b].tolist()):
          keys.append((b, t, z))
          prefixes.append(tokens[b, :t].tolist() + [z])
          got.append(vz)
  steps = [t for _, t, _ in keys]
  assert sorted(set(steps)) == list(range(t_max))  # the rows reach the last step
  want = _values_tf(value, x[[b for b, _, _ in keys]], prefixes, t_max + 1)
  err = np.abs(np.asarray(got) - want)
  assert err.max() < 1e-4, f"max |V_incremental - V_teacher_forced| per step: " \
                           f"{_max_error_per_step(steps, err)}"
  # ...and the sampler's log-probs are those of p(z | s) exp(V([s, z]) / beta) over the top-k
  # of p (pad excluded), all from teacher-forced passes.
  v_tf = {key: w for key, w in zip(keys, want)}
  logp = _logp_tf(policy, x, tokens)
  for b in range(tokens.shape[0]):
    for t in range(lengths[b]):
      cands = np.argsort(-logp[b, t])[:k]
      assert {z for bb, tt, z in keys if (bb, tt) == (b, t)} == set(cands.tolist())
      scores = np.array([logp[b, t, z] + v_tf[(b, t, z)] / beta for z in cands])
      lse = scores.max() + np.log(np.exp(scores - scores.max()).sum())
      want_lq = scores[list(cands).index(tokens[b, t])] - lse
      assert abs(float(out.logprobs[b, t]) - want_lq) < 1e-4, (b, t)


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenwise_cd_q_head_equals_teacher_forced_at_every_step(family):
  """With a Q-head over the whole vocabulary, every step's log-prob and KL = teacher forcing."""
  policy, qmodel = _tiny(family, "lm", 0), _tiny(family, "lm", 2)
  beta, t_max, n = 0.5, 5, 2
  cfg = sampler.SamplingConfig(max_new_tokens=t_max)
  out = jax.jit(lambda r: controlled.tokenwise_cd(policy, qmodel, jnp.asarray(REAL_PROMPTS), r,
                                                  cfg, beta=beta, num_samples=n))(
      jax.random.PRNGKey(0))
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  x = np.repeat(REAL_PROMPTS, n, axis=0)
  assert lengths.max() == t_max
  logp = _logp_tf(policy, x, tokens)
  q = np.asarray(qmodel.lm.forward(qmodel.params, jnp.asarray(x), jnp.asarray(tokens))["logits"],
                 np.float64)
  scores = logp + q / beta
  logq = scores - scores.max(-1, keepdims=True)
  logq -= np.log(np.exp(logq).sum(-1, keepdims=True))
  for b in range(tokens.shape[0]):
    for t in range(lengths[b]):
      y = tokens[b, t]
      assert abs(float(out.logprobs[b, t]) - logq[b, t, y]) < 1e-4, (b, t)
      assert abs(float(out.model_logprobs[0, b, t]) - logp[b, t, y]) < 1e-4, (b, t)
      live = np.isfinite(logq[b, t])
      kl = np.sum(np.exp(logq[b, t, live]) * (logq[b, t, live] - logp[b, t, live]))
      assert abs(float(out.kl[b, t]) - kl) < 1e-4, (b, t)


@pytest.mark.parametrize("family", FAMILIES)
def test_blockwise_cd_block_values_equal_teacher_forced(family, monkeypatch):
  """Every candidate block's V([s, z^M]) from the forked value cache = teacher forcing,
  including the last block, which runs past the response length."""
  policy, value = _tiny(family, "lm", 0), _tiny(family, "scalar", 1)
  kk, m, t_max = 3, 2, 5
  records = _record(monkeypatch, "block_values",
                    lambda args, res: (args[1]["index"], args[3], args[4], res[0]))
  cfg = sampler.SamplingConfig(max_new_tokens=t_max)
  out = jax.jit(lambda r: controlled.blockwise_cd(policy, value, jnp.asarray(REAL_PROMPTS), r,
                                                  cfg, num_blocks=kk, block_len=m))(
      jax.random.PRNGKey(0))
  jax.effects_barrier()
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  rows, prefixes, got, steps = [], [], [], []
  for index, blocks, blens, v in records:
    t = _consumed(family, index)  # the pending token is not consumed yet
    assert t % m == 0
    for r in range(blocks.shape[0]):
      b = r // kk
      if t < lengths[b]:
        rows.append(b)
        prefixes.append(tokens[b, :t].tolist() + blocks[r, :max(int(blens[r]), 1)].tolist())
        got.append(float(v[r]))
        steps.append(t)
      if t < lengths[b] and r % kk == 0:  # the emitted block is the best-scored one
        best = r + int(np.argmax(v[r:r + kk]))
        np.testing.assert_array_equal(tokens[b, t:t + m], blocks[best, :min(m, t_max - t)])
  assert sorted(set(steps)) == list(range(0, t_max, m))
  want = _values_tf(value, REAL_PROMPTS[rows], prefixes, t_max + m + 1)
  err = np.abs(np.asarray(got) - want)
  assert err.max() < 1e-4, f"max |V_incremental - V_teacher_forced| per block start: " \
                           f"{_max_error_per_step(steps, err)}"


# ---- bad input -------------------------------------------------------------------------
def test_bad_settings_are_one_line_errors(mdp):
  p, v = mdp.policy(), mdp.value_model()
  other = Component(TabularLM(vocab_size=VOCAB + 1, output_head="scalar"), v.params)
  with pytest.raises(UserError, match="value model has vocabulary size 6 but the policy has 5"):
    controlled.validate_tokenwise(p, other, beta=1.0, top_k=2)
  with pytest.raises(UserError, match="top_k = 6 is larger than the vocabulary"):
    controlled.validate_tokenwise(p, v, beta=1.0, top_k=VOCAB + 1)
  with pytest.raises(UserError, match="beta must be a finite number > 0"):
    controlled.validate_tokenwise(p, v, beta=0.0, top_k=2)
  with pytest.raises(UserError, match="block length M must be an integer >= 1"):
    controlled.validate_blockwise(p, v, num_blocks=2, block_len=0)
  with pytest.raises(UserError, match="candidate blocks K must be an integer >= 1"):
    controlled.validate_blockwise(p, v, num_blocks=0, block_len=2)
  with pytest.raises(UserError, match="value model needs output_head"):
    controlled.validate_tokenwise(p, Component(TabularLM(output_head="x"), v.params), 1.0, 2)


# ---- the sampler's KL and best-of-n against enumeration ----------------------------
def test_dera_sampler_kl_equals_enumeration_per_step_and_per_sequence():
  """DeRa at lambda = 0.5 between two tabular policies: every step's reported KL is
  KL(pi(. | s) || p(. | s)) of the enumerated mixture at that state, and the mean of the
  sequence KLs matches the enumerated KL(pi || p) over the 40 responses."""
  from realign_jax.decoding import dera
  ref, al = TinyMDP(seed=0), TinyMDP(seed=1, temperature=2.0)
  lam, n = 0.5, 3000
  mix = lam * al.logits.astype(np.float64) + (1 - lam) * ref.logits.astype(np.float64)
  logpi = np.where(np.isfinite(mix), mix - np.logaddexp.reduce(
      np.where(np.isfinite(mix), mix, -np.inf), axis=-1, keepdims=True), -np.inf)
  step_kl = {}
  for s in all_states():
    i = np_index(s)
    live = np.isfinite(logpi[i])
    step_kl[s] = float(np.sum(np.exp(logpi[i, live]) * (logpi[i, live] - ref.logp[i, live])))
  cfg = sampler.SamplingConfig(max_new_tokens=MAX_LEN)
  inputs = jnp.asarray(np.repeat(PROMPTS, n, axis=0))
  out = jax.jit(lambda r: dera.sample_mixture([ref.policy(), al.policy()], dera.dera_weights(lam),
                                              inputs, r, cfg))(jax.random.PRNGKey(5))
  tokens, kls = np.asarray(out.tokens), np.asarray(out.kl, np.float64)
  for row in range(50):
    y = tuple(int(t) for t in tokens[row] if t)
    for t in range(len(y)):
      assert abs(kls[row, t] - step_kl[y[:t]]) < 1e-5, (row, t)
    assert np.all(kls[row, len(y):] == 0.0)
  seq = kls.sum(axis=1)
  prob_pi = lambda y: np.exp(sum(logpi[np_index(y[:i]), y[i]] for i in range(len(y))))
  exact = sum(prob_pi(y) * (np.log(prob_pi(y)) - np.log(ref.prob(y))) for y in ref.responses)
  assert abs(seq.mean() - exact) < 4 * seq.std(ddof=1) / np.sqrt(n), (seq.mean(), exact)


def test_best_of_n_distribution_and_exact_kl_against_enumeration():
  """Best-of-4 over the 40 responses (distinct rewards): the kept responses' frequencies
  follow pi_n(y) = F(y)^n - F(y-)^n, and `exact_kl` equals sum_y pi_n log(pi_n / p)."""
  from realign_jax.evaluation import best_of_n_theory as bon_theory
  mdp, n, rows = TinyMDP(seed=0), 4, 4000
  p = np.array([mdp.prob(y) for y in mdp.responses])
  r = np.array([mdp.reward[np_index(y)] for y in mdp.responses])
  order = np.argsort(r)
  cdf = np.cumsum(p[order])
  pi = np.empty_like(p)
  pi[order] = cdf ** n - np.concatenate([[0.0], cdf[:-1]]) ** n
  exact = float(np.sum(pi * np.log(pi / p)))
  assert abs(bon_theory.exact_kl(p, r, n) - exact) < 1e-6  # p sums to 1 within 1e-7
  policy = mdp.policy()
  cfg = sampler.SamplingConfig(max_new_tokens=MAX_LEN)
  sample_fn = jax.jit(lambda x, key, k: sampler.generate(policy.lm, policy.params, x, key, cfg,
                                                         num_samples=k), static_argnums=2)
  reward = lambda prompts, responses: [mdp.reward[np_index(tuple(y) + (EOS,))]
                                       for y in responses]
  best = bon.best_of_n(sample_fn, jnp.asarray(np.repeat(PROMPTS, rows, axis=0)),
                       jax.random.PRNGKey(6), n=n, reward_fn=reward)
  index_of = {y: i for i, y in enumerate(mdp.responses)}
  counts = np.zeros(len(p))
  for row in np.asarray(best.best_tokens):
    counts[index_of[tuple(int(t) for t in row if t)]] += 1
  freq = counts / rows
  se = np.sqrt(pi * (1 - pi) / rows)
  assert np.all(np.abs(freq - pi) < 4.5 * se + 1e-3), np.max(np.abs(freq - pi) / (se + 1e-12))
  # and it is not p itself: the test can tell the two apart
  assert np.max(np.abs(freq - p) / np.sqrt(p * (1 - p) / rows)) > 10
