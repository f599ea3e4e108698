"""T5.1.1-style encoder-decoder in Flax.

RMSNorm pre-norm without biases, relative-position buckets (bidirectional in
the encoder, causal in the decoder, one bias table per stack, shared by its
layers), gated-GELU MLP, dropout on every residual branch, tied or untied
output embedding. No 1/sqrt(d) in attention: T5 folds it into the query init.

Decoding: `prefill` encodes the prompt ONCE and precomputes every layer's
cross-attention keys and values; `step` then runs one decoder position with a
self-attention KV cache.
"""

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from realign_jax.models import heads as heads_lib
from realign_jax.models import layers
from realign_jax.models.config import T5Config

ACT = ("batch", "act_length", "act_embed")


def relative_position_bucket(relative_position, *, bidirectional, num_buckets, max_distance):
  """Mesh-TF/T5 bucketing of (key_pos - query_pos) into `num_buckets` ids."""
  ret = 0
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    ret = (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  n_safe = jnp.maximum(n, 1).astype(jnp.float32)
  large = max_exact + (jnp.log(n_safe / max_exact) / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return ret + jnp.where(is_small, n, large)


class RelativePositionBias(nn.Module):
  config: T5Config
  bidirectional: bool

  @nn.compact
  def __call__(self, q_pos, k_pos):
    """[T] query and [S] key positions -> bias [1, H, T, S] (float32)."""
    cfg = self.config
    table = self.param(
        "rel_embedding",
        layers.logical(nn.initializers.normal(stddev=1.0), ("relpos_buckets", "heads")),
        (cfg.relative_buckets, cfg.num_heads), jnp.dtype(cfg.param_dtype))
    rel = k_pos[None, :] - q_pos[:, None]  # [T, S]
    buckets = relative_position_bucket(rel, bidirectional=self.bidirectional,
                                       num_buckets=cfg.relative_buckets,
                                       max_distance=cfg.relative_max_distance)
    bias = jnp.take(table.astype(jnp.float32), buckets, axis=0)  # [T, S, H]
    return jnp.transpose(bias, (2, 0, 1))[None]


class T5Attention(nn.Module):
  config: T5Config

  def setup(self):
    cfg = self.config
    kw = dict(dtype=layers.opt_dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    hd = (cfg.num_heads, cfg.head_dim)
    # NOTE: T5 has no 1/sqrt(head_dim) in attention; the query init absorbs it.
    self.query = layers.dense(hd, ("embed", "heads", "kv"), scale=1.0 / cfg.head_dim, **kw)
    self.key = layers.dense(hd, ("embed", "heads", "kv"), **kw)
    self.value = layers.dense(hd, ("embed", "heads", "kv"), **kw)
    self.out = layers.dense(cfg.d_model, ("heads", "kv", "embed"), axis=(-2, -1), **kw)
    self.probs_dropout = nn.Dropout(cfg.dropout_rate)

  def project_kv(self, x):
    """[B, S, E] -> keys, values [B, H, S, D]."""
    return layers.heads_major(self.key(x)), layers.heads_major(self.value(x))

  def __call__(self, x, k, v, mask, bias=None, deterministic: bool = True):
    q = layers.constrain(self.query(x), ("batch", "act_length", "act_heads", "act_kv"))
    drop = None
    if not deterministic and self.config.dropout_rate > 0:
      drop = lambda p: self.probs_dropout(p, deterministic=False)  # noqa: E731
    out = layers.attention(q, k, v, mask, bias, scale=1.0, probs_dropout=drop,
                           impl=self.config.attention_impl)
    return self.out(out)


class EncoderLayer(nn.Module):
  config: T5Config
  scanned: bool = False  # returns (x, None), the carry and output of an nn.scan body

  @nn.compact
  def __call__(self, x, mask, bias, deterministic):
    cfg = self.config
    dt = layers.opt_dtype(cfg.dtype)
    drop = nn.Dropout(cfg.dropout_rate)
    h = layers.RMSNorm(cfg.rms_eps, dt, jnp.dtype(cfg.param_dtype), name="pre_attention_norm")(x)
    attn = T5Attention(cfg, name="attention")
    k, v = attn.project_kv(h)
    x = x + drop(attn(h, k, v, mask, bias, deterministic), deterministic=deterministic)
    h = layers.RMSNorm(cfg.rms_eps, dt, jnp.dtype(cfg.param_dtype), name="pre_mlp_norm")(x)
    h = layers.GatedMLP(cfg.d_ff, "gelu", cfg.dropout_rate, dt, jnp.dtype(cfg.param_dtype),
                        name="mlp")(h, deterministic)
    x = layers.constrain(x + drop(h, deterministic=deterministic), ACT)
    return (x, None) if self.scanned else x


class DecoderLayer(nn.Module):
  config: T5Config

  def setup(self):
    cfg = self.config
    dt = layers.opt_dtype(cfg.dtype)
    self.pre_self_attention_norm = layers.RMSNorm(cfg.rms_eps, dt, jnp.dtype(cfg.param_dtype))
    self.self_attention = T5Attention(cfg)
    self.pre_cross_attention_norm = layers.RMSNorm(cfg.rms_eps, dt, jnp.dtype(cfg.param_dtype))
    self.encoder_decoder_attention = T5Attention(cfg)
    self.pre_mlp_norm = layers.RMSNorm(cfg.rms_eps, dt, jnp.dtype(cfg.param_dtype))
    self.mlp = layers.GatedMLP(cfg.d_ff, "gelu", cfg.dropout_rate, dt, jnp.dtype(cfg.param_dtype))
    self.drop = nn.Dropout(cfg.dropout_rate)

  def cross_kv(self, encoded):
    return self.encoder_decoder_attention.project_kv(encoded)

  def __call__(self, x, self_mask, self_bias, cross_kv, cross_mask, deterministic,
               cache=None, cache_index=None):
    """Full pass when `cache` is None; else writes this chunk's k/v at `cache_index`."""
    h = self.pre_self_attention_norm(x)
    k, v = self.self_attention.project_kv(h)
    new_cache = None
    if cache is not None:
      k = layers.update_cache(cache["k"], k, cache_index)
      v = layers.update_cache(cache["v"], v, cache_index)
      new_cache = {"k": k, "v": v}
    x = x + self.drop(self.self_attention(h, k, v, self_mask, self_bias, deterministic),
                      deterministic=deterministic)
    h = self.pre_cross_attention_norm(x)
    ck, cv = cross_kv
    x = x + self.drop(self.encoder_decoder_attention(h, ck, cv, cross_mask, None, deterministic),
                      deterministic=deterministic)
    h = self.mlp(self.pre_mlp_norm(x), deterministic)
    return layers.constrain(x + self.drop(h, deterministic=deterministic), ACT), new_cache


class _ScannedDecoderLayer(DecoderLayer):
  """DecoderLayer whose __call__ is `scan_body` (nn.scan transforms __call__)."""

  def __call__(self, *args):
    return self.scan_body(*args)

  def layer(self, x, self_mask, self_bias, cross_kv, cross_mask, deterministic, cache=None,
            cache_index=None):
    return DecoderLayer.__call__(self, x, self_mask, self_bias, cross_kv, cross_mask,
                                 deterministic, cache, cache_index)

  def scan_body(self, x, self_mask, self_bias, encoded, cross_kv, cross_mask, deterministic,
                cache, cache_index):
    """One layer of the scanned stack.

    `cross_kv` is this layer's precomputed (k, v) when decoding, None in a
    teacher-forced pass (then computed from `encoded`). Returns (x, {"self":
    the new self cache or None, "cross": the cross k/v computed here when a
    cache is given, else None}): prefill collects every layer's that way.
    """
    computed = cross_kv is None
    if computed:
      cross_kv = self.cross_kv(encoded)
    x, new_cache = self.layer(x, self_mask, self_bias, cross_kv, cross_mask, deterministic,
                              cache, cache_index)
    cross = {"k": cross_kv[0], "v": cross_kv[1]} if computed and cache is not None else None
    return x, {"self": new_cache, "cross": cross}


def encoder_stack(cfg: T5Config, name: str):
  """The scanned encoder: (x, mask, bias, deterministic) -> (x, None)."""
  body = layers.remat(EncoderLayer, cfg.remat_policy, static_argnums=(4,), prevent_cse=False)
  return layers.scan_stack(body, cfg.num_encoder_layers,
                           (nn.broadcast, nn.broadcast, nn.broadcast))(
                               cfg, scanned=True, name=name)


def decoder_stack(cfg: T5Config, name: str):
  """The scanned decoder over `_ScannedDecoderLayer.scan_body`'s arguments."""
  body = layers.remat(_ScannedDecoderLayer, cfg.remat_policy, static_argnums=(7,),
                      prevent_cse=False)
  bc = nn.broadcast
  return layers.scan_stack(body, cfg.num_decoder_layers, (bc, bc, bc, 1, bc, bc, 1, bc))(
      cfg, name=name)


class T5(nn.Module):
  """Encoder-decoder with an "lm", "scalar" or "lm+scalar" output head."""

  config: T5Config
  output_head: str = "lm"

  def setup(self):
    cfg = self.config
    heads_lib.check_output_head(self.output_head)
    dt = layers.opt_dtype(cfg.dtype)
    pdt = jnp.dtype(cfg.param_dtype)
    self.token_embedder = layers.Embed(cfg.vocab_size, cfg.d_model, dt, pdt)
    self.encoder_relpos = RelativePositionBias(cfg, bidirectional=True)
    if cfg.scan_layers:
      self.encoder_layers = encoder_stack(cfg, "encoder_layers")
      self.decoder_layers = decoder_stack(cfg, "decoder_layers")
    else:
      enc = layers.remat(EncoderLayer, cfg.remat_policy, static_argnums=(4,))
      dec = layers.remat(DecoderLayer, cfg.remat_policy, static_argnums=(6,))
      self.encoder_layers = [enc(cfg) for _ in range(cfg.num_encoder_layers)]
      self.decoder_layers = [dec(cfg) for _ in range(cfg.num_decoder_layers)]
    self.encoder_norm = layers.RMSNorm(cfg.rms_eps, dt, jnp.dtype(cfg.param_dtype))
    self.decoder_relpos = RelativePositionBias(cfg, bidirectional=False)
    self.decoder_norm = layers.RMSNorm(cfg.rms_eps, dt, jnp.dtype(cfg.param_dtype))
    self.drop = nn.Dropout(cfg.dropout_rate)
    if "lm" in self.output_head and not cfg.tie_embeddings:
      self.logits_dense = layers.dense(cfg.vocab_size, ("embed", "vocab"), dtype=dt,
                                       param_dtype=pdt)
    if "scalar" in self.output_head:
      self.scalar_head = heads_lib.ScalarHead(param_dtype=pdt)

  # ---- encoder ------------------------------------------------------------
  def encode(self, inputs, deterministic: bool = True):
    """[B, Li] ids (config.tokens.pad_id = pad) -> [B, Li, E] encoded."""
    mask = inputs != self.config.tokens.pad_id
    x = self.drop(self.token_embedder(inputs), deterministic=deterministic)
    pos = jnp.arange(inputs.shape[1])
    bias = self.encoder_relpos(pos, pos)
    attn_mask = mask[:, None, None, :]
    if self.config.scan_layers:
      x, _ = self.encoder_layers(x, attn_mask, bias, deterministic)
    else:
      for layer in self.encoder_layers:
        x = layer(x, attn_mask, bias, deterministic)
    return self.drop(self.encoder_norm(x), deterministic=deterministic)

  # ---- heads ----------------------------------------------------------------
  def _outputs(self, h):
    out = {}
    if "lm" in self.output_head:
      if self.config.tie_embeddings:
        logits = self.token_embedder.attend(h * (self.config.d_model ** -0.5))
      else:
        logits = self.logits_dense(h)
      out["logits"] = layers.constrain(logits.astype(jnp.float32),
                                       ("batch", "act_length", "act_vocab"))
    if "scalar" in self.output_head:
      out["values"] = self.scalar_head(h)
    return out

  # ---- teacher-forced decoder ---------------------------------------------
  def __call__(self, inputs, decoder_inputs, deterministic: bool = True):
    """Full forward pass.

    Args:
      inputs: [B, Li] encoder ids.
      decoder_inputs: [B, Lt] decoder ids (targets shifted right, 0 first).

    Returns:
      dict with "logits" [B, Lt, V] and/or "values" [B, Lt], float32.
    """
    encoded = self.encode(inputs, deterministic)
    cross_mask = (inputs != self.config.tokens.pad_id)[:, None, None, :]
    t = decoder_inputs.shape[1]
    pos = jnp.arange(t)
    bias = self.decoder_relpos(pos, pos)
    causal = (pos[None, :] <= pos[:, None])[None, None]
    x = self.drop(self.token_embedder(decoder_inputs), deterministic=deterministic)
    if self.config.scan_layers:
      x, _ = self.decoder_layers(x, causal, bias, encoded, None, cross_mask, deterministic, None,
                                 None)
    else:
      for layer in self.decoder_layers:
        x, _ = layer(x, causal, bias, layer.cross_kv(encoded), cross_mask, deterministic)
    h = self.drop(self.decoder_norm(x), deterministic=deterministic)
    return self._outputs(h)

  # ---- incremental decoding -----------------------------------------------
  def prefill(self, inputs, max_decode_len: int):
    """Encodes once; returns a cache holding cross k/v and empty self k/v.

    Unrolled: "cross" and "self" are lists (one {"k", "v"} per layer) of
    [B, H, S, D]; scanned: one {"k", "v"} of [B, L, H, S, D] each.
    """
    cfg = self.config
    encoded = self.encode(inputs, deterministic=True)
    b = inputs.shape[0]
    dt = layers.opt_dtype(cfg.dtype)
    shape = (b, cfg.num_heads, max_decode_len, cfg.head_dim)
    cross_mask = inputs != cfg.tokens.pad_id
    if cfg.scan_layers:
      n = cfg.num_decoder_layers
      stacked = (b, n) + shape[1:]
      selfc = {"k": jnp.zeros(stacked, dt), "v": jnp.zeros(stacked, dt)}
      # NOTE: the stack computes each layer's cross k/v inside the scan, so
      # prefill runs it once on a start token; that pass's self k/v are
      # dropped (the first step writes slot 0 itself).
      x = self.token_embedder(jnp.zeros((b, 1), jnp.int32))
      pos = jnp.zeros((1,), jnp.int32)
      _, per_layer = self.decoder_layers(
          x, jnp.ones((1, 1, 1, 1), bool), self.decoder_relpos(pos, pos), encoded, None,
          cross_mask[:, None, None, :], True, selfc, jnp.zeros((), jnp.int32))
      return {"cross": per_layer["cross"], "self": selfc, "cross_mask": cross_mask,
              "index": jnp.zeros((), jnp.int32)}
    cross, selfc = [], []
    for layer in self.decoder_layers:
      k, v = layer.cross_kv(encoded)
      cross.append({"k": k, "v": v})
      selfc.append({"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)})
    return {"cross": cross, "self": selfc, "cross_mask": cross_mask,
            "index": jnp.zeros((), jnp.int32)}

  def step(self, tokens, cache):
    """One decoder position: tokens [B] -> (outputs for [B, 1], new cache)."""
    idx = cache["index"]
    scanned = self.config.scan_layers
    s = cache["self"]["k"].shape[3] if scanned else cache["self"][0]["k"].shape[2]
    k_pos = jnp.arange(s)
    bias = self.decoder_relpos(idx[None], k_pos)  # [1, H, 1, S]
    self_mask = (k_pos <= idx)[None, None, None, :]
    cross_mask = cache["cross_mask"][:, None, None, :]
    x = self.token_embedder(tokens[:, None])
    if scanned:
      cross_kv = (cache["cross"]["k"], cache["cross"]["v"])
      x, per_layer = self.decoder_layers(x, self_mask, bias, None, cross_kv, cross_mask, True,
                                         cache["self"], idx)
      out = self._outputs(self.decoder_norm(x))
      return out, dict(cache, self=per_layer["self"], index=idx + 1)
    new_self = []
    for layer, c_cross, c_self in zip(self.decoder_layers, cache["cross"], cache["self"]):
      x, c = layer(x, self_mask, bias, (c_cross["k"], c_cross["v"]), cross_mask, True,
                   cache=c_self, cache_index=idx)
      new_self.append(c)
    out = self._outputs(self.decoder_norm(x))
    new_cache = dict(cache, self=new_self, index=idx + 1)
    return out, new_cache
