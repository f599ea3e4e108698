"""Optimizer state sharded like its parameters (parallel/optimizer_state.py).

Through the one trainer loop on a tiny T5 whose MLP and embedding are wide
enough for Adafactor to factor them: with FSDP on the 8 simulated devices no
optimizer-state leaf above a few thousand elements is replicated, for
Adafactor, AdamW and SGD with momentum, scanned and unrolled. One Adafactor
step sharded (FSDP, its second moments reduced across shards) equals the same
step on one device.
"""

import dataclasses

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from realign_jax.models.api import LanguageModel
from realign_jax.models.config import T5Config
from realign_jax.parallel import optimizer_state, partitioning
from realign_jax.training import optim, trainer
from realign_jax.training.sft import SFT

# NOTE: d_model and d_ff >= 128 so that Adafactor factors the MLP kernels and the
# embeddings (v_row, v_col); the attention kernels' head_dim 16 < 128 keeps them whole.
TINY = T5Config(vocab_size=256, d_model=128, num_heads=2, head_dim=16, d_ff=256,
                num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.0,
                dtype="float32")
# Elements above which a state leaf must be sharded on the (8, 1) FSDP mesh; the
# leaves below it are the counts, Adafactor's placeholders and its column moments
# over axes the rules leave whole (`mlp` and `vocab` go to `model`, of size 1).
THRESHOLD = 1024


@dataclasses.dataclass
class RandomSFT(SFT):
  """SFT on random token ids: no vocabulary, no data pipeline, no evaluation."""

  def setup(self, mesh, rules):
    del rules
    self._mesh = mesh

  def batches(self, start_step):
    rng = np.random.default_rng(start_step)
    while True:
      yield {k: rng.integers(2, self.model.vocab_size, (self.batch_size, n), dtype=np.int32)
             for k, n in (("inputs", self.input_length), ("targets", self.target_length))}

  def evaluate(self, params, step, aux=None):
    return {}, []


OPTIMIZERS = {
    "adafactor": lambda: optim.make_optimizer(name="adafactor", learning_rate=1e-2),
    "adamw": lambda: optim.make_optimizer(name="adamw", learning_rate=1e-3),
    "sgd_momentum": lambda: optax.chain(optax.clip_by_global_norm(1.0),
                                        optax.sgd(1e-2, momentum=0.9)),
}


def _train(tmp_path, optimizer, steps, *, scan=True, mesh=(8, 1), fsdp=True):
  alg = RandomSFT(model=LanguageModel(dataclasses.replace(TINY, scan_layers=scan)),
                  batch_size=8, input_length=16, target_length=8, num_eval_samples=0)
  devices = jax.devices()[:mesh[0] * mesh[1]]
  trainer.train(algorithm=alg, model_dir=str(tmp_path), train_steps=steps,
                optimizer=OPTIMIZERS[optimizer](),
                mesh=partitioning.create_mesh(*mesh, devices=devices),
                rules=partitioning.logical_axis_rules(fsdp),
                config=trainer.TrainerConfig(checkpoint_every=10**6, eval_every=0,
                                             progress=False, async_checkpoint=False))
  return alg.final_state


def _replicated_leaves(tree, threshold=THRESHOLD):
  return [(jax.tree_util.keystr(k), x.shape) for k, x in
          jax.tree_util.tree_leaves_with_path(tree)
          if x.size > threshold and x.sharding.is_fully_replicated]


# ---- the rule on its own -------------------------------------------------------
def test_logical_axes_follow_the_params():
  params = {"w": jax.ShapeDtypeStruct((256, 512), np.float32),
            "b": jax.ShapeDtypeStruct((512,), np.float32)}
  axes = {"w": P("embed", "mlp"), "b": P("mlp")}
  adafactor = optax.adafactor(1e-2)
  state = jax.eval_shape(adafactor.init, params)
  got = optimizer_state.logical_axes(state, params, axes)
  factored = got[0]  # FactoredState: count, v_row, v_col, v
  assert factored.count == P()
  # v_row drops the largest dimension (mlp), v_col the other one (embed).
  assert factored.v_row == {"w": P("embed"), "b": P()}
  assert factored.v_col == {"w": P("mlp"), "b": P()}
  assert factored.v == {"w": P(), "b": P("mlp")}

  # Adam: mu and nu; SGD: the momentum trace. Each with the params' axes.
  for opt, copies in ((optax.adamw(1e-3), 2), (optax.sgd(1e-2, momentum=0.9), 1)):
    state = jax.eval_shape(opt.init, params)
    got = jax.tree_util.tree_leaves(optimizer_state.logical_axes(state, params, axes),
                                    is_leaf=lambda x: isinstance(x, P))
    assert sorted(tuple(t) for t in got if t != P()) == sorted(
        [tuple(axes["w"]), tuple(axes["b"])] * copies)


def _expected_shardings(optimizer, scan, mesh, rules):
  """The optimizer state of the tiny model, abstract, with the shardings the trainer gives it."""
  lm = LanguageModel(dataclasses.replace(TINY, scan_layers=scan))
  params, axes = lm.abstract_init()
  state = jax.eval_shape(OPTIMIZERS[optimizer]().init, params)
  shardings = optimizer_state.shardings(state, params, axes, mesh, rules)
  return jax.tree_util.tree_map(
      lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state, shardings)


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_no_large_optimizer_state_leaf_is_replicated(optimizer, scan):
  mesh = partitioning.create_mesh(8, 1)
  state = _expected_shardings(optimizer, scan, mesh, partitioning.logical_axis_rules(True))
  large = [x for x in jax.tree_util.tree_leaves(state) if x.size > THRESHOLD]
  assert large, "the tiny model has no optimizer-state leaf above the threshold"
  assert not _replicated_leaves(state)
  # Each by its param's `embed` axis over `data`: one eighth of it per device.
  assert all(np.prod(x.sharding.shard_shape(x.shape)) * 8 == x.size for x in large)


# ---- through the trainer ---------------------------------------------------------
def test_one_sharded_adafactor_step_equals_one_device(tmp_path):
  sharded = _train(tmp_path / "sharded", "adafactor", 1, scan=True, mesh=(8, 1))
  one = _train(tmp_path / "one", "adafactor", 1, scan=True, mesh=(1, 1), fsdp=False)
  # The trainer lays the state out by the rule and its step keeps that layout.
  expected = _expected_shardings("adafactor", True, partitioning.create_mesh(8, 1),
                                 partitioning.logical_axis_rules(True))
  for got, want in zip(jax.tree_util.tree_leaves(sharded["opt_state"]),
                       jax.tree_util.tree_leaves(expected)):
    assert got.sharding.is_equivalent_to(want.sharding, got.ndim), (got.sharding, want.sharding)
  assert not _replicated_leaves(sharded["opt_state"])
  for name in ("params", "opt_state"):
    a = jax.tree_util.tree_leaves(jax.device_get(sharded[name]))
    b = jax.tree_util.tree_leaves(jax.device_get(one[name]))
    assert len(a) == len(b)
    for x, y in zip(a, b):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
