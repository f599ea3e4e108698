"""The reward-vs-KL frontier of every alignment method, on one task; see experiments/__init__.py."""

from realign_jax.experiments import entry_point

__getattr__ = entry_point(__name__, "frontier")
