"""Trainer tests, in-process: loss, sharded parity, resume, optimizers, NaN, size mismatch.

Every run is a tiny SFT model on the built-in corpus through the one trainer
loop (`trainer.train`); the runs that several tests compare against are made
once per module (`runs`).
"""

import dataclasses
import itertools
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from realign_jax.checkpoints import manager as ckpt_lib
from realign_jax.plumbing.errors import UserError
from realign_jax.models.api import LanguageModel
from realign_jax.models.config import replace
from realign_jax.parallel import partitioning
from realign_jax.training import optim
from realign_jax.training import trainer
from realign_jax.training.sft import SFT, cross_entropy
from tests.helpers import TINY_BUILTIN

STEPS = 4
# NOTE: compared metrics exclude timings (tokens_per_sec, steps_per_sec).
DETERMINISTIC_KEYS = ("step", "split", "loss", "grad_norm", "target_tokens")


def _sft(family, cls=SFT, **kwargs):
  return cls(model=LanguageModel(TINY_BUILTIN[family]), batch_size=8, input_length=32,
             target_length=8, num_eval_samples=0, max_eval_examples=16, **kwargs)


def _optimizer():
  # NOTE: one warmup step (lr 0 at step 0) keeps Adam's first, sign-like
  # update from amplifying float round-off between meshes.
  return optim.make_optimizer(name="adamw", learning_rate=1e-3, schedule="cosine",
                              warmup_steps=1, total_steps=STEPS)


def _mesh(kind):
  if kind == "one":
    return partitioning.create_mesh(1, 1, devices=jax.devices()[:1])
  return partitioning.create_mesh(4, 2)


def _train(model_dir, algorithm, steps, mesh="4x2", fsdp=False, **config):
  config = dict(dict(checkpoint_every=100, keep_checkpoints=5, eval_every=0, log_every=1,
                     progress=False), **config)
  result = trainer.train(algorithm=algorithm, model_dir=str(model_dir), train_steps=steps,
                         optimizer=_optimizer(), mesh=_mesh(mesh),
                         rules=partitioning.logical_axis_rules(fsdp),
                         config=trainer.TrainerConfig(**config))
  return result


def _params(algorithm):
  return jax.tree_util.tree_map(np.asarray, algorithm.final_state["params"])


def _metrics(model_dir):
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _checkpoint_steps(model_dir):
  root = os.path.join(model_dir, ckpt_lib.CHECKPOINT_SUBDIR)
  return sorted(int(d) for d in os.listdir(root) if d.isdigit())


def _max_abs_diff(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  return max(float(np.max(np.abs(x - y))) for x, y in zip(la, lb))


# The reference runs: (family, mesh, fsdp), STEPS steps each, one checkpoint at the end.
# The 8-device runs cover both rule sets: T5 with FSDP, the decoder without.
RUN_KEYS = [("t5", "one", False), ("t5", "4x2", True),
            ("decoder", "one", False), ("decoder", "4x2", False)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = {}
  for family, mesh, fsdp in RUN_KEYS:
    model_dir = tmp_path_factory.mktemp(f"{family}_{mesh}_{'fsdp' if fsdp else 'tp'}")
    alg = _sft(family)
    result = _train(model_dir, alg, STEPS, mesh, fsdp)
    assert result["step"] == STEPS
    out[family, mesh, fsdp] = {"dir": str(model_dir), "params": _params(alg),
                               "state": alg.final_state, "metrics": _metrics(model_dir)}
  return out


# ---- loss ---------------------------------------------------------------------
def test_cross_entropy_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 5)).astype(np.float32) * 3
  targets = np.array([[4, 2, 0], [3, 0, 0]], np.int32)
  logp = logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))
  nll = [-logp[0, 0, 4], -logp[0, 1, 2], -logp[1, 0, 3]]

  loss, n = cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
  np.testing.assert_allclose(float(loss), np.mean(nll), rtol=1e-6)
  assert float(n) == 3

  # Logits at padded positions do not matter.
  noisy = logits.copy()
  noisy[0, 2] += 100.0
  noisy[1, 1:] -= 50.0
  np.testing.assert_allclose(float(cross_entropy(jnp.asarray(noisy), targets)[0]),
                             np.mean(nll), rtol=1e-6)

  # Row weights mask whole examples.
  loss, n = cross_entropy(jnp.asarray(logits), targets, jnp.array([1.0, 0.0]))
  np.testing.assert_allclose(float(loss), np.mean(nll[:2]), rtol=1e-6)
  assert float(n) == 2

  # All padding: zero loss over zero tokens, not NaN.
  loss, n = cross_entropy(jnp.asarray(logits), np.zeros_like(targets))
  assert float(loss) == 0.0 and float(n) == 0.0


# ---- sharded parity -----------------------------------------------------------
@pytest.mark.parametrize("family,fsdp", [("t5", True), ("decoder", False)])
def test_sharded_training_equals_single_device(runs, family, fsdp):
  one, sharded = runs[family, "one", False], runs[family, "4x2", fsdp]
  # The sharded run really is sharded: params over `model`, and over `data` with FSDP.
  specs = [tuple(x.sharding.spec) for x in jax.tree_util.tree_leaves(sharded["state"]["params"])]
  assert any("model" in s for s in specs)
  assert any("data" in s for s in specs) == fsdp

  losses_one = [r["loss"] for r in one["metrics"]]
  losses_sharded = [r["loss"] for r in sharded["metrics"]]
  assert [r["step"] for r in sharded["metrics"]] == list(range(1, STEPS + 1))
  np.testing.assert_allclose(losses_sharded, losses_one, rtol=0, atol=1e-5)
  assert _max_abs_diff(sharded["params"], one["params"]) < 1e-5
  # Training moved the params: the comparison above is not between two inits.
  assert len(set(losses_one)) == STEPS


def test_checkpoint_holds_the_final_params(runs):
  run = runs["t5", "4x2", True]
  abstract, _ = LanguageModel(TINY_BUILTIN["t5"]).abstract_init()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract)
  loaded = ckpt_lib.as_numpy(ckpt_lib.load_params(run["dir"], abstract))
  assert _max_abs_diff(loaded, run["params"]) == 0.0
  assert _checkpoint_steps(run["dir"]) == [STEPS]


# ---- resume -------------------------------------------------------------------
def test_resume_equals_uninterrupted(runs, tmp_path):
  family, fsdp = "decoder", False
  full = runs[family, "4x2", fsdp]
  alg = _sft(family)
  assert _train(tmp_path, alg, STEPS // 2, fsdp=fsdp)["step"] == STEPS // 2
  assert _checkpoint_steps(tmp_path) == [STEPS // 2]
  alg = _sft(family)
  assert _train(tmp_path, alg, STEPS, fsdp=fsdp)["step"] == STEPS

  assert _max_abs_diff(_params(alg), full["params"]) == 0.0
  rows = _metrics(tmp_path)
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # no duplicates
  pick = lambda rs: [{k: r[k] for k in DETERMINISTIC_KEYS} for r in rs]
  assert pick(rows) == pick(full["metrics"])
  assert _checkpoint_steps(tmp_path) == [STEPS // 2, STEPS]


# ---- optimizers ---------------------------------------------------------------
@pytest.mark.parametrize("name,schedule",
                         list(itertools.product(optim.OPTIMIZERS, optim.SCHEDULES)))
def test_optimizer_builds_and_descends(name, schedule):
  opt = optim.make_optimizer(name=name, learning_rate=0.05, schedule=schedule,
                             warmup_steps=0, total_steps=10, weight_decay=0.0)
  params = {"w": jnp.array([[1.0, -2.0, 0.5], [3.0, 0.5, -1.0]]), "b": jnp.array([0.5, -0.5])}

  def loss(p):
    return sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(p))

  @jax.jit
  def step(p, s):
    updates, s = opt.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, updates), s

  new, _ = step(params, opt.init(params))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(new))
  assert float(loss(new)) < float(loss(params))


def test_schedules_hand_computed():
  def at(schedule, steps, **kwargs):
    fn = optim.make_schedule(1.0, schedule, **kwargs)
    return [float(fn(s)) for s in steps]

  np.testing.assert_allclose(at("constant", [0, 2, 4, 19], warmup_steps=4, total_steps=20),
                             [0.0, 0.5, 1.0, 1.0], atol=1e-6)
  np.testing.assert_allclose(at("linear", [0, 4, 12, 20], warmup_steps=4, total_steps=20),
                             [0.0, 1.0, 0.5, 0.0], atol=1e-6)
  np.testing.assert_allclose(at("cosine", [2, 4, 12, 20], warmup_steps=4, total_steps=20),
                             [0.5, 1.0, 0.5, 0.0], atol=1e-6)
  # T5: constant through warmup, then sqrt(warmup / step).
  np.testing.assert_allclose(at("rsqrt", [0, 3, 15, 99], warmup_steps=4),
                             [1.0, 1.0, 0.5, 0.2], atol=1e-6)


def test_unknown_optimizer_or_schedule():
  with pytest.raises(UserError, match="'lion'"):
    optim.make_optimizer(name="lion")
  with pytest.raises(UserError, match="'exponential'"):
    optim.make_optimizer(name="adamw", schedule="exponential")
  with pytest.raises(UserError, match="'warmup'"):
    optim.make_schedule(1e-3, "warmup")


# ---- non-finite loss ----------------------------------------------------------
@dataclasses.dataclass
class _PoisonedSFT(SFT):
  """SFT whose loss turns NaN from the batch of (0-based) step `poison_from` on."""

  poison_from: int = 0

  def batches(self, start_step):
    for step, batch in zip(itertools.count(start_step), super().batches(start_step)):
      bad = np.nan if step >= self.poison_from else 0.0
      yield dict(batch, poison=np.full((self.batch_size,), bad, np.float32))

  def loss(self, params, batch, rng, aux=None, frozen=None):
    loss, metrics = super().loss(params, batch, rng, aux=aux, frozen=frozen)
    return loss + jnp.mean(batch["poison"]), metrics


def test_nan_loss_stops_and_keeps_last_good_checkpoint(runs, tmp_path):
  # Steps 1-4 are good (checkpoints at 2 and 4); step 5's loss is NaN.
  alg = _sft("t5", _PoisonedSFT, poison_from=STEPS)
  with pytest.raises(UserError, match=r"nan at step 5\b.*last good checkpoint: 4"):
    _train(tmp_path, alg, STEPS + 2, fsdp=True, checkpoint_every=2)
  assert _checkpoint_steps(tmp_path) == [2, 4]
  rows = _metrics(tmp_path)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) for r in rows)

  # The last good checkpoint is complete and holds the params of a clean 4-step run.
  abstract, _ = LanguageModel(TINY_BUILTIN["t5"]).abstract_init()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract)
  loaded = ckpt_lib.as_numpy(ckpt_lib.load_params(str(tmp_path), abstract, step=4))
  assert _max_abs_diff(loaded, runs["t5", "4x2", True]["params"]) < 1e-6


# ---- checkpoint of another model size -----------------------------------------
def _snapshot(model_dir):
  files = {}
  for root, _, names in os.walk(model_dir):
    for name in names:
      path = os.path.join(root, name)
      st = os.stat(path)
      files[os.path.relpath(path, model_dir)] = (st.st_size, st.st_mtime_ns)
  return files


def test_resume_with_another_model_size_names_parameter(runs, tmp_path):
  model_dir = tmp_path / "run"
  shutil.copytree(runs["t5", "4x2", True]["dir"], model_dir)
  before = _snapshot(model_dir)
  bigger = replace(TINY_BUILTIN["t5"], d_model=64)
  alg = SFT(model=LanguageModel(bigger), batch_size=8, input_length=32, target_length=8,
            num_eval_samples=0)
  with pytest.raises(UserError) as info:
    _train(model_dir, alg, STEPS + 2, fsdp=True)
  msg = str(info.value)
  m = re.search(r"parameter (\S+) has shape \(([\d, ]*)\), the model expects \(([\d, ]*)\)",
                msg)
  assert m, msg
  assert str(model_dir / ckpt_lib.CHECKPOINT_SUBDIR) in msg

  # The named parameter really has these shapes in the two models.
  def shape_of(config, key):
    abstract, _ = LanguageModel(config).abstract_init()
    flat = {jax.tree_util.keystr(p): x.shape
            for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    return flat[key]

  as_tuple = lambda s: tuple(int(x) for x in s.replace(" ", "").split(",") if x)
  assert as_tuple(m.group(2)) == shape_of(TINY_BUILTIN["t5"], m.group(1))
  assert as_tuple(m.group(3)) == shape_of(bigger, m.group(1))
  assert as_tuple(m.group(2)) != as_tuple(m.group(3))
  # Nothing was written: no new checkpoint, metrics untouched.
  assert _snapshot(model_dir) == before
