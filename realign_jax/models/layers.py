"""Building blocks shared by the T5 and decoder-only families.

Every parameter is created through `nn.with_logical_partitioning`, so the
parameter tree carries logical axis names; `realign_jax.parallel` maps them to
mesh axes. Activations are constrained with `act_*` names, kept apart from the
parameter names so that FSDP (sharding `embed` over `data`) does not also
shard activations.

Shape letters: B batch, T query length, S key length, H heads, K kv heads,
G = H // K query groups, D head dim, E embed dim, F mlp dim, V vocab.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from realign_jax.models.config import REMAT_POLICIES, check_choice

Dtype = Any
NEG_INF = -1e10  # NOTE: finite, so fully masked rows (left padding) stay NaN-free.


def logical(init, names):
  return nn.with_logical_partitioning(init, names)


def constrain(x, names):
  return nn.with_logical_constraint(x, names)


class RMSNorm(nn.Module):
  """Root-mean-square layer norm without bias or mean subtraction (T5, Llama)."""

  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", logical(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


class Embed(nn.Module):
  """Token embedding with an `attend` method for tied output projections."""

  num_embeddings: int
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = 1.0

  def setup(self):
    self.embedding = self.param(
        "embedding",
        logical(nn.initializers.normal(stddev=self.init_std), ("vocab", "embed")),
        (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, ids):
    # [B, T] -> [B, T, E]
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x):
    # [B, T, E] -> [B, T, V]
    return jnp.einsum("bte,ve->btv", x, self.embedding.astype(self.dtype))


class DenseGeneral(nn.Module):
  """Bias-free dense map over the last `n_in` axes with an unflattened kernel.

  NOTE: flax's DenseGeneral builds its kernel flat and reshapes it, which
  clashes with logical sharding constraints of the unflattened rank; this
  version creates the kernel at its real shape, [*in_shape, *features].
  """

  features: tuple
  names: tuple
  n_in: int = 1
  scale: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n_out = len(self.features)
    in_shape = x.shape[-self.n_in:]
    shape = tuple(in_shape) + tuple(self.features)
    init = nn.initializers.variance_scaling(
        self.scale, "fan_in", "truncated_normal", in_axis=tuple(range(self.n_in)),
        out_axis=tuple(range(self.n_in, self.n_in + n_out)))
    kernel = self.param("kernel", logical(init, self.names), shape, self.param_dtype)
    contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
    return jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                               (contract, ((), ())))


def dense(features, names, *, dtype, param_dtype, scale=1.0, axis=-1, name=None):
  """Bias-free dense layer whose kernel carries logical axis `names`."""
  features = tuple(features) if isinstance(features, (tuple, list)) else (features,)
  n_in = len(axis) if isinstance(axis, (tuple, list)) else 1
  return DenseGeneral(features, tuple(names), n_in=n_in, scale=scale, dtype=dtype,
                      param_dtype=param_dtype, name=name)


def attention(q, k, v, mask, bias=None, *, scale=1.0, probs_dropout=None, impl="einsum"):
  """Grouped-query dot-product attention, softmax in float32.

  Args:
    q: [B, T, H, D] queries.
    k, v: [B, K, S, D] keys and values (kv-head-major, the cache layout, so a
      decode step needs no transpose of the cache), H a multiple of K.
    mask: bool, broadcastable to [B, 1, T, S]; True where attention is allowed.
    bias: optional, broadcastable to [B, H, T, S].
    scale: multiplies q k^T (T5 uses 1, Llama 1/sqrt(D)).
    probs_dropout: optional function applied to the attention probabilities.
    impl: "einsum" (below) or "dot_product": `jax.nn.dot_product_attention`,
      a fused kernel where the backend has one (cuDNN), the same math
      otherwise; attention-probability dropout always takes the einsum path.

  Returns:
    [B, T, H, D] in q's dtype.
  """
  if impl == "dot_product" and probs_dropout is None:
    # NOTE: the fused op wants [B, S, K, D] keys; the cache keeps [B, K, S, D]
    # so that a decode step writes one contiguous slot.
    kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    if bias is not None:
      bias = bias.astype(jnp.float32 if q.dtype == jnp.float32 else q.dtype)
    mask = jnp.broadcast_to(mask, (mask.shape[0], 1, q.shape[1], k.shape[2]))
    return jax.nn.dot_product_attention(q, kt, vt.astype(q.dtype), bias=bias, mask=mask,
                                        scale=scale).astype(q.dtype)
  b, t, h, d = q.shape
  kh = k.shape[1]
  g = h // kh
  qg = q.reshape(b, t, kh, g, d)
  logits = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32)
  logits = logits * scale
  if bias is not None:
    bias = jnp.broadcast_to(bias, (bias.shape[0], h) + bias.shape[2:])
    logits = logits + bias.reshape(bias.shape[0], kh, g, t, -1).astype(jnp.float32)
  mask = jnp.broadcast_to(mask, (mask.shape[0], 1, t, k.shape[2]))[:, :, None]  # [B,1,1,T,S]
  logits = jnp.where(mask, logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1)
  if probs_dropout is not None:
    probs = probs_dropout(probs)
  probs = probs.astype(v.dtype)
  out = jnp.einsum("bkgts,bksd->btkgd", probs, v)
  return out.reshape(b, t, h, d)


def heads_major(x):
  """[B, T, K, D] projections -> [B, K, T, D], the layout of keys, values and caches."""
  return jnp.transpose(x, (0, 2, 1, 3))


def update_cache(cache_arr, new, index):
  """Writes `new` [B, K, T, D] into `cache_arr` [B, K, S, D] at slots index..index+T."""
  return jax.lax.dynamic_update_slice(cache_arr, new.astype(cache_arr.dtype), (0, 0, index, 0))


class GatedMLP(nn.Module):
  """act(x W_gate) * (x W_up) -> W_down; gated-GELU (T5.1.1) or SwiGLU (Llama)."""

  d_ff: int
  activation: str  # "gelu" | "silu"
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  names: tuple = ("wi_0", "wi_1", "wo")

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    e = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gate = dense(self.d_ff, ("embed", "mlp"), name=self.names[0], **kw)(x)
    up = dense(self.d_ff, ("embed", "mlp"), name=self.names[1], **kw)(x)
    if self.activation == "gelu":
      act = jax.nn.gelu(gate, approximate=True)
    elif self.activation == "silu":
      act = jax.nn.silu(gate)
    else:
      raise ValueError(f"unknown activation {self.activation!r}")
    h = constrain(act * up, ("batch", "act_length", "act_mlp"))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    return dense(e, ("mlp", "embed"), name=self.names[2], **kw)(h)


def remat(module_cls, policy: str, static_argnums: tuple, prevent_cse: bool = True):
  """`module_cls` under the named rematerialisation policy (REMAT_POLICIES).

  none: keep every activation; dots_saveable: keep only matmul outputs and
  recompute the element-wise ops in the backward pass; full: keep only the
  layer's inputs and recompute the whole layer.
  """
  check_choice("remat_policy", policy, REMAT_POLICIES)
  if policy == "none":
    return module_cls
  fn = jax.checkpoint_policies.dots_saveable if policy == "dots_saveable" else None
  return nn.remat(module_cls, policy=fn, prevent_cse=prevent_cse, static_argnums=static_argnums)


def scan_stack(module_cls, length: int, in_axes: tuple):
  """`nn.scan` of one layer over `length` layers, params stacked on axis 0 (`layers`).

  Per-layer inputs and outputs (KV caches) are scanned over axis 1, so the
  batch stays on axis 0 of every cache leaf ([B, L, ...]): the decoding
  package forks caches by indexing axis 0.
  """
  return nn.scan(module_cls, variable_axes={"params": 0},
                 split_rngs={"params": True, "dropout": True}, in_axes=in_axes, out_axes=1,
                 length=length, metadata_params={nn.PARTITION_NAME: "layers"})


def rope(x, positions, theta: float):
  """Rotary embedding in the rotate-half layout of the HF Llama checkpoints.

  Args:
    x: [B, T, H, D].
    positions: [B, T] integer positions.
    theta: base frequency.
  """
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))  # [D/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, D]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def to_left_padding(tokens, pad_id: int = 0):
  """Moves right-padded rows [B, L] to left-padded rows (pad first).

  Returns the left-padded tokens and the per-row lengths [B].
  """
  length = tokens.shape[1]
  lengths = jnp.sum(tokens != pad_id, axis=1).astype(jnp.int32)
  # Row i: out[j] = tokens[(j + lengths[i]) % L] puts the real tokens last.
  idx = (jnp.arange(length)[None, :] + lengths[:, None]) % length
  out = jnp.take_along_axis(tokens, idx, axis=1)
  return out, lengths


def positions_from_mask(mask):
  """Position ids counting only real tokens: [B, L] bool -> [B, L] int32."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


def opt_dtype(name: Optional[str]):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
