"""Parameter layouts: unrolled layers and scanned (stacked) layers.

Unrolled: one subtree per layer, `encoder_layers_0`, `encoder_layers_1`, ...
(T5 encoder), `decoder_layers_i` (T5 decoder), `blocks_i` (decoder-only).
Scanned: one subtree per stack (`encoder_layers`, `decoder_layers`,
`blocks`) whose leaves carry a leading `layers` axis of length L; leaf
[i] of the scanned tree is layer i of the unrolled one. Everything outside
the stacks (embeddings, norms, heads, relative-position tables) is shared.

`to_scanned` / `to_unrolled` convert a param tree (or a tree of logical
ShapeDtypeStructs, whose NamedShardings gain or lose the leading axis)
between the two; `convert` goes to a
config's layout from a named one. `model.json` records the layout of a
checkpoint (`"layout"`), see checkpoints/manager.py.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from realign_jax.models.config import ModelConfig, layout
from realign_jax.plumbing.errors import UserError

LAYOUTS = ("unrolled", "scanned")


def stacks(config: ModelConfig) -> tuple:
  """(name, number of layers) of every layer stack of the family."""
  if config.family == "t5":
    return (("encoder_layers", config.num_encoder_layers),
            ("decoder_layers", config.num_decoder_layers))
  return (("blocks", config.num_layers),)


def _sharding_with(sharding, add: bool):
  """A NamedSharding with a leading unsharded axis added (or the leading axis removed)."""
  if not isinstance(sharding, NamedSharding):
    return None
  spec = tuple(sharding.spec)
  spec = (None,) + spec if add else spec[1:]
  return NamedSharding(sharding.mesh, P(*spec))


def _stack_leaves(trees):
  def stack(*xs):
    if isinstance(xs[0], jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct((len(xs),) + tuple(xs[0].shape), xs[0].dtype,
                                  sharding=_sharding_with(xs[0].sharding, add=True))
    if isinstance(xs[0], np.ndarray):
      return np.stack(xs)
    return jnp.stack(xs)
  return jax.tree_util.tree_map(stack, *trees)


def _unstack_leaves(tree, n: int):
  def take(i):
    def f(x):
      if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype,
                                    sharding=_sharding_with(x.sharding, add=False))
      return x[i]
    return jax.tree_util.tree_map(f, tree)
  return [take(i) for i in range(n)]


def detect(params, config: ModelConfig) -> str:
  """The layout a param tree is in, from its top-level names."""
  name, _ = stacks(config)[0]
  if name in params:
    return "scanned"
  if f"{name}_0" in params:
    return "unrolled"
  raise ValueError(f"params hold neither {name!r} nor {name + '_0'!r}: not a "
                   f"{config.family} param tree")


def to_scanned(params, config: ModelConfig) -> Any:
  """Unrolled params -> scanned: layer subtrees stacked on a new leading axis."""
  if detect(params, config) == "scanned":
    return params
  out = dict(params)
  for name, n in stacks(config):
    out[name] = _stack_leaves([out.pop(f"{name}_{i}") for i in range(n)])
  return out


def to_unrolled(params, config: ModelConfig) -> Any:
  """Scanned params -> unrolled: the leading `layers` axis split into L subtrees."""
  if detect(params, config) == "unrolled":
    return params
  out = dict(params)
  for name, n in stacks(config):
    stacked = out.pop(name)
    for i, layer in enumerate(_unstack_leaves(stacked, n)):
      out[f"{name}_{i}"] = layer
  return out


def to_layout(params, config: ModelConfig, name: str) -> Any:
  """`params` (either layout) in layout `name` ("unrolled" | "scanned")."""
  if name not in LAYOUTS:
    raise UserError(f"unknown parameter layout {name!r}; known: {', '.join(LAYOUTS)}")
  return to_scanned(params, config) if name == "scanned" else to_unrolled(params, config)


def convert(params, config: ModelConfig) -> Any:
  """`params` (either layout) in the layout `config` asks for (`scan_layers`)."""
  return to_layout(params, config, layout(config))
