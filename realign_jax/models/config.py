"""Model configurations for both families.

The defaults are the `tiny` sizes used by tests and CPU runs; the published
sizes live as gin fragments under `gin/models/` (t5x convention), which bind
the fields of these dataclasses.
"""

import dataclasses
from typing import Optional, Union

import gin


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

  @property
  def family(self) -> str:
    return "decoder"


ModelConfig = Union[T5Config, DecoderConfig]


def replace(config: ModelConfig, **kwargs) -> ModelConfig:
  return dataclasses.replace(config, **kwargs)
