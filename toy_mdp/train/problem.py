"""The training problem: a batch of MDPs with their exact KL-regularized solution (:class:`Problem`),
and the exact, differentiable quantities of a softmax policy on it.

``regularized_return_of_logits`` is :func:`toy_mdp.solve.regularized_return` (``J(pi) = sum_s mu(s)
V_pi(s)``) for a policy given by logits on a :class:`Problem`, in JAX so that ``exact_pg`` can
differentiate it. ``visitation_weights`` is *not* :func:`toy_mdp.solve.state_visitation`: with a horizon
it normalises over (t, s) jointly (each time step weighs 1/H), so it sums to 1 and serves as the
metrics' weights; solve's gives per-time-step marginals that each sum to 1.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from toy_mdp.mdp import random_mdp, random_reference_policy
from toy_mdp.solve import solve_kl_regularized
from toy_mdp.train.config import EnvConfig

Array = jax.Array

class Problem(NamedTuple):
    """Arrays of one MDP (or, with a leading ``[M]`` axis, a batch); ``Hp = H`` or 1 (discounted)."""

    transitions: Array  # [S, A, S]
    rewards: Array      # [S, A]
    initial: Array      # [S]
    gamma: Array        # []
    ref_log: Array      # [Hp, S, A]  log pi_ref
    adv_star: Array     # [Hp, S, A]  A* = Q* - V* (solver)
    log_pi_star: Array  # [Hp, S, A]  log pi* (solver)


def _time_table(x: np.ndarray, horizon: Optional[int], batch: int, name: str) -> np.ndarray:
    """Broadcast a policy-shaped array to ``[M, Hp, S, A]``."""
    x = np.asarray(x, dtype=np.float64)
    hp = 1 if horizon is None else int(horizon)
    if x.ndim == 3:  # [M, S, A]
        x = x[:, None]
    if x.ndim != 4 or x.shape[0] != batch:
        raise ValueError(f"{name}: expected shape [M, (H,) S, A] with M={batch}, got {x.shape}")
    return np.broadcast_to(x, (batch, hp) + x.shape[2:]).copy()


def problem_from_mdp(mdp, ref_policy, beta: float) -> Problem:
    """Solve a batched :class:`toy_mdp.TabularMDP` for ``beta`` and pack a :class:`Problem`.

    ``ref_policy`` ``[M, S, A]`` or ``[M, H, S, A]`` must be strictly positive (the logits start at
    ``log pi_ref``; zero-probability actions cannot be trained).
    """
    if not getattr(mdp, "batch_shape", ()):
        raise ValueError("mdp: expected a batched TabularMDP (leading [M] axis; toy_mdp.mdp.stack)")
    ref = np.asarray(ref_policy, dtype=np.float64)
    if not np.all(np.isfinite(ref)) or np.any(ref <= 0):
        raise ValueError("ref_policy: expected strictly positive, finite probabilities for training "
                         f"(min {np.nanmin(ref):.3g}); the policy logits start at log pi_ref")
    M = mdp.batch_shape[0]
    sol = solve_kl_regularized(mdp, ref, beta)
    h = mdp.horizon
    gamma = np.broadcast_to(np.asarray(mdp.gamma, np.float64), (M,)).copy()
    with jax.enable_x64(True):
        return _problem(mdp, ref, sol, gamma, h, M)


def _problem(mdp, ref: np.ndarray, sol, gamma: np.ndarray, h: Optional[int], M: int) -> Problem:
    return Problem(
        transitions=jnp.asarray(mdp.transitions, jnp.float64),
        rewards=jnp.asarray(mdp.rewards, jnp.float64),
        initial=jnp.asarray(mdp.initial, jnp.float64),
        gamma=jnp.asarray(gamma),
        ref_log=jnp.asarray(np.log(_time_table(ref, h, M, "ref_policy"))),
        adv_star=jnp.asarray(_time_table(np.asarray(sol.advantage), h, M, "advantage")),
        log_pi_star=jnp.asarray(_time_table(np.asarray(sol.log_policy), h, M, "log_policy")),
    )


def make_problem(env: EnvConfig, seed: int) -> tuple[Any, np.ndarray, Problem]:
    """Random MDPs + reference policies from ``seed``, solved exactly: ``(mdp, ref_policy, problem)``."""
    env.validate()
    root = jax.random.key(int(seed))
    k_mdp, k_ref = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)
    mdp = random_mdp(k_mdp, env.num_states, env.num_actions, deterministic=env.deterministic,
                     gamma=env.gamma, horizon=env.horizon, reward_scale=env.reward_scale,
                     num_mdps=env.num_mdps)
    ref = random_reference_policy(k_ref, env.num_states, env.num_actions,
                                  min_prob=env.ref_min_prob, num_mdps=env.num_mdps)
    return mdp, ref, problem_from_mdp(mdp, ref, env.beta)


# ------------------------------------------------------------------------------ exact quantities
def regularized_values(logits: Array, ref_log: Array, transitions: Array, rewards: Array,
                       gamma: Array, beta: float | Array, horizon: Optional[int]) -> Array:
    """Exact regularized state values ``V_pi [Hp, S]`` of the softmax policy of ``logits [Hp, S, A]``.

    ``V_t(s) = sum_a pi_t(a|s) (r(s, a) - beta log(pi_t/pi_ref_t)(a|s) + gamma sum_s' P(s'|s,a) V_{t+1}(s'))``
    with ``V_H = 0`` (backward induction), or, discounted, the linear solve
    ``(I - gamma P_pi) V = r_pi - beta KL_pi``. Differentiable in ``logits``.
    """
    logp = jax.nn.log_softmax(logits, axis=-1)
    pi = jnp.exp(logp)
    r_reg = jnp.sum(pi * (rewards[None] - beta * (logp - ref_log)), axis=-1)  # [Hp, S]
    p_pi = jnp.einsum("hsa,sap->hsp", pi, transitions)                          # [Hp, S, S]
    if horizon is None:
        S = transitions.shape[0]
        v = jnp.linalg.solve(jnp.eye(S, dtype=p_pi.dtype) - gamma * p_pi[0], r_reg[0])
        return v[None]

    def back(v_next, inp):
        r_t, p_t = inp
        v_t = r_t + gamma * p_t @ v_next
        return v_t, v_t

    _, vs = jax.lax.scan(back, jnp.zeros_like(r_reg[0]), (r_reg, p_pi), reverse=True)
    return vs


def regularized_return_of_logits(logits: Array, prob: Problem, beta: float | Array,
                                 horizon: Optional[int]) -> Array:
    """``J(pi) = sum_s mu(s) V_pi(s)`` at t = 0 of ``pi = softmax(logits)`` (the objective exact_pg
    maximises; :func:`toy_mdp.solve.regularized_return` in differentiable JAX)."""
    v = regularized_values(logits, prob.ref_log, prob.transitions, prob.rewards, prob.gamma, beta,
                           horizon)
    return prob.initial @ v[0]


def visitation_weights(policy: Array, transitions: Array, initial: Array, gamma: Array,
                       horizon: Optional[int]) -> Array:
    """Normalised state visitation ``d_pi [Hp, S]`` (sums to 1 over t and s) of ``policy [Hp, S, A]``.

    Horizon: ``d_0 = mu``, ``d_{t+1}(s') = sum_{s,a} d_t(s) pi_t(a|s) P(s'|s,a)``, weight ``1/H`` each.
    Discounted: ``d = (1 - gamma) mu^T (I - gamma P_pi)^{-1}``.
    """
    p_pi = jnp.einsum("hsa,sap->hsp", policy, transitions)
    if horizon is None:
        S = transitions.shape[0]
        d = (1 - gamma) * jnp.linalg.solve((jnp.eye(S, dtype=p_pi.dtype) - gamma * p_pi[0]).T,
                                           initial)
        return d[None]

    def fwd(d_t, p_t):
        return d_t @ p_t, d_t

    _, ds = jax.lax.scan(fwd, initial, p_pi)
    return ds / p_pi.shape[0]
