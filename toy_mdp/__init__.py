"""Tabular stochastic MDPs: exact KL-regularized solver (Proposition 1)."""
