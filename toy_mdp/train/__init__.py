"""Post-training algorithms on tabular MDPs: does a trained policy's log-ratio recover A*, and how fast?

Proposition 1 says the *optimal* KL-regularized policy satisfies ``beta * log(pi*/pi_ref) = A*``.
The policies people score with progress advantage come out of finite-budget PPO, GRPO or
REINFORCE-with-KL runs, sometimes without any KL term. This module trains tabular softmax
policies with those algorithms on random MDPs (batched with ``vmap``) and measures, against the
exact ``A*`` of :func:`toy_mdp.solve_kl_regularized` for the same ``beta`` and ``pi_ref``, how close
``beta * log(pi_theta/pi_ref)`` gets during training.

Policies: logits ``[S, A]`` (discounted) or ``[H, S, A]`` (finite horizon, one table per time step),
initialised at ``log pi_ref`` (so ``pi_theta = pi_ref`` at step 0), trained with optax Adam and a
cosine learning-rate decay. Algorithms (``ALGOS``):

``exact_pg``
    Gradient ascent on the exact regularized return
    ``J(theta) = sum_s mu(s) V_theta(s)``, ``V_theta`` from a linear solve
    ``(I - gamma P_pi) V = r_pi - beta KL_pi`` (backward induction with a horizon), differentiated by
    ``jax.grad``. Its fixed point is ``pi*``.
``reinforce_kl``
    Sampled REINFORCE on the RLHF reward ``r_t - beta * log(pi/pi_ref)(a_t|s_t)`` (stop-gradient on the
    penalty), return-to-go minus a learned tabular value baseline. Unbiased for ``grad J``.
``grpo``
    GRPO-style: groups of ``group_size`` episodes from one shared initial state (the "prompt"); every
    action of an episode gets the group-normalised outcome advantage ``(R_i - mean_g R)/(std_g R + eps)``;
    the KL enters the *loss* (not the reward) through the per-step ``k3`` estimator
    ``k3 = pi_ref/pi - log(pi_ref/pi) - 1`` (Schulman's k3, as in DeepSeekMath), one on-policy update per
    batch. Note: ``E_{a~pi}[grad k3] = pi - pi_ref`` per state, the gradient of the *forward*
    ``KL(pi_ref || pi)``, not of ``KL(pi || pi_ref)``, and the std normalisation rescales the reward,
    so GRPO's fixed point is not ``pi*`` (ablations: ``grpo_kl="reward"``, ``grpo_std_normalize=False``).
``ppo_clip`` / ``ppo_kl``
    PPO with the clipped surrogate ``min(rho A, clip(rho, 1-eps, 1+eps) A)``, GAE(lambda) advantages
    from a learned tabular critic, normalised per batch, ``epochs`` full-batch updates per rollout.
    ``ppo_kl`` puts the per-step penalty ``-beta * log(pi_old/pi_ref)(a_t|s_t)`` in the reward (the
    RLHF PPO formulation, fixed point ``pi*``); ``ppo_clip`` has no KL term at all.

Metrics (:func:`policy_metrics`), all weighted by the trained policy's normalised state visitation
``d_pi(t, s)`` (``w(t, s, a) = d_pi(t, s) pi(a|t, s)`` for state-action quantities), with the error
``e = beta * log(pi/pi_ref) - A*``: the mean ``sum w |e|``; the worst ``|e|`` over visited entries
(``w >= min_weight``) and over all entries; weighted Pearson and Spearman correlation of the scaled
log-ratio with ``A*``; the visitation-weighted fraction of action pairs ranked alike (ties in the
log-ratio count 1/2) and of states whose best action agrees; the least-squares effective beta
``beta_eff = sum w l A* / sum w l^2`` (``l = log(pi/pi_ref)``, no intercept) and its weighted RMS
residual; the regularized-return gap ``J(pi*) - J(pi)``. Weighted Spearman = weighted Pearson of the
weighted mid-ranks ``r_i = sum_j w_j ([x_j < x_i] + [x_j = x_i] / 2)`` (equal weights: ``spearmanr``).

Sampling is pure JAX: ``lax.scan`` over time, ``vmap`` over episodes and over MDPs. Everything runs
in float64 under ``jax.enable_x64(True)`` (scoped; the rest of the process is untouched). Same seed,
same numbers. CLI: ``python -m toy_mdp train --algo all --json PATH`` (see :func:`main`).

Layout (one concern a module): :mod:`~toy_mdp.train.config` (EnvConfig, AlgoConfig, DEFAULTS),
:mod:`~toy_mdp.train.problem` (the solved MDP batch; exact differentiable return and visitation weights),
:mod:`~toy_mdp.train.metrics`, :mod:`~toy_mdp.train.sampling`, :mod:`~toy_mdp.train.losses`,
:mod:`~toy_mdp.train.driver` (train_algorithm, run, run_configs) and :mod:`~toy_mdp.train.cli`
(``main``, the atomic results JSON, the table). Everything public is re-exported here.
"""

from toy_mdp.train.cli import build_parser, format_table, main, write_json_atomic
from toy_mdp.train.config import ALGOS, DEFAULTS, METRICS, AlgoConfig, EnvConfig, default_algo_config
from toy_mdp.train.driver import run, run_configs, train_algorithm
from toy_mdp.train.losses import (
    LOSSES,
    exact_pg_loss,
    grpo_loss,
    make_optimizer,
    make_step,
    reinforce_kl_loss,
)
from toy_mdp.train.metrics import (
    TIE_TOL,
    VAR_TOL,
    effective_beta,
    policy_metrics,
    ranking_agreement,
    weighted_midranks,
    weighted_pearson,
    weighted_spearman,
)
from toy_mdp.train.problem import (
    Problem,
    make_problem,
    problem_from_mdp,
    regularized_return_of_logits,
    regularized_values,
    visitation_weights,
)
from toy_mdp.train.sampling import Episodes, sample_episode, sample_episodes, sample_initial

__all__ = [
    "ALGOS", "DEFAULTS", "LOSSES", "METRICS", "TIE_TOL", "VAR_TOL", "AlgoConfig", "EnvConfig", "Episodes", "Problem",
    "build_parser", "default_algo_config", "effective_beta", "exact_pg_loss", "format_table", "grpo_loss", "main",
    "make_optimizer", "make_problem", "make_step", "policy_metrics", "problem_from_mdp", "ranking_agreement",
    "regularized_return_of_logits", "regularized_values", "reinforce_kl_loss", "run", "run_configs",
    "sample_episode", "sample_episodes", "sample_initial", "train_algorithm", "visitation_weights",
    "weighted_midranks", "weighted_pearson", "weighted_spearman", "write_json_atomic",
]
