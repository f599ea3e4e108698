"""realign_jax.experiments."""
