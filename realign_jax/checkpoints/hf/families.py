"""The tensor map of a model config: T5 (`t5.py`) or Llama/Mistral (`llama.py`)."""

from realign_jax.checkpoints.hf import llama, t5
from realign_jax.checkpoints.hf.tensor_map import Extra, Tensor
from realign_jax.models.config import DecoderConfig, ModelConfig, T5Config


def tensors(config: ModelConfig) -> list[Tensor]:
  """Every tensor an HF checkpoint of `config` holds, each with its param leaf."""
  if isinstance(config, T5Config):
    return t5.tensors(config)
  if isinstance(config, DecoderConfig):
    return llama.tensors(config)
  raise TypeError(f"unknown model config {type(config).__name__}")


def aliases(config: ModelConfig) -> dict[str, tuple[str, ...]]:
  """Other names a tensor may be stored under when its usual name is absent."""
  if isinstance(config, T5Config):
    return t5.aliases()
  return {}


def harmless(config: ModelConfig) -> list[Extra]:
  """Extra tensors that HF checkpoints carry and loading may ignore."""
  if isinstance(config, T5Config):
    return t5.harmless(config)
  return llama.harmless(config)
