"""HF safetensors import/export: parity with an independent numpy reference.

Every checkpoint here is written by hand in the exact HF key layout (names
and [out, in] shapes of transformers' T5 / Llama / Mistral modules) from
random numbers, with the `safetensors` package's own writer, never through
`export_hf_checkpoint`. The reference forward passes below re-implement the
HF modules in float64 numpy straight from those HF-named tensors, so a wrong
transpose, head split, bucket or RoPE layout in the importer or the models
shows up as a logits mismatch.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy as st_numpy

from realign_jax.checkpoints import safetensors as st_codec
from realign_jax.checkpoints.hf import config as hf_config
from realign_jax.checkpoints.hf import export as hf_export
from realign_jax.checkpoints.hf import load as hf_load
from realign_jax.plumbing.errors import UserError
from realign_jax.models.api import LanguageModel
from realign_jax.models.config import DecoderConfig, SpecialTokens, T5Config

ATOL = 1e-4

T5_CONFIG = {
    "model_type": "t5", "architectures": ["T5ForConditionalGeneration"],
    "vocab_size": 97, "d_model": 32, "d_kv": 12, "d_ff": 40, "num_heads": 4,
    "num_layers": 2, "num_decoder_layers": 3,
    "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16,
    "layer_norm_epsilon": 1e-6, "dropout_rate": 0.1, "feed_forward_proj": "gated-gelu",
    "tie_word_embeddings": False, "is_encoder_decoder": True, "decoder_start_token_id": 0,
}
LLAMA_CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"],
    "vocab_size": 97, "hidden_size": 32, "intermediate_size": 48,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "num_hidden_layers": 2, "rope_theta": 500.0, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False, "hidden_act": "silu", "max_position_embeddings": 128,
    "rope_scaling": None, "attention_bias": False,
}
MISTRAL_CONFIG = {
    "model_type": "mistral", "architectures": ["MistralForCausalLM"],
    "vocab_size": 97, "hidden_size": 32, "intermediate_size": 48,
    "num_attention_heads": 4, "num_key_value_heads": 1,  # head_dim defaults to 32 / 4
    "num_hidden_layers": 2, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "hidden_act": "silu", "max_position_embeddings": 64,
    "sliding_window": 4,
}
CASES = {
    "t5_untied": T5_CONFIG,
    "t5_tied": {**T5_CONFIG, "tie_word_embeddings": True},
    # transformers 5.x saves flan-t5/T5.1.1 as tied but unscaled, lm_head kept separately.
    "t5_v5_unscaled": {**T5_CONFIG, "tie_word_embeddings": True, "scale_decoder_outputs": False},
    "llama_gqa": LLAMA_CONFIG,
    "llama_tied": {**LLAMA_CONFIG, "tie_word_embeddings": True},
    "mistral_window": MISTRAL_CONFIG,
}


# ---- hand-built HF state dicts ------------------------------------------------


def _normal(rng, shape, std):
  return (rng.standard_normal(shape) * std).astype(np.float32)


def _norm_weight(rng, n):
  return (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)


def hf_t5_state(c: dict, seed: int = 0) -> dict:
  """T5ForConditionalGeneration tensors (T5.1.1 layout), HF names and shapes."""
  rng = np.random.default_rng(seed)
  v, e, d, f, h = c["vocab_size"], c["d_model"], c["d_kv"], c["d_ff"], c["num_heads"]
  hd = h * d
  sd = {"shared.weight": _normal(rng, (v, e), 1.0)}

  def attn(prefix):
    # HF T5 init: q std (E * D)^-0.5, no 1/sqrt(D) in the attention itself.
    sd[f"{prefix}.q.weight"] = _normal(rng, (hd, e), (e * d) ** -0.5)
    sd[f"{prefix}.k.weight"] = _normal(rng, (hd, e), e ** -0.5)
    sd[f"{prefix}.v.weight"] = _normal(rng, (hd, e), e ** -0.5)
    sd[f"{prefix}.o.weight"] = _normal(rng, (e, hd), hd ** -0.5)

  def mlp(prefix):
    sd[f"{prefix}.wi_0.weight"] = _normal(rng, (f, e), e ** -0.5)
    sd[f"{prefix}.wi_1.weight"] = _normal(rng, (f, e), e ** -0.5)
    sd[f"{prefix}.wo.weight"] = _normal(rng, (e, f), f ** -0.5)

  buckets = c["relative_attention_num_buckets"]
  for stack, n in (("encoder", c["num_layers"]), ("decoder", c["num_decoder_layers"])):
    for i in range(n):
      b = f"{stack}.block.{i}.layer"
      attn(f"{b}.0.SelfAttention")
      if i == 0:
        sd[f"{b}.0.SelfAttention.relative_attention_bias.weight"] = _normal(rng, (buckets, h), 1.0)
      sd[f"{b}.0.layer_norm.weight"] = _norm_weight(rng, e)
      if stack == "encoder":
        mlp(f"{b}.1.DenseReluDense")
        sd[f"{b}.1.layer_norm.weight"] = _norm_weight(rng, e)
      else:
        attn(f"{b}.1.EncDecAttention")
        sd[f"{b}.1.layer_norm.weight"] = _norm_weight(rng, e)
        mlp(f"{b}.2.DenseReluDense")
        sd[f"{b}.2.layer_norm.weight"] = _norm_weight(rng, e)
    sd[f"{stack}.final_layer_norm.weight"] = _norm_weight(rng, e)
  if not _t5_scaled(c):
    sd["lm_head.weight"] = _normal(rng, (v, e), e ** -0.5)
  return sd


def _t5_scaled(c: dict) -> bool:
  """HF's rule: `scale_decoder_outputs` (5.x) when stored, else `tie_word_embeddings` (4.x)."""
  if "scale_decoder_outputs" in c:
    return c["scale_decoder_outputs"]
  return c.get("tie_word_embeddings", True)


def hf_llama_state(c: dict, seed: int = 0) -> dict:
  """LlamaForCausalLM / MistralForCausalLM tensors, HF names and shapes."""
  rng = np.random.default_rng(seed)
  v, e, f = c["vocab_size"], c["hidden_size"], c["intermediate_size"]
  h = c["num_attention_heads"]
  k = c.get("num_key_value_heads", h)
  d = c.get("head_dim", e // h)
  sd = {"model.embed_tokens.weight": _normal(rng, (v, e), 1.0)}
  for i in range(c["num_hidden_layers"]):
    m = f"model.layers.{i}"
    sd[f"{m}.input_layernorm.weight"] = _norm_weight(rng, e)
    sd[f"{m}.self_attn.q_proj.weight"] = _normal(rng, (h * d, e), e ** -0.5)
    sd[f"{m}.self_attn.k_proj.weight"] = _normal(rng, (k * d, e), e ** -0.5)
    sd[f"{m}.self_attn.v_proj.weight"] = _normal(rng, (k * d, e), e ** -0.5)
    sd[f"{m}.self_attn.o_proj.weight"] = _normal(rng, (e, h * d), (h * d) ** -0.5)
    sd[f"{m}.post_attention_layernorm.weight"] = _norm_weight(rng, e)
    sd[f"{m}.mlp.gate_proj.weight"] = _normal(rng, (f, e), e ** -0.5)
    sd[f"{m}.mlp.up_proj.weight"] = _normal(rng, (f, e), e ** -0.5)
    sd[f"{m}.mlp.down_proj.weight"] = _normal(rng, (e, f), f ** -0.5)
  sd["model.norm.weight"] = _norm_weight(rng, e)
  if not c.get("tie_word_embeddings", False):
    sd["lm_head.weight"] = _normal(rng, (v, e), e ** -0.5)
  return sd


def hf_state(c: dict, seed: int = 0) -> dict:
  return hf_t5_state(c, seed) if c["model_type"] == "t5" else hf_llama_state(c, seed)


def write_hf(path, config_json: dict, sd: dict) -> str:
  """A single-file HF checkpoint written with the `safetensors` package."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_json, f)
  st_numpy.save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  return str(path)


def write_raw_safetensors(file, sd: dict) -> None:
  """Minimal independent safetensors writer (for dtypes numpy's backend lacks)."""
  tags = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16",
          np.dtype(np.float16): "F16"}
  header, blobs, offset = {}, [], 0
  for name, a in sd.items():
    raw = np.ascontiguousarray(a).tobytes()
    header[name] = {"dtype": tags[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + len(raw)]}
    blobs.append(raw)
    offset += len(raw)
  text = json.dumps(header).encode()
  with open(file, "wb") as f:
    f.write(len(text).to_bytes(8, "little") + text + b"".join(blobs))


# ---- numpy reference of the HF forward passes ---------------------------------


def _rms(x, w, eps):
  return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  p = np.exp(x)
  return p / p.sum(axis=-1, keepdims=True)


def _gelu_new(x):
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _silu(x):
  return x / (1.0 + np.exp(-x))


def t5_bucket(rel, bidirectional, num_buckets, max_distance):
  """transformers T5Attention._relative_position_bucket (float32 like torch)."""
  ret = np.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    ret = ret + (rel > 0).astype(rel.dtype) * num_buckets
    rel = np.abs(rel)
  else:
    rel = -np.minimum(rel, 0)
  max_exact = num_buckets // 2
  is_small = rel < max_exact
  with np.errstate(divide="ignore", invalid="ignore"):
    large = max_exact + (np.log(rel.astype(np.float32) / np.float32(max_exact))
                         / np.float32(math.log(max_distance / max_exact))
                         * np.float32(num_buckets - max_exact)).astype(rel.dtype)
  large = np.minimum(large, num_buckets - 1)
  return ret + np.where(is_small, rel, large)


def np_t5_logits(sd: dict, c: dict, enc_ids, dec_in) -> np.ndarray:
  """HF T5ForConditionalGeneration logits for one unpadded example: [Lt, V]."""
  w = {k: v.astype(np.float64) for k, v in sd.items()}
  h, d, eps = c["num_heads"], c["d_kv"], c["layer_norm_epsilon"]
  nb, md = c["relative_attention_num_buckets"], c["relative_attention_max_distance"]
  emb = w["shared.weight"]

  def attention(prefix, x, kv, bias):
    q = (x @ w[f"{prefix}.q.weight"].T).reshape(len(x), h, d)
    k = (kv @ w[f"{prefix}.k.weight"].T).reshape(len(kv), h, d)
    v = (kv @ w[f"{prefix}.v.weight"].T).reshape(len(kv), h, d)
    p = _softmax(np.einsum("thd,shd->hts", q, k) + bias)  # no 1/sqrt(d) in T5
    return np.einsum("hts,shd->thd", p, v).reshape(len(x), h * d) @ w[f"{prefix}.o.weight"].T

  def mlp(prefix, x):
    g = _gelu_new(x @ w[f"{prefix}.wi_0.weight"].T) * (x @ w[f"{prefix}.wi_1.weight"].T)
    return g @ w[f"{prefix}.wo.weight"].T

  def position_bias(stack, n, bidirectional):
    pos = np.arange(n)
    buckets = t5_bucket(pos[None, :] - pos[:, None], bidirectional, nb, md)  # memory - context
    table = w[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    return np.transpose(table[buckets], (2, 0, 1))  # [H, T, S]

  x = emb[np.asarray(enc_ids)]
  bias = position_bias("encoder", len(x), True)
  for i in range(c["num_layers"]):
    b = f"encoder.block.{i}.layer"
    x = x + attention(f"{b}.0.SelfAttention", _rms(x, w[f"{b}.0.layer_norm.weight"], eps),
                      _rms(x, w[f"{b}.0.layer_norm.weight"], eps), bias)
    x = x + mlp(f"{b}.1.DenseReluDense", _rms(x, w[f"{b}.1.layer_norm.weight"], eps))
  enc = _rms(x, w["encoder.final_layer_norm.weight"], eps)

  y = emb[np.asarray(dec_in)]
  t = len(y)
  causal = np.where(np.tril(np.ones((t, t), bool)), 0.0, -1e30)
  bias = position_bias("decoder", t, False) + causal
  for i in range(c["num_decoder_layers"]):
    b = f"decoder.block.{i}.layer"
    hn = _rms(y, w[f"{b}.0.layer_norm.weight"], eps)
    y = y + attention(f"{b}.0.SelfAttention", hn, hn, bias)
    y = y + attention(f"{b}.1.EncDecAttention", _rms(y, w[f"{b}.1.layer_norm.weight"], eps),
                      enc, 0.0)
    y = y + mlp(f"{b}.2.DenseReluDense", _rms(y, w[f"{b}.2.layer_norm.weight"], eps))
  y = _rms(y, w["decoder.final_layer_norm.weight"], eps)
  if _t5_scaled(c):
    y = y * c["d_model"] ** -0.5
  # A stored lm_head is the head; without one, the shared matrix is.
  return y @ w.get("lm_head.weight", emb).T


def np_llama_logits(sd: dict, c: dict, ids) -> np.ndarray:
  """HF Llama/Mistral ForCausalLM logits for one unpadded sequence: [T, V]."""
  w = {k: v.astype(np.float64) for k, v in sd.items()}
  e, h = c["hidden_size"], c["num_attention_heads"]
  kh = c.get("num_key_value_heads", h)
  d = c.get("head_dim", e // h)
  eps = c["rms_norm_eps"]
  window = c.get("sliding_window") if c["model_type"] == "mistral" else None
  t = len(ids)
  pos = np.arange(t)
  inv_freq = 1.0 / (c["rope_theta"] ** (np.arange(0, d, 2) / d))
  freqs = pos[:, None] * inv_freq[None, :]
  angles = np.concatenate([freqs, freqs], axis=-1)[:, None, :]  # [T, 1, D]
  cos, sin = np.cos(angles), np.sin(angles)

  def rotate_half(x):
    return np.concatenate([-x[..., d // 2:], x[..., :d // 2]], axis=-1)

  allowed = pos[None, :] <= pos[:, None]
  if window is not None:
    allowed &= pos[None, :] > pos[:, None] - window
  x = w["model.embed_tokens.weight"][np.asarray(ids)]
  for i in range(c["num_hidden_layers"]):
    m = f"model.layers.{i}"
    hn = _rms(x, w[f"{m}.input_layernorm.weight"], eps)
    q = (hn @ w[f"{m}.self_attn.q_proj.weight"].T).reshape(t, h, d)
    k = (hn @ w[f"{m}.self_attn.k_proj.weight"].T).reshape(t, kh, d)
    v = (hn @ w[f"{m}.self_attn.v_proj.weight"].T).reshape(t, kh, d)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    k, v = np.repeat(k, h // kh, axis=1), np.repeat(v, h // kh, axis=1)  # HF repeat_kv
    s = np.einsum("thd,shd->hts", q, k) / math.sqrt(d)
    p = _softmax(np.where(allowed[None], s, -1e30))
    o = np.einsum("hts,shd->thd", p, v).reshape(t, h * d)
    x = x + o @ w[f"{m}.self_attn.o_proj.weight"].T
    hn = _rms(x, w[f"{m}.post_attention_layernorm.weight"], eps)
    g = _silu(hn @ w[f"{m}.mlp.gate_proj.weight"].T) * (hn @ w[f"{m}.mlp.up_proj.weight"].T)
    x = x + g @ w[f"{m}.mlp.down_proj.weight"].T
  x = _rms(x, w["model.norm.weight"], eps)
  head = w["model.embed_tokens.weight"] if c.get("tie_word_embeddings") else w["lm_head.weight"]
  return x @ head.T


def reference_logits(sd, c, prompt, targets) -> np.ndarray:
  """Reference logits[t] = p(targets[t] | prompt, targets[:t]) for one example."""
  if c["model_type"] == "t5":
    return np_t5_logits(sd, c, prompt, [0] + list(targets[:-1]))
  seq = list(prompt) + list(targets[:-1])
  return np_llama_logits(sd, c, seq)[len(prompt) - 1:]


# ---- helpers --------------------------------------------------------------------


def _rows(rng, lengths, vocab):
  """Right-padded [B, max(lengths)] int32 ids in [1, vocab), and the unpadded rows."""
  rows = [list(rng.integers(1, vocab, n)) for n in lengths]
  out = np.zeros((len(rows), max(lengths)), np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out, rows


def _leaves_equal(a, b) -> bool:
  if jax.tree.structure(a) != jax.tree.structure(b):
    return False
  return all(x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _greedy(lm, params, inputs, n):
  """Greedy decode (over non-pad ids) via prefill/step: tokens [B, n], logits [B, n, V]."""
  step = jax.jit(lm.step)
  cache, tok = jax.jit(lm.prefill, static_argnums=2)(params, jnp.asarray(inputs), n)
  toks, logits = [], []
  for _ in range(n):
    lg, cache = step(params, tok, cache)
    tok = jnp.argmax(lg[:, 1:], axis=-1).astype(jnp.int32) + 1  # NOTE: 0 is pad.
    toks.append(np.asarray(tok))
    logits.append(np.asarray(lg))
  return np.stack(toks, 1), np.stack(logits, 1)


# ---- parity ---------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_greedy_decoding_match_numpy_hf_reference(tmp_path, case):
  c = CASES[case]
  sd = hf_state(c)
  config, params = hf_load.load_hf_checkpoint(write_hf(tmp_path / "ckpt", c, sd))
  assert isinstance(config, T5Config if c["model_type"] == "t5" else DecoderConfig)
  lm = LanguageModel(config)
  want = lm.abstract_init()[0]
  assert jax.tree.structure(params) == jax.tree.structure(want)
  assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, want)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))

  rng = np.random.default_rng(1)
  v = c["vocab_size"]
  # Prompts of different lengths (right-padded); the encoder one is longer than
  # max_distance so the log-spaced relative buckets are exercised.
  inputs, prompts = _rows(rng, (19, 11), v)
  targets, target_rows = _rows(rng, (9, 6), v)
  forward = jax.jit(lm.forward)  # NOTE: one compile beats op-by-op dispatch here.
  logits = np.asarray(forward(params, jnp.asarray(inputs), jnp.asarray(targets))["logits"])
  assert logits.shape == targets.shape + (v,)
  for i, (p, t) in enumerate(zip(prompts, target_rows)):
    ref = reference_logits(sd, c, p, t)
    np.testing.assert_allclose(logits[i, :len(t)], ref, atol=ATOL, rtol=0)
  assert np.abs(logits).max() > 0.5  # not trivially small

  # Greedy decoding with caches == argmax of the teacher-forced full forward.
  n = targets.shape[1]  # NOTE: same shapes as above, so `forward` compiles once.
  toks, step_logits = _greedy(lm, params, inputs, n)
  full = np.asarray(forward(params, jnp.asarray(inputs), jnp.asarray(toks))["logits"])
  np.testing.assert_array_equal(np.argmax(full[..., 1:], axis=-1) + 1, toks)
  np.testing.assert_allclose(step_logits, full, atol=ATOL, rtol=0)
  for i, p in enumerate(prompts):
    np.testing.assert_allclose(full[i], reference_logits(sd, c, p, list(toks[i])),
                               atol=ATOL, rtol=0)


def test_t5_relative_buckets_match_hf():
  from realign_jax.models.t5 import relative_position_bucket
  rel = np.arange(-300, 301)
  for bidirectional in (True, False):
    for nb, md in ((32, 128), (8, 16), (64, 256)):
      ours = relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional,
                                      num_buckets=nb, max_distance=md)
      np.testing.assert_array_equal(np.asarray(ours), t5_bucket(rel, bidirectional, nb, md))


# ---- file formats ---------------------------------------------------------------


def test_sharded_checkpoint_gives_identical_params(tmp_path):
  for name in ("t5_untied", "llama_gqa"):
    c = CASES[name]
    sd = hf_state(c)
    _, single = hf_load.load_hf_checkpoint(write_hf(tmp_path / name / "single", c, sd))
    shard_dir = tmp_path / name / "sharded"
    os.makedirs(shard_dir)
    with open(shard_dir / "config.json", "w") as f:
      json.dump(c, f)
    names = sorted(sd)
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    parts = {files[0]: names[::2], files[1]: names[1::2]}
    for file, part in parts.items():
      st_numpy.save_file({k: sd[k] for k in part}, str(shard_dir / file))
    index = {"metadata": {"total_size": 0},
             "weight_map": {k: file for file, part in parts.items() for k in part}}
    with open(shard_dir / "model.safetensors.index.json", "w") as f:
      json.dump(index, f)
    _, sharded = hf_load.load_hf_checkpoint(str(shard_dir))
    assert _leaves_equal(single, sharded)

    os.remove(shard_dir / files[1])
    with pytest.raises(UserError, match=files[1]):
      hf_load.load_hf_checkpoint(str(shard_dir))


def test_bfloat16_and_float16_files(tmp_path):
  c = CASES["llama_gqa"]
  sd = hf_state(c)
  sd_bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()}
  bf_dir = tmp_path / "bf16"
  os.makedirs(bf_dir)
  with open(bf_dir / "config.json", "w") as f:
    json.dump(c, f)
  write_raw_safetensors(bf_dir / "model.safetensors", sd_bf16)
  # The same values, widened to float32 and written by the safetensors package.
  f32_dir = write_hf(tmp_path / "f32", c, {k: v.astype(np.float32) for k, v in sd_bf16.items()})

  _, from_bf16 = hf_load.load_hf_checkpoint(str(bf_dir))
  _, from_f32 = hf_load.load_hf_checkpoint(f32_dir)
  assert _leaves_equal(from_bf16, from_f32)
  raw = st_codec.read_safetensors(str(bf_dir / "model.safetensors"))
  assert all(raw[k].dtype == ml_dtypes.bfloat16 and np.array_equal(raw[k], sd_bf16[k])
             for k in sd)

  config, kept = hf_load.load_hf_checkpoint(str(bf_dir), dtype="bfloat16")
  assert config.param_dtype == "bfloat16"
  # Leaf dtypes follow init under param_dtype=bfloat16 (kernels and embeddings
  # bfloat16 at least), and the values are the file's, exactly.
  want = jax.tree.map(lambda x: np.dtype(x.dtype), LanguageModel(config).abstract_init()[0])
  assert jax.tree.map(lambda x: x.dtype, kept) == want
  assert kept["embed_tokens"]["embedding"].dtype == ml_dtypes.bfloat16
  assert kept["blocks_0"]["attention"]["q_proj"]["kernel"].dtype == ml_dtypes.bfloat16
  assert _leaves_equal(jax.tree.map(lambda x: x.astype(np.float32), kept), from_f32)

  f16_dir = tmp_path / "f16"
  os.makedirs(f16_dir)
  with open(f16_dir / "config.json", "w") as f:
    json.dump(c, f)
  st_numpy.save_file({k: v.astype(np.float16) for k, v in sd.items()},
                     str(f16_dir / "model.safetensors"))
  _, from_f16 = hf_load.load_hf_checkpoint(str(f16_dir))
  _, want = hf_load.load_hf_checkpoint(
      write_hf(tmp_path / "f16_as_f32", c, {k: v.astype(np.float16).astype(np.float32)
                                            for k, v in sd.items()}))
  assert _leaves_equal(from_f16, want)


@pytest.mark.parametrize("case", ["t5_untied", "t5_tied", "llama_gqa", "mistral_window"])
def test_export_import_round_trip_is_exact(tmp_path, case):
  c = CASES[case]
  sd = hf_state(c)
  config, params = hf_load.load_hf_checkpoint(write_hf(tmp_path / "in", c, sd))
  out = str(tmp_path / "out")
  hf_export.export_hf_checkpoint(config, params, out)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # temp dir renamed away
  # The exported file is the HF layout, readable by the reference reader.
  exported = st_numpy.load_file(os.path.join(out, "model.safetensors"))
  assert sorted(exported) == sorted(sd)
  assert all(np.array_equal(exported[k], sd[k]) for k in sd)
  config2, params2 = hf_load.load_hf_checkpoint(out)
  assert config2 == config
  assert _leaves_equal(params, params2)

  with pytest.raises(UserError, match="already exists"):
    hf_export.export_hf_checkpoint(config, params, out)
  bf16 = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), params)
  hf_export.export_hf_checkpoint(config, bf16, out, overwrite=True)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  with safetensors.safe_open(os.path.join(out, "model.safetensors"), framework="np") as f:
    assert f.metadata() == {"format": "pt"} and sorted(f.keys()) == sorted(sd)
  config3, back = hf_load.load_hf_checkpoint(out, dtype=jnp.bfloat16)
  assert config3.param_dtype == "bfloat16"
  want = jax.tree.map(lambda x: np.dtype(x.dtype), LanguageModel(config3).abstract_init()[0])
  assert jax.tree.map(lambda x: x.dtype, back) == want
  assert _leaves_equal(jax.tree.map(lambda x: x.astype(np.float32), back),
                       jax.tree.map(lambda x: x.astype(np.float32), bf16))


def test_export_of_init_shaped_params(tmp_path):
  config = DecoderConfig(vocab_size=64, d_model=16, num_heads=4, num_kv_heads=2, head_dim=8,
                         d_ff=24, num_layers=1, sliding_window=8)
  rng = np.random.default_rng(0)
  # NOTE: random values in init's exact tree, without paying for an eager init.
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype),
                        LanguageModel(config).abstract_init()[0])
  hf_export.export_hf_checkpoint(config, params, str(tmp_path / "m"))
  config2, params2 = hf_load.load_hf_checkpoint(str(tmp_path / "m"))
  assert config2 == config
  assert _leaves_equal(params, params2)
  with pytest.raises(UserError, match="lm_head"):
    hf_export.export_hf_checkpoint(config, {**params, "lm_head": {}}, str(tmp_path / "bad"))
  assert not os.path.exists(tmp_path / "bad")


def test_harmless_extra_tensors_are_ignored(tmp_path):
  c = CASES["t5_tied"]
  sd = hf_state(c)
  _, want = hf_load.load_hf_checkpoint(write_hf(tmp_path / "plain", c, sd))
  extra = dict(sd)
  extra["encoder.embed_tokens.weight"] = sd["shared.weight"]
  extra["decoder.embed_tokens.weight"] = sd["shared.weight"]
  extra["lm_head.weight"] = sd["shared.weight"]  # saved copy of the tied matrix
  extra["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = (
      np.zeros((8, 4), np.float32))
  _, got = hf_load.load_hf_checkpoint(write_hf(tmp_path / "extra", c, extra))
  assert _leaves_equal(got, want)
  # The tied embedding stored only under an encoder/decoder alias.
  alias = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v
           for k, v in sd.items()}
  _, got = hf_load.load_hf_checkpoint(write_hf(tmp_path / "alias", c, alias))
  assert _leaves_equal(got, want)

  # A stored lm_head that is not the tied matrix: the config's tying is wrong.
  extra["lm_head.weight"] = sd["shared.weight"] + 1.0
  with pytest.raises(UserError, match="lm_head.weight.*differs.*tie_word_embeddings"):
    hf_load.load_hf_checkpoint(write_hf(tmp_path / "untied", c, extra))

  c = CASES["llama_tied"]
  sd = hf_state(c)
  _, want = hf_load.load_hf_checkpoint(write_hf(tmp_path / "llama", c, sd))
  extra = dict(sd, **{"model.layers.1.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32),
                      "lm_head.weight": sd["model.embed_tokens.weight"]})
  _, got = hf_load.load_hf_checkpoint(write_hf(tmp_path / "llama_extra", c, extra))
  assert _leaves_equal(got, want)


def test_transformers_5_t5_head_layouts(tmp_path):
  """scale_decoder_outputs decides the d_model**-0.5 rescale; a stored lm_head is the head."""
  base = {**T5_CONFIG, "tie_word_embeddings": True}
  sd = hf_state({**base, "scale_decoder_outputs": False})
  rng = np.random.default_rng(3)
  prompt, target = list(rng.integers(1, 97, 7)), list(rng.integers(1, 97, 5))

  def logits(path):
    config, params = hf_load.load_hf_checkpoint(path)
    out = LanguageModel(config).forward(params, jnp.asarray([prompt], jnp.int32),
                                        jnp.asarray([target], jnp.int32))
    return config, np.asarray(out["logits"])[0]

  # 5.x, unscaled, no lm_head stored: the shared matrix without the rescale.
  c = {**base, "scale_decoder_outputs": False}
  shared_head = {k: v for k, v in sd.items() if k != "lm_head.weight"}
  config, got = logits(write_hf(tmp_path / "shared", c, shared_head))
  assert not config.tie_embeddings
  np.testing.assert_allclose(got, reference_logits(shared_head, c, prompt, target),
                             atol=ATOL, rtol=0)
  # ... which differs from the rescaled (4.x tied) reading by the d_model**-0.5 factor.
  scaled = reference_logits(shared_head, base, prompt, target)
  np.testing.assert_allclose(got * 32 ** -0.5, scaled, atol=ATOL, rtol=0)

  # 5.x, scaled (original T5): a stored lm_head must be the shared matrix.
  c = {**base, "scale_decoder_outputs": True}
  with pytest.raises(UserError, match="lm_head.weight.*differs.*scale_decoder_outputs is true"):
    hf_load.load_hf_checkpoint(write_hf(tmp_path / "scaled", c, sd))
  # 4.x, tie_word_embeddings stored true: the hint names that field, not a default.
  with pytest.raises(UserError, match="tie_word_embeddings is true and there is no "
                     "scale_decoder_outputs"):
    hf_load.load_hf_checkpoint(write_hf(tmp_path / "v4tied", base, sd))
  # 4.x untied without lm_head: a missing head, not silently the shared matrix.
  with pytest.raises(UserError, match="missing tensor 'lm_head.weight'"):
    hf_load.load_hf_checkpoint(write_hf(tmp_path / "v4untied", T5_CONFIG, shared_head))
  with pytest.raises(UserError, match="scale_decoder_outputs='no' is not a boolean"):
    hf_config.config_from_hf({**base, "scale_decoder_outputs": "no"})


# ---- configs --------------------------------------------------------------------


def test_config_from_hf_mapping_and_defaults():
  t5 = hf_config.config_from_hf(T5_CONFIG)
  assert t5 == T5Config(vocab_size=97, d_model=32, num_heads=4, head_dim=12, d_ff=40,
                        num_encoder_layers=2, num_decoder_layers=3, dropout_rate=0.1,
                        tie_embeddings=False, relative_buckets=8, relative_max_distance=16,
                        rms_eps=1e-6)
  minimal = {k: T5_CONFIG[k] for k in ("model_type", "vocab_size", "d_model", "d_kv", "d_ff",
                                       "num_heads", "num_layers", "feed_forward_proj")}
  t5 = hf_config.config_from_hf(minimal)
  assert t5.tie_embeddings  # HF T5's default
  assert t5.num_decoder_layers == 2
  assert (t5.relative_buckets, t5.relative_max_distance) == (32, 128)

  mistral = hf_config.config_from_hf(MISTRAL_CONFIG)
  assert mistral == DecoderConfig(vocab_size=97, d_model=32, num_heads=4, num_kv_heads=1,
                                  head_dim=8, d_ff=48, num_layers=2, rope_theta=10000.0,
                                  rms_eps=1e-6, tie_embeddings=False, sliding_window=4,
                                  max_length=64, tokens=SpecialTokens(0, 2, 1))
  # Special ids: transformers' defaults per model type, else config.json's (a pad equal to
  # eos or bos is not a pad of its own: 0, the Llama/Mistral unk).
  assert t5.tokens == SpecialTokens(pad_id=0, eos_id=1, bos_id=None)
  assert hf_config.config_from_hf({**LLAMA_CONFIG, "bos_token_id": 5, "eos_token_id": [7, 9],
                                   "pad_token_id": 7}).tokens == SpecialTokens(0, 7, 5)
  no_kv = {k: v for k, v in LLAMA_CONFIG.items() if k not in ("num_key_value_heads", "head_dim")}
  llama = hf_config.config_from_hf(no_kv)
  assert (llama.num_kv_heads, llama.head_dim, llama.sliding_window) == (4, 8, None)
  # A sliding_window field on a llama config is not a Llama feature; null disables Mistral's.
  assert hf_config.config_from_hf({**MISTRAL_CONFIG, "sliding_window": None}).sliding_window is None
  assert hf_config.config_from_hf(
      {**LLAMA_CONFIG, "rope_scaling": {"rope_type": "default"}}).rope_theta == 500.0
  v5 = {k: v for k, v in LLAMA_CONFIG.items() if k != "rope_theta"}  # transformers >= 5
  v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 1234.0}
  assert hf_config.config_from_hf(v5).rope_theta == 1234.0
  assert hf_config.config_from_hf({**T5_CONFIG, "model_type": "mt5"}) == hf_config.config_from_hf(
      T5_CONFIG)
  for config in (t5, mistral, llama):
    assert hf_config.config_from_hf(hf_config.config_to_hf(config)) == config


@pytest.mark.parametrize("change, match", [
    ({"model_type": "gpt2"}, "gpt2"),
    ({"model_type": None}, "model_type"),
    ({"feed_forward_proj": "relu"}, "relu"),
    ({"num_heads": None}, "num_heads"),
])
def test_bad_t5_configs(change, match):
  with pytest.raises(UserError, match=match):
    hf_config.config_from_hf({**T5_CONFIG, **change})


@pytest.mark.parametrize("change, match", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "unsupported"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "unsupported"),
    ({"rope_scaling": {"factor": 2.0}}, "unsupported"),
    ({"hidden_act": "gelu"}, "gelu"),
    ({"attention_bias": True}, "attention_bias"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"intermediate_size": None}, "intermediate_size"),
])
def test_bad_llama_configs(change, match):
  with pytest.raises(UserError, match=match):
    hf_config.config_from_hf({**LLAMA_CONFIG, **change})


# ---- bad checkpoints --------------------------------------------------------------


def test_missing_config_json(tmp_path):
  os.makedirs(tmp_path / "ckpt")
  with pytest.raises(UserError, match=str(tmp_path / "ckpt" / "config.json")):
    hf_load.load_hf_checkpoint(str(tmp_path / "ckpt"))
  with pytest.raises(UserError, match="not found"):
    hf_load.load_hf_checkpoint(str(tmp_path / "nowhere"))


def test_missing_weights_file(tmp_path):
  os.makedirs(tmp_path / "ckpt")
  with open(tmp_path / "ckpt" / "config.json", "w") as f:
    json.dump(LLAMA_CONFIG, f)
  open(tmp_path / "ckpt" / "pytorch_model.bin", "wb").close()
  with pytest.raises(UserError, match="pytorch_model.bin"):
    hf_load.load_hf_checkpoint(str(tmp_path / "ckpt"))


@pytest.mark.parametrize("case, key", [
    ("llama_gqa", "model.layers.1.mlp.up_proj.weight"),
    ("llama_gqa", "lm_head.weight"),
    ("t5_untied", "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
    ("t5_untied", "decoder.block.2.layer.1.EncDecAttention.o.weight"),
])
def test_missing_tensor(tmp_path, case, key):
  sd = hf_state(CASES[case])
  del sd[key]
  path = write_hf(tmp_path / "ckpt", CASES[case], sd)
  with pytest.raises(UserError, match="missing") as info:
    hf_load.load_hf_checkpoint(path)
  assert key in str(info.value) and os.path.join(path, "model.safetensors") in str(info.value)


def test_wrong_shape(tmp_path):
  c = CASES["llama_gqa"]
  sd = hf_state(c)
  key = "model.layers.0.self_attn.k_proj.weight"
  sd[key] = np.zeros((64, 32), np.float32)  # as if num_key_value_heads were 4
  with pytest.raises(UserError) as info:
    hf_load.load_hf_checkpoint(write_hf(tmp_path / "ckpt", c, sd))
  msg = str(info.value)
  assert key in msg and "[64, 32]" in msg and "[32, 32]" in msg


def test_unexpected_tensor(tmp_path):
  c = CASES["t5_untied"]
  sd = hf_state(c)
  sd["decoder.block.3.layer.0.SelfAttention.q.weight"] = np.zeros((48, 32), np.float32)
  with pytest.raises(UserError, match=r"unexpected.*decoder\.block\.3\.layer\.0"):
    hf_load.load_hf_checkpoint(write_hf(tmp_path / "ckpt", c, sd))
  # A bias the model does not have is reported, not silently dropped.
  c = CASES["llama_tied"]
  sd = hf_state(c)
  sd["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
  with pytest.raises(UserError, match="q_proj.bias"):
    hf_load.load_hf_checkpoint(write_hf(tmp_path / "ckpt2", c, sd))


def test_corrupt_safetensors_file(tmp_path):
  c = CASES["llama_gqa"]
  path = write_hf(tmp_path / "ckpt", c, hf_state(c))
  file = os.path.join(path, "model.safetensors")
  with open(file, "rb") as f:
    data = f.read()
  with open(file, "wb") as f:
    f.write(data[:-100])
  with pytest.raises(UserError, match="model.safetensors"):
    hf_load.load_hf_checkpoint(path)
