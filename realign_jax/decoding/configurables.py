"""Gin surface of the decoding package (imported by `gin_utils.register()`)."""

import gin


def register() -> None:
  # NOTE: lazy: the package loads only when a binary registers it (gin_utils.register()).
  from realign_jax.decoding import sampler, transfer_q
  gin.external_configurable(sampler.SamplingConfig, "SamplingConfig")
  gin.external_configurable(transfer_q.TQConfig, "TQConfig")
