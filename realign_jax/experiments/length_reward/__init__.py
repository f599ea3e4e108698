"""The length-reward study (DeRa paper, section 5.2, Figure 2); see experiments/__init__.py."""

from realign_jax.experiments import entry_point

__getattr__ = entry_point(__name__, "length_reward")
