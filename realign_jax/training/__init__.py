"""realign_jax.training."""
