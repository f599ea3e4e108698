"""Model tests: shapes, heads, KV-cache parity, padding, bf16, logical axes, sharding."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realign_jax.models import layers
from realign_jax.models.api import LanguageModel
from realign_jax.models.config import replace
from realign_jax.models.heads import last_position_values
from realign_jax.models.t5 import relative_position_bucket
from realign_jax.parallel import partitioning
from tests.helpers import TINY, random_batch

FAMILIES = ["t5", "decoder"]


def _params(cfg, head="lm", seed=0):
  lm = LanguageModel(cfg, head)
  return lm, _jitted(lm).init(jax.random.PRNGKey(seed)), lm.abstract_init()[1]


class _Jitted:
  """A model's programs, each jitted once (eager, every op of a forward pass is
  dispatched and compiled on its own: 15 to 30 CPU-s a test)."""

  def __init__(self, lm):
    self.init = jax.jit(lambda rng: lm.init(rng)[0])  # NOTE: the params (the axes are no arrays)
    self.forward = jax.jit(lm.forward)
    self.prefill = jax.jit(lm.prefill, static_argnums=2)
    self.step = jax.jit(lm.step)
    self.step_outputs = jax.jit(lm.step_outputs)


@functools.lru_cache(maxsize=None)
def _jitted(lm) -> _Jitted:
  return _Jitted(lm)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head", ["lm", "scalar", "lm+scalar"])
def test_output_shapes(family, head):
  lm, params, _ = _params(TINY[family], head)
  inputs, targets = random_batch(np.random.default_rng(0), 3, 7, 5, 64)
  out = _jitted(lm).forward(params, inputs, targets)
  if "lm" in head:
    assert out["logits"].shape == (3, 5, 64) and out["logits"].dtype == jnp.float32
  else:
    assert "logits" not in out
  if "scalar" in head:
    assert out["values"].shape == (3, 5)
    assert last_position_values(out["values"], targets != 0).shape == (3,)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", ["plain", "tied", "window"])
def test_cache_matches_full_forward(family, variant):
  cfg = TINY[family]
  if variant == "tied":
    cfg = replace(cfg, tie_embeddings=True)
  if variant == "window":
    if family == "t5":
      pytest.skip("sliding window is a decoder-only option")
    cfg = replace(cfg, sliding_window=3)
  lm, params, _ = _params(cfg, "lm+scalar")
  inputs, targets = random_batch(np.random.default_rng(1), 4, 9, 6, 64)
  full = _jitted(lm).forward(params, inputs, targets)
  cache, tok = _jitted(lm).prefill(params, inputs, targets.shape[1])
  step = _jitted(lm).step_outputs
  for t in range(targets.shape[1]):
    out, cache = step(params, tok, cache)
    valid = targets[:, t] != 0
    np.testing.assert_allclose(out["logits"][valid], full["logits"][valid, t], atol=1e-5,
                               rtol=0)
    np.testing.assert_allclose(out["values"][valid], full["values"][valid, t], atol=1e-5,
                               rtol=0)
    tok = jnp.asarray(targets[:, t])


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_does_not_change_outputs(family):
  """The same prompt and response give the same logits with more padding around them."""
  lm, params, _ = _params(TINY[family])
  inputs, targets = random_batch(np.random.default_rng(2), 2, 6, 4, 64, min_len=2)
  wide_in = np.pad(inputs, ((0, 0), (0, 5)))
  wide_tg = np.pad(targets, ((0, 0), (0, 3)))
  a = _jitted(lm).forward(params, inputs, targets)["logits"]
  b = _jitted(lm).forward(params, wide_in, wide_tg)["logits"][:, :4]
  mask = targets != 0
  np.testing.assert_allclose(np.asarray(a)[mask], np.asarray(b)[mask], atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_forward_and_cache(family):
  cfg = replace(TINY[family], dtype="bfloat16")
  lm, params, _ = _params(cfg)
  inputs, targets = random_batch(np.random.default_rng(3), 2, 6, 4, 64)
  full = _jitted(lm).forward(params, inputs, targets)["logits"]
  assert full.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(full)))
  cache, tok = _jitted(lm).prefill(params, inputs, 4)
  leaves = jax.tree_util.tree_leaves(cache)
  assert any(x.dtype == jnp.bfloat16 for x in leaves)
  logits, _ = _jitted(lm).step(params, tok, cache)
  np.testing.assert_allclose(logits, full[:, 0], atol=0.1)
  # and close to the float32 model with the same params
  f32 = _jitted(LanguageModel(TINY[family])).forward(params, inputs, targets)["logits"]
  assert float(jnp.max(jnp.abs(f32 - full))) < 0.25


@pytest.mark.parametrize("family", FAMILIES)
def test_every_param_has_logical_axes(family):
  _, params, axes = _params(TINY[family], "lm+scalar")
  flat_p = jax.tree_util.tree_leaves(params)
  flat_a = jax.tree_util.tree_leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert len(flat_p) == len(flat_a)
  for p, a in zip(flat_p, flat_a):
    assert isinstance(a, jax.sharding.PartitionSpec) and len(a) == p.ndim


def _bucket_reference(rel, bidirectional, num_buckets=32, max_distance=128):
  """Scalar Python transcription of the Mesh-TF/T5 bucketing rule."""
  n = -rel
  ret = 0
  if bidirectional:
    num_buckets //= 2
    ret += num_buckets if n < 0 else 0
    n = abs(n)
  else:
    n = max(n, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return ret + n
  large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact)
                          * (num_buckets - max_exact))
  return ret + min(large, num_buckets - 1)


def test_relative_position_buckets_match_t5_formula():
  rel = list(range(-300, 301))
  for bidirectional in (True, False):
    got = relative_position_bucket(jnp.array(rel), bidirectional=bidirectional,
                                   num_buckets=32, max_distance=128).tolist()
    assert got == [_bucket_reference(r, bidirectional) for r in rel]
  # Spot values: one side of the bidirectional table per sign, causal sees only the past.
  assert _bucket_reference(-1, True) == 1 and _bucket_reference(1, True) == 17
  assert _bucket_reference(1, False) == 0 and _bucket_reference(-200, False) == 31


def test_to_left_padding():
  toks = jnp.array([[5, 6, 1, 0, 0], [7, 1, 0, 0, 0], [2, 3, 4, 5, 1]])
  left, lengths = layers.to_left_padding(toks)
  assert left.tolist() == [[0, 0, 5, 6, 1], [0, 0, 0, 7, 1], [2, 3, 4, 5, 1]]
  assert lengths.tolist() == [3, 2, 5]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fsdp", [False, True])
def test_sharded_forward_equals_single_device(family, fsdp):
  lm, params, axes = _params(TINY[family])
  inputs, targets = random_batch(np.random.default_rng(4), 8, 7, 5, 64)
  ref = _jitted(lm).forward(params, inputs, targets)["logits"]
  mesh = partitioning.create_mesh(data=4, model=2)
  rules = partitioning.logical_axis_rules(fsdp)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    sh = partitioning.logical_to_mesh_sharding(axes, mesh, rules)
    p = jax.device_put(params, sh)
    b = partitioning.shard_batch({"inputs": inputs, "targets": targets}, mesh)
    # NOTE: a fresh function, so it is traced (with its sharding constraints) in the mesh.
    out = jax.jit(lambda p_, x, y: lm.forward(p_, x, y))(p, b["inputs"], b["targets"])["logits"]
    assert len(out.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
