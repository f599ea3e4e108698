"""realign_jax.parallel."""
