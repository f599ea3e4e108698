"""One interface over both model families.

Everything downstream (trainer, losses, sampler, DeRa, heads) sees only this:

  lm = LanguageModel(config, output_head="lm")
  params, axes = lm.init(rng)                      # axes: logical PartitionSpecs
  out = lm.forward(params, inputs, targets)        # teacher forcing
  cache, token = lm.prefill(params, inputs, max_new_tokens)
  out, cache = lm.step(params, token, cache)       # one position

Batches are family-agnostic: `inputs` [B, Li] (prompt ids, right-padded with
the pad id; see `data.pipeline` for how a prompt starts and ends) and
`targets` [B, Lt] (response ids, right-padded). The special ids are the
config's (`config.tokens`, a `SpecialTokens`).
`forward` returns per-target-position outputs: logits[:, t] is the
distribution of targets[:, t] given the prompt and targets[:, :t].

Decoding protocol: `prefill` consumes the prompt and returns the cache plus
the first token to feed (T5: the decoder start id 0; decoder-only: the
prompt's last token, the prefix before it being prefilled in one pass); each
`step` consumes one token and returns the logits of the next.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from realign_jax.models import layers
from realign_jax.models.config import DecoderConfig, ModelConfig, T5Config
from realign_jax.models.decoder import DecoderLM
from realign_jax.models.t5 import T5
from realign_jax.plumbing.errors import UserError

Params = Any


def shift_right(targets):
  """[B, Lt] -> decoder inputs: 0 (the T5 decoder start id) then targets[:, :-1]."""
  return jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]


@dataclasses.dataclass(frozen=True)
class LanguageModel:
  config: ModelConfig
  output_head: str = "lm"

  @property
  def family(self) -> str:
    return self.config.family

  @property
  def module(self) -> nn.Module:
    if isinstance(self.config, T5Config):
      return T5(self.config, self.output_head)
    if isinstance(self.config, DecoderConfig):
      return DecoderLM(self.config, self.output_head)
    raise TypeError(f"unknown model config {type(self.config).__name__}")

  @property
  def vocab_size(self) -> int:
    return self.config.vocab_size

  # ---- parameters ---------------------------------------------------------
  def _init_variables(self, rng):
    inputs = jnp.ones((1, 4), jnp.int32)
    targets = jnp.ones((1, 3), jnp.int32)
    if self.family == "t5":
      return self.module.init(rng, inputs, shift_right(targets), deterministic=True)
    tokens = jnp.ones((1, 4), jnp.int32)
    pos = jnp.arange(4)[None]
    return self.module.init(rng, tokens, pos, pos, deterministic=True)

  def init(self, rng):
    """Returns (params, logical_axes): plain arrays and a matching PartitionSpec tree."""
    variables = self._init_variables(rng)
    return nn.unbox(variables)["params"], nn.get_partition_spec(variables)["params"]

  def abstract_init(self):
    """Shapes/dtypes and logical axes of the params, without allocating them."""
    return abstract_init(self.init)

  # ---- teacher forcing ----------------------------------------------------
  def forward(self, params, inputs, targets, *, dropout_rng=None):
    """Outputs aligned with `targets`: "logits" [B, Lt, V], "values" [B, Lt].

    Dropout is on iff `dropout_rng` is given.
    """
    det = dropout_rng is None
    rngs = None if det else {"dropout": dropout_rng}
    if self.family == "t5":
      return self.module.apply({"params": params}, inputs, shift_right(targets),
                               deterministic=det, rngs=rngs)
    li = inputs.shape[1]
    pad = self.config.tokens.pad_id
    left, _ = layers.to_left_padding(inputs, pad)
    tokens = jnp.concatenate([left, targets[:, :-1]], axis=1)
    mask = tokens != pad
    pos = layers.positions_from_mask(mask)
    key_pos = jnp.where(mask, pos, -1)
    out, _ = self.module.apply({"params": params}, tokens, pos, key_pos, deterministic=det,
                               rngs=rngs)
    # The prompt's last token (index li - 1) predicts targets[:, 0].
    return {k: v[:, li - 1:] for k, v in out.items()}

  # ---- incremental decoding -----------------------------------------------
  def prefill(self, params, inputs, max_new_tokens: int):
    """Consumes the prompt once. Returns (cache, first token to feed [B])."""
    b, li = inputs.shape
    if self.family == "t5":
      cache = self.module.apply({"params": params}, inputs, max_new_tokens,
                                method=T5.prefill)
      return cache, jnp.zeros((b,), jnp.int32)
    cfg = self.config
    left, _ = layers.to_left_padding(inputs, cfg.tokens.pad_id)
    mask = left != cfg.tokens.pad_id
    pos = layers.positions_from_mask(mask)
    n_pre = li - 1
    slots = n_pre + max_new_tokens
    dt = layers.opt_dtype(cfg.dtype)
    shape = (b, cfg.num_kv_heads, slots, cfg.head_dim)
    if cfg.scan_layers:  # one stacked {"k", "v"}: [B, L, K, S, D]
      stacked = (b, cfg.num_layers) + shape[1:]
      kv = {"k": jnp.zeros(stacked, dt), "v": jnp.zeros(stacked, dt)}
    else:
      kv = [{"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)}
            for _ in range(cfg.num_layers)]
    key_pos = jnp.full((b, slots), -1, jnp.int32)
    key_pos = key_pos.at[:, :n_pre].set(jnp.where(mask[:, :n_pre], pos[:, :n_pre], -1))
    if n_pre > 0:
      _, kv = self.module.apply({"params": params}, left[:, :n_pre], pos[:, :n_pre], key_pos,
                                deterministic=True, cache=kv, cache_index=0)
    cache = {"layers": kv, "key_pos": key_pos, "next_pos": pos[:, -1],
             "index": jnp.asarray(n_pre, jnp.int32)}
    return cache, left[:, -1]

  def step_outputs(self, params, tokens, cache):
    """Consumes tokens [B]; returns (outputs for the next position, new cache)."""
    if self.family == "t5":
      out, cache = self.module.apply({"params": params}, tokens, cache, method=T5.step)
      return {k: v[:, 0] for k, v in out.items()}, cache
    idx = cache["index"]
    pos = cache["next_pos"]
    key_pos = jax.lax.dynamic_update_slice(cache["key_pos"], pos[:, None], (0, idx))
    out, kv = self.module.apply({"params": params}, tokens[:, None], pos[:, None], key_pos,
                                deterministic=True, cache=cache["layers"], cache_index=idx)
    new_cache = {"layers": kv, "key_pos": key_pos, "next_pos": pos + 1, "index": idx + 1}
    return {k: v[:, 0] for k, v in out.items()}, new_cache

  def step(self, params, tokens, cache):
    """`step(tokens, cache) -> (logits [B, V] float32, cache)` for the sampler."""
    out, cache = self.step_outputs(params, tokens, cache)
    return out["logits"], cache


def abstract_init(init_fn):
  """(params as ShapeDtypeStructs, logical axes) of `init_fn(rng) -> (params, axes)`."""
  holder = {}

  def f(rng):
    params, axes = init_fn(rng)
    holder["axes"] = axes
    return params
  abstract = jax.eval_shape(f, jax.random.PRNGKey(0))
  return abstract, holder["axes"]


def count_params(params) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


def describe(config: ModelConfig) -> str:
  return f"{type(config).__name__}({', '.join(f'{k}={v}' for k, v in dataclasses.asdict(config).items())})"


def build(config: ModelConfig, output_head: str = "lm") -> LanguageModel:
  return LanguageModel(config, output_head)


def check_same_vocab(a: ModelConfig, b: ModelConfig, what: str = "models") -> None:
  if a.vocab_size != b.vocab_size:
    raise UserError(f"{what} have different vocabulary sizes: {a.vocab_size} vs {b.vocab_size}")


