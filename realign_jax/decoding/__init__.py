"""realign_jax.decoding."""
