"""RL alignment: GAE, PPO's clipped losses, KL, the first ratio, learning runs, bad input.

The learning runs start from a tiny SFT model trained once per test run (tests/conftest.py) on the
built-in corpus (`sft_dir`) and go through the one trainer loop; their eval
metrics (one sample per eval prompt, fixed seed) are measured at step 0 and
at the end.
"""

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realign_jax.checkpoints import run_dir
from realign_jax.plumbing.errors import UserError
from realign_jax.models.api import LanguageModel
from realign_jax.models.config import replace
from realign_jax.parallel import partitioning
from realign_jax.rewards import base as rewards_base
from realign_jax.rewards.length import LengthReward
from realign_jax.training import optim, policy, rl, trainer
from realign_jax.training.pg import PG, reinforce_loss
from realign_jax.training.ppo import PPO, ppo_losses
from tests.helpers import TINY_BUILTIN

T5 = TINY_BUILTIN["t5"]
# The SFT start writes ~11-token summaries (max 16); the reward asks for 3-6.
WINDOW = (3, 6)
RL_STEPS = 20


# ---- pure functions against hand-computed values ---------------------------------
def test_gae_by_hand():
  rewards = jnp.array([[1.0, 0.0, 2.0], [0.0, 3.0, 9.0]])
  values = jnp.array([[0.5, 1.0, 1.5], [1.0, 2.0, 7.0]])
  mask = jnp.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
  adv, ret = rl.gae(rewards, values, mask, gamma=0.9, lam=0.5)
  # row 0: deltas 1 + .9 - .5 = 1.4, 0 + 1.35 - 1 = .35, 2 - 1.5 = .5;
  #   A2 = .5, A1 = .35 + .45 * .5 = .575, A0 = 1.4 + .45 * .575 = 1.65875.
  # row 1 (two tokens): deltas .8, 1;  A1 = 1, A0 = .8 + .45 = 1.25.
  np.testing.assert_allclose(adv, [[1.65875, 0.575, 0.5], [1.25, 1.0, 0.0]], rtol=1e-6)
  np.testing.assert_allclose(ret, [[2.15875, 1.575, 2.0], [2.25, 3.0, 0.0]], rtol=1e-6)


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
  rng = np.random.default_rng(0)
  r, v = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
  lengths = np.array([6, 3, 1, 5])
  mask = (np.arange(6)[None] < lengths[:, None]).astype(np.float32)
  adv, ret = rl.gae(r, v, mask, gamma=1.0, lam=1.0)
  to_go = np.cumsum((r * mask)[:, ::-1], axis=1)[:, ::-1]
  np.testing.assert_allclose(adv, (to_go - v) * mask, atol=1e-5)
  np.testing.assert_allclose(ret, to_go * mask, atol=1e-5)


def test_ppo_clipped_losses_by_hand():
  log = math.log
  logp = jnp.array([[log(1.5), log(0.5), 3.0], [log(0.5), log(1.1), -3.0]])
  old = jnp.zeros((2, 3))
  adv = jnp.array([[1.0, 1.0, 5.0], [-2.0, -1.0, 5.0]])
  values = jnp.array([[1.0, 0.0, 9.0], [0.5, 2.0, 9.0]])
  old_values = jnp.array([[0.5, 0.5, 0.0], [0.5, 1.0, 0.0]])
  returns = jnp.array([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
  mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
  pg, vf, m = ppo_losses(logp, old, adv, values, old_values, returns, mask, clip_eps=0.2,
                         value_clip=0.2)
  # per token max(-A r, -A clip(r)): -1.2 (clipped), -0.5, 1.6 (clipped), 1.1
  np.testing.assert_allclose(pg, (-1.2 - 0.5 + 1.6 + 1.1) / 4, rtol=1e-6)
  # per token max((v-R)^2, (v_clip-R)^2): 1.69, .09, .25, 3.24 (three clipped)
  np.testing.assert_allclose(vf, 0.5 * (1.69 + 0.09 + 0.25 + 3.24) / 4, rtol=1e-6)
  np.testing.assert_allclose(m["policy/clipfrac"], 0.5)
  np.testing.assert_allclose(m["value/clipfrac"], 0.75)
  lr = np.array([log(1.5), log(0.5), log(0.5), log(1.1)])
  np.testing.assert_allclose(m["policy/approxkl"], 0.5 * np.mean(lr ** 2), rtol=1e-6)
  np.testing.assert_allclose(m["policy/ratio_mean"], (1.5 + 0.5 + 0.5 + 1.1) / 4, rtol=1e-6)


def test_kl_penalised_rewards_and_reinforce_by_hand():
  r = rl.kl_penalised_rewards(jnp.array([2.0]), jnp.array([[-1.0, -2.0, 0.0]]),
                              jnp.array([[-1.5, -1.0, 0.0]]), jnp.array([[1.0, 1.0, 0.0]]),
                              jnp.array([2]), 0.5)
  np.testing.assert_allclose(r, [[-0.25, 2.5, 0.0]])
  np.testing.assert_allclose(reinforce_loss(jnp.array([-1.0, -3.0]), jnp.array([2.0, -1.0])),
                             -(2.0 * -1.0 + -1.0 * -3.0) / 2)


def test_exact_kl_and_entropy_by_enumeration():
  # Token 0 (pad) is excluded from both distributions, as the sampler excludes it.
  p, q = np.array([0.0, 0.5, 0.5, 0.0]), np.array([0.0, 0.25, 0.75, 0.0])
  logits = jnp.log(jnp.array([[[0.3, 0.35, 0.35, 1e-30]]]))
  ref = jnp.log(jnp.array([[[0.6, 0.1, 0.3, 1e-30]]]))
  kl, ent = policy.full_kl_and_entropy(logits, ref)
  np.testing.assert_allclose(kl[0, 0], np.sum(p[1:3] * np.log(p[1:3] / q[1:3])), rtol=1e-5)
  np.testing.assert_allclose(ent[0, 0], math.log(2), rtol=1e-5)
  same, _ = policy.full_kl_and_entropy(logits * 3.7, logits * 3.7)
  assert float(same[0, 0]) == 0.0


def test_adaptive_beta():
  np.testing.assert_allclose(rl.adaptive_beta(0.1, 2.0, 1.0, 100.0, 10), 0.1 * (1 + 0.2 * 0.1))
  np.testing.assert_allclose(rl.adaptive_beta(0.1, 0.95, 1.0, 100.0, 10),
                             0.1 * (1 - 0.05 * 0.1), rtol=1e-6)


# ---- runs through the trainer ----------------------------------------------------
def _mesh(kind="one"):
  if kind == "one":
    return partitioning.create_mesh(1, 1, devices=jax.devices()[:1])
  return partitioning.create_mesh(4, 2)


def _train(model_dir, algorithm, steps, lr=1e-3, mesh="one", eval_every=0):
  return trainer.train(
      algorithm=algorithm, model_dir=str(model_dir), train_steps=steps,
      optimizer=optim.make_optimizer(name="adamw", learning_rate=lr), mesh=_mesh(mesh),
      rules=partitioning.logical_axis_rules(),
      config=trainer.TrainerConfig(checkpoint_every=1000, eval_every=eval_every, log_every=1,
                                   progress=False))


def _rows(model_dir, split):
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


@pytest.fixture(scope="module")
def sft_dir(tiny_sft_dir):
  # NOTE: the suite's one tiny SFT start (tests/conftest.py): T5 on the built-in corpus,
  # batch 16, 32 input / 16 target tokens, 100 steps at 3e-3.
  return tiny_sft_dir


def _rl_kwargs(**kw):
  return dict(dict(model=LanguageModel(T5), reward=LengthReward(*WINDOW), beta=0.05,
                   batch_size=32, input_length=32, max_new_tokens=16, max_eval_examples=64,
                   num_eval_samples=2), **kw)


@pytest.fixture(scope="module")
def ppo_run(sft_dir, tmp_path_factory):
  d = str(tmp_path_factory.mktemp("ppo"))
  run_dir.write_model_json(d, T5, "lm+scalar")  # as the train binary does
  alg = PPO(init_checkpoint=sft_dir, num_epochs=2, num_minibatches=2, **_rl_kwargs())
  _train(d, alg, RL_STEPS, eval_every=RL_STEPS)
  return d


def test_ppo_raises_the_length_reward(ppo_run):
  ev = _rows(ppo_run, "eval")
  assert [r["step"] for r in ev] == [0, RL_STEPS]
  gain = ev[1]["reward"] - ev[0]["reward"]
  print(f"PPO eval length reward {ev[0]['reward']:.3f} -> {ev[1]['reward']:.3f} "
        f"(length {ev[0]['length']:.2f} -> {ev[1]['length']:.2f}, KL {ev[1]['kl']:.3f})")
  assert gain >= 0.3, ev
  _assert_significant_gain_and_kl(ev)


def _assert_significant_gain_and_kl(ev):
  """The eval reward rose by more than 3 standard errors of the difference, and the trained
  policy's exact KL is more than 3 standard errors above 0 (a KL against the policy itself, or
  float noise, would not be), while the start's is exactly 0 (the start is the reference)."""
  gain = ev[1]["reward"] - ev[0]["reward"]
  assert gain > 3 * math.hypot(ev[0]["reward_se"], ev[1]["reward_se"]), ev
  assert ev[0]["kl"] == 0.0 and ev[0]["kl_se"] == 0.0
  assert ev[1]["kl"] > 3 * ev[1]["kl_se"] > 0.0, ev


def test_ppo_metrics_and_first_ratio(ppo_run):
  rows = _rows(ppo_run, "train")
  assert len(rows) == RL_STEPS
  for key in ("objective/reward", "objective/kl", "objective/entropy", "policy/clipfrac",
              "policy/approxkl", "loss/policy", "loss/value", "response/length",
              "policy/ratio_mean", "objective/beta", "steps_per_sec"):
    assert all(math.isfinite(r[key]) for r in rows), key
  # NOTE: the first minibatch sees the rollout's own policy; dropout is off, so
  # the ratio is 1 up to float32 round-off (the same forward compiled at the
  # minibatch shape and inside the gradient).
  for r in rows:
    assert abs(r["first/policy/ratio_mean"] - 1.0) < 1e-6
    assert r["first/policy/ratio_max_abs_dev"] < 1e-5
    assert r["first/policy/approxkl"] < 1e-12
    assert r["first/policy/clipfrac"] == 0.0
  assert rows[0]["objective/kl"] == 0.0  # step 1 rolls out the start policy
  assert rows[-1]["objective/kl"] > 0.0
  assert any(r["policy/ratio_max_abs_dev"] > 1e-3 for r in rows)  # later updates move it


def test_pg_improves(sft_dir, tmp_path):
  alg = PG(init_checkpoint=sft_dir, **_rl_kwargs())
  _train(tmp_path, alg, RL_STEPS, eval_every=RL_STEPS)
  ev = _rows(tmp_path, "eval")
  assert [r["step"] for r in ev] == [0, RL_STEPS]
  print(f"PG eval length reward {ev[0]['reward']:.3f} +- {ev[0]['reward_se']:.3f} -> "
        f"{ev[1]['reward']:.3f} +- {ev[1]['reward_se']:.3f} (KL {ev[1]['kl']:.3f})")
  _assert_significant_gain_and_kl(ev)
  rows = _rows(tmp_path, "train")
  assert rows[0]["objective/kl"] == 0.0
  assert rows[0]["baseline"] == 0.0 and rows[1]["baseline"] == rows[0]["objective/return"]


# ---- decoder-only, first ratio, bad input ----------------------------------------------
class _NanOnSecondCall(rewards_base.Reward):
  """A text reward (scored on the host): minus the word count, then NaN from the 2nd call."""
  name = "broken"

  def __init__(self):
    self.calls = 0

  def score(self, prompts, responses):
    self.calls += 1
    s = -np.asarray([len(r.split()) for r in responses], np.float32)
    if self.calls >= 2:
      s[1] = np.nan
    return s


def test_decoder_ppo_kl_zero_ratio_one_then_nan_reward_stops(tmp_path):
  """Decoder-only policy (dropout 0.1 in its config) on the 4x2 mesh, a host reward.

  Step 1: the policy is its reference (both the seeded init), so the exact KL
  is exactly 0; dropout is off, so the one update's ratio is 1 (up to one
  float32 ulp: the loss's forward is compiled inside the gradient, the
  rollout's outside; dropout at rate 0.1 would move it by ~0.1). Step 2: the
  reward returns NaN -> one UserError naming the reward and the step.
  """
  cfg = TINY_BUILTIN["decoder"]
  assert cfg.dropout_rate > 0
  reward = _NanOnSecondCall()
  alg = PPO(**_rl_kwargs(model=LanguageModel(cfg), reward=reward, batch_size=8,
                         max_new_tokens=6, max_eval_examples=0, num_epochs=1,
                         num_minibatches=1))
  with pytest.raises(UserError, match=r"reward 'broken' returned NaN or inf for 1 of 8 "
                                      r"responses at step 2; stopped without saving"):
    _train(tmp_path, alg, 3, mesh="4x2")
  assert reward.calls == 2
  (row,) = _rows(tmp_path, "train")
  assert row["step"] == 1
  assert row["objective/kl"] == 0.0 and row["objective/kl_sampled"] == 0.0
  assert row["policy/ratio_max_abs_dev"] <= 2e-6 and row["policy/approxkl"] < 1e-12
  assert row["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
  assert row["value/mean"] == 0.0  # a fresh value head
  assert row["objective/reward"] <= 0.0 and row["objective/reward_nonfinite"] == 0.0
  assert not os.listdir(os.path.join(tmp_path, "checkpoints"))


def test_missing_init_checkpoint(tmp_path):
  alg = PPO(init_checkpoint=str(tmp_path / "nope"), **_rl_kwargs())
  with pytest.raises(UserError, match="INIT_CHECKPOINT .*nope does not exist"):
    _train(tmp_path / "run", alg, 1)


def test_init_checkpoint_of_another_architecture(sft_dir, tmp_path):
  alg = PPO(init_checkpoint=sft_dir, **_rl_kwargs(model=LanguageModel(TINY_BUILTIN["decoder"])))
  with pytest.raises(UserError, match="holds a t5 model but this run's policy is a decoder"):
    _train(tmp_path / "a", alg, 1)
  alg = PG(init_checkpoint=sft_dir, **_rl_kwargs(model=LanguageModel(replace(T5, d_ff=128))))
  with pytest.raises(UserError, match="another architecture: d_ff=64 there, 128"):
    _train(tmp_path / "b", alg, 1)


def test_load_init_params_adds_a_fresh_value_head(sft_dir):
  mesh, rules = _mesh(), partitioning.logical_axis_rules()
  lm = LanguageModel(T5, "lm+scalar")
  abstract, _ = lm.abstract_init()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    p = policy.load_init_params(sft_dir, abstract, config=T5)
    ref = policy.load_init_params(sft_dir, policy.strip_value_head(abstract), config=T5)
  assert policy.VALUE_HEAD not in ref
  np.testing.assert_array_equal(p[policy.VALUE_HEAD]["kernel"], 0.0)
  for a, b in zip(jax.tree_util.tree_leaves(policy.strip_value_head(p)),
                  jax.tree_util.tree_leaves(ref)):
    np.testing.assert_array_equal(a, b)


def test_load_init_params_from_a_run_with_a_value_head(ppo_run, sft_dir):
  mesh, rules = _mesh(), partitioning.logical_axis_rules()
  abstract, _ = LanguageModel(T5, "lm+scalar").abstract_init()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    full = policy.load_init_params(ppo_run, abstract, config=T5)
    lm_only = policy.load_init_params(ppo_run, policy.strip_value_head(abstract), config=T5)
    sft = policy.load_init_params(sft_dir, policy.strip_value_head(abstract), config=T5)
  assert np.any(np.asarray(full[policy.VALUE_HEAD]["kernel"]) != 0)  # trained, kept
  assert policy.VALUE_HEAD not in lm_only
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(lm_only),
                                                    jax.tree_util.tree_leaves(sft))]
  assert any(moved)
