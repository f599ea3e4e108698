"""Mesh, logical axis rules and shardings (t5x conventions, jit only, no pmap).

Parameters carry logical axis names (`embed`, `vocab`, `heads`, `kv_heads`,
`kv`, `mlp`, `relpos_buckets`, and `layers` for scanned stacks); activations use `batch` and `act_*` names.
Keeping the two vocabularies apart is what makes FSDP a one-line change:
`fsdp=True` shards the parameters' `embed` axis over `data` while activations
stay batch-sharded.

Several hosts are set up by `parallel/multihost.py` (SLURM, TPU pods, explicit
coordinator flags; launchers under scripts/).
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from realign_jax.plumbing.errors import UserError

DATA, MODEL = "data", "model"


@gin.configurable
def logical_axis_rules(fsdp: bool = False) -> tuple:
  """Logical -> mesh axis table."""
  return (
      ("batch", DATA),
      ("vocab", MODEL),
      ("heads", MODEL),
      ("kv_heads", MODEL),
      ("mlp", MODEL),
      ("embed", DATA if fsdp else None),
      ("kv", None),
      ("relpos_buckets", None),
      # NOTE: the stacked axis of scanned layers stays whole: the scan slices
      # one layer per iteration on every device.
      ("layers", None),
      ("act_length", None),
      ("act_embed", None),
      ("act_heads", MODEL),
      ("act_kv", None),
      ("act_mlp", MODEL),
      ("act_vocab", MODEL),
  )


@gin.configurable
def create_mesh(data: int = -1, model: int = 1,
                devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A (data, model) mesh over `devices` (default: all). data=-1 takes the rest."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if not isinstance(model, int) or model < 1 or n % model:
    raise UserError(f"mesh model axis {model} does not divide the {n} devices; use a divisor "
                    f"of {n}")
  if data == -1:
    data = n // model
  if not isinstance(data, int) or data * model != n:
    raise UserError(f"mesh {data}x{model} (data x model) does not cover the {n} devices; use "
                    f"data={n // model} (or -1) with model={model}")
  try:
    from jax.experimental import mesh_utils
    arr = mesh_utils.create_device_mesh((data, model), devices=devices)
  except Exception:  # NOTE: CPU/simulated devices have no physical topology.
    arr = np.asarray(devices).reshape(data, model)
  return Mesh(arr, (DATA, MODEL))


def logical_to_mesh_sharding(logical_specs, mesh: Mesh, rules) -> Any:
  """Tree of logical PartitionSpecs -> tree of NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over `data`, the rest replicated."""
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_divides(batch_size: int, mesh: Mesh, what: str = "batch size") -> None:
  """One-line UserError unless `batch_size` splits evenly over the mesh's `data` axis."""
  n = mesh.shape[DATA]
  if batch_size % n:
    lo = batch_size // n * n
    hint = f"{lo} or {lo + n}" if lo else f"{n}"
    raise UserError(f"{what} {batch_size} is not divisible by the mesh data axis ({n} devices); "
                    f"use a multiple of {n}, e.g. {hint}")


def shard_batch(batch, mesh: Mesh):
  """Places a host batch (dict of numpy arrays) on the mesh, split over `data`."""
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), batch)


def check_params_divide(abstract_params, axes, mesh: Mesh, rules,
                        what: str = "the model") -> None:
  """One-line UserError naming the first parameter dimension the mesh cannot split evenly.

  abstract_params: the params (anything with `.shape`); axes: their logical
  PartitionSpecs (e.g. a mesh `model` axis of 8 over a model with 2 kv heads).
  """
  shardings = logical_to_mesh_sharding(axes, mesh, rules)
  flat_axes = jax.tree_util.tree_structure(abstract_params).flatten_up_to(axes)
  for (path, x), names, sh in zip(jax.tree_util.tree_leaves_with_path(abstract_params),
                                  flat_axes, jax.tree_util.tree_leaves(shardings)):
    for dim, part in enumerate(tuple(sh.spec)[:len(x.shape)]):
      mesh_axes = part if isinstance(part, tuple) else (part,)
      n = int(np.prod([mesh.shape[a] for a in mesh_axes if a]))
      if x.shape[dim] % n:
        name = names[dim] if dim < len(names) else None
        raise UserError(
            f"{what}'s parameter {jax.tree_util.keystr(path)} has {x.shape[dim]} along its "
            f"'{name}' axis, which the mesh's {'x'.join(a for a in mesh_axes if a)} axis "
            f"({n} devices) cannot split evenly; use a mesh axis size that divides "
            f"{x.shape[dim]}")
