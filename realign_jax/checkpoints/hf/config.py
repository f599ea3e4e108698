"""HF config.json <-> our model configs (`T5Config`, `DecoderConfig`).

T5 heads. transformers 4.x multiplies T5's decoder output by d_model**-0.5
exactly when `tie_word_embeddings` is true (original T5; T5.1.1 and flan-t5
store false and a separate `lm_head`). transformers 5.x keeps
`tie_word_embeddings` true and stores the rescale as `scale_decoder_outputs`,
a T5.1.1/flan-t5 `lm_head` still in the weights. Both are read: the rescale is
`scale_decoder_outputs` when present, else `tie_word_embeddings`; an unscaled
model's head is its stored `lm_head` (or, 5.x only, the shared matrix when
none is stored: `t5.head_aliases`). Export writes both fields.

Errors name "config.json"; `load.config_of` puts the file's path in its place.
"""

from typing import Any, Optional

from realign_jax.plumbing.errors import UserError
from realign_jax.models.config import DecoderConfig, ModelConfig, SpecialTokens, T5Config

_REQUIRED = object()
_T5_TYPES = ("t5", "mt5")  # NOTE: HF's MT5 is T5.1.1 with another vocabulary.


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
  as untied with a copy of it (see `t5.head_aliases`).
  """
  scale = c.get("scale_decoder_outputs")
  if scale is None:
    scale = _get(c, "tie_word_embeddings", True)  # HF T5 default: tied.
  if not isinstance(scale, bool):
    field = "scale_decoder_outputs" if "scale_decoder_outputs" in c else "tie_word_embeddings"
    raise UserError(f"config.json: {field}={scale!r} is not a boolean (true or false)")
  return scale


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
  holding a tokenizer takes the tokenizer's ids instead: `load.hf_model_config`).
  """
  if c.get("model_type") in _T5_TYPES:
    return SpecialTokens(pad_id=_token_id(c, "pad_token_id", 0),
                         eos_id=_token_id(c, "eos_token_id", 1), bos_id=None)
  bos = _token_id(c, "bos_token_id", 1)
  eos = _token_id(c, "eos_token_id", 2)
  pad = _token_id(c, "pad_token_id", None)
  if pad is None or pad in (eos, bos):
    pad = 0
  return SpecialTokens(pad_id=pad, eos_id=eos, bos_id=bos)


def _t5_from_hf(c: dict) -> T5Config:
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


def _decoder_from_hf(c: dict) -> DecoderConfig:
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
  window = c.get("sliding_window") if c.get("model_type") == "mistral" else None
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
  model_type = config_json.get("model_type")
  if model_type in _T5_TYPES:
    return _t5_from_hf(config_json)
  if model_type in ("llama", "mistral"):
    return _decoder_from_hf(config_json)
  raise UserError(f"config.json: unsupported model_type {model_type!r} (supported: 't5' or "
                  "'mt5' with gated-gelu, 'llama', 'mistral')")


def _t5_to_hf(config: T5Config, torch_dtype: str) -> dict:
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


def _decoder_to_hf(config: DecoderConfig, torch_dtype: str) -> dict:
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


def config_to_hf(config: ModelConfig, torch_dtype: str = "float32") -> dict:
  """The HF config.json for `config`; inverse of `config_from_hf`."""
  if isinstance(config, T5Config):
    return _t5_to_hf(config, torch_dtype)
  if isinstance(config, DecoderConfig):
    return _decoder_to_hf(config, torch_dtype)
  raise TypeError(f"unknown model config {type(config).__name__}")
