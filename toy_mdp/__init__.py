"""Tabular stochastic MDPs: exact KL-regularized solver (Proposition 1).

Everything runs in float64 inside :func:`float64` (``jax.enable_x64`` as a context manager)
without switching x64 on for the rest of the process; results are NumPy float64 arrays.
Batch many MDPs with :func:`stack` (or ``random_mdp(..., num_mdps=N)``): the solver and the
evaluator then run one ``jit(vmap(...))`` call.
"""
from toy_mdp.mdp import (TabularMDP, check_distribution, check_reference_policy, random_mdp,
                         random_reference_policy, stack)
from toy_mdp.solve import (KStepAdvantage, Solution, SolveInfo, evaluate_policy, float64,
                           progress_k_advantage, regularized_return, soft_improvement,
                           solve_kl_regularized, solve_trajectory_posterior, state_visitation,
                           value_iteration)

__all__ = [
    "KStepAdvantage", "Solution", "SolveInfo", "TabularMDP", "check_distribution", "check_reference_policy",
    "evaluate_policy", "float64", "progress_k_advantage", "random_mdp", "random_reference_policy",
    "regularized_return", "soft_improvement", "solve_kl_regularized", "solve_trajectory_posterior",
    "stack", "state_visitation", "value_iteration",
]
