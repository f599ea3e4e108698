"""Model configurations for both families.

The defaults are the `tiny` sizes used by tests and CPU runs; the published
sizes live as gin fragments under `gin/models/` (t5x convention), which bind
the fields of these dataclasses.
"""

import dataclasses
from typing import Optional, Union

import gin

from realign_jax.plumbing.errors import UserError

ATTENTION_IMPLS = ("einsum", "dot_product")
REMAT_POLICIES = ("none", "dots_saveable", "full")


def check_choice(what: str, value, valid) -> None:
  """One-line UserError unless `value` is one of `valid`."""
  if value not in valid:
    raise UserError(f"{what} {value!r} is not one of: {', '.join(valid)}")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  """The special token ids of a model and its tokenizer: the one place they are defined.

  Recorded in model.json next to the config (`special_tokens`); an HF
  directory's come from its tokenizer files (or config.json). The defaults are
  T5's (pad 0, eos 1, no bos), which every run directory written before the
  ids were recorded used. The data pipeline pads with `pad_id`, ends targets
  with `eos_id` and starts prompts with `bos_id` when there is one; the
  sampler never samples `pad_id`, stops at `eos_id` and fills with `pad_id`;
  every loss, mask and reward reads the same ids.

  `pad_id` is never a token of a response (the sampler masks it), so it must
  differ from `eos_id` and `bos_id`. A tokenizer without a pad token (Llama,
  Mistral), or whose pad token is its eos (Zephyr), pads with its unk id, a
  token a trained model does not emit (`vocab.special_tokens_from_names`).
  """

  pad_id: int = 0
  eos_id: int = 1
  bos_id: Optional[int] = None

  def __post_init__(self):
    for name in ("pad_id", "eos_id", "bos_id"):
      v = getattr(self, name)
      if v is None and name == "bos_id":
        continue
      if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise UserError(f"SpecialTokens.{name} must be an integer >= 0, got {v!r}")
    if self.pad_id in (self.eos_id, self.bos_id):
      raise UserError(f"SpecialTokens.pad_id={self.pad_id} is also the "
                      f"{'eos' if self.pad_id == self.eos_id else 'bos'} id: padding is never a "
                      "token of a sequence, so it needs an id of its own")

  def describe(self) -> str:
    return f"pad_id={self.pad_id}, eos_id={self.eos_id}, bos_id={self.bos_id}"


def _check_tokens(config) -> None:
  if not isinstance(config.tokens, SpecialTokens):
    raise UserError(f"{type(config).__name__}.tokens must be a SpecialTokens, got "
                    f"{config.tokens!r}")
  t = config.tokens
  top = max(i for i in (t.pad_id, t.eos_id, t.bos_id) if i is not None)
  if top >= config.vocab_size:
    raise UserError(f"{type(config).__name__}: special token id {top} ({t.describe()}) is "
                    f"outside the vocabulary (vocab_size={config.vocab_size})")


def _check_execution_fields(config) -> None:
  check_choice(f"{type(config).__name__}.remat_policy", config.remat_policy, REMAT_POLICIES)
  check_choice(f"{type(config).__name__}.attention_impl", config.attention_impl,
               ATTENTION_IMPLS)
  if not isinstance(config.scan_layers, bool):
    raise UserError(f"{type(config).__name__}.scan_layers must be True or False, got "
                    f"{config.scan_layers!r}")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class T5Config:
  """T5.1.1-style encoder-decoder."""

  vocab_size: int = 2048
  d_model: int = 128
  num_heads: int = 4
  head_dim: int = 32
  d_ff: int = 256
  num_encoder_layers: int = 2
  num_decoder_layers: int = 2
  dropout_rate: float = 0.0
  tie_embeddings: bool = False
  relative_buckets: int = 32
  relative_max_distance: int = 128
  rms_eps: float = 1e-6
  dtype: str = "float32"  # activations: float32 | bfloat16
  param_dtype: str = "float32"
  scan_layers: bool = False  # params stacked on a leading `layers` axis (layout.py)
  remat_policy: str = "none"  # REMAT_POLICIES
  attention_impl: str = "einsum"  # ATTENTION_IMPLS
  tokens: SpecialTokens = SpecialTokens()  # NOTE: T5 hard-codes 0 as the decoder start id

  def __post_init__(self):
    _check_execution_fields(self)
    _check_tokens(self)

  @property
  def family(self) -> str:
    return "t5"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Decoder-only transformer in the Llama/Mistral architecture."""

  vocab_size: int = 2048
  d_model: int = 128
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  d_ff: int = 384
  num_layers: int = 2
  rope_theta: float = 10000.0
  rms_eps: float = 1e-5
  tie_embeddings: bool = False
  dropout_rate: float = 0.0
  sliding_window: Optional[int] = None
  max_length: int = 4096
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat_policy: str = "none"
  attention_impl: str = "einsum"
  tokens: SpecialTokens = SpecialTokens()

  def __post_init__(self):
    _check_execution_fields(self)
    _check_tokens(self)

  @property
  def family(self) -> str:
    return "decoder"


ModelConfig = Union[T5Config, DecoderConfig]


def layout(config: ModelConfig) -> str:
  """The parameter layout: "scanned" (stacked layers) or "unrolled"."""
  return "scanned" if config.scan_layers else "unrolled"


def replace(config: ModelConfig, **kwargs) -> ModelConfig:
  return dataclasses.replace(config, **kwargs)
