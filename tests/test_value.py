"""CD-FUDGE and CD-Q: losses by hand, the value-index convention, and convergence
to V* on the tiny MDP through the one trainer loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from realign_jax.decoding import sampler
from realign_jax.decoding.dera import Component
from realign_jax.plumbing.errors import UserError
from realign_jax.models.api import LanguageModel
from realign_jax.models.config import replace
from realign_jax.training import trainer, value
from tests.helpers import TINY, random_batch
from realign_jax.models.heads import DUELING_Q
from tests.test_controlled import (EOS, MAX_LEN, PROMPTS, VOCAB, TabularLM, TinyMDP, all_states,
                                   np_index)


# ---- losses by hand ---------------------------------------------------------------------
def test_fudge_loss_by_hand():
  values = jnp.array([[0.5, 1.0, 9.0], [0.0, 0.0, 0.0]])
  rewards = jnp.array([1.0, -1.0])
  mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
  # row 0: 1/2 (0.25 + 0) ; row 1: 1/2 (1) ; mean over rows
  assert abs(float(value.fudge_loss(values, rewards, mask)) - (0.125 + 0.5) / 2) < 1e-7


def test_cdq_targets_and_loss_by_hand():
  # B = 1, T = 3, V = 3 (id 0 = pad); the response has 2 tokens (the second one is the last).
  # p(. | s_1) without pad: (0.125, 0.375) / 0.5 = (0.25, 0.75); the pad's Q (99) never counts.
  ref_next = jnp.log(jnp.array([[[0.5, 0.125, 0.375], [0.2, 0.4, 0.4], [0.1, 0.8, 0.1]]]))
  q_next = jnp.array([[[99.0, 2.0, 4.0], [99.0, 1.0, 3.0], [99.0, 7.0, 7.0]]])
  mask = jnp.array([[1.0, 1.0, 0.0]])
  v = value.cdq_targets(ref_next, q_next, jnp.array([5.0]), mask, jnp.array([2]))
  np.testing.assert_allclose(np.asarray(v), [[0.25 * 2 + 0.75 * 4, 5.0, 0.0]], rtol=1e-6)
  q = jnp.array([[[0.0, 1.0, 0.0], [0.0, 0.0, 6.0], [9.0, 9.0, 9.0]]])
  tokens = jnp.array([[1, 2, 0]])
  # (1 - 3.5)^2 + (6 - 5)^2 = 7.25 -> 1/2 * 7.25
  assert abs(float(value.cdq_loss(q, tokens, v, mask)) - 3.625) < 1e-6


def test_dueling_q_by_hand():
  # B = 1, T = 2, V = 3; p(. | s_0) = (0, 0.25, 0.75) (pad excluded), p(. | s_1) = (0, 0.5, 0.5)
  ref = jnp.log(jnp.array([[[0.5, 0.125, 0.375], [0.2, 0.4, 0.4]]]))
  adv = jnp.array([[[9.0, 2.0, -2.0], [5.0, 1.0, 3.0]]])
  values = jnp.array([[0.5, -1.0]])
  q, mean_adv = value.dueling_q_taken(values, adv, ref, jnp.array([[1, 2]]))
  # E_p A: 0.25 * 2 + 0.75 * -2 = -1 ; 0.5 * 1 + 0.5 * 3 = 2 (the pad's advantage never counts)
  np.testing.assert_allclose(np.asarray(mean_adv), [[-1.0, 2.0]], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(q), [[0.5 + 2 + 1, -1.0 + 3 - 2]], rtol=1e-6)


@pytest.mark.parametrize("family", ["t5", "decoder"])
def test_value_index_convention(family):
  """forward(...)["values"][:, t] = the incremental value after t response tokens."""
  lm = LanguageModel(TINY[family], "scalar")
  params = jax.jit(lambda r: lm.init(r)[0])(jax.random.PRNGKey(0))  # NOTE: eager: op by op
  params = jax.tree_util.tree_map(lambda x: x + 0.1 if x.ndim == 1 else x, params)  # non-zero head
  inputs, targets = random_batch(np.random.default_rng(1), 2, 5, 4, 64)
  fwd = np.asarray(jax.jit(lm.forward)(params, inputs, value.extend(targets))["values"])
  cache, tok = jax.jit(lm.prefill, static_argnums=2)(params, inputs, 8)
  step = jax.jit(lm.step_outputs)
  lengths = np.sum(targets != 0, axis=1)
  for t in range(targets.shape[1] + 1):
    out, cache = step(params, tok, cache)
    live = t <= lengths  # prefixes up to the whole response (EOS included)
    np.testing.assert_allclose(np.asarray(out["values"])[live], fwd[live, t], atol=1e-4)
    if t < targets.shape[1]:
      tok = jnp.asarray(targets[:, t])


# ---- convergence to V* on the tiny MDP ------------------------------------------------------
def _pweighted_mse(mdp, fn):
  """E_{y ~ p} 1/|y| sum_t (fn(y^t) - V*(y^t))^2 over the 40 responses, t = 1..|y|."""
  total = 0.0
  for y in mdp.responses:
    err = np.mean([(fn(y[:t]) - mdp.value[np_index(y[:t])]) ** 2 for t in range(1, len(y) + 1)])
    total += mdp.prob(y) * err
  return total


def _train(alg, steps, lr, tmp_path):
  return _train_params(alg, steps, lr, tmp_path)["table"]


@pytest.fixture(scope="module")
def mdp():
  return TinyMDP(seed=3, temperature=0.5)


def test_cd_fudge_converges_to_vstar(mdp, tmp_path):
  alg = value.FudgeValue(model=TabularLM(output_head="scalar"), reference=mdp.policy(),
                         token_reward=mdp.token_reward(), prompts=PROMPTS, batch_size=512,
                         max_new_tokens=MAX_LEN)
  table = _train(alg, 300, 0.05, tmp_path)
  mse = _pweighted_mse(mdp, lambda s: table[np_index(s)])
  assert mse < 1e-3, mse


def _q_of(mdp, params, head):
  """Q(s)[z] as the head defines it, from the trained tables: [V^L, V]."""
  if head == "lm":
    return np.asarray(params["table"])
  adv = np.asarray(params["table"], np.float64)
  p = np.exp(mdp.logp)
  mean = np.sum(np.where(np.isfinite(mdp.logp), p * adv, 0.0), axis=-1)
  return np.asarray(params["values"])[:, None] + adv - mean[:, None]


def _train_params(alg, steps, lr, tmp_path):
  opt = optax.adam(optax.cosine_decay_schedule(lr, steps))
  cfg = trainer.TrainerConfig(checkpoint_every=10**6, eval_every=0, log_every=steps,
                              async_checkpoint=False, progress=False)
  trainer.train(algorithm=alg, model_dir=str(tmp_path), train_steps=steps, optimizer=opt,
                config=cfg)
  return jax.device_get(alg.final_state["params"])


@pytest.mark.parametrize("ema,head", [(0.0, "lm"), (0.2, "lm"), (0.0, DUELING_Q)])
def test_cd_q_converges_to_vstar(mdp, tmp_path, ema, head):
  alg = value.CDQValue(model=TabularLM(output_head=head), reference=mdp.policy(),
                       token_reward=mdp.token_reward(), prompts=PROMPTS, batch_size=512,
                       max_new_tokens=MAX_LEN, target_ema=ema, target_period=5, output_head=head)
  q = _q_of(mdp, _train_params(alg, 300, 0.05, tmp_path), head)
  mse = _pweighted_mse(mdp, lambda s: q[np_index(s[:-1]), s[-1]])
  assert mse < 1e-3, mse


def test_dueling_q_is_not_optimistic_on_unvisited_tokens(tmp_path):
  """Rewards in [-1, 0] and a token p almost never draws (logit -16 at every state).

  A plain Q-head keeps that token's Q at its zero start, above every true value,
  so full-vocabulary CD at small beta follows it; the dueling head leaves it at
  V(s), the value of continuing with p.
  """
  mdp = TinyMDP(seed=3, temperature=0.5, reward_offset=-1.0, rare_token=4)
  # the states p reaches (token 4 never drawn) where token 4 is allowed
  states = [s for s in all_states() if len(s) < MAX_LEN - 1 and 4 not in s]
  q = {}
  for head in ("lm", DUELING_Q):
    # NOTE: a table shares no output rows between states, so the shrinkage the neural
    # models need (advantage_l2 = 3e-2 by default) is only a bias here; 1e-3 still stops
    # the drift of the never-drawn token's advantage.
    alg = value.CDQValue(model=TabularLM(output_head=head), reference=mdp.policy(),
                         token_reward=mdp.token_reward(), prompts=PROMPTS, batch_size=512,
                         max_new_tokens=MAX_LEN, target_period=5, output_head=head,
                         advantage_l2=1e-3)
    q[head] = _q_of(mdp, _train_params(alg, 300, 0.05, tmp_path / head.replace(":", "_")),
                    head)
  rare_plain = np.array([q["lm"][np_index(s), 4] for s in states])
  rare_duel = np.array([q[DUELING_Q][np_index(s), 4] for s in states])
  vstar = np.array([mdp.value[np_index(s)] for s in states])
  assert np.all(rare_plain > -0.05) and np.all(vstar < -0.2)  # optimistic by > 0.15 everywhere
  np.testing.assert_allclose(rare_duel, vstar, atol=0.05)
  # and the visited tokens are still learned: Q(s)[z] = V*([s, z]) for z in {1, 2, 3}
  for s in states:
    for z in (1, 2, 3):
      assert abs(q[DUELING_Q][np_index(s), z] - mdp.value[np_index(s + (z,))]) < 0.05
  # token-wise CD at beta = 0.01 over the whole vocabulary: the plain head puts a large
  # mass (38%) on a token p gives 1e-7 at the root, the dueling head almost none
  root = np_index(())
  for head, lo, hi in (("lm", 0.2, 1.0), (DUELING_Q, 0.0, 1e-3)):
    scores = mdp.logp[root] + np.where(np.isfinite(mdp.logp[root]), q[head][root], 0.0) / 0.01
    pi = np.exp(scores - np.logaddexp.reduce(scores[np.isfinite(scores)]))
    assert lo <= pi[4] <= hi, (head, pi)


# ---- bad input -----------------------------------------------------------------------------
def test_value_vocab_mismatch_and_nan_reward(mdp, tmp_path):
  alg = value.FudgeValue(model=TabularLM(vocab_size=VOCAB + 1, output_head="scalar"),
                         reference=mdp.policy(), token_reward=mdp.token_reward(),
                         prompts=PROMPTS, batch_size=8, max_new_tokens=MAX_LEN)
  with pytest.raises(UserError, match=r"value model's vocabulary \(6\) differs from the "
                                      r"reference's \(5"):
    _train(alg, 1, 0.1, tmp_path / "a")
  nan = lambda x, y, n: jnp.full((x.shape[0],), jnp.nan)
  alg = value.FudgeValue(model=TabularLM(output_head="scalar"), reference=mdp.policy(),
                         token_reward=nan, prompts=PROMPTS, batch_size=8, max_new_tokens=MAX_LEN)
  with pytest.raises(UserError, match="returned NaN or inf for 8 of 8 responses at step 1"):
    _train(alg, 2, 0.1, tmp_path / "b")
  with pytest.raises(UserError, match="reference_checkpoint is not set"):
    value.CDQValue(model=TabularLM(), token_reward=nan)


# ---- init_checkpoint: the trunk of a run directory, the value output at zero ----------------
@pytest.mark.parametrize("cls,head,head_keys", [
    (value.FudgeValue, "scalar", ("scalar_head",)), (value.CDQValue, "lm", ("logits_dense",)),
    (value.CDQValue, DUELING_Q, ("logits_dense", "scalar_head"))])
def test_value_init_checkpoint(tmp_path, cls, head, head_keys):
  from realign_jax.checkpoints import manager as ckpt_lib
  from realign_jax.checkpoints import run_dir
  from realign_jax.models.api import LanguageModel
  from realign_jax.models.config import replace
  from realign_jax.parallel import partitioning
  from realign_jax.rewards.length import LengthReward
  from tests.helpers import TINY_BUILTIN
  cfg = TINY_BUILTIN["t5"]
  run = tmp_path / "sft"
  sft = jax.jit(lambda r: LanguageModel(cfg).init(r)[0])(jax.random.PRNGKey(7))
  run_dir.write_model_json(str(run), cfg, "lm")
  ck = ckpt_lib.Checkpointer(str(run), keep=1, async_save=False)
  ck.save(1, {"step": np.int32(1), "params": sft})
  ck.close()
  alg = cls(model=LanguageModel(cfg), reward=LengthReward(), reference_checkpoint=str(run),
            init_checkpoint=str(run), output_head=head)
  alg.setup(partitioning.create_mesh(), partitioning.logical_axis_rules())
  abstract, _ = alg.model.abstract_init()
  params = jax.device_get(alg.initial_params(abstract))
  assert set(params) == set(abstract)
  for k, v in params.items():
    want = (jax.tree_util.tree_map(np.zeros_like, jax.device_get(sft.get(k, v)))
            if k in head_keys else jax.device_get(sft[k]))
    for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(want)):
      np.testing.assert_array_equal(a, b, err_msg=k)
  # the value output is zero everywhere before training
  x = jnp.ones((2, 6), jnp.int32)
  out = jax.jit(alg.model.forward)(params, x, jnp.ones((2, 3), jnp.int32))
  for key in ("values", "logits"):
    if key in out:
      assert float(jnp.max(jnp.abs(out[key]))) == 0.0, key
  other = cls(model=LanguageModel(replace(cfg, num_heads=cfg.num_heads * 2)),
              reward=LengthReward(), reference_checkpoint=str(run), init_checkpoint=str(run))
  with pytest.raises(UserError, match="init_checkpoint .* holds another architecture: num_heads"):
    other.setup(partitioning.create_mesh(), partitioning.logical_axis_rules())
