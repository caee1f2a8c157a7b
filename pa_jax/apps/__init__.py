"""The paper's three applications as pure functions on scores (no model code)."""
from pa_jax.apps import bon, fa, uq

__all__ = ["bon", "fa", "uq"]
