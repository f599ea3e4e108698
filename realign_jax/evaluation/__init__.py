"""realign_jax.evaluation."""
