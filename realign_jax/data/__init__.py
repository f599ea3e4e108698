"""realign_jax.data."""
