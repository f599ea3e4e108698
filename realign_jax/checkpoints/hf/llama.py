"""The Llama/Mistral tensor map (HF `LlamaForCausalLM` / `MistralForCausalLM` names)."""

import re

from realign_jax.checkpoints.hf.tensor_map import Extra, Tensor, copy, linear
from realign_jax.models.config import DecoderConfig

_ROTARY = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def tensors(c: DecoderConfig) -> list[Tensor]:
  """Every tensor a Llama/Mistral checkpoint of `c` holds, in the order the model is built."""
  e, h, k, d, f = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.d_ff
  out = [copy("model.embed_tokens.weight", ("embed_tokens", "embedding"), (c.vocab_size, e))]
  for i in range(c.num_layers):
    m, p = f"model.layers.{i}", f"blocks_{i}"
    a = (p, "attention")
    out += [
        copy(f"{m}.input_layernorm.weight", (p, "input_norm", "scale"), (e,)),
        linear(f"{m}.self_attn.q_proj.weight", a + ("q_proj", "kernel"), (h * d, e), (e, h, d)),
        linear(f"{m}.self_attn.k_proj.weight", a + ("k_proj", "kernel"), (k * d, e), (e, k, d)),
        linear(f"{m}.self_attn.v_proj.weight", a + ("v_proj", "kernel"), (k * d, e), (e, k, d)),
        linear(f"{m}.self_attn.o_proj.weight", a + ("o_proj", "kernel"), (e, h * d), (h, d, e)),
        copy(f"{m}.post_attention_layernorm.weight", (p, "post_attention_norm", "scale"), (e,)),
        linear(f"{m}.mlp.gate_proj.weight", (p, "mlp", "gate_proj", "kernel"), (f, e), (e, f)),
        linear(f"{m}.mlp.up_proj.weight", (p, "mlp", "up_proj", "kernel"), (f, e), (e, f)),
        linear(f"{m}.mlp.down_proj.weight", (p, "mlp", "down_proj", "kernel"), (e, f), (f, e)),
    ]
  out.append(copy("model.norm.weight", ("final_norm", "scale"), (e,)))
  if not c.tie_embeddings:
    out.append(linear("lm_head.weight", ("lm_head", "kernel"), (c.vocab_size, e),
                      (e, c.vocab_size)))
  return out


def harmless(c: DecoderConfig) -> list[Extra]:
  """Extra tensors that HF Llama/Mistral checkpoints carry and loading may ignore."""
  out = [Extra(lambda n: _ROTARY.fullmatch(n) is not None, None)]  # rotary inv_freq buffers
  if c.tie_embeddings:
    out.append(Extra(lambda n: n == "lm_head.weight", (c.vocab_size, c.d_model),
                     "model.embed_tokens.weight"))
  return out
