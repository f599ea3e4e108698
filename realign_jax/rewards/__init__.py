"""realign_jax.rewards."""
