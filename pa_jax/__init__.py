"""pa-jax: progress advantage in JAX."""
__version__ = "0.1.0"
