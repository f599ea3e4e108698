"""Optimizer-state shardings from the parameters' logical axes (t5x's rule).

optax's state trees mirror the params: Adam's `mu` and `nu`, SGD's momentum
`trace`, Adafactor's `v`, `v_row` and `v_col` are each a tree with the params'
structure. Every leaf of such a subtree takes its parameter's logical axes:

  - a leaf of the param's shape: the param's axes (mu, nu, trace, Adafactor's
    unfactored second moment v);
  - a leaf of the param's shape less one dimension: the param's axes less that
    one (Adafactor's factored second moments v_row and v_col; where several
    dimensions could be the one dropped, equal sizes, the first is);
  - anything else (Adafactor's (1,) placeholders): replicated.

Leaves outside every params-shaped subtree (step counts, schedule states) are
replicated. Left to propagation from the initialisation, the whole state came
out replicated: under FSDP it held most of each device's argument bytes.
"""

from typing import Any

import jax
from jax.sharding import PartitionSpec as P

from realign_jax.parallel import partitioning


def _leaf_axes(leaf, param, names) -> P:
  """The logical axes of one state leaf mirroring `param` (logical axes `names`)."""
  shape, pshape = tuple(leaf.shape), tuple(param.shape)
  names = tuple(names) + (None,) * (len(pshape) - len(names))
  if shape == pshape:
    return P(*names)
  if len(shape) == len(pshape) - 1:
    for i in range(len(pshape)):
      if pshape[:i] + pshape[i + 1:] == shape:
        return P(*(names[:i] + names[i + 1:]))
  return P()


def logical_axes(opt_state, params, param_axes) -> Any:
  """`opt_state`'s tree of logical PartitionSpecs (see the module docstring).

  opt_state, params: trees of arrays, tracers or ShapeDtypeStructs (anything
  with `.shape`); param_axes: the params' logical PartitionSpecs.
  """
  treedef = jax.tree_util.tree_structure(params)
  param_leaves = treedef.flatten_up_to(params)
  axes_leaves = treedef.flatten_up_to(param_axes)

  def mirrors(node) -> bool:
    # NOTE: a bare leaf has the structure `*`; params are never a single leaf.
    return treedef.num_leaves > 1 and jax.tree_util.tree_structure(node) == treedef

  def axes_of(node):
    if not mirrors(node):
      return P()
    leaves = treedef.flatten_up_to(node)
    return treedef.unflatten([_leaf_axes(x, p, a)
                              for x, p, a in zip(leaves, param_leaves, axes_leaves)])

  return jax.tree_util.tree_map(axes_of, opt_state, is_leaf=mirrors)


def shardings(opt_state, params, param_axes, mesh, rules) -> Any:
  """`opt_state`'s tree of NamedShardings on `mesh` under the logical axis `rules`."""
  return partitioning.logical_to_mesh_sharding(
      logical_axes(opt_state, params, param_axes), mesh, rules)
