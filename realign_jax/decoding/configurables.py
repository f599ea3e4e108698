"""Gin surface of the decoding package (imported by `gin_utils.register()`)."""

import gin


def register() -> None:
  from realign_jax.decoding import sampler, transfer_q
  # NOTE: decode.py registers SamplingConfig itself; skip it here if already known.
  try:
    gin.external_configurable(sampler.SamplingConfig, "SamplingConfig")
  except ValueError:
    pass
  gin.external_configurable(transfer_q.TQConfig, "TQConfig")
