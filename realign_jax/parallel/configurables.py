"""Gin surface of the parallel package (imported by `gin_utils.register()`)."""


def register() -> None:
  # NOTE: lazy: the package loads only when a binary registers it (gin_utils.register()).
  # NOTE: logical_axis_rules and create_mesh decorate themselves (direct calls read
  # their bindings); importing the module registers them.
  from realign_jax.parallel import partitioning  # noqa: F401
