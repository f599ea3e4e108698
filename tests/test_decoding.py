"""The sampler, DeRa and best-of-n against exact expectations."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realign_jax.decoding import best_of_n as bon
from realign_jax.decoding import dera, sampler
from realign_jax.plumbing.errors import UserError
from realign_jax.models.api import LanguageModel
from realign_jax.models.config import replace
from realign_jax.parallel import partitioning
from realign_jax.training import policy as policy_lib
from tests.helpers import TINY, random_batch

FAMILIES = ["t5", "decoder"]


def _model(family, seed, **overrides):
  cfg = replace(TINY[family], **overrides) if overrides else TINY[family]
  lm = LanguageModel(cfg)
  return dera.Component(lm, _init_fn(lm)(jax.random.PRNGKey(seed)))


# NOTE: the programs below are jitted once per model and settings, with params, prompts,
# lambdas and keys as arguments: a jitted closure over them compiles again for every value
# (about 2 CPU-s each), and the run's compilation cache cannot reuse it.
@functools.lru_cache(maxsize=None)
def _init_fn(lm):
  return jax.jit(lambda rng: lm.init(rng)[0])  # NOTE: the params (the axes are no arrays)


@functools.lru_cache(maxsize=None)
def _mixture_fn(lms, cfg, num_samples=1):
  def f(params, inputs, weights, rng):
    comps = [dera.Component(lm, p) for lm, p in zip(lms, params)]
    return dera.sample_mixture(comps, weights, inputs, rng, cfg, num_samples=num_samples)
  return jax.jit(f)


@functools.lru_cache(maxsize=None)
def _generate_fn(lm, cfg, num_samples=1):
  return jax.jit(lambda params, inputs, rng: sampler.generate(lm, params, inputs, rng, cfg,
                                                              num_samples=num_samples))


def _mixture(comps, weights, inputs, rng, cfg, num_samples=1):
  """dera.sample_mixture, jitted (see _mixture_fn)."""
  return _mixture_fn(tuple(c.lm for c in comps), cfg, num_samples)(
      tuple(c.params for c in comps), inputs, weights, rng)


def _prompts(b=3, seed=0):
  return random_batch(np.random.default_rng(seed), b, 6, 4, 64)[0]


# ---- hand-built logits ----------------------------------------------------------
def _table_step(table):
  """A fake model: at step t every row gets logits table[t] ([T, V])."""
  table = jnp.asarray(table, jnp.float32)

  def step(tokens, cache):
    return jnp.broadcast_to(table[cache], (tokens.shape[0], table.shape[1])), cache + 1
  return step


def _run(step, b, cfg, rng=0, row_ids=None):
  f = jax.jit(lambda r: sampler.sample_loop(step, jnp.zeros((), jnp.int32),
                                            jnp.zeros((b,), jnp.int32), r, cfg,
                                            row_ids=row_ids))
  return f(jax.random.PRNGKey(rng))


def test_process_logits_exact_sets():
  logits = jnp.array([[0.0, 3.0, 1.0, 2.0, -1.0]])
  k2 = sampler.process_logits(logits, sampler.SamplingConfig(top_k=2))
  assert np.isfinite(np.asarray(k2)).tolist() == [[False, True, False, True, False]]
  # probs sorted: 3.0 -> .644, 2.0 -> .237, 1.0 -> .087, ...; top_p=0.8 keeps {1, 3}
  p = sampler.process_logits(logits, sampler.SamplingConfig(top_p=0.8))
  assert np.isfinite(np.asarray(p)).tolist() == [[False, True, False, True, False]]
  p = sampler.process_logits(logits, sampler.SamplingConfig(top_p=0.9))
  assert np.isfinite(np.asarray(p)).tolist() == [[False, True, True, True, False]]
  p = sampler.process_logits(logits, sampler.SamplingConfig(top_p=0.5))
  assert np.isfinite(np.asarray(p)).tolist() == [[False, True, False, False, False]]
  t = sampler.process_logits(logits, sampler.SamplingConfig(temperature=2.0))
  np.testing.assert_allclose(t, logits / 2.0)


def test_greedy_topk_topp_give_expected_tokens():
  table = np.full((4, 8), -2.0, np.float32)
  best = [5, 3, 7, 1]  # 1 = EOS at the last step
  for t, tok in enumerate(best):
    table[t, tok] = 4.0
    table[t, (tok + 1) % 8] = 3.5  # runner-up with substantial mass
  for cfg in [sampler.SamplingConfig(max_new_tokens=4, greedy=True),
              sampler.SamplingConfig(max_new_tokens=4, top_k=1),
              sampler.SamplingConfig(max_new_tokens=4, top_p=0.3)]:
    out = _run(_table_step(table), 16, cfg, row_ids=jnp.arange(16))
    assert np.asarray(out.tokens).tolist() == [best] * 16
    assert np.asarray(out.lengths).tolist() == [4] * 16
  # top_k=2: only the two top tokens ever appear, in the renormalised proportions.
  out = _run(_table_step(table), 4000, sampler.SamplingConfig(max_new_tokens=1, top_k=2))
  toks = np.asarray(out.tokens)[:, 0]
  assert set(toks.tolist()) <= {5, 6}
  p_top = 1 / (1 + np.exp(-0.5))
  assert abs(np.mean(toks == 5) - p_top) < 0.03
  np.testing.assert_allclose(np.exp(np.asarray(out.logprobs)[:, 0]),
                             np.where(toks == 5, p_top, 1 - p_top), rtol=1e-5)


def test_eos_stops_each_row_and_pads():
  table = np.full((5, 8), -9.0, np.float32)
  table[:, 4] = 0.0
  table[2, 1] = 5.0  # EOS wins at step 2
  out = _run(_table_step(table), 2, sampler.SamplingConfig(max_new_tokens=5, greedy=True))
  assert np.asarray(out.tokens).tolist() == [[4, 4, 1, 0, 0]] * 2
  assert np.asarray(out.lengths).tolist() == [3, 3]
  assert np.all(np.asarray(out.logprobs)[:, 3:] == 0)


def test_bad_sampling_settings():
  with pytest.raises(UserError, match="top_p"):
    sampler.SamplingConfig(top_p=0.0)
  with pytest.raises(UserError, match="top_p"):
    sampler.SamplingConfig(top_p=1.5)
  with pytest.raises(UserError, match="temperature"):
    sampler.SamplingConfig(temperature=0.0)
  with pytest.raises(UserError, match="max_new_tokens"):
    sampler.SamplingConfig(max_new_tokens=0)


# ---- DeRa ---------------------------------------------------------------------
def _dera(ref, al, inputs, lam, cfg, rng=1):
  lam = jnp.full((inputs.shape[0],), lam, jnp.float32)
  return _mixture([ref, al], dera.dera_weights(lam), inputs, jax.random.PRNGKey(rng), cfg)


def _single(c, inputs, cfg, rng=1):
  return _generate_fn(c.lm, cfg)(c.params, inputs, jax.random.PRNGKey(rng))


@functools.lru_cache(maxsize=None)
def _mixed_step_fn(lms):
  def f(params, weights, tok, cache):
    comps = [dera.Component(lm, p) for lm, p in zip(lms, params)]
    return dera.mixed_step(comps, weights)(tok, cache)
  return jax.jit(f)


@functools.lru_cache(maxsize=None)
def _prefill_fn(lms, max_new_tokens):
  def f(params, inputs):
    comps = [dera.Component(lm, p) for lm, p in zip(lms, params)]
    return dera.prefill(comps, inputs, max_new_tokens)
  return jax.jit(f)


@pytest.mark.parametrize("family", FAMILIES)
def test_lambda_zero_and_one_reproduce_each_model(family):
  ref, al = _model(family, 0), _model(family, 1)
  inputs = _prompts(4)
  cfg = sampler.SamplingConfig(max_new_tokens=8)
  for lam, c in [(0.0, ref), (1.0, al)]:
    mixed = _dera(ref, al, inputs, lam, cfg)
    single = _single(c, inputs, cfg)
    np.testing.assert_array_equal(mixed.tokens, single.tokens)
    np.testing.assert_allclose(mixed.logprobs, single.logprobs, atol=1e-6)
  # lam = 0: the per-step KL to the reference is exactly zero.
  assert float(jnp.max(jnp.abs(_dera(ref, al, inputs, 0.0, cfg).kl))) == 0.0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lam", [-0.5, 0.0, 0.3, 1.0, 2.0, 10.0])
def test_proposition1(family, lam):
  """softmax(lam h_al + (1 - lam) h_ref) == normalise(p_ref (p_al / p_ref)^lam) at every step."""
  ref, al = _model(family, 0), _model(family, 1)
  inputs = _prompts(3)
  cfg = sampler.SamplingConfig(max_new_tokens=6)
  out = _dera(ref, al, inputs, lam, cfg)
  # Replay the sampled tokens through the mixed step and check every step's distribution.
  w = dera.dera_weights(jnp.full((3,), lam))
  lms, params = (ref.lm, al.lm), (ref.params, al.params)
  step = functools.partial(_mixed_step_fn(lms), params, w)
  cache = _prefill_fn(lms, cfg.max_new_tokens)(params, inputs)
  tok = jnp.zeros((3,), jnp.int32)
  toks = np.asarray(out.tokens)
  for t in range(cfg.max_new_tokens):
    mixed, cache = step(tok, cache)
    q = np.asarray(jax.nn.softmax(mixed.logits, axis=-1), np.float64)
    p_ref = _softmax64(mixed.components[0])
    p_al = _softmax64(mixed.components[1])
    expected = p_ref * (p_al / p_ref) ** lam
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(q, expected, atol=1e-6)
    live = t < np.asarray(out.lengths)
    sampled = expected.copy()  # the sampler draws from it without pad, renormalised
    sampled[:, sampler.PAD_ID] = 0.0
    sampled /= sampled.sum(-1, keepdims=True)
    np.testing.assert_allclose(
        np.asarray(out.logprobs)[live, t],
        np.log(sampled[np.arange(3), toks[:, t]][live]), atol=1e-5)
    tok = jnp.asarray(toks[:, t])


def _softmax64(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_sweep_equals_separate_calls(family):
  ref, al = _model(family, 0), _model(family, 1)
  inputs = _prompts(3)
  lambdas = [0.0, 0.25, 0.5, 1.0, 2.0, 4.0]
  cfg = sampler.SamplingConfig(max_new_tokens=8, top_k=20)
  sweep = jax.jit(lambda p0, p1, x, lams, r: dera.dera_sweep(
      dera.Component(ref.lm, p0), dera.Component(al.lm, p1), x, lams, r, cfg))(
          ref.params, al.params, inputs, jnp.asarray(lambdas), jax.random.PRNGKey(7))
  toks = np.asarray(sweep.tokens).reshape(3, len(lambdas), -1)
  kl = np.asarray(sweep.kl).reshape(3, len(lambdas), -1)
  for k, lam in enumerate(lambdas):
    sep = _dera(ref, al, inputs, lam, cfg, rng=7)
    np.testing.assert_array_equal(toks[:, k], np.asarray(sep.tokens))
    np.testing.assert_allclose(kl[:, k], np.asarray(sep.kl), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_equals_recomputation(family):
  c = _model(family, 0)
  lm, params = c.lm, c.params
  inputs = _prompts(3)
  t_max = 7
  cfg = sampler.SamplingConfig(max_new_tokens=t_max)

  def cached(params, r):
    cache, first = lm.prefill(params, inputs, t_max)
    return sampler.sample_loop(lambda t, k: lm.step(params, t, k), cache, first, r, cfg)

  def uncached(params, r):
    # The "cache" is the response so far; every step recomputes the whole prefix.
    def step(tok, state):
      buf, t = state
      buf = jnp.where(t > 0, buf.at[:, jnp.maximum(t - 1, 0)].set(tok), buf)
      logits = lm.forward(params, inputs, buf)["logits"]
      return jnp.take(logits, t, axis=1), (buf, t + 1)
    init = (jnp.zeros((inputs.shape[0], t_max), jnp.int32), jnp.zeros((), jnp.int32))
    return sampler.sample_loop(step, init, jnp.zeros((3,), jnp.int32), r, cfg)

  a = jax.jit(cached)(params, jax.random.PRNGKey(3))
  b = jax.jit(uncached)(params, jax.random.PRNGKey(3))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_sampled_rows_never_hold_pad_and_teacher_forcing_scores_them_exactly():
  """A random tiny decoder: no pad before EOS, and teacher-forced log-probs = the sampler's.

  NOTE: the decoder-only teacher-forced pass masks `tokens != 0`, so a sampled
  pad would be scored as if absent (PPO's old/reference log-probs and KL, and
  pairwise scoring, would then be of another distribution than the sampled one).
  """
  ref, al = _model("decoder", 0), _model("decoder", 1)
  inputs, n, t_max = _prompts(16), 4, 8
  cfg = sampler.SamplingConfig(max_new_tokens=t_max)
  x = jnp.repeat(inputs, n, axis=0)
  # lam = 1: the policy al sampled with the reference's log-probs and the exact KL to it.
  out = _mixture([ref, al], dera.dera_weights(jnp.ones(16 * n)), inputs, jax.random.PRNGKey(0),
                 cfg, num_samples=n)
  single = _generate_fn(al.lm, cfg, n)(al.params, inputs, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(out.tokens, single.tokens)
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  mask = policy_lib.length_mask(out.lengths, t_max)
  live = np.asarray(mask) > 0
  bad = sorted({int(b) for b in np.nonzero((tokens == sampler.PAD_ID) & live)[0]})
  assert not bad, f"rows {bad} of {tokens.shape[0]} sampled the pad id before EOS"
  for row, length in zip(tokens, lengths):
    assert len(bon.trim(row)) == length - (row[length - 1] == sampler.EOS_ID)
  forward = jax.jit(al.lm.forward)  # NOTE: one program for both models (the same shapes)
  al_logits = forward(al.params, x, out.tokens)["logits"]
  ref_logits = forward(ref.params, x, out.tokens)["logits"]
  tf = np.asarray(policy_lib.logprobs_from_logits(al_logits, out.tokens) * mask)
  tf_ref = np.asarray(policy_lib.logprobs_from_logits(ref_logits, out.tokens) * mask)
  kl, _ = policy_lib.full_kl_and_entropy(al_logits, ref_logits)
  for b in range(tokens.shape[0]):
    np.testing.assert_allclose(tf[b], np.asarray(out.logprobs[b]), atol=2e-5, err_msg=f"row {b}")
    np.testing.assert_allclose(tf[b], np.asarray(single.logprobs[b]), atol=2e-5,
                               err_msg=f"row {b}")
    np.testing.assert_allclose(tf[b], np.asarray(out.model_logprobs[1, b]), atol=2e-5,
                               err_msg=f"row {b}")
    np.testing.assert_allclose(tf_ref[b], np.asarray(out.model_logprobs[0, b]), atol=2e-5,
                               err_msg=f"row {b}")
    np.testing.assert_allclose(np.asarray(kl * mask)[b], np.asarray(out.kl[b]), atol=2e-5,
                               err_msg=f"row {b}")
  # pad targets (after EOS) score 0, and the gradients (PPO, DPO, entropy bonus) are finite
  def loss(p):
    lg = al.lm.forward(p, x, out.tokens)["logits"]
    kl, ent = policy_lib.full_kl_and_entropy(lg, ref_logits)
    return jnp.sum(policy_lib.logprobs_from_logits(lg, out.tokens)) + jnp.sum(kl + ent)
  grad = jax.jit(jax.grad(loss))(al.params)
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grad))


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_decoding_equals_single_device(family):
  ref, al = _model(family, 0), _model(family, 1)
  inputs = _prompts(8)
  cfg = sampler.SamplingConfig(max_new_tokens=6)
  lam = jnp.linspace(-0.5, 2.0, 8)
  f = lambda r, p0, p1, x, l: dera.sample_mixture(  # noqa: E731
      [dera.Component(ref.lm, p0), dera.Component(al.lm, p1)], dera.dera_weights(l), x, r, cfg)
  one = jax.jit(f)(jax.random.PRNGKey(2), ref.params, al.params, inputs, lam)
  mesh = partitioning.create_mesh(data=4, model=2)
  rules = partitioning.logical_axis_rules()
  axes = ref.lm.abstract_init()[1]
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    sh = partitioning.logical_to_mesh_sharding(axes, mesh, rules)
    p0, p1 = jax.device_put(ref.params, sh), jax.device_put(al.params, sh)
    x = jax.device_put(inputs, partitioning.batch_sharding(mesh))
    l = jax.device_put(lam, partitioning.batch_sharding(mesh))
    eight = jax.jit(f)(jax.random.PRNGKey(2), p0, p1, x, l)
    assert len(eight.tokens.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(one.tokens), np.asarray(eight.tokens))
  np.testing.assert_allclose(np.asarray(one.kl), np.asarray(eight.kl), atol=1e-5)


def test_extrapolation_with_bf16_params_stays_finite():
  ref = _model("decoder", 0, dtype="bfloat16", param_dtype="bfloat16")
  al = _model("decoder", 1, dtype="bfloat16", param_dtype="bfloat16")
  out = _dera(ref, al, _prompts(3), 10.0, sampler.SamplingConfig(max_new_tokens=6))
  assert np.all(np.isfinite(np.asarray(out.logprobs)))
  assert np.all(np.isfinite(np.asarray(out.kl)))


def test_weight_mixing():
  ref, al = _model("t5", 0), _model("t5", 1)
  for lam in (0.0, 1.0, 0.3, 2.0):
    mixed = dera.mix_weights(al.params, ref.params, lam)
    for m, a, r in zip(*(jax.tree_util.tree_leaves(t) for t in (mixed, al.params, ref.params))):
      np.testing.assert_allclose(m, lam * np.asarray(a) + (1 - lam) * np.asarray(r), atol=1e-6)
  np.testing.assert_array_equal(
      jax.tree_util.tree_leaves(dera.mix_weights(al.params, ref.params, 0.0))[0],
      jax.tree_util.tree_leaves(ref.params)[0])


def test_mixing_errors_name_the_problem():
  small = _model("t5", 0)
  other_vocab = _model("t5", 1, vocab_size=80)
  with pytest.raises(UserError, match="64.*80"):
    dera.check_vocabularies([small, other_vocab])
  deeper = _model("t5", 1, d_ff=96)
  with pytest.raises(UserError, match=r"wi_0.*\(32, 96\)|wi_0.*\(32, 64\)"):
    dera.mix_weights(deeper.params, small.params, 0.5)
  with pytest.raises(UserError, match="lambda"):
    dera.check_lambdas([0.5, float("nan")])
  with pytest.raises(UserError, match="lambda"):
    dera.check_lambdas([float("inf")])


# ---- best-of-n ------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_best_of_n_argmax_and_single_prefill(family):
  c = _model(family, 0)
  calls = []
  orig = c.lm.prefill

  class Counting(type(c.lm)):
    def prefill(self, params, inputs, max_new_tokens):
      calls.append(inputs.shape[0])
      return orig(params, inputs, max_new_tokens)

  lm = Counting(c.lm.config)
  inputs = _prompts(3)
  cfg = sampler.SamplingConfig(max_new_tokens=6)
  # NOTE: jitted (one program; eager it dispatches every op of the prefill): the prefill
  # is called once per trace, as once per run eagerly.
  sample_fn = jax.jit(lambda x, r, n: sampler.generate(lm, c.params, x, r, cfg, num_samples=n),
                      static_argnums=2)
  reward = lambda prompts, responses: [float(len(r)) + 0.01 * sum(r) for r in responses]  # noqa
  res = bon.best_of_n(sample_fn, inputs, jax.random.PRNGKey(0), n=5, reward_fn=reward)
  assert calls == [3]  # one prefill for the 3 prompts, shared by all 15 samples
  assert res.scores.shape == (3, 5)
  np.testing.assert_array_equal(res.best_index, np.argmax(res.scores, axis=1))
  toks = np.asarray(res.samples.tokens).reshape(3, 5, -1)
  for b in range(3):
    np.testing.assert_array_equal(res.best_tokens[b], toks[b, res.best_index[b]])
    assert res.scores[b].max() == pytest.approx(
        reward(None, [bon.trim(toks[b, res.best_index[b]])])[0])
  with pytest.raises(UserError, match="n >= 1"):
    bon.best_of_n(sample_fn, inputs, jax.random.PRNGKey(0), n=0, reward_fn=reward)
  with pytest.raises(UserError, match="non-finite"):
    bon.best_of_n(sample_fn, inputs, jax.random.PRNGKey(0), n=2,
                  reward_fn=lambda p, r: [float("nan")] * len(r))


def test_best_of_n_with_dera_sampler():
  ref, al = _model("decoder", 0), _model("decoder", 1)
  inputs = _prompts(2)
  cfg = sampler.SamplingConfig(max_new_tokens=5)
  sample_fn = lambda x, r, n: _mixture(  # noqa: E731
      [ref, al], dera.dera_weights(jnp.full((x.shape[0] * n,), 0.5)), x, r, cfg, num_samples=n)
  res = bon.best_of_n(sample_fn, inputs, jax.random.PRNGKey(0), n=4,
                      reward_fn=lambda p, r: [-abs(len(x) - 3) for x in r])
  np.testing.assert_array_equal(res.best_index, np.argmax(res.scores, axis=1))
