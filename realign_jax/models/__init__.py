"""realign_jax.models."""
