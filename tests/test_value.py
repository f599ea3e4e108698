"""CD-FUDGE and CD-Q: losses by hand, the value-index convention, and convergence
to V* on the tiny MDP through the one trainer loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from realign_jax.decoding import sampler
from realign_jax.decoding.dera import Component
from realign_jax.errors import UserError
from realign_jax.models.api import LanguageModel
from realign_jax.models.config import replace
from realign_jax.training import trainer, value
from tests.helpers import TINY, random_batch
from tests.test_controlled import (EOS, MAX_LEN, PROMPTS, VOCAB, TabularLM, TinyMDP, np_index)


# ---- losses by hand ---------------------------------------------------------------------
def test_fudge_loss_by_hand():
  values = jnp.array([[0.5, 1.0, 9.0], [0.0, 0.0, 0.0]])
  rewards = jnp.array([1.0, -1.0])
  mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
  # row 0: 1/2 (0.25 + 0) ; row 1: 1/2 (1) ; mean over rows
  assert abs(float(value.fudge_loss(values, rewards, mask)) - (0.125 + 0.5) / 2) < 1e-7


def test_cdq_targets_and_loss_by_hand():
  # B = 1, T = 3, V = 2; the response has 2 tokens (the second one is the last)
  ref_next = jnp.log(jnp.array([[[0.25, 0.75], [0.5, 0.5], [0.9, 0.1]]]))
  q_next = jnp.array([[[2.0, 4.0], [1.0, 3.0], [7.0, 7.0]]])
  mask = jnp.array([[1.0, 1.0, 0.0]])
  v = value.cdq_targets(ref_next, q_next, jnp.array([5.0]), mask, jnp.array([2]))
  np.testing.assert_allclose(np.asarray(v), [[0.25 * 2 + 0.75 * 4, 5.0, 0.0]], rtol=1e-6)
  q = jnp.array([[[1.0, 0.0], [0.0, 6.0], [9.0, 9.0]]])
  tokens = jnp.array([[0, 1, 0]])
  # (1 - 3.5)^2 + (6 - 5)^2 = 7.25 -> 1/2 * 7.25
  assert abs(float(value.cdq_loss(q, tokens, v, mask)) - 3.625) < 1e-6


@pytest.mark.parametrize("family", ["t5", "decoder"])
def test_value_index_convention(family):
  """forward(...)["values"][:, t] = the incremental value after t response tokens."""
  lm = LanguageModel(TINY[family], "scalar")
  params = lm.init(jax.random.PRNGKey(0))[0]
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
  opt = optax.adam(optax.cosine_decay_schedule(lr, steps))
  cfg = trainer.TrainerConfig(checkpoint_every=10**6, eval_every=0, log_every=steps,
                              async_checkpoint=False, progress=False)
  trainer.train(algorithm=alg, model_dir=str(tmp_path), train_steps=steps, optimizer=opt,
                config=cfg)
  return jax.device_get(alg.final_state["params"]["table"])


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


@pytest.mark.parametrize("ema", [0.0, 0.2])
def test_cd_q_converges_to_vstar(mdp, tmp_path, ema):
  alg = value.CDQValue(model=TabularLM(output_head="lm"), reference=mdp.policy(),
                       token_reward=mdp.token_reward(), prompts=PROMPTS, batch_size=512,
                       max_new_tokens=MAX_LEN, target_ema=ema, target_period=5)
  table = _train(alg, 300, 0.05, tmp_path)
  mse = _pweighted_mse(mdp, lambda s: table[np_index(s[:-1]), s[-1]])
  assert mse < 1e-3, mse


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
@pytest.mark.parametrize("cls,head_key", [(value.FudgeValue, "scalar_head"),
                                          (value.CDQValue, "logits_dense")])
def test_value_init_checkpoint(tmp_path, cls, head_key):
  from realign_jax.checkpoints import manager as ckpt_lib
  from realign_jax.models.api import LanguageModel
  from realign_jax.models.config import replace
  from realign_jax.parallel import partitioning
  from realign_jax.rewards.length import LengthReward
  from tests.helpers import TINY_BUILTIN
  cfg = replace(TINY_BUILTIN["t5"], dropout_rate=0.0)
  run = tmp_path / "sft"
  sft = jax.jit(lambda r: LanguageModel(cfg).init(r)[0])(jax.random.PRNGKey(7))
  ckpt_lib.write_model_json(str(run), cfg, "lm")
  ck = ckpt_lib.Checkpointer(str(run), keep=1, async_save=False)
  ck.save(1, {"step": np.int32(1), "params": sft})
  ck.close()
  alg = cls(model=LanguageModel(cfg), reward=LengthReward(), reference_checkpoint=str(run),
            init_checkpoint=str(run))
  alg.setup(partitioning.create_mesh(), partitioning.logical_axis_rules())
  abstract, _ = alg.model.abstract_init()
  params = jax.device_get(alg.initial_params(abstract))
  assert set(params) == set(abstract)
  for k, v in params.items():
    want = (jax.tree_util.tree_map(np.zeros_like, jax.device_get(sft.get(k, v)))
            if k == head_key else jax.device_get(sft[k]))
    for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(want)):
      np.testing.assert_array_equal(a, b, err_msg=k)
  # the value output is zero everywhere before training
  x = jnp.ones((2, 6), jnp.int32)
  out = alg.model.forward(params, x, jnp.ones((2, 3), jnp.int32))
  v = out["values"] if head_key == "scalar_head" else out["logits"]
  assert float(jnp.max(jnp.abs(v))) == 0.0
  other = cls(model=LanguageModel(replace(cfg, num_heads=cfg.num_heads * 2)),
              reward=LengthReward(), reference_checkpoint=str(run), init_checkpoint=str(run))
  with pytest.raises(UserError, match="init_checkpoint .* holds another architecture: num_heads"):
    other.setup(partitioning.create_mesh(), partitioning.logical_axis_rules())
