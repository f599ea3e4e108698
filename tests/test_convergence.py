"""Training to convergence: the stopping rule, the trainer's early stop (and resume),
schedules over PPO's updates, and the exact-KL estimator's rewards."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from realign_jax.plumbing.errors import UserError
from realign_jax.experiments import stages as stages_lib
from realign_jax.models.api import LanguageModel
from realign_jax.parallel import partitioning
from realign_jax.training import rl
from realign_jax.training import trainer
from realign_jax.training.sft import SFT
from tests.helpers import TINY_BUILTIN


def _ev(j, se=0.01):
  return {"regularised": j, "regularised_se": se}


def test_converged_rule_by_hand():
  c = trainer.converged
  # too few evals for the window: never
  assert not c([_ev(-1.0), _ev(-1.0)], 2)
  # flat after the first: the last 2 do not beat -0.5 by more than its se
  assert c([_ev(-0.5), _ev(-0.5), _ev(-0.495)], 2)
  # a gain larger than the best earlier eval's standard error: go on
  assert not c([_ev(-0.5), _ev(-0.5), _ev(-0.48)], 2)
  # the best earlier one counts, not the last before the window
  assert c([_ev(-0.9), _ev(-0.3), _ev(-0.6), _ev(-0.35), _ev(-0.31)], 3)
  assert not c([_ev(-0.9), _ev(-0.3, 0.0), _ev(-0.6), _ev(-0.35), _ev(-0.29)], 3)
  # a missing or NaN standard error counts as 0; rows without the metric are ignored
  assert c([{"regularised": -0.5}, _ev(-0.5, float("nan")), _ev(-0.5), {"loss": 1.0}], 2)
  assert not c([_ev(-0.5)] * 5, 0)  # off


@dataclasses.dataclass
class _FlatSFT(SFT):
  """SFT whose eval reports a constant J: the rule must stop it."""

  def evaluate(self, params, step, aux=None):
    return {"regularised": -0.5, "regularised_se": 0.01}, []


def _train(tmp_path, steps, **config):
  alg = _FlatSFT(model=LanguageModel(TINY_BUILTIN["t5"]), batch_size=8, input_length=32,
                 target_length=8, num_eval_samples=0, max_eval_examples=8)
  cfg = trainer.TrainerConfig(**dict(dict(checkpoint_every=100, keep_checkpoints=2,
                                          log_every=1, progress=False), **config))
  return trainer.train(algorithm=alg, model_dir=str(tmp_path), train_steps=steps,
                       optimizer=optax.adam(1e-3),
                       mesh=partitioning.create_mesh(1, 1, devices=jax.devices()[:1]),
                       rules=partitioning.logical_axis_rules(), config=cfg)


def test_trainer_stops_when_converged_and_resumes_stopped(tmp_path):
  res = _train(tmp_path, 10, eval_every=1, stop_window=2)
  # evals at steps 0, 1, 2: the last two gain nothing on step 0's
  assert res["step"] == 2 and res["converged"] is True
  assert [e["step"] for e in res["evals"]] == [0, 1, 2]
  assert (tmp_path / "checkpoints" / "2").exists()
  # a rerun reads its evals back and trains no further
  again = _train(tmp_path, 10, eval_every=1, stop_window=2)
  assert again["step"] == 2 and again["converged"] is True
  assert [e["step"] for e in again["evals"]] == [0, 1, 2]


def test_stop_window_needs_evals(tmp_path):
  with pytest.raises(UserError, match="stop_window"):
    _train(tmp_path, 2, eval_every=0, stop_window=2)


def test_stage_schedule_spans_every_ppo_update(monkeypatch, tmp_path):
  # NOTE: the bug: a decaying schedule built over train steps reached 0 after
  # steps updates, a quarter of PPO's 2 x 2 updates a step.
  from realign_jax import train as train_bin
  seen = {}

  def fake_train(*, model_dir, train_steps, algorithm, optimizer, trainer_config):
    seen["opt"] = optimizer
    return {"step": train_steps, "train": {}, "evals": [], "converged": False}
  monkeypatch.setattr(train_bin, "train", fake_train)
  alg = type("Alg", (), {"num_epochs": 2, "num_minibatches": 2})()
  spec = stages_lib.OptimizerSpec(name="sgd", learning_rate=1.0, schedule="linear",
                                  grad_clip_norm=0.0)
  out = stages_lib.train_stage(str(tmp_path), alg, 10, spec, trainer.TrainerConfig())
  assert out == {"step": 10, "last_train": {}, "converged": False, "evals": []}
  opt, p = seen["opt"], jnp.zeros(())
  state, moves = opt.init(p), []
  for _ in range(40):  # 10 steps x 2 epochs x 2 minibatches
    upd, state = opt.update(jnp.ones(()), state, p)
    moves.append(float(upd))
  assert all(m < 0 for m in moves), moves  # still moving at the last update
  assert moves[-1] == pytest.approx(-1.0 / 40)
  assert stages_lib.optimizer_updates(alg, 10) == 40
  assert stages_lib.optimizer_updates(object(), 10) == 10  # SFT: one update a step


def test_future_kl_rewards_by_hand():
  kl = jnp.array([[0.5, 0.25, 1.0, 9.0], [0.1, 0.2, 0.0, 0.0]])
  mask = jnp.array([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
  r = rl.future_kl_rewards(jnp.array([-1.0, 0.0]), kl, mask, jnp.array([3, 2]), 0.1)
  # action t pays the next state's KL; the last one gets the score; none past the end
  np.testing.assert_allclose(r, [[-0.025, -0.1, -1.0, 0.0], [-0.02, 0.0, 0.0, 0.0]],
                             rtol=1e-6)


def test_train_binary_builds_its_optimizer_over_every_update():
  # The shipped configs bind `train.optimizer = @make_optimizer` (the factory): the train
  # binary gives it the run's optimizer updates, so PPO's 2 x 2 updates a step are counted.
  import gin
  import optax
  from realign_jax.plumbing import gin_utils
  from realign_jax import train as train_bin
  gin.clear_config()
  gin_utils.register()
  try:
    gin.get_configurable("train")
  except ValueError:
    gin.external_configurable(train_bin.train, "train")
  try:
    gin_utils.parse(["configs/ppo/length_builtin_tiny.gin"],
                    ["MODEL_DIR = 'm'", "INIT_CHECKPOINT = 'i'", "TRAIN_STEPS = 10",
                     "make_optimizer.name = 'sgd'", "make_optimizer.schedule = 'linear'",
                     "make_optimizer.learning_rate = 1.0", "make_optimizer.grad_clip_norm = 0.0",
                     "PPO.num_epochs = 2", "PPO.num_minibatches = 2"])
    bound = gin.get_bindings("train")
    opt = train_bin._built_optimizer(bound["optimizer"], bound["algorithm"], 10)
    with gin.unlock_config():  # a config from before the factory
      gin.bind_parameter("make_optimizer.total_steps", 10)
    with pytest.raises(UserError, match=r"make_optimizer.total_steps is bound \(10\).*\(40\)"):
      train_bin._built_optimizer(bound["optimizer"], bound["algorithm"], 10)
  finally:
    gin.clear_config()
  p = jnp.zeros(())
  state, moves = opt.init(p), []
  for _ in range(40):
    upd, state = opt.update(jnp.ones(()), state, p)
    moves.append(float(upd))
  assert all(m < 0 for m in moves) and moves[-1] == pytest.approx(-1.0 / 40)
  assert train_bin._built_optimizer(opt, None, 10) is opt  # an optimizer is used as it is
  with pytest.raises(UserError, match="train.optimizer must be"):
    train_bin._built_optimizer(3, None, 10)
  with pytest.raises(UserError, match="returned int"):
    train_bin._built_optimizer(lambda total_steps: total_steps, None, 10)
  assert isinstance(opt, optax.GradientTransformation)
