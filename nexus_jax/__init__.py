"""nexus-jax: Nexus-Gen (unified understanding, generation and editing) in JAX / Flax NNX."""

__version__ = "0.1.0"
