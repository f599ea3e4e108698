"""Model configurations for both families.

The defaults are the `tiny` sizes used by tests and CPU runs; the published
sizes live as gin fragments under `gin/models/` (t5x convention), which bind
the fields of these dataclasses.
"""

import dataclasses
from typing import Optional, Union

import gin

ATTENTION_IMPLS = ("einsum", "dot_product")
REMAT_POLICIES = ("none", "dots_saveable", "full")


def check_choice(what: str, value, valid) -> None:
  """One-line UserError unless `value` is one of `valid`."""
  from realign_jax.errors import UserError
  if value not in valid:
    raise UserError(f"{what} {value!r} is not one of: {', '.join(valid)}")


def _check_execution_fields(config) -> None:
  check_choice(f"{type(config).__name__}.remat_policy", config.remat_policy, REMAT_POLICIES)
  check_choice(f"{type(config).__name__}.attention_impl", config.attention_impl,
               ATTENTION_IMPLS)
  if not isinstance(config.scan_layers, bool):
    from realign_jax.errors import UserError
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

  def __post_init__(self):
    _check_execution_fields(self)

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

  def __post_init__(self):
    _check_execution_fields(self)

  @property
  def family(self) -> str:
    return "decoder"


ModelConfig = Union[T5Config, DecoderConfig]


def layout(config: ModelConfig) -> str:
  """The parameter layout: "scanned" (stacked layers) or "unrolled"."""
  return "scanned" if config.scan_layers else "unrolled"


def replace(config: ModelConfig, **kwargs) -> ModelConfig:
  return dataclasses.replace(config, **kwargs)
