"""T5.1.1's tensor map (HF `T5ForConditionalGeneration` names), and its head quirks.

HF stores a stack's one relative-position bias table in block 0 only, and
the shared embedding up to three times (shared, encoder and decoder
embed_tokens); a saver may keep any one of those names. Whether the head is
the shared matrix is read from config.json (`config._t5_scales_outputs`);
`head_aliases` and `tie_hint` carry the transformers 4.x / 5.x differences
into loading.
"""

from realign_jax.checkpoints.hf.tensor_map import Extra, Tensor, copy, linear
from realign_jax.models.config import T5Config

_EMBED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def _attention(prefix: str, path: tuple, c: T5Config) -> list[Tensor]:
  e, h, d = c.d_model, c.num_heads, c.head_dim
  qkv = [linear(f"{prefix}.{hf}.weight", path + (ours, "kernel"), (h * d, e), (e, h, d))
         for hf, ours in (("q", "query"), ("k", "key"), ("v", "value"))]
  return qkv + [linear(f"{prefix}.o.weight", path + ("out", "kernel"), (e, h * d), (h, d, e))]


def _mlp(prefix: str, path: tuple, c: T5Config) -> list[Tensor]:
  e, f = c.d_model, c.d_ff
  return [linear(f"{prefix}.wi_0.weight", path + ("wi_0", "kernel"), (f, e), (e, f)),
          linear(f"{prefix}.wi_1.weight", path + ("wi_1", "kernel"), (f, e), (e, f)),
          linear(f"{prefix}.wo.weight", path + ("wo", "kernel"), (e, f), (f, e))]


def _layer(stack: str, i: int, c: T5Config) -> list[Tensor]:
  e = (c.d_model,)
  b, p = f"{stack}.block.{i}.layer", f"{stack}_layers_{i}"
  if stack == "encoder":
    return [copy(f"{b}.0.layer_norm.weight", (p, "pre_attention_norm", "scale"), e),
            *_attention(f"{b}.0.SelfAttention", (p, "attention"), c),
            copy(f"{b}.1.layer_norm.weight", (p, "pre_mlp_norm", "scale"), e),
            *_mlp(f"{b}.1.DenseReluDense", (p, "mlp"), c)]
  return [copy(f"{b}.0.layer_norm.weight", (p, "pre_self_attention_norm", "scale"), e),
          *_attention(f"{b}.0.SelfAttention", (p, "self_attention"), c),
          copy(f"{b}.1.layer_norm.weight", (p, "pre_cross_attention_norm", "scale"), e),
          *_attention(f"{b}.1.EncDecAttention", (p, "encoder_decoder_attention"), c),
          copy(f"{b}.2.layer_norm.weight", (p, "pre_mlp_norm", "scale"), e),
          *_mlp(f"{b}.2.DenseReluDense", (p, "mlp"), c)]


def tensors(c: T5Config) -> list[Tensor]:
  """Every tensor a T5.1.1 checkpoint of `c` holds, in the order the model is built."""
  e = (c.d_model,)
  out = [copy("shared.weight", ("token_embedder", "embedding"), (c.vocab_size, c.d_model))]
  for stack, n in (("encoder", c.num_encoder_layers), ("decoder", c.num_decoder_layers)):
    # NOTE: HF stores the stack's one bias table in block 0 only; every layer shares it.
    out.append(copy(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                    (f"{stack}_relpos", "rel_embedding"), (c.relative_buckets, c.num_heads)))
    for i in range(n):
      out += _layer(stack, i, c)
    out.append(copy(f"{stack}.final_layer_norm.weight", (f"{stack}_norm", "scale"), e))
  if not c.tie_embeddings:
    out.append(linear("lm_head.weight", ("logits_dense", "kernel"), (c.vocab_size, c.d_model),
                      (c.d_model, c.vocab_size)))
  return out


def aliases() -> dict[str, tuple[str, ...]]:
  """Other names a tensor may be stored under when its usual name is absent."""
  # NOTE: the three T5 embeddings are one tied tensor; a saver may keep any one name.
  return {"shared.weight": _EMBED_COPIES}


def harmless(c: T5Config) -> list[Extra]:
  """Extra tensors that HF T5 checkpoints carry and loading may ignore."""
  emb = (c.vocab_size, c.d_model)
  out = [Extra(lambda n: n in _EMBED_COPIES, emb, "shared.weight"),
         # Old HF T5 saves kept an unused bias table on block 0's cross-attention.
         Extra(lambda n: n == "decoder.block.0.layer.1.EncDecAttention."
               "relative_attention_bias.weight", (c.relative_buckets, c.num_heads))]
  if c.tie_embeddings:
    out.append(Extra(lambda n: n == "lm_head.weight", emb, "shared.weight"))
  return out


def head_aliases(config_json: dict) -> tuple[str, ...]:
  """Stored names the untied head may be read from when `lm_head.weight` is absent.

  Only a transformers 5.x config (`scale_decoder_outputs: false` with
  `tie_word_embeddings` true) says the head is the shared matrix without the
  rescale; a 4.x config with `tie_word_embeddings: false` and no `lm_head` is
  a checkpoint missing its head.
  """
  c = config_json
  if (c.get("model_type") in ("t5", "mt5") and c.get("scale_decoder_outputs") is False
      and c.get("tie_word_embeddings", True) is not False):
    return ("shared.weight",) + _EMBED_COPIES
  return ()


def tie_hint(config_json: dict) -> str:
  """Why a T5 config ties (and scales) the head, for the lm_head-differs error."""
  if "scale_decoder_outputs" in config_json:
    return (" (scale_decoder_outputs is true: transformers 5.x ties and rescales the head; "
            "a T5.1.1/flan-t5 checkpoint with its own lm_head has scale_decoder_outputs false)")
  if "tie_word_embeddings" in config_json:
    return (" (tie_word_embeddings is true and there is no scale_decoder_outputs field: "
            "transformers 4.x ties and rescales the head; a T5.1.1/flan-t5 checkpoint "
            "has tie_word_embeddings false)")
  return " (tie_word_embeddings defaults to true for HF T5 when config.json omits it)"
