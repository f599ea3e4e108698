"""Hugging Face safetensors checkpoints: import into, and export from, our params.

Supported releases: T5.1.1-style encoder-decoders (`model_type` "t5" with
`feed_forward_proj` "gated-gelu": t5-v1_1, flan-t5, ...) and decoder-only
Llama/Mistral models (`model_type` "llama" / "mistral").

  config, params = load_hf_checkpoint("/ckpt/flan-t5-base")
  lm = LanguageModel(config)              # params fit lm.init(...)[0] exactly
  export_hf_checkpoint(config, params, "/out/my-model")

A checkpoint directory holds `config.json` and either `model.safetensors` or
`model.safetensors.index.json` (its "weight_map": tensor name -> shard file)
next to the shards. The safetensors format is read and written here directly
(8-byte little-endian header length, JSON header, raw little-endian data):
the `safetensors` numpy backend cannot represent bfloat16, which most
released checkpoints use, and this way one code path serves every dtype.

Layout conversion. HF linear weights are [out, in]; our kernels are
[in, out] with DenseGeneral head splitting, so a weight is transposed and its
out axis reshaped: q/k/v [H*D, E] -> [E, H, D], o [E, H*D] -> [H, D, E].
Nothing else changes: T5 has no 1/sqrt(D) in attention in either codebase,
and our RoPE uses the rotate-half layout of the HF Llama weights, so q/k need
no permutation.

T5 heads. transformers 4.x multiplies T5's decoder output by d_model**-0.5
exactly when `tie_word_embeddings` is true (original T5; T5.1.1 and flan-t5
store false and a separate `lm_head`). transformers 5.x keeps
`tie_word_embeddings` true and stores the rescale as `scale_decoder_outputs`,
a T5.1.1/flan-t5 `lm_head` still in the weights. Both are read: the rescale is
`scale_decoder_outputs` when present, else `tie_word_embeddings`; an unscaled
model's head is its stored `lm_head` (or, 5.x only, the shared matrix when
none is stored). Export writes both fields.

Directories as checkpoints: `is_hf_dir`, `hf_model_config` and `hf_params`
let code that reads run directories take an HF directory in their place.

Loading is strict: a missing tensor, an unexpected tensor (other than the
harmless extras listed in `_harmless`, e.g. rotary `inv_freq` buffers or the
encoder/decoder copies of T5's shared embedding; a stored copy of a tied
matrix must equal it) or a shape that disagrees with config.json raises
`UserError` naming the tensor and the file. Parameters
come back as host numpy arrays (float32 unless `dtype` says otherwise), so a
caller can `jax.device_put` them with its own shardings.
"""

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import ml_dtypes
import numpy as np

from realign_jax.errors import UserError
from realign_jax.models import layout as layout_lib
from realign_jax.models.api import LanguageModel
from realign_jax.models.config import DecoderConfig, ModelConfig, SpecialTokens, T5Config

Params = Any
DTypeLike = Union[str, np.dtype, type, None]

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype tag <-> numpy dtype (always little-endian on disk).
_ST_TO_NP = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_NP_TO_ST = {v: k for k, v in _ST_TO_NP.items()}
_FLOAT_TAGS = ("F64", "F32", "F16", "BF16")
_PARAM_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                 "float16": np.dtype(np.float16)}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # NOTE: the limit the reference reader enforces too.


# ---- safetensors files --------------------------------------------------------


class _Entry(NamedTuple):
  """One tensor's header record inside a safetensors file."""

  file: str
  dtype: str  # safetensors tag, e.g. "BF16"
  shape: tuple
  start: int  # absolute byte offsets in the file
  end: int


def _read_header(path: str) -> dict[str, _Entry]:
  """Parses a safetensors header; validates offsets against the file size."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      raw_len = f.read(8)
      if len(raw_len) != 8:
        raise UserError(f"{path}: not a safetensors file (shorter than 8 bytes)")
      n = int.from_bytes(raw_len, "little")
      if n > _MAX_HEADER_BYTES or 8 + n > size:
        raise UserError(f"{path}: not a safetensors file (header length {n}, file size {size})")
      header = json.loads(f.read(n).decode("utf-8"))
  except FileNotFoundError:
    raise UserError(f"safetensors file not found: {path}") from None
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"{path}: unreadable safetensors header ({e})") from None
  if not isinstance(header, dict):
    raise UserError(f"{path}: safetensors header is not a JSON object")
  base = 8 + n
  entries = {}
  for name, rec in header.items():
    if name == "__metadata__":
      continue
    try:
      tag, shape, (lo, hi) = rec["dtype"], tuple(int(s) for s in rec["shape"]), rec["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise UserError(f"{path}: malformed header record for tensor {name!r}: {rec!r}") from None
    if tag not in _ST_TO_NP:
      raise UserError(f"{path}: tensor {name!r} has unsupported dtype {tag!r} "
                      f"(supported: {', '.join(_ST_TO_NP)})")
    want = math.prod(shape) * _ST_TO_NP[tag].itemsize
    if not 0 <= lo <= hi or hi - lo != want or base + hi > size:
      raise UserError(f"{path}: tensor {name!r} has data_offsets [{lo}, {hi}] inconsistent with "
                      f"dtype {tag} shape {list(shape)} ({want} bytes) or the file size {size}")
    entries[name] = _Entry(path, tag, shape, base + lo, base + hi)
  return entries


def _read_entry(entry: _Entry, mm: Optional[np.ndarray] = None) -> np.ndarray:
  """A read-only view of one tensor's data (memory-mapped, not copied)."""
  if mm is None:
    mm = np.memmap(entry.file, dtype=np.uint8, mode="r")
  return mm[entry.start:entry.end].view(_ST_TO_NP[entry.dtype]).reshape(entry.shape)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads every tensor of a safetensors file (any dtype, bfloat16 included).

  Args:
    path: a `.safetensors` file.

  Returns:
    name -> numpy array (a copy, native byte order; bfloat16 as
    `ml_dtypes.bfloat16`).
  """
  entries = _read_header(path)
  mm = np.memmap(path, dtype=np.uint8, mode="r") if entries else None
  return {name: np.array(_read_entry(e, mm)) for name, e in entries.items()}


def write_safetensors(path: str, tensors: dict[str, np.ndarray],
                      metadata: Optional[dict[str, str]] = None) -> None:
  """Writes `tensors` as one safetensors file (not atomic; see export).

  Args:
    path: destination file.
    tensors: name -> array of a dtype safetensors knows (bfloat16 included).
    metadata: optional string -> string map stored under "__metadata__"
      (HF transformers wants {"format": "pt"}).
  """
  arrays, header, offset = [], {}, 0
  for name in sorted(tensors):
    a = np.asarray(tensors[name])
    if a.dtype.byteorder == ">":
      a = a.astype(a.dtype.newbyteorder("<"))
    if a.dtype not in _NP_TO_ST:
      raise ValueError(f"tensor {name!r}: dtype {a.dtype} has no safetensors equivalent")
    tag = _NP_TO_ST[a.dtype]
    a = np.ascontiguousarray(a, dtype=_ST_TO_NP[tag])
    header[name] = {"dtype": tag, "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  # NOTE: space padding keeps the data 8-byte aligned, as the reference writer does.
  raw += b" " * (-len(raw) % 8)
  with open(path, "wb") as f:
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for a in arrays:
      f.write(a.reshape(-1).view(np.uint8).data)


def _checkpoint_entries(path: str) -> tuple[dict[str, _Entry], str]:
  """Headers of a checkpoint directory: (name -> entry, description of the files)."""
  single = os.path.join(path, SINGLE_FILE)
  index = os.path.join(path, INDEX_FILE)
  if os.path.isfile(single):
    return _read_header(single), single
  if not os.path.isfile(index):
    others = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".h5", ".msgpack")))
    hint = (f" (found {', '.join(others)}: only safetensors is supported; re-save the model "
            "with safe_serialization=True)") if others else ""
    raise UserError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}{hint}")
  try:
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    if not isinstance(weight_map, dict):
      raise TypeError("weight_map is not an object")
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise UserError(f"{index}: malformed safetensors index ({e!r})") from None
  headers: dict[str, dict[str, _Entry]] = {}
  entries = {}
  for name, shard in weight_map.items():
    shard_path = os.path.join(path, shard)
    if shard not in headers:
      if not os.path.isfile(shard_path):
        raise UserError(f"{index} maps tensor {name!r} to {shard}, which does not exist in {path}")
      headers[shard] = _read_header(shard_path)
    if name not in headers[shard]:
      raise UserError(f"{index} maps tensor {name!r} to {shard_path}, which does not contain it")
    entries[name] = headers[shard][name]
  return entries, index


# ---- configs -------------------------------------------------------------------

_REQUIRED = object()


def _get(cfg: dict, key: str, default: Any = _REQUIRED) -> Any:
  value = cfg.get(key, default)
  if value is None and default is not _REQUIRED:
    value = default  # NOTE: HF configs often spell "use the default" as null.
  if value is _REQUIRED or value is None:
    raise UserError(f"config.json ({cfg.get('model_type')}): required field {key!r} is missing")
  return value


def _check_rope(cfg: dict) -> float:
  """rope_theta, refusing any RoPE scaling (Llama 3, YaRN, linear, dynamic, ...)."""
  theta = cfg.get("rope_theta")
  params = cfg.get("rope_parameters")  # transformers >= 5 keeps theta and scaling here.
  for field, value in (("rope_scaling", cfg.get("rope_scaling")), ("rope_parameters", params)):
    if value is None:
      continue
    kind = value.get("rope_type", value.get("type")) if isinstance(value, dict) else value
    if kind != "default":
      raise UserError(f"config.json: {field}={value!r} is unsupported (only plain RoPE is "
                      "implemented)")
  if isinstance(params, dict) and params.get("rope_theta") is not None:
    theta = params["rope_theta"]
  return float(theta if theta is not None else 10000.0)


def _t5_scales_outputs(c: dict) -> bool:
  """Whether HF T5 multiplies the decoder output by d_model**-0.5 before the head.

  transformers 4.x derives it from `tie_word_embeddings` (default true: the
  original T5 ties and scales; T5.1.1 and flan-t5 store false). transformers
  5.x stores it as `scale_decoder_outputs` and keeps `tie_word_embeddings`
  true for every T5, with T5.1.1's separate `lm_head` in the weights. Our
  `T5Config.tie_embeddings` means "tied head and scaled outputs", so it is
  this value; an unscaled model whose head is the shared matrix is imported
  as untied with a copy of it (see `_t5_head_aliases`).
  """
  scale = c.get("scale_decoder_outputs")
  if scale is None:
    scale = _get(c, "tie_word_embeddings", True)  # HF T5 default: tied.
  if not isinstance(scale, bool):
    field = "scale_decoder_outputs" if "scale_decoder_outputs" in c else "tie_word_embeddings"
    raise UserError(f"config.json: {field}={scale!r} is not a boolean (true or false)")
  return scale


def _t5_head_aliases(c: dict) -> tuple[str, ...]:
  """Stored names the untied head may be read from when `lm_head.weight` is absent.

  Only a transformers 5.x config (`scale_decoder_outputs: false` with
  `tie_word_embeddings` true) says the head is the shared matrix without the
  rescale; a 4.x config with `tie_word_embeddings: false` and no `lm_head` is
  a checkpoint missing its head.
  """
  if (c.get("model_type") in ("t5", "mt5") and c.get("scale_decoder_outputs") is False
      and c.get("tie_word_embeddings", True) is not False):
    return ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
  return ()


def _token_id(c: dict, key: str, default: Optional[int]) -> Optional[int]:
  """config.json's `key` (an id, null, or a list whose first id is the main one)."""
  v = c.get(key, default)
  if isinstance(v, list):
    v = v[0] if v else None
  if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
    raise UserError(f"config.json: {key}={v!r} is not a token id")
  return v


def hf_config_tokens(c: dict) -> SpecialTokens:
  """The special ids config.json records, with transformers' defaults for its model type.

  T5: pad 0, eos 1, no bos. Llama/Mistral: bos 1, eos 2 and no pad token;
  the pad is then 0, the unk of the Llama/Mistral vocabularies (a directory
  holding a tokenizer takes the tokenizer's ids instead: `hf_model_config`).
  """
  if c.get("model_type") in ("t5", "mt5"):
    return SpecialTokens(pad_id=_token_id(c, "pad_token_id", 0),
                         eos_id=_token_id(c, "eos_token_id", 1), bos_id=None)
  bos = _token_id(c, "bos_token_id", 1)
  eos = _token_id(c, "eos_token_id", 2)
  pad = _token_id(c, "pad_token_id", None)
  if pad is None or pad in (eos, bos):
    pad = 0
  return SpecialTokens(pad_id=pad, eos_id=eos, bos_id=bos)


def config_from_hf(config_json: dict) -> ModelConfig:
  """Maps an HF `config.json` (as a dict) to our model config.

  Args:
    config_json: the parsed config.json of a T5.1.1-style ("t5" with
      gated-gelu) or a Llama/Mistral ("llama", "mistral") checkpoint.

  Returns:
    A `T5Config` or a `DecoderConfig` (float32 params and activations).

  Raises:
    UserError: unknown model_type, a missing field, or an architecture
      variant the models do not implement.
  """
  if not isinstance(config_json, dict):
    raise UserError(f"config.json must hold a JSON object, got {type(config_json).__name__}")
  c = config_json
  model_type = c.get("model_type")
  if model_type in ("t5", "mt5"):  # NOTE: HF's MT5 is T5.1.1 with another vocabulary.
    ff = c.get("feed_forward_proj", "relu")  # HF's default is the original T5's ReLU.
    if ff not in ("gated-gelu", "gated-gelu_new"):  # both mean tanh-approximate GELU in HF
      raise UserError(f"config.json: feed_forward_proj={ff!r} is unsupported; only T5.1.1-style "
                      "'gated-gelu' checkpoints (t5-v1_1, flan-t5) can be imported")
    num_layers = int(_get(c, "num_layers"))
    return T5Config(
        vocab_size=int(_get(c, "vocab_size")),
        d_model=int(_get(c, "d_model")),
        num_heads=int(_get(c, "num_heads")),
        head_dim=int(_get(c, "d_kv")),
        d_ff=int(_get(c, "d_ff")),
        num_encoder_layers=num_layers,
        num_decoder_layers=int(_get(c, "num_decoder_layers", num_layers)),
        dropout_rate=float(_get(c, "dropout_rate", 0.1)),
        tie_embeddings=_t5_scales_outputs(c),
        relative_buckets=int(_get(c, "relative_attention_num_buckets", 32)),
        relative_max_distance=int(_get(c, "relative_attention_max_distance", 128)),
        rms_eps=float(_get(c, "layer_norm_epsilon", 1e-6)),
        tokens=hf_config_tokens(c),
    )
  if model_type in ("llama", "mistral"):
    act = c.get("hidden_act", "silu")
    if act != "silu":
      raise UserError(f"config.json: hidden_act={act!r} is unsupported (only 'silu')")
    for flag in ("attention_bias", "mlp_bias"):
      if c.get(flag):
        raise UserError(f"config.json: {flag}=true is unsupported (the model has no biases)")
    theta = _check_rope(c)
    heads = int(_get(c, "num_attention_heads"))
    hidden = int(_get(c, "hidden_size"))
    kv_heads = int(_get(c, "num_key_value_heads", heads))
    if heads % kv_heads:
      raise UserError(f"config.json: num_attention_heads={heads} is not a multiple of "
                      f"num_key_value_heads={kv_heads}")
    window = c.get("sliding_window") if model_type == "mistral" else None
    return DecoderConfig(
        vocab_size=int(_get(c, "vocab_size")),
        d_model=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(_get(c, "head_dim", hidden // heads)),
        d_ff=int(_get(c, "intermediate_size")),
        num_layers=int(_get(c, "num_hidden_layers")),
        rope_theta=theta,
        rms_eps=float(_get(c, "rms_norm_eps", 1e-6)),
        tie_embeddings=bool(_get(c, "tie_word_embeddings", False)),
        sliding_window=None if window is None else int(window),
        max_length=int(_get(c, "max_position_embeddings", 2048)),
        tokens=hf_config_tokens(c),
    )
  raise UserError(f"config.json: unsupported model_type {model_type!r} (supported: 't5' or "
                  "'mt5' with gated-gelu, 'llama', 'mistral')")


def config_to_hf(config: ModelConfig, torch_dtype: str = "float32") -> dict:
  """The HF config.json for `config`; inverse of `config_from_hf`."""
  if isinstance(config, T5Config):
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": config.vocab_size,
        "d_model": config.d_model,
        "d_kv": config.head_dim,
        "d_ff": config.d_ff,
        "num_heads": config.num_heads,
        "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers,
        "relative_attention_num_buckets": config.relative_buckets,
        "relative_attention_max_distance": config.relative_max_distance,
        "layer_norm_epsilon": config.rms_eps,
        "dropout_rate": config.dropout_rate,
        "feed_forward_proj": "gated-gelu",
        "dense_act_fn": "gelu_new",
        "is_gated_act": True,
        "tie_word_embeddings": config.tie_embeddings,
        # NOTE: read by transformers 5.x (which keeps the head untied when the
        # weights hold `lm_head`); 4.x derives the same from the tying above.
        "scale_decoder_outputs": config.tie_embeddings,
        "is_encoder_decoder": True,
        "pad_token_id": config.tokens.pad_id,
        "eos_token_id": config.tokens.eos_id,
        "decoder_start_token_id": 0,  # NOTE: the models hard-code 0 as the decoder start.
        "torch_dtype": torch_dtype,
    }
  if isinstance(config, DecoderConfig):
    mistral = config.sliding_window is not None
    out = {
        "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
        "model_type": "mistral" if mistral else "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "num_hidden_layers": config.num_layers,
        "hidden_act": "silu",
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": config.rms_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "max_position_embeddings": config.max_length,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": torch_dtype,
        "bos_token_id": config.tokens.bos_id,
        "eos_token_id": config.tokens.eos_id,
        "pad_token_id": config.tokens.pad_id,
    }
    if mistral:
      out["sliding_window"] = config.sliding_window
    return out
  raise TypeError(f"unknown model config {type(config).__name__}")


# ---- the name and layout map -----------------------------------------------------


class _Tensor(NamedTuple):
  """One HF tensor and the param leaf it becomes."""

  hf_name: str
  path: tuple  # keys into our params tree
  hf_shape: tuple
  shape: tuple  # our param shape
  linear: bool  # HF [out, in] weight -> our [in, out...] kernel


def _copy(hf_name, path, shape) -> _Tensor:
  return _Tensor(hf_name, path, tuple(shape), tuple(shape), False)


def _linear(hf_name, path, hf_shape, shape) -> _Tensor:
  return _Tensor(hf_name, path, tuple(hf_shape), tuple(shape), True)


def _to_param(t: _Tensor, w: np.ndarray, dtype: np.dtype) -> np.ndarray:
  if t.linear:
    # [out, in] -> [in, out] -> split out into e.g. (heads, head_dim); one copying pass.
    return np.array(w.T, dtype=dtype, order="C").reshape(t.shape)
  return np.array(w, dtype=dtype, order="C")


def _from_param(t: _Tensor, p: np.ndarray) -> np.ndarray:
  if t.linear:
    n_in = t.hf_shape[1]
    return np.ascontiguousarray(p.reshape(n_in, -1).T)
  return np.ascontiguousarray(p)


def _t5_attention(prefix: str, path: tuple, c: T5Config) -> list[_Tensor]:
  e, h, d = c.d_model, c.num_heads, c.head_dim
  qkv = [_linear(f"{prefix}.{hf}.weight", path + (ours, "kernel"), (h * d, e), (e, h, d))
         for hf, ours in (("q", "query"), ("k", "key"), ("v", "value"))]
  return qkv + [_linear(f"{prefix}.o.weight", path + ("out", "kernel"), (e, h * d), (h, d, e))]


def _t5_mlp(prefix: str, path: tuple, c: T5Config) -> list[_Tensor]:
  e, f = c.d_model, c.d_ff
  return [_linear(f"{prefix}.wi_0.weight", path + ("wi_0", "kernel"), (f, e), (e, f)),
          _linear(f"{prefix}.wi_1.weight", path + ("wi_1", "kernel"), (f, e), (e, f)),
          _linear(f"{prefix}.wo.weight", path + ("wo", "kernel"), (e, f), (f, e))]


def _t5_tensors(c: T5Config) -> list[_Tensor]:
  e = (c.d_model,)
  out = [_copy("shared.weight", ("token_embedder", "embedding"), (c.vocab_size, c.d_model))]
  for stack, n in (("encoder", c.num_encoder_layers), ("decoder", c.num_decoder_layers)):
    # NOTE: HF stores the stack's one bias table in block 0 only; every layer shares it.
    out.append(_copy(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                     (f"{stack}_relpos", "rel_embedding"), (c.relative_buckets, c.num_heads)))
    for i in range(n):
      b, p = f"{stack}.block.{i}.layer", f"{stack}_layers_{i}"
      if stack == "encoder":
        out += [_copy(f"{b}.0.layer_norm.weight", (p, "pre_attention_norm", "scale"), e),
                *_t5_attention(f"{b}.0.SelfAttention", (p, "attention"), c),
                _copy(f"{b}.1.layer_norm.weight", (p, "pre_mlp_norm", "scale"), e),
                *_t5_mlp(f"{b}.1.DenseReluDense", (p, "mlp"), c)]
      else:
        out += [_copy(f"{b}.0.layer_norm.weight", (p, "pre_self_attention_norm", "scale"), e),
                *_t5_attention(f"{b}.0.SelfAttention", (p, "self_attention"), c),
                _copy(f"{b}.1.layer_norm.weight", (p, "pre_cross_attention_norm", "scale"), e),
                *_t5_attention(f"{b}.1.EncDecAttention", (p, "encoder_decoder_attention"), c),
                _copy(f"{b}.2.layer_norm.weight", (p, "pre_mlp_norm", "scale"), e),
                *_t5_mlp(f"{b}.2.DenseReluDense", (p, "mlp"), c)]
    out.append(_copy(f"{stack}.final_layer_norm.weight", (f"{stack}_norm", "scale"), e))
  if not c.tie_embeddings:
    out.append(_linear("lm_head.weight", ("logits_dense", "kernel"), (c.vocab_size, c.d_model),
                       (c.d_model, c.vocab_size)))
  return out


def _decoder_tensors(c: DecoderConfig) -> list[_Tensor]:
  e, h, k, d, f = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.d_ff
  out = [_copy("model.embed_tokens.weight", ("embed_tokens", "embedding"), (c.vocab_size, e))]
  for i in range(c.num_layers):
    m, p = f"model.layers.{i}", f"blocks_{i}"
    a = (p, "attention")
    out += [
        _copy(f"{m}.input_layernorm.weight", (p, "input_norm", "scale"), (e,)),
        _linear(f"{m}.self_attn.q_proj.weight", a + ("q_proj", "kernel"), (h * d, e), (e, h, d)),
        _linear(f"{m}.self_attn.k_proj.weight", a + ("k_proj", "kernel"), (k * d, e), (e, k, d)),
        _linear(f"{m}.self_attn.v_proj.weight", a + ("v_proj", "kernel"), (k * d, e), (e, k, d)),
        _linear(f"{m}.self_attn.o_proj.weight", a + ("o_proj", "kernel"), (e, h * d), (h, d, e)),
        _copy(f"{m}.post_attention_layernorm.weight", (p, "post_attention_norm", "scale"), (e,)),
        _linear(f"{m}.mlp.gate_proj.weight", (p, "mlp", "gate_proj", "kernel"), (f, e), (e, f)),
        _linear(f"{m}.mlp.up_proj.weight", (p, "mlp", "up_proj", "kernel"), (f, e), (e, f)),
        _linear(f"{m}.mlp.down_proj.weight", (p, "mlp", "down_proj", "kernel"), (e, f), (f, e)),
    ]
  out.append(_copy("model.norm.weight", ("final_norm", "scale"), (e,)))
  if not c.tie_embeddings:
    out.append(_linear("lm_head.weight", ("lm_head", "kernel"), (c.vocab_size, e),
                       (e, c.vocab_size)))
  return out


def _tensors(config: ModelConfig) -> list[_Tensor]:
  if isinstance(config, T5Config):
    return _t5_tensors(config)
  if isinstance(config, DecoderConfig):
    return _decoder_tensors(config)
  raise TypeError(f"unknown model config {type(config).__name__}")


def _aliases(config: ModelConfig) -> dict[str, tuple[str, ...]]:
  """Other names a tensor may be stored under when its usual name is absent."""
  if isinstance(config, T5Config):
    # NOTE: the three T5 embeddings are one tied tensor; a saver may keep any one name.
    return {"shared.weight": ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")}
  return {}


class _Extra(NamedTuple):
  """A stored tensor the model does not use, accepted and ignored."""

  match: Callable[[str], bool]
  shape: Optional[tuple]  # required shape, None for any
  copy_of: Optional[str] = None  # it must then equal this (tied) tensor, as HF ties them


def _harmless(config: ModelConfig) -> list[_Extra]:
  """Extra tensors that HF checkpoints carry and loading may ignore."""
  if isinstance(config, T5Config):
    emb = (config.vocab_size, config.d_model)
    out = [_Extra(lambda n: n in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"),
                  emb, "shared.weight"),
           # Old HF T5 saves kept an unused bias table on block 0's cross-attention.
           _Extra(lambda n: n == "decoder.block.0.layer.1.EncDecAttention."
                  "relative_attention_bias.weight", (config.relative_buckets, config.num_heads))]
    if config.tie_embeddings:
      out.append(_Extra(lambda n: n == "lm_head.weight", emb, "shared.weight"))
    return out
  rotary = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
  out = [_Extra(lambda n: rotary.fullmatch(n) is not None, None)]
  if config.tie_embeddings:
    out.append(_Extra(lambda n: n == "lm_head.weight", (config.vocab_size, config.d_model),
                      "model.embed_tokens.weight"))
  return out


# ---- public API ----------------------------------------------------------------


def _resolve_dtype(dtype: DTypeLike) -> tuple[str, np.dtype]:
  if dtype is None:
    return "float32", _PARAM_DTYPES["float32"]
  try:
    np_dtype = np.dtype(dtype)
  except TypeError:
    np_dtype = None
  for name, d in _PARAM_DTYPES.items():
    if np_dtype == d or dtype == name:
      return name, d
  raise UserError(f"unsupported param dtype {dtype!r} (use one of {', '.join(_PARAM_DTYPES)})")


def _set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get_leaf(tree: Any, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def _tree_diff(got: Params, want: Params) -> list[str]:
  """Human-readable differences in structure or leaf shapes of two param trees."""
  flat_got = {jax.tree_util.keystr(k): np.shape(v)
              for k, v in jax.tree_util.tree_flatten_with_path(got)[0]}
  flat_want = {jax.tree_util.keystr(k): tuple(v.shape)
               for k, v in jax.tree_util.tree_flatten_with_path(want)[0]}
  diff = [f"missing {k}" for k in sorted(flat_want.keys() - flat_got.keys())]
  diff += [f"unexpected {k}" for k in sorted(flat_got.keys() - flat_want.keys())]
  diff += [f"{k}: shape {flat_got[k]} != {flat_want[k]}"
           for k in sorted(flat_got.keys() & flat_want.keys()) if flat_got[k] != flat_want[k]]
  if not diff and jax.tree.structure(got) != jax.tree.structure(want):
    diff.append(f"tree structure {jax.tree.structure(got)} != {jax.tree.structure(want)}")
  return diff


def _preview(names: list[str], k: int = 5) -> str:
  shown = ", ".join(repr(n) for n in names[:k])
  return shown + (f" and {len(names) - k} more" if len(names) > k else "")


def _read_config_json(path: str) -> tuple[str, dict]:
  """(path of config.json, its parsed contents) of an HF checkpoint directory."""
  if not os.path.isdir(path):
    raise UserError(f"HF checkpoint directory not found: {path}")
  config_path = os.path.join(path, CONFIG_FILE)
  try:
    with open(config_path) as f:
      return config_path, json.load(f)
  except FileNotFoundError:
    raise UserError(f"no {CONFIG_FILE} in HF checkpoint directory {path}: {config_path}") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{config_path}: invalid JSON ({e})") from None


def _config_of(config_json: dict, config_path: str) -> ModelConfig:
  """`config_from_hf`, its errors naming the file instead of "config.json"; ids as below.

  A directory holding a tokenizer (the first vocabulary file of
  HF_VOCAB_FILES) takes its special ids from the tokenizer's files; they must
  agree with the bos/eos ids config.json states (one line naming both).
  """
  try:
    config = config_from_hf(config_json)
  except UserError as e:
    msg = str(e)
    if msg.startswith(CONFIG_FILE):
      msg = config_path + msg[len(CONFIG_FILE):]
    raise UserError(msg) from None
  tokens = _tokenizer_tokens(os.path.dirname(config_path))
  if tokens is None:
    return config
  for name, key in (("eos_id", "eos_token_id"), ("bos_id", "bos_token_id")):
    stated = config_json.get(key)
    if stated is not None and getattr(tokens, name) not in (
        stated if isinstance(stated, list) else [stated]):
      raise UserError(f"{config_path} has {key}={stated} but the tokenizer beside it has "
                      f"{name}={getattr(tokens, name)} ({tokens.describe()})")
  try:
    return dataclasses.replace(config, tokens=tokens)
  except UserError as e:
    raise UserError(f"{config_path}: {e}") from None


def _tokenizer_tokens(path: str) -> Optional[SpecialTokens]:
  """The SpecialTokens of an HF directory's tokenizer files.

  None: no tokenizer, or a tokenizer.json whose special tokens no file names
  (config.json's ids are then the model's).
  """
  from realign_jax.data import vocab as vocab_lib  # NOTE: lazy, as the binaries import it
  for name in HF_VOCAB_FILES:
    file = os.path.join(path, name)
    if not os.path.isfile(file):
      continue
    if name == vocab_lib.HF_TOKENIZER_FILE and not any(
        os.path.isfile(os.path.join(path, f)) for f in vocab_lib.HF_SPECIAL_FILES):
      return None
    return vocab_lib.special_tokens_of(file)
  return None


def is_hf_dir(path: str) -> bool:
  """Whether `path` is an HF checkpoint directory (config.json + safetensors weights).

  A run directory written by realign_jax (it has model.json) is not one, even
  if it also holds HF files.
  """
  return (os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))
          and not os.path.exists(os.path.join(path, "model.json"))
          and (os.path.isfile(os.path.join(path, SINGLE_FILE))
               or os.path.isfile(os.path.join(path, INDEX_FILE))))


def hf_model_config(path: str) -> ModelConfig:
  """The model config of an HF checkpoint directory (float32 params), weights unread.

  The counterpart of `manager.read_model_json` for a directory where
  `is_hf_dir(path)`; its output head is "lm".
  """
  config_path, config_json = _read_config_json(path)
  return _config_of(config_json, config_path)


# The vocabulary file of an HF directory, in order of preference.
HF_VOCAB_FILES = ("spiece.model", "tokenizer.model", "tokenizer.json")


def hf_vocabulary(path: str) -> Optional[dict]:
  """{"path", "sha256"} of an HF directory's vocabulary file, as model.json records one.

  The counterpart of `run_dir.recorded_vocabulary` for an HF directory: the
  first of spiece.model, tokenizer.model, tokenizer.json that it holds; None
  when it holds none.
  """
  import hashlib
  for name in HF_VOCAB_FILES:
    file = os.path.join(path, name)
    if os.path.isfile(file):
      try:
        with open(file, "rb") as f:
          return {"path": file, "sha256": hashlib.sha256(f.read()).hexdigest()}
      except OSError as e:
        raise UserError(f"cannot read {file}: {e.strerror}") from None
  return None


def hf_vocabularies(path: str) -> list[dict]:
  """{"path", "sha256"} of every vocabulary file an HF directory holds (HF_VOCAB_FILES order).

  Each is the directory's vocabulary: a tokenizer.json and a tokenizer.model
  beside it are the fast and slow forms of one tokenizer.
  """
  import hashlib
  out = []
  for name in HF_VOCAB_FILES:
    file = os.path.join(path, name)
    if os.path.isfile(file):
      try:
        with open(file, "rb") as f:
          out.append({"path": file, "sha256": hashlib.sha256(f.read()).hexdigest()})
      except OSError as e:
        raise UserError(f"cannot read {file}: {e.strerror}") from None
  return out


def hf_params(path: str, abstract_params: Params) -> Params:
  """An HF checkpoint's params placed like `abstract_params` (the `load_params` twin).

  Args:
    path: an HF checkpoint directory (`is_hf_dir`).
    abstract_params: tree of jax.ShapeDtypeStruct, with shardings where the
      caller wants them, of `LanguageModel(hf_model_config(path))`.

  Returns:
    The params as jax arrays, each leaf in its abstract dtype and sharding.
  """
  config, params = load_hf_checkpoint(path)
  # NOTE: HF checkpoints hold layers one by one; a scanned model gets them stacked.
  params = layout_lib.to_layout(params, config, layout_lib.detect(abstract_params, config))
  diff = _tree_diff(params, abstract_params)
  if diff:
    raise UserError(f"HF checkpoint {path} does not fit the model it is used for: "
                    + "; ".join(diff[:3]))
  for key, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    # NOTE: as `load_params` refuses a run's non-finite params, so is an HF one refused.
    if not np.isfinite(leaf).all():
      raise UserError(f"HF checkpoint {path} holds non-finite values in parameter "
                      f"{jax.tree_util.keystr(key)}; refusing to use it")

  def place(x, s):
    x = np.asarray(x, dtype=s.dtype)
    sharding = getattr(s, "sharding", None)
    return jax.device_put(x, sharding) if sharding is not None else jax.numpy.asarray(x)
  return jax.tree.map(place, params, abstract_params)


def _t5_tie_hint(c: dict) -> str:
  """Why a T5 config ties (and scales) the head, for the lm_head-differs error."""
  if "scale_decoder_outputs" in c:
    return (" (scale_decoder_outputs is true: transformers 5.x ties and rescales the head; "
            "a T5.1.1/flan-t5 checkpoint with its own lm_head has scale_decoder_outputs false)")
  if "tie_word_embeddings" in c:
    return (" (tie_word_embeddings is true and there is no scale_decoder_outputs field: "
            "transformers 4.x ties and rescales the head; a T5.1.1/flan-t5 checkpoint "
            "has tie_word_embeddings false)")
  return " (tie_word_embeddings defaults to true for HF T5 when config.json omits it)"


def load_hf_checkpoint(path: str, *, dtype: DTypeLike = None) -> tuple[ModelConfig, Params]:
  """Imports an HF safetensors checkpoint directory.

  Args:
    path: directory with config.json and model.safetensors (or
      model.safetensors.index.json plus its shards).
    dtype: param dtype: "float32" (default), "bfloat16" or "float16" (or the
      numpy/jax dtype). It becomes the returned config's `param_dtype`, and
      every leaf gets the dtype `LanguageModel(config).init` gives it under
      that config (the models currently keep RMSNorm scales in float32).

  Returns:
    (config, params): params is a nested dict of host numpy arrays with
    exactly the structure, shapes and dtypes of
    `LanguageModel(config).init(rng)[0]`.

  Raises:
    UserError: missing/unreadable files, an unsupported config, a missing or
      unexpected tensor, or a tensor whose shape disagrees with config.json.
  """
  config_path, config_json = _read_config_json(path)
  dtype_name, np_dtype = _resolve_dtype(dtype)
  config = _config_of(config_json, config_path)
  config = dataclasses.replace(config, param_dtype=dtype_name)

  entries, source = _checkpoint_entries(path)
  specs = _tensors(config)
  aliases = dict(_aliases(config))
  if isinstance(config, T5Config) and not config.tie_embeddings:
    aliases["lm_head.weight"] = _t5_head_aliases(config_json)
  used: dict[str, str] = {}  # our spec's hf_name -> the stored name it is read from
  missing = []
  for t in specs:
    name = next((n for n in (t.hf_name, *aliases.get(t.hf_name, ())) if n in entries), None)
    if name is None:
      missing.append(t.hf_name)
    else:
      used[t.hf_name] = name
  if missing:
    raise UserError(f"{source}: missing tensor {_preview(missing)} "
                    f"({len(missing)} missing in all, for {type(config).__name__})")
  harmless = _harmless(config)
  stored_used = set(used.values())
  unexpected, copies = [], []
  for name in sorted(entries):
    if name in stored_used:
      continue
    rule = next((r for r in harmless if r.match(name)), None)
    if rule is None:
      unexpected.append(name)
    elif rule.shape is not None and entries[name].shape != rule.shape:
      raise UserError(f"{entries[name].file}: tensor {name!r} has shape "
                      f"{list(entries[name].shape)}, expected {list(rule.shape)}")
    elif rule.copy_of is not None:
      copies.append((name, used[rule.copy_of]))
  if unexpected:
    raise UserError(f"{source}: unexpected tensor {_preview(unexpected)} "
                    f"({len(unexpected)} unexpected in all, for {type(config).__name__} "
                    f"from {config_path})")
  for t in specs:
    e = entries[used[t.hf_name]]
    if e.shape != t.hf_shape:
      raise UserError(f"{e.file}: tensor {used[t.hf_name]!r} has shape {list(e.shape)}, "
                      f"expected {list(t.hf_shape)} from {config_path}")
    if e.dtype not in _FLOAT_TAGS:
      raise UserError(f"{e.file}: tensor {used[t.hf_name]!r} has dtype {e.dtype}, expected a "
                      "floating-point dtype")

  for name, tied in copies:
    # NOTE: HF would silently replace `name` by `tied`; a different stored value
    # means config.json's tying does not describe how the model was trained.
    if not np.array_equal(_read_entry(entries[name]), _read_entry(entries[tied])):
      hint = ""
      if name == "lm_head.weight" and isinstance(config, T5Config):
        hint = _t5_tie_hint(config_json)
      raise UserError(f"{entries[name].file}: tensor {name!r} differs from {tied!r}, which "
                      f"{config_path} ties it to{hint}")

  want = LanguageModel(config).abstract_init()[0]
  maps: dict[str, np.ndarray] = {}
  params: dict = {}
  for t in specs:
    e = entries[used[t.hf_name]]
    if e.file not in maps:
      maps[e.file] = np.memmap(e.file, dtype=np.uint8, mode="r")
    try:
      # NOTE: the dtype init gives this leaf under param_dtype=`dtype` (the models
      # keep e.g. RMSNorm scales in float32), so params match init exactly.
      leaf_dtype = np.dtype(_get_leaf(want, t.path).dtype)
    except (KeyError, TypeError):
      leaf_dtype = np_dtype  # reported by the structure check below
    _set(params, t.path, _to_param(t, _read_entry(e, maps[e.file]), leaf_dtype))
  del maps

  diff = _tree_diff(params, want)
  if diff:
    # NOTE: shapes were checked against config.json above, so this is a bug in the
    # name map (or a model change it was not updated for), not bad input.
    raise RuntimeError(f"HF import produced params that do not fit {type(config).__name__}: "
                       + "; ".join(diff[:10]))
  return config, params


def hf_state_dict(config: ModelConfig, params: Params) -> dict[str, np.ndarray]:
  """Our params (either layer layout) as HF-named tensors in the HF layout (dtype preserved)."""
  config = dataclasses.replace(config, scan_layers=False)
  params = layout_lib.to_unrolled(params, config)
  want = LanguageModel(config).abstract_init()[0]
  diff = _tree_diff(params, want)
  if diff:
    raise UserError(f"params do not fit {type(config).__name__} (export takes the 'lm' head "
                    f"params only): {'; '.join(diff[:10])}")
  return {t.hf_name: _from_param(t, np.asarray(_get_leaf(params, t.path)))
          for t in _tensors(config)}


def _shard_plan(tensors: dict[str, np.ndarray], max_shard_bytes: Optional[int]
                ) -> list[list[str]]:
  """Tensor names per shard: in name order, a new shard when the next would pass the limit."""
  names = sorted(tensors)
  if max_shard_bytes is None:
    return [names]
  shards: list[list[str]] = [[]]
  size = 0
  for name in names:
    n = tensors[name].nbytes
    if shards[-1] and size + n > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += n
  return shards


def write_hf_weights(directory: str, tensors: dict[str, np.ndarray],
                     max_shard_bytes: Optional[int] = None) -> list[str]:
  """Writes `tensors` as model.safetensors, or as shards plus model.safetensors.index.json.

  Shards follow transformers' naming (model-00001-of-00003.safetensors); a
  tensor larger than the limit gets a shard of its own. Returns the files
  written.
  """
  plan = _shard_plan(tensors, max_shard_bytes)
  if len(plan) == 1:
    write_safetensors(os.path.join(directory, SINGLE_FILE), tensors, metadata={"format": "pt"})
    return [SINGLE_FILE]
  files, weight_map = [], {}
  for i, names in enumerate(plan):
    file = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
    write_safetensors(os.path.join(directory, file), {n: tensors[n] for n in names},
                      metadata={"format": "pt"})
    weight_map.update({n: file for n in names})
    files.append(file)
  index = {"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))},
           "weight_map": weight_map}
  with open(os.path.join(directory, INDEX_FILE), "w") as f:
    json.dump(index, f, indent=2, sort_keys=True)
    f.write("\n")
  return files + [INDEX_FILE]


def replace_dir(tmp: str, path: str) -> None:
  """Renames the complete directory `tmp` to `path`; an old `path` is moved away first."""
  parent = os.path.dirname(path)
  if os.path.lexists(path):
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
    os.rename(path, os.path.join(old, "x"))
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(tmp, path)


def export_hf_checkpoint(config: ModelConfig, params: Params, path: str, *,
                         overwrite: bool = False, max_shard_bytes: Optional[int] = None,
                         extra_files: Optional[dict[str, str]] = None) -> None:
  """Writes config.json + model.safetensors in the HF layout, atomically.

  The files go to a temporary directory next to `path` that is then renamed
  to `path`, so readers never see a half-written checkpoint. Params keep
  their dtype (float32, bfloat16 or float16).

  Args:
    config: the model config.
    params: params of `LanguageModel(config)` ("lm" head).
    path: destination directory; must not exist unless `overwrite`.
    overwrite: replace an existing `path`.
    max_shard_bytes: split the weights into shards of at most this many bytes
      (plus an index); None writes one model.safetensors.
    extra_files: name in `path` -> file to copy there (e.g. tokenizer files).
  """
  path = os.path.abspath(path)
  if os.path.lexists(path) and not overwrite:
    raise UserError(f"export destination already exists: {path} (pass overwrite=True)")
  tensors = hf_state_dict(config, params)
  dtypes = {a.dtype for a in tensors.values()}
  names = {v: k for k, v in _PARAM_DTYPES.items()}
  torch_dtype = names.get(dtypes.pop(), "float32") if len(dtypes) == 1 else "float32"
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  try:
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(config_to_hf(config, torch_dtype), f, indent=2, sort_keys=True)
      f.write("\n")
    write_hf_weights(tmp, tensors, max_shard_bytes)
    for name, source in sorted((extra_files or {}).items()):
      shutil.copyfile(source, os.path.join(tmp, name))
    os.chmod(tmp, 0o755)
    replace_dir(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
