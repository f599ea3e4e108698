"""Decoder-only transformer in the Llama/Mistral architecture, in Flax.

RMSNorm pre-norm, rotary position embeddings (rotate-half layout), SwiGLU
MLP, grouped-query causal attention, optional sliding window (Mistral).

One code path serves the full forward pass and incremental decoding: every
call gets token positions and the position id of every key slot (`key_pos`,
-1 for empty or padded slots); a key is visible to a query iff
0 <= key_pos <= query_pos (and within the window). With a cache, the chunk's
keys and values are written at `cache_index` first. Left-padded prompts thus
prefill in one call, and each decode step reads the cache without ever
recomputing the prefix.
"""

import flax.linen as nn
import jax.numpy as jnp

from realign_jax.models import heads as heads_lib
from realign_jax.models import layers
from realign_jax.models.config import DecoderConfig

ACT = ("batch", "act_length", "act_embed")


class Attention(nn.Module):
  config: DecoderConfig

  def setup(self):
    cfg = self.config
    kw = dict(dtype=layers.opt_dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    self.q_proj = layers.dense((cfg.num_heads, cfg.head_dim), ("embed", "heads", "kv"), **kw)
    self.k_proj = layers.dense((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "kv"), **kw)
    self.v_proj = layers.dense((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "kv"), **kw)
    self.o_proj = layers.dense(cfg.d_model, ("heads", "kv", "embed"), axis=(-2, -1), **kw)

  def __call__(self, x, positions, key_pos, cache=None, cache_index=None):
    cfg = self.config
    q = layers.rope(self.q_proj(x), positions, cfg.rope_theta)
    k = layers.heads_major(layers.rope(self.k_proj(x), positions, cfg.rope_theta))
    v = layers.heads_major(self.v_proj(x))
    q = layers.constrain(q, ("batch", "act_length", "act_heads", "act_kv"))
    new_cache = None
    if cache is not None:
      k = layers.update_cache(cache["k"], k, cache_index)
      v = layers.update_cache(cache["v"], v, cache_index)
      new_cache = {"k": k, "v": v}
    qp = positions[:, :, None]  # [B, T, 1]
    kp = key_pos[:, None, :]  # [B, 1, S]
    mask = (kp >= 0) & (kp <= qp)
    if cfg.sliding_window is not None:
      mask = mask & (kp > qp - cfg.sliding_window)
    out = layers.attention(q, k, v, mask[:, None], scale=cfg.head_dim ** -0.5,
                           impl=cfg.attention_impl)
    return self.o_proj(out), new_cache


class Block(nn.Module):
  config: DecoderConfig

  def setup(self):
    cfg = self.config
    dt = layers.opt_dtype(cfg.dtype)
    self.input_norm = layers.RMSNorm(cfg.rms_eps, dt, jnp.dtype(cfg.param_dtype))
    self.attention = Attention(cfg)
    self.post_attention_norm = layers.RMSNorm(cfg.rms_eps, dt, jnp.dtype(cfg.param_dtype))
    self.mlp = layers.GatedMLP(cfg.d_ff, "silu", cfg.dropout_rate, dt,
                               jnp.dtype(cfg.param_dtype),
                               names=("gate_proj", "up_proj", "down_proj"))
    self.drop = nn.Dropout(cfg.dropout_rate)

  def __call__(self, x, positions, key_pos, deterministic, cache=None, cache_index=None):
    h, new_cache = self.attention(self.input_norm(x), positions, key_pos, cache, cache_index)
    x = x + self.drop(h, deterministic=deterministic)
    h = self.mlp(self.post_attention_norm(x), deterministic)
    return layers.constrain(x + self.drop(h, deterministic=deterministic), ACT), new_cache


def block_stack(cfg: DecoderConfig, name: str):
  """The scanned stack: (x, positions, key_pos, deterministic, cache [B, L, ...],
  cache_index) -> (x, new cache [B, L, ...])."""
  body = layers.remat(Block, cfg.remat_policy, static_argnums=(4,), prevent_cse=False)
  bc = nn.broadcast
  return layers.scan_stack(body, cfg.num_layers, (bc, bc, bc, 1, bc))(cfg, name=name)


class DecoderLM(nn.Module):
  """Decoder-only LM with an "lm", "scalar" or "lm+scalar" output head."""

  config: DecoderConfig
  output_head: str = "lm"

  def setup(self):
    cfg = self.config
    heads_lib.check_output_head(self.output_head)
    dt = layers.opt_dtype(cfg.dtype)
    pdt = jnp.dtype(cfg.param_dtype)
    self.embed_tokens = layers.Embed(cfg.vocab_size, cfg.d_model, dt, pdt)
    if cfg.scan_layers:
      self.blocks = block_stack(cfg, "blocks")
    else:
      block = layers.remat(Block, cfg.remat_policy, static_argnums=(4,))
      self.blocks = [block(cfg) for _ in range(cfg.num_layers)]
    self.final_norm = layers.RMSNorm(cfg.rms_eps, dt, jnp.dtype(cfg.param_dtype))
    self.drop = nn.Dropout(cfg.dropout_rate)
    if "lm" in self.output_head and not cfg.tie_embeddings:
      self.lm_head = layers.dense(cfg.vocab_size, ("embed", "vocab"), dtype=dt, param_dtype=pdt)
    if "scalar" in self.output_head:
      self.scalar_head = heads_lib.ScalarHead(param_dtype=pdt)

  def __call__(self, tokens, positions, key_pos, deterministic: bool = True, cache=None,
               cache_index=None):
    """Runs a chunk of tokens.

    Args:
      tokens: [B, T] ids.
      positions: [B, T] position ids of these tokens.
      key_pos: [B, S] position id of every key slot (-1 = invisible); S = T
        without a cache, the cache length with one.
      deterministic: disables dropout.
      cache: optional list (one per layer) of {"k", "v"}: [B, K, S, D]; with
        scanned layers one {"k", "v"} of [B, L, K, S, D].
      cache_index: slot at which this chunk's keys are written.

    Returns:
      (outputs dict with "logits" [B, T, V] and/or "values" [B, T], new cache).
    """
    x = self.drop(self.embed_tokens(tokens), deterministic=deterministic)
    if self.config.scan_layers:
      x, new_cache = self.blocks(x, positions, key_pos, deterministic, cache, cache_index)
      return self._outputs(x, deterministic), new_cache
    new_cache = [] if cache is not None else None
    for i, block in enumerate(self.blocks):
      c = cache[i] if cache is not None else None
      x, c = block(x, positions, key_pos, deterministic, c, cache_index)
      if cache is not None:
        new_cache.append(c)
    return self._outputs(x, deterministic), new_cache

  def _outputs(self, x, deterministic):
    h = self.drop(self.final_norm(x), deterministic=deterministic)
    out = {}
    if "lm" in self.output_head:
      logits = self.embed_tokens.attend(h) if self.config.tie_embeddings else self.lm_head(h)
      out["logits"] = layers.constrain(logits.astype(jnp.float32),
                                       ("batch", "act_length", "act_vocab"))
    if "scalar" in self.output_head:
      out["values"] = self.scalar_head(h)
    return out
