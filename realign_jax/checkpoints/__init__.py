"""realign_jax.checkpoints."""
