"""Scanned layers, layouts, remat policies and attention paths.

Scanned and unrolled models from the same parameters (converted layout) give
the same logits and gradients; cached decoding equals the full pass with
scanned layers (forked caches included); remat policies and attention
implementations change nothing numerically; an 8-device FSDP + model-parallel
gradient with scanned layers equals one device; checkpoints convert between
layouts on load; bad settings are one-line errors.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realign_jax.checkpoints import manager as ckpt_lib
from realign_jax.checkpoints import run_dir
from realign_jax.decoding import controlled, sampler
from realign_jax.plumbing.errors import UserError
from realign_jax.models import layout
from realign_jax.models.api import LanguageModel
from realign_jax.models.config import REMAT_POLICIES, T5Config, replace
from realign_jax.parallel import partitioning
from tests.helpers import TINY, random_batch

FAMILIES = ["t5", "decoder"]
TOL = 1e-5


def _cfg(family, **kw):
  cfg = TINY[family]
  if family == "decoder":
    cfg = replace(cfg, sliding_window=4)  # grouped-query heads (4 vs 2) and a window
  return replace(cfg, **kw)


def _batch(seed=0, b=4):
  return random_batch(np.random.default_rng(seed), b, 7, 5, 64)


def _loss(lm):
  def f(params, inputs, targets):
    logits = lm.forward(params, inputs, targets)["logits"]
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * (targets != 0)) / jnp.sum(targets != 0)
  return f


def _max_diff(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in
             zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.fixture(scope="module")
def unrolled():
  """{family: (config, unrolled params)}."""
  out = {}
  for family in FAMILIES:
    cfg = _cfg(family)
    lm = LanguageModel(cfg)
    out[family] = (cfg, jax.jit(lambda r, lm=lm: lm.init(r)[0])(jax.random.PRNGKey(1)))
  return out


@pytest.fixture(scope="module")
def grads(unrolled):
  """{family: {(layout, remat policy): (loss, grads in the unrolled layout)}} on one batch."""
  inputs, targets = _batch(2)
  out = {}
  for family in FAMILIES:
    cfg, params = unrolled[family]
    res = {}
    # NOTE: every policy on the decoder stack; T5's two stacks get "full" in
    # the sharded test: each gradient is a compile, T5's the slowest.
    combos = [(False, "none"), (True, "none")]
    if family == "decoder":
      combos += [(True, "full"), (True, "dots_saveable"), (False, "dots_saveable")]
    for scan, policy in combos:
      c = replace(cfg, scan_layers=scan, remat_policy=policy)
      loss, g = jax.jit(jax.value_and_grad(_loss(LanguageModel(c))))(
          layout.convert(params, c), inputs, targets)
      res[layout.layout(c), policy] = (float(loss), layout.to_unrolled(g, cfg))
    out[family] = res
  return out


# ---- layouts ------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_layout_round_trip_and_logical_axes(family, unrolled):
  cfg, params = unrolled[family]
  scanned = layout.to_scanned(params, cfg)
  first, n = layout.stacks(cfg)[0]
  assert f"{first}_0" not in scanned and scanned[first] is not None
  # Layer i of the stack is exactly the unrolled layer i.
  leaf_u = jax.tree_util.tree_leaves(params[f"{first}_1"])
  leaf_s = jax.tree_util.tree_leaves(scanned[first])
  assert all(s.shape == (n,) + u.shape for s, u in zip(leaf_s, leaf_u))
  assert all(np.array_equal(s[1], u) for s, u in zip(leaf_s, leaf_u))
  assert _max_diff(layout.to_unrolled(scanned, cfg), params) == 0.0
  # The scanned model's own init has this tree, its stacks on a `layers` axis.
  s_params, s_axes = LanguageModel(replace(cfg, scan_layers=True)).abstract_init()
  assert jax.tree_util.tree_structure(s_params) == jax.tree_util.tree_structure(scanned)
  specs = jax.tree_util.tree_leaves(s_axes[first], is_leaf=lambda x: isinstance(x, nn.Partitioned)
                                    or type(x).__name__ == "PartitionSpec")
  assert specs and all(tuple(s)[0] == "layers" for s in specs)


@pytest.mark.parametrize("family", FAMILIES)
def test_scanned_equals_unrolled_logits_and_gradients(family, unrolled, grads):
  cfg, params = unrolled[family]
  s_cfg = replace(cfg, scan_layers=True)
  inputs, targets = _batch(2)
  out_u = jax.jit(LanguageModel(cfg).forward)(params, inputs, targets)["logits"]
  out_s = jax.jit(LanguageModel(s_cfg).forward)(layout.to_scanned(params, cfg), inputs,
                                                targets)["logits"]
  np.testing.assert_allclose(out_s, out_u, atol=TOL, rtol=0)
  (lu, gu), (ls, gs) = grads[family]["unrolled", "none"], grads[family]["scanned", "none"]
  assert abs(ls - lu) < TOL
  assert _max_diff(gs, gu) < TOL
  # Every layer gets a gradient: the comparison is not between zeros.
  for name, n in layout.stacks(cfg):
    for i in range(n):
      assert max(float(jnp.max(jnp.abs(g))) for g in
                 jax.tree_util.tree_leaves(gu[f"{name}_{i}"])) > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_scanned_cache_matches_full_forward_and_forks(family, unrolled):
  """Every cache leaf keeps the batch on axis 0, so the decoding package's forks work."""
  cfg, params = unrolled[family]
  lm = LanguageModel(replace(cfg, scan_layers=True), "lm+scalar")
  s_params = dict(layout.to_scanned(params, cfg))
  s_params["scalar_head"] = {"kernel": jnp.linspace(-1.0, 1.0, cfg.d_model),
                             "bias": jnp.asarray(0.5)}
  inputs, targets = _batch(3)
  full = jax.jit(lm.forward)(s_params, inputs, targets)
  cache, tok = jax.jit(lm.prefill, static_argnums=2)(s_params, inputs, targets.shape[1])
  b = inputs.shape[0]
  for leaf in jax.tree_util.tree_leaves(cache):
    assert leaf.ndim == 0 or leaf.shape[0] == b
  step = jax.jit(lm.step_outputs)
  rows = np.array([2, 0])  # a fork of rows 2 and 0, as controlled decoding takes them
  for t in range(targets.shape[1]):
    if t == 2:
      forked = controlled.take_rows(sampler.repeat_cache(cache, 2), rows * 2 + 1)
      f_out, _ = step(s_params, tok[rows], forked)
    out, cache = step(s_params, tok, cache)
    if t == 2:
      np.testing.assert_allclose(f_out["logits"], out["logits"][rows], atol=TOL, rtol=0)
    valid = targets[:, t] != 0
    np.testing.assert_allclose(out["logits"][valid], full["logits"][valid, t], atol=TOL, rtol=0)
    np.testing.assert_allclose(out["values"][valid], full["values"][valid, t], atol=TOL, rtol=0)
    tok = jnp.asarray(targets[:, t])


# ---- remat and attention ------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_every_remat_policy_gives_the_same_loss_and_gradients(family, grads):
  res = grads[family]
  base_loss, base_grads = res["unrolled", "none"]
  for key, (loss, g) in res.items():
    assert abs(loss - base_loss) < TOL, key
    assert _max_diff(g, base_grads) < TOL, key


def test_remat_policies_change_the_compiled_program(unrolled):
  """Each policy really is applied: they compile to different backward passes."""
  cfg, params = unrolled["t5"]
  cfg = replace(cfg, scan_layers=True)
  params = layout.convert(params, cfg)
  inputs, targets = _batch(4)
  texts = {}
  for policy in REMAT_POLICIES:
    fn = jax.grad(_loss(LanguageModel(replace(cfg, remat_policy=policy))))
    texts[policy] = str(jax.make_jaxpr(fn)(params, inputs, targets))
  assert "remat" not in texts["none"] and "checkpoint" not in texts["none"]
  assert texts["dots_saveable"] != texts["full"]
  assert all(("remat" in texts[p] or "checkpoint" in texts[p]) for p in ("dots_saveable", "full"))


@pytest.mark.parametrize("family", FAMILIES)
def test_dot_product_attention_equals_einsum(family, unrolled):
  """T5's relative-position bias, padding, causal masks, GQA and the window, both paths."""
  cfg, params = unrolled[family]
  inputs, targets = _batch(5)
  fused_cfg = replace(cfg, attention_impl="dot_product", scan_layers=True)
  ref = jax.jit(LanguageModel(cfg).forward)(params, inputs, targets)["logits"]
  lm = LanguageModel(fused_cfg)
  s_params = layout.convert(params, fused_cfg)
  out = jax.jit(lm.forward)(s_params, inputs, targets)["logits"]
  np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)
  cache, tok = jax.jit(lm.prefill, static_argnums=2)(s_params, inputs, 2)
  logits, _ = jax.jit(lm.step)(s_params, tok, cache)
  np.testing.assert_allclose(logits, ref[:, 0], atol=TOL, rtol=0)


# ---- sharding -----------------------------------------------------------------
def test_sharded_scanned_gradients_equal_single_device(unrolled, grads):
  """FSDP over `data` x model parallel over `model` (8 devices) vs one device, T5 (both stacks).

  The sharded model also recomputes its layers (remat "full"); the one-device
  reference keeps every activation.
  """
  cfg, params = unrolled["t5"]
  cfg = replace(cfg, scan_layers=True, remat_policy="full")
  lm = LanguageModel(cfg)
  _, axes = lm.abstract_init()
  inputs, targets = _batch(2)
  mesh = partitioning.create_mesh(data=4, model=2)
  rules = partitioning.logical_axis_rules(fsdp=True)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    sh = partitioning.logical_to_mesh_sharding(axes, mesh, rules)
    p = jax.device_put(layout.to_scanned(params, cfg), sh)
    specs = [tuple(x.sharding.spec) for x in jax.tree_util.tree_leaves(p)]
    assert any("model" in s for s in specs) and any("data" in s for s in specs)
    b = partitioning.shard_batch({"inputs": inputs, "targets": targets}, mesh)
    loss8, g8 = jax.jit(jax.value_and_grad(_loss(lm)), out_shardings=(None, sh))(
        p, b["inputs"], b["targets"])
    assert len(jax.tree_util.tree_leaves(g8)[0].sharding.device_set) == 8
  loss1, g1 = grads["t5"]["scanned", "none"]
  assert abs(float(loss8) - loss1) < TOL
  assert _max_diff(layout.to_unrolled(jax.device_get(g8), cfg), g1) < TOL


# ---- checkpoints ----------------------------------------------------------------
def _write_run(model_dir, cfg, params):
  run_dir.write_model_json(str(model_dir), cfg)
  ck = ckpt_lib.Checkpointer(str(model_dir), keep=1, async_save=False)
  ck.save(3, {"params": params})
  ck.wait()
  ck.close()


@pytest.mark.parametrize("source_scanned", [False, True])
def test_checkpoint_of_the_other_layout_is_converted_on_load(tmp_path, unrolled,
                                                            source_scanned):
  cfg, params = unrolled["t5"]
  src_cfg = replace(cfg, scan_layers=source_scanned)
  _write_run(tmp_path, src_cfg, layout.convert(params, src_cfg))
  doc = json.load(open(os.path.join(tmp_path, ckpt_lib.MODEL_JSON)))
  assert doc["layout"] == ("scanned" if source_scanned else "unrolled")
  assert ckpt_lib.read_model_json(str(tmp_path))[0] == src_cfg

  want_cfg = replace(cfg, scan_layers=not source_scanned)
  mesh = partitioning.create_mesh(data=4, model=2)
  rules = partitioning.logical_axis_rules(fsdp=True)
  abstract, axes = LanguageModel(want_cfg).abstract_init()
  sh = partitioning.logical_to_mesh_sharding(axes, mesh, rules)
  target = jax.tree_util.tree_map(
      lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h), abstract, sh)
  loaded = ckpt_lib.load_params(str(tmp_path), target)
  assert _max_diff(jax.device_get(loaded), layout.convert(params, want_cfg)) == 0.0
  for x, h in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(sh)):
    assert x.sharding.is_equivalent_to(h, x.ndim)


def test_model_json_without_layout_reads_as_unrolled(tmp_path):
  doc = {"family": "t5", "output_head": "lm", "config": {"vocab_size": 64}}
  (tmp_path / ckpt_lib.MODEL_JSON).write_text(json.dumps(doc))
  cfg, _ = ckpt_lib.read_model_json(str(tmp_path))
  assert cfg.scan_layers is False and layout.layout(cfg) == "unrolled"
  doc["layout"] = "stacked"
  (tmp_path / ckpt_lib.MODEL_JSON).write_text(json.dumps(doc))
  with pytest.raises(UserError, match="malformed.*stacked"):
    ckpt_lib.read_model_json(str(tmp_path))


# ---- bad input --------------------------------------------------------------------
def test_bad_settings_are_one_line_errors():
  with pytest.raises(UserError) as e:
    T5Config(remat_policy="dots")
  first = str(e.value).splitlines()[0]
  assert "'dots'" in first and "none, dots_saveable, full" in first
  with pytest.raises(UserError, match="attention_impl 'flash' is not one of: einsum, "):
    T5Config(attention_impl="flash")
  with pytest.raises(UserError, match="model axis 3 does not divide the 8 devices"):
    partitioning.create_mesh(data=-1, model=3)
  with pytest.raises(UserError, match=r"mesh 2x2 .* does not cover the 8 devices; use data=4"):
    partitioning.create_mesh(data=2, model=2)
  mesh = partitioning.create_mesh(data=4, model=2)
  partitioning.check_batch_divides(8, mesh)
  with pytest.raises(UserError, match=r"batch size 10 is not divisible by the mesh data axis "
                     r"\(4 devices\); use a multiple of 4, e.g. 8 or 12"):
    partitioning.check_batch_divides(10, mesh)
  with pytest.raises(UserError, match="unknown parameter layout 'stacked'"):
    layout.to_layout({}, TINY["t5"], "stacked")
