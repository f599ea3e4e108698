"""A model's params as abstract arrays that carry their mesh shardings.

The target every sharded restore and sharded init is built from (the trainer's
INIT_CHECKPOINT, the reward model, the decode binary's components).
"""

import jax

from realign_jax.parallel import partitioning


def sharded_abstract(lm, mesh, rules):
  """`lm`'s params (a `models.api.LanguageModel`) as ShapeDtypeStructs with their shardings."""
  abstract, axes = lm.abstract_init()
  shardings = partitioning.logical_to_mesh_sharding(axes, mesh, rules)
  return jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings)
