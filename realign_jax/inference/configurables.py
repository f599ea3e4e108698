"""Gin surface of the inference package (imported by `gin_utils.register()`).

The decoding methods, each registered once under its class name:
`decode.method = @TokenwiseCD()`, `TokenwiseCD.beta = 0.5`.
"""

import gin

from realign_jax.inference.methods_cd import BlockwiseCD, TokenwiseCD
from realign_jax.inference.methods_dera import DeRa
from realign_jax.inference.methods_tq import ARGS, TransferQ

METHODS = (DeRa, TokenwiseCD, BlockwiseCD, TransferQ, ARGS)


def register() -> None:
  for cls in METHODS:
    gin.external_configurable(cls, cls.__name__)
