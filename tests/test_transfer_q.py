"""Transfer Q* and ARGS against enumeration on the tiny MDP, and forked-cache
rollouts against rollouts re-generated from scratch with real tiny models."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realign_jax.decoding import sampler
from realign_jax.decoding import transfer_q as tq
from realign_jax.decoding.dera import Component
from realign_jax.plumbing.errors import UserError
from realign_jax.models.api import LanguageModel
from tests.helpers import TINY_SHALLOW, random_batch
from tests.test_controlled import (EOS, MAX_LEN, PROMPTS, VOCAB, WORDS, TabularLM, TinyMDP,
                                   all_states, np_index)


@pytest.fixture(scope="module")
def world():
  """Reference p, baseline rho_BL (another random table), target and baseline rewards."""
  ref = TinyMDP(seed=0)
  base = TinyMDP(seed=1, temperature=2.0)
  r_bl = TinyMDP(seed=2).reward  # a second, distinct reward table
  return ref, base, r_bl


def _completions(mdp, s):
  """All complete responses extending s, with their probability under mdp given s."""
  out = []

  def rec(y, p):
    if y and y[-1] == EOS:
      out.append((y, p))
      return
    i = np_index(y)
    for z in range(1, VOCAB):
      if np.isfinite(mdp.logp[i, z]):
        rec(y + (z,), p * np.exp(mdp.logp[i, z]))
  rec(tuple(s), 1.0)
  return out


def _greedy_completion(mdp, y):
  while y[-1] != EOS:
    y = y + (int(np.argmax(mdp.logp[np_index(y)])),)
  return y


def _top_k(ref, i, k):
  """The top-k tokens of p at state index i."""
  kth = np.sort(ref.logp[i])[::-1][k - 1]
  return [z for z in range(VOCAB) if np.isfinite(ref.logp[i, z]) and ref.logp[i, z] >= kth]


def _paper_policy(ref, q_fn, alpha, k, temperature=1.0):
  """The paper's token policy (Section 3.3), as log-probs, by enumeration:

  pi(z | s) = p(z | s)^(1/T) exp(Q(s, z) / alpha) / Z over the top-k of p
  (at T = 1: p exp(Q / alpha), normalised), alpha the KL weight.
  """
  out = np.full_like(ref.logp, -np.inf)
  for s in all_states():
    i = np_index(s)
    cand = _top_k(ref, i, k)
    w = {z: np.exp(ref.logp[i, z]) ** (1.0 / temperature) * np.exp(q_fn(s, z) / alpha)
         for z in cand}
    total = sum(w.values())
    for z in cand:
      out[i, z] = np.log(w[z] / total)
  return out


def _authors_policy(ref, q_fn, alpha, k):
  """log pi(z | s) = log softmax over the top-k of p of log p + alpha Q(s, z).

  The authors' code (alpha multiplies Q), and ARGS with w for alpha.
  """
  out = np.full_like(ref.logp, -np.inf)
  for s in all_states():
    i = np_index(s)
    scores = np.full(VOCAB, -np.inf)
    for z in _top_k(ref, i, k):
      scores[z] = ref.logp[i, z] + alpha * q_fn(s, z)
    m = scores.max()
    out[i] = scores - m - np.log(np.sum(np.exp(scores - m)))
  return out


def _decode(ref, base, cfg, reward, baseline_reward=None, n=96, seed=0, temperature=1.0):
  inputs = jnp.asarray(np.repeat(PROMPTS, n, axis=0))
  dcfg = sampler.SamplingConfig(max_new_tokens=MAX_LEN, temperature=temperature)
  f = jax.jit(lambda r: tq.transfer_q(ref.policy(), base.policy(), inputs, r, dcfg, cfg, reward,
                                      baseline_reward=baseline_reward))
  out, bad = f(jax.random.PRNGKey(seed))
  assert not np.any(np.asarray(bad))
  return out


def _check(out, ref, policy_logp, min_seen=8):
  seen = set()
  for row, lq in zip(np.asarray(out.tokens), np.asarray(out.logprobs).sum(1)):
    y = tuple(int(t) for t in row if t)
    seen.add(y)
    assert abs(lq - np.log(ref.prob(y, policy_logp))) < 1e-5, y
  assert len(seen) > min_seen


GREEDY_ROLLOUT = sampler.SamplingConfig(max_new_tokens=1, greedy=True)


def _greedy_q(ref, base, r_bl, mode="direct", weighting="self_normalized",
              alpha_traj=1.0, convention="paper"):
  """Q(s, z) of exhaustive (greedy) baseline rollouts, from the paper's eq. 15 weights."""
  def q(s, z):
    y = _greedy_completion(base, tuple(s) + (z,))
    r, rb = ref.reward[np_index(y)], r_bl[np_index(y)]
    if mode == "indirect" and weighting == "unnormalized":
      logw = (r - rb) / alpha_traj if convention == "paper" else alpha_traj * (r - rb)
      return np.exp(logw) * r
    return r
  return q


@pytest.mark.parametrize("mode,weighting,convention,temperature", [
    ("direct", "self_normalized", "paper", 1.0),
    ("indirect", "self_normalized", "paper", 1.0),
    ("indirect", "unnormalized", "paper", 1.0),
    ("direct", "self_normalized", "paper", 0.5),
    ("direct", "self_normalized", "authors", 1.0),
    ("indirect", "unnormalized", "authors", 1.0)])
def test_tq_with_exhaustive_rollouts_equals_enumeration(world, mode, weighting, convention,
                                                         temperature):
  """Greedy baseline rollouts are exhaustive (one trajectory per candidate).

  "paper" (the default) against p^(1/T) exp(Q / alpha) normalised over the top-k;
  "authors" against log p + alpha Q.
  """
  ref, base, r_bl = world
  k = 3
  # NOTE: alpha = 0.5 (paper) and 2 (authors) are the same tilt: a code that
  # multiplied by the paper's alpha would tilt by 0.5 Q instead of 2 Q and fail.
  alpha, alpha_traj = (0.5, 0.5) if convention == "paper" else (2.0, 2.0)
  cfg = tq.TQConfig(top_k=k, horizon=MAX_LEN, alpha=alpha, num_rollouts=2, mode=mode,
                    weighting=weighting, alpha_traj=alpha_traj, alpha_convention=convention,
                    rollout=GREEDY_ROLLOUT)
  tq.validate_tq(ref.policy(), base.policy(), cfg, baseline_reward=ref.token_reward(r_bl))
  q = _greedy_q(ref, base, r_bl, mode, weighting, alpha_traj, convention)
  out = _decode(ref, base, cfg, ref.token_reward(),
                ref.token_reward(r_bl) if mode == "indirect" else None, temperature=temperature)
  want = (_paper_policy(ref, q, alpha, k, temperature) if convention == "paper"
          else _authors_policy(ref, q, alpha, k))
  _check(out, ref, want)


def test_tq_larger_paper_alpha_is_closer_to_the_reference(world):
  """alpha is the KL weight: the exact KL of the first step (every row starts at
  the empty prefix) decreases as alpha grows and equals the enumeration's, and so
  do the exact sequence KL of the enumerated policy and the decoder's mean KL."""
  ref, base, r_bl = world
  k = 3
  q = _greedy_q(ref, base, r_bl)
  first, exact, mean = [], [], []
  for alpha in (0.25, 1.0, 4.0):
    cfg = tq.TQConfig(top_k=k, horizon=MAX_LEN, alpha=alpha, rollout=GREEDY_ROLLOUT)
    kl = np.asarray(_decode(ref, base, cfg, ref.token_reward(), n=256).kl)
    np.testing.assert_allclose(kl[:, 0], kl[0, 0], rtol=1e-6)
    pol = _paper_policy(ref, q, alpha, k)
    i = np_index(())
    want = sum(np.exp(pol[i, z]) * (pol[i, z] - ref.logp[i, z]) for z in _top_k(ref, i, k))
    assert abs(kl[0, 0] - want) < 1e-5, (alpha, kl[0, 0], want)
    first.append(want)
    exact.append(sum(ref.prob(y, pol) * np.log(ref.prob(y, pol) / ref.prob(y))
                     for y in ref.responses if ref.prob(y, pol) > 0))
    mean.append(kl.sum(1).mean())
  assert first[0] > first[1] > first[2], first
  assert exact[0] > exact[1] > exact[2], exact
  assert mean[0] > mean[1] > mean[2], mean


def test_alpha_conventions_are_reciprocal():
  """"authors" with 1 / alpha (and 1 / alpha_traj) is "paper" with alpha, at T = 1."""
  paper = tq.TQConfig(alpha=4.0)
  authors = dataclasses.replace(paper, alpha=0.25, alpha_convention="authors")
  assert tq.q_coefficient(paper) == tq.q_coefficient(authors) == 0.25
  # the paper's alpha keeps its meaning at any temperature: logits / T + Q / alpha
  assert tq.q_coefficient(paper, temperature=2.0) == 0.5
  assert tq.q_coefficient(authors, temperature=2.0) == 0.25
  rng = np.random.default_rng(0)
  r, rb = (jnp.asarray(rng.uniform(size=(3, 5)), jnp.float32) for _ in range(2))
  for weighting in tq.WEIGHTINGS:
    p = tq.TQConfig(mode="indirect", weighting=weighting, alpha_traj=0.5)
    a = dataclasses.replace(p, alpha_traj=2.0, alpha_convention="authors")
    np.testing.assert_allclose(tq.combine(r, rb, p), tq.combine(r, rb, a), rtol=1e-6)


def test_tq_q_values_match_expectations(world):
  """Sampled rollouts (m = 4000) at the empty prefix against exact expectations."""
  ref, base, r_bl = world
  m, a = 4000, 0.5
  inputs = jnp.asarray(PROMPTS)
  cands = jnp.asarray([[2, 3, 4, EOS]])
  bl = base.policy()
  rollout = sampler.SamplingConfig(max_new_tokens=1)

  @jax.jit
  def qv(mode, weighting):
    del mode, weighting
    return None
  results = {}
  for mode, weighting in (("direct", "self_normalized"), ("indirect", "self_normalized"),
                          ("indirect", "unnormalized")):
    cfg = tq.TQConfig(top_k=4, horizon=MAX_LEN, num_rollouts=m, mode=mode, weighting=weighting,
                      alpha_traj=a, rollout=rollout)

    @jax.jit
    def f(rng, cfg=cfg):
      cache, first = bl.lm.prefill(bl.params, inputs, 8)
      _, cache = bl.lm.step(bl.params, first, cache)
      return tq.q_values(bl, cache, inputs, jnp.zeros((1, 4), jnp.int32), 0, first, cands, rng,
                         jnp.zeros((1,), jnp.int32), cfg, ref.token_reward(),
                         ref.token_reward(r_bl), 8)[0]
    results[(mode, weighting)] = np.asarray(f(jax.random.PRNGKey(5)))[0]
  for i, z in enumerate([2, 3, 4, EOS]):
    comp = _completions(base, (z,))
    p = np.array([pr for _, pr in comp])
    r = np.array([ref.reward[np_index(y)] for y, _ in comp])
    rb = np.array([r_bl[np_index(y)] for y, _ in comp])
    w = np.exp((r - rb) / a)
    exact = {("direct", "self_normalized"): (p @ r, np.sqrt(p @ r**2 - (p @ r)**2)),
             ("indirect", "self_normalized"): ((p * w) @ r / (p @ w),
                                               np.sqrt(p @ (w**2 * (r - (p * w) @ r / (p @ w))**2))
                                               / (p @ w)),
             ("indirect", "unnormalized"): (p @ (w * r), np.sqrt(p @ (w * r)**2 - (p @ (w * r))**2))}
    for key, (mean, sd) in exact.items():
      got = results[key][i]
      assert abs(got - mean) <= 4 * sd / np.sqrt(m) + 1e-6, (key, z, got, mean)
  # the indirect estimate moves toward the target tilt: it differs from the direct one
  assert not np.allclose(results[("direct", "self_normalized")],
                         results[("indirect", "self_normalized")], atol=1e-3)


def test_args_equals_enumeration(world):
  ref, _, _ = world
  rng = np.random.default_rng(7)
  partial = rng.uniform(size=VOCAB ** MAX_LEN)  # a reward for every (partial) response
  w, k = 1.5, 2
  inputs = jnp.asarray(np.repeat(PROMPTS, 96, axis=0))
  dcfg = sampler.SamplingConfig(max_new_tokens=MAX_LEN)
  out, bad = jax.jit(lambda r: tq.args_decode(ref.policy(), inputs, r, dcfg,
                                              ref.token_reward(partial), top_k=k, weight=w))(
      jax.random.PRNGKey(2))
  assert not np.any(np.asarray(bad))
  _check(out, ref, _authors_policy(ref, lambda s, z: partial[np_index(tuple(s) + (z,))], w, k),
         4)


# ---- real tiny models: forked caches = from scratch -------------------------------------
def _count_reward(token_id):
  def reward(inputs, responses, lengths):
    del inputs
    live = jnp.arange(responses.shape[1])[None] < lengths[:, None]
    return jnp.sum((responses == token_id) & live, axis=1).astype(jnp.float32) / 4.0
  return reward


@pytest.mark.parametrize("family", ["t5", "decoder"])
def test_forked_rollouts_equal_rollouts_from_scratch(family):
  """Q(s, z) and the rollouts themselves: forked cache = re-fed prefix = no cache."""
  # NOTE: one layer per stack: the test is about the cache, and compiling three
  # rollout loops of the full tiny models dominated this file's time.
  lm = LanguageModel(TINY_SHALLOW[family])
  base = Component(lm, lm.init(jax.random.PRNGKey(1))[0])
  inputs = jnp.asarray(random_batch(np.random.default_rng(0), 2, 6, 4, 64)[0])
  t, tmax, h = 3, 5, 4
  prefix = jnp.asarray(np.random.default_rng(1).integers(2, 64, (2, tmax)), jnp.int32)
  cands = jnp.asarray([[5, 9, 1], [7, 8, 9]], jnp.int32)

  @jax.jit
  def run(rng):
    cache, first = lm.prefill(base.params, inputs, tmax + h)
    for tok in [first] + [prefix[:, i] for i in range(t)]:
      _, cache = lm.step(base.params, tok, cache)
    res = []
    for how in tq.ROLLOUTS:
      cfg = tq.TQConfig(top_k=3, horizon=h, num_rollouts=2, mode="indirect", rollouts=how,
                        rollout=sampler.SamplingConfig(max_new_tokens=1, temperature=0.7))
      q, out = tq.q_values(base, cache, inputs, prefix, jnp.asarray(t), first, cands, rng,
                           jnp.arange(2), cfg, _count_reward(7), _count_reward(9), tmax + h)
      res.append((q, out.tokens))
    return res
  res = run(jax.random.PRNGKey(3))
  for q, tokens in res[1:]:
    np.testing.assert_array_equal(np.asarray(res[0][1]), np.asarray(tokens))
    np.testing.assert_allclose(np.asarray(res[0][0]), np.asarray(q), atol=1e-6)
  toks = np.asarray(res[0][1])
  assert len({tuple(r) for r in toks.tolist()}) > 4  # real, varied rollouts


# ---- bad input -----------------------------------------------------------------------------
def test_bad_settings_are_one_line_errors(world):
  ref, base, _ = world
  p, b = ref.policy(), base.policy()
  with pytest.raises(UserError, match="larger than the vocabulary"):
    tq.validate_tq(p, b, tq.TQConfig(top_k=VOCAB + 1))
  with pytest.raises(UserError, match="horizon H must be an integer >= 1"):
    tq.validate_tq(p, b, tq.TQConfig(top_k=2, horizon=0))
  with pytest.raises(UserError, match="number of rollouts m"):
    tq.validate_tq(p, b, tq.TQConfig(top_k=2, num_rollouts=0))
  with pytest.raises(UserError, match="needs the baseline's reward"):
    tq.validate_tq(p, b, tq.TQConfig(top_k=2, mode="indirect"))
  other = Component(TabularLM(vocab_size=6), b.params)
  with pytest.raises(UserError, match="baseline model has vocabulary size 6"):
    tq.validate_tq(p, other, tq.TQConfig(top_k=2))
  # alpha: the paper's KL weight divides Q (> 0); the authors' multiplier may be 0
  for alpha in (0.0, -1.0, float("inf"), float("nan")):
    with pytest.raises(UserError, match=r"^alpha must be a finite number > 0 under "
                                        r"alpha_convention 'paper'[^\n]*$"):
      tq.validate_tq(p, b, tq.TQConfig(top_k=2, alpha=alpha))
  tq.validate_tq(p, b, tq.TQConfig(top_k=2, alpha=0.0, alpha_convention="authors"))
  with pytest.raises(UserError, match="alpha must be a finite number >= 0, got -1"):
    tq.validate_tq(p, b, tq.TQConfig(top_k=2, alpha=-1.0, alpha_convention="authors"))
  with pytest.raises(UserError, match="alpha_traj must be a finite number > 0 under"):
    tq.validate_tq(p, b, tq.TQConfig(top_k=2, mode="indirect", alpha_traj=0.0),
                   baseline_reward=ref.token_reward())
  with pytest.raises(UserError, match="alpha_convention must be one of"):
    tq.validate_tq(p, b, tq.TQConfig(top_k=2, alpha_convention="inverse"))
  with pytest.raises(UserError, match="larger than the vocabulary"):
    tq.validate_args(p, top_k=VOCAB + 1, weight=1.0)
  nan_reward = lambda x, y, n: jnp.full((x.shape[0],), jnp.nan)
  with pytest.raises(UserError, match="non-finite score"):
    tq.check_reward_finite(nan_reward, jnp.asarray(PROMPTS))
  # a reward that turns NaN only during decoding is flagged per row
  late_nan = lambda x, y, n: jnp.where(n > 2, jnp.nan, 1.0)
  out, bad = jax.jit(lambda r: tq.args_decode(p, jnp.asarray(np.repeat(PROMPTS, 8, 0)), r,
                                              sampler.SamplingConfig(max_new_tokens=MAX_LEN),
                                              late_nan, top_k=2))(jax.random.PRNGKey(0))
  assert np.any(np.asarray(bad))
