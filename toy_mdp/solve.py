"""Exact KL-regularized solvers and evaluators for tabular MDPs (float64 JAX).

Objective (the KL penalizes the agent's actions only, never the environment's transitions)::

    J(pi) = E[ sum_t gamma^t ( r(s_t, a_t) - beta * KL(pi(.|s_t) || pi_ref(.|s_t)) ) ]

Soft Bellman optimality equations (``V_H = 0`` with a horizon)::

    Q*(s, a) = r(s, a) + gamma * sum_s' P(s'|s, a) V*(s')
    V*(s)    = beta * log sum_a pi_ref(a|s) exp(Q*(s, a) / beta)
    pi*(a|s) = pi_ref(a|s) exp((Q*(s, a) - V*(s)) / beta)

so ``beta * log(pi*/pi_ref) = Q* - V* = A*`` (Proposition 1).

Precision and batching. Every kernel runs in float64 inside :func:`float64` (``jax.enable_x64``
as a context manager), so x64 is never switched on for the rest of the process; jitted functions
are traced and called inside it (the jit cache is keyed on the x64 flag). Host-facing functions
validate on the host, call a jitted kernel and return NumPy float64 arrays. A batched
:class:`~toy_mdp.mdp.TabularMDP` (one leading axis ``N``, see :func:`toy_mdp.mdp.stack`) is
solved by ``jax.jit(jax.vmap(kernel))``; the pure kernels (``soft_policy_iteration``,
``soft_backward_induction``, ``evaluate_discounted``, ...) take plain arrays and may be
``vmap``-ed or ``jit``-ed by callers inside ``with toy_mdp.float64():``.

Zeros in the reference policy are supported: actions with ``pi_ref(a|s) = 0`` are outside the
support, get ``pi*(a|s) = 0``, ``log_policy = advantage = -inf`` and contribute nothing to any KL
or expectation (masked everywhere).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from toy_mdp.mdp import TabularMDP, check_beta, check_reference_policy

Array = jax.Array

DEFAULT_TOL = 1e-13     # relative stopping tolerance of soft policy iteration
DEFAULT_MAX_ITER = 100  # soft policy iteration converges in ~5-30 steps (Newton's method)


@contextlib.contextmanager
def float64() -> Iterator[None]:
    """Enable float64 for the enclosed tracing and calls only (``jax.enable_x64(True)``)."""
    with jax.enable_x64(True):
        yield


class Solution(NamedTuple):
    """A KL-regularized solution. ``[S, A]`` / ``[S]``; with a horizon ``[H, S, A]`` / ``[H, S]``
    (a batched MDP adds a leading ``[N]``). ``log_policy`` and ``advantage`` are ``-inf`` (and
    ``policy`` is 0) where ``pi_ref = 0``."""
    q: np.ndarray
    v: np.ndarray
    policy: np.ndarray
    log_policy: np.ndarray
    advantage: np.ndarray


class SolveInfo(NamedTuple):
    """Solver diagnostics (``return_info=True``): policy-iteration steps and the last
    ``max |Q_k - Q_{k-1}|`` (1 and 0 for the exact finite-horizon backward induction)."""
    iterations: np.ndarray
    residual: np.ndarray


class KStepAdvantage(NamedTuple):
    """Both sides of the progress k-advantage identity, ``[S, A]`` (``[H, S, A]``), -inf masked."""
    advantage_sum: np.ndarray  # E[sum_{i<k} gamma^i A*(s_{t+i}, a_{t+i}) | s_t, a_t], a ~ pi*
    telescoped: np.ndarray     # E[sum_{i<k} gamma^i r_{t+i} + gamma^k V*(s_{t+k})] - V*(s_t)


# ----------------------------------------------------------------------------------------------
# Pure kernels (single MDP; call inside float64(); vmap/jit freely)
# ----------------------------------------------------------------------------------------------

def masked_log(p: Array) -> Array:
    """``log p`` with ``log 0 = -inf`` (no warnings, no NaN)."""
    return jnp.where(p > 0, jnp.log(jnp.where(p > 0, p, 1.0)), -jnp.inf)


def soft_improvement(q: Array, log_ref: Array, beta: Array) -> tuple[Array, Array]:
    """``V = beta * logsumexp_a(log pi_ref + Q / beta)``, ``log pi = log pi_ref + (Q - V) / beta``.

    Works on any leading shape ``[..., A]``; -inf ``log_ref`` entries stay -inf. Computed
    around ``m = max_a Q`` (``z = log pi_ref + (Q - m) / beta``, ``log pi = z - logsumexp(z)``)
    so that ``sum_a pi = 1`` to float64 rounding even when ``|Q| / beta`` is large.
    """
    m = jnp.max(jnp.where(jnp.isneginf(log_ref), -jnp.inf, q), axis=-1, keepdims=True)
    z = log_ref + (q - m) / beta
    lse = jax.nn.logsumexp(z, axis=-1, keepdims=True)
    return (m + beta * lse)[..., 0], z - lse


def kl_regularized_reward(rewards: Array, policy: Array, log_policy: Array, log_ref: Array,
                          beta: Array) -> Array:
    """``r_pi(s) = sum_a pi(a|s) [r(s, a) - beta * (log pi(a|s) - log pi_ref(a|s))]`` (0 * log 0 = 0)."""
    live = policy > 0
    log_ratio = jnp.where(live, log_policy - jnp.where(live, log_ref, 0.0), 0.0)
    return jnp.sum(jnp.where(live, policy * (rewards - beta * log_ratio), 0.0), axis=-1)


def _evaluate_log_policy(P: Array, R: Array, log_pi: Array, log_ref: Array, beta: Array,
                         gamma: Array) -> Array:
    """Solver-internal policy evaluation from log-probabilities: ``Q = R + gamma P (I - gamma P_pi)^-1 r_pi``."""
    pi = jnp.exp(log_pi)
    r_pi = kl_regularized_reward(R, pi, log_pi, log_ref, beta)
    P_pi = jnp.einsum("sa,sat->st", pi, P)
    v = jnp.linalg.solve(jnp.eye(P.shape[0], dtype=P.dtype) - gamma * P_pi, r_pi)
    return R + gamma * (P @ v)


def _keep_iterating(state, *, tol: float, max_iter: int) -> Array:
    """Policy-iteration stopping rule on ``(q, it, delta, prev_delta)``: go on while
    ``delta > tol * (1 + max|q|)`` and ``it < max_iter``, unless the step has reached the float64
    floor (``delta < 1e-8 * scale`` and no longer shrinking)."""
    q, it, delta, prev = state
    scale = 1.0 + jnp.max(jnp.abs(q))
    stalled = (delta >= prev) & (delta < 1e-8 * scale)
    return (it < max_iter) & (delta > tol * scale) & ~stalled


def soft_policy_iteration(P: Array, R: Array, log_ref: Array, beta: Array, gamma: Array, *,
                          tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER
                          ) -> tuple[Array, Array, Array, Array, Array]:
    """Soft policy iteration for the discounted KL-regularized objective.

    ``Q_0 = Q^{pi_ref}``; ``pi_{k} = pi_ref exp((Q_k - V_k)/beta)`` (soft improvement);
    ``Q_{k+1} = Q^{pi_k}`` (exact evaluation, one linear solve). This is Newton's method on the
    soft Bellman equation: monotone, and quadratic near the fixed point. Stops when
    ``max |Q_{k+1} - Q_k| <= tol * (1 + max |Q_k|)``, when the step stops shrinking (float64
    floor), or at ``max_iter``. Returns ``(q, v, log_pi, iterations, residual)``.
    """
    q0 = _evaluate_log_policy(P, R, log_ref, log_ref, beta, gamma)

    cond = functools.partial(_keep_iterating, tol=tol, max_iter=max_iter)

    def body(state):
        q, it, delta, _ = state
        _, log_pi = soft_improvement(q, log_ref, beta)
        q_new = _evaluate_log_policy(P, R, log_pi, log_ref, beta, gamma)
        return q_new, it + 1, jnp.max(jnp.abs(q_new - q)), delta

    inf = jnp.asarray(jnp.inf, q0.dtype)
    q, it, delta, _ = lax.while_loop(cond, body, (q0, jnp.asarray(0), inf, inf))
    v, log_pi = soft_improvement(q, log_ref, beta)
    return q, v, log_pi, it, delta


def soft_backward_induction(P: Array, R: Array, log_ref: Array, beta: Array, gamma: Array
                            ) -> tuple[Array, Array, Array]:
    """Exact finite-horizon soft Bellman recursion, ``log_ref`` ``[H, S, A]``, ``V_H = 0``:
    ``Q_t = R + gamma P V_{t+1}``, ``(V_t, log pi_t) = soft_improvement(Q_t)``. Returns ``[H, ...]``."""
    def step(v_next, log_ref_t):
        q = R + gamma * (P @ v_next)
        v, log_pi = soft_improvement(q, log_ref_t, beta)
        return v, (q, v, log_pi)

    _, (q, v, log_pi) = lax.scan(step, jnp.zeros(P.shape[0], P.dtype), log_ref, reverse=True)
    return q, v, log_pi


def evaluate_discounted(P: Array, R: Array, policy: Array, ref_policy: Array, beta: Array,
                        gamma: Array) -> tuple[Array, Array]:
    """Exact KL-regularized evaluation of a stationary policy (a linear solve)::

        V = (I - gamma P_pi)^{-1} r_pi,   P_pi(s, s') = sum_a pi(a|s) P(s'|s, a),
        r_pi(s) = sum_a pi(a|s) [r(s, a) - beta log(pi(a|s) / pi_ref(a|s))],
        Q = r + gamma P V.
    """
    pi = policy
    r_pi = kl_regularized_reward(R, pi, masked_log(pi), masked_log(ref_policy), beta)
    A_mat = jnp.eye(P.shape[0], dtype=P.dtype) - gamma * jnp.einsum("sa,sat->st", pi, P)
    v = jnp.linalg.solve(A_mat, r_pi)
    return R + gamma * jnp.einsum("sat,t->sa", P, v), v


def evaluate_finite(P: Array, R: Array, policy: Array, ref_policy: Array, beta: Array,
                    gamma: Array) -> tuple[Array, Array]:
    """Exact KL-regularized evaluation by backward induction, ``policy``/``ref_policy`` ``[H, S, A]``::

        V_H = 0,  Q_t = r + gamma P V_{t+1},
        V_t(s) = sum_a pi_t(a|s) [Q_t(s, a) - beta log(pi_t(a|s) / pi_ref,t(a|s))].
    """
    def step(v_next, xs):
        pi_t, ref_t = xs
        q = R + gamma * jnp.einsum("sat,t->sa", P, v_next)
        v = kl_regularized_reward(q, pi_t, masked_log(pi_t), masked_log(ref_t), beta)
        return v, (q, v)

    _, (q, v) = lax.scan(step, jnp.zeros(P.shape[0], P.dtype), (policy, ref_policy), reverse=True)
    return q, v


def value_iteration_discounted(P: Array, R: Array, mask: Array, gamma: Array, *,
                               tol: float = 1e-12, max_iter: int = 100_000) -> tuple[Array, Array]:
    """Plain (unregularized) value iteration ``V <- max_{a in mask} [r + gamma P V]`` until
    ``max |V_{k+1} - V_k| <= tol * (1 - gamma)`` (so ``|V - V*| <= tol``)."""
    def backup(v):
        q = R + gamma * (P @ v)
        return q, jnp.max(jnp.where(mask, q, -jnp.inf), axis=-1)

    def cond(state):
        _, delta, it = state
        return (delta > tol * (1.0 - gamma)) & (it < max_iter)

    def body(state):
        v, _, it = state
        _, v_new = backup(v)
        return v_new, jnp.max(jnp.abs(v_new - v)), it + 1

    v0 = jnp.zeros(P.shape[0], P.dtype)
    v, _, _ = lax.while_loop(cond, body, (v0, jnp.asarray(jnp.inf, P.dtype), jnp.asarray(0)))
    q, v = backup(v)
    return q, v


def value_iteration_finite(P: Array, R: Array, mask: Array, gamma: Array) -> tuple[Array, Array]:
    """Plain finite-horizon backward induction ``Q_t = r + gamma P V_{t+1}``,
    ``V_t = max_{a in mask_t} Q_t`` (``mask`` ``[H, S, A]``)."""
    def step(v_next, mask_t):
        q = R + gamma * (P @ v_next)
        v = jnp.max(jnp.where(mask_t, q, -jnp.inf), axis=-1)
        return v, (q, v)

    _, (q, v) = lax.scan(step, jnp.zeros(P.shape[0], P.dtype), mask, reverse=True)
    return q, v


def _transition_posterior(P: Array, v: Array, beta: Array) -> tuple[Array, Array]:
    """``beta log sum_s' P(s'|s,a) exp(V(s')/beta)`` and the tilted ``q(s'|s,a) ∝ P exp(V/beta)``."""
    logits = masked_log(P) + v / beta
    lse = jax.nn.logsumexp(logits, axis=-1)
    return beta * lse, jnp.exp(logits - lse[..., None])


def trajectory_posterior_discounted(P: Array, R: Array, log_ref: Array, beta: Array,
                                    gamma: Array, *, tol: float = DEFAULT_TOL,
                                    max_iter: int = DEFAULT_MAX_ITER):
    """Control-as-inference "trajectory posterior" (the environment's transitions re-weighted)::

        Q(s, a) = r(s, a) + gamma * beta * log sum_s' P(s'|s, a) exp(V(s') / beta)
        V(s)    = beta * log sum_a pi_ref(a|s) exp(Q(s, a) / beta)

    The log-sum-exp over next states equals ``max_q E_q[V] - beta KL(q || P)``: the posterior is
    the KL-regularized optimum of an agent that also controls the transitions. Solved by soft
    policy iteration over the joint (action, next-state) policy. Returns like
    :func:`soft_policy_iteration`.
    """
    S = P.shape[0]

    def evaluate(q):
        v, log_pi = soft_improvement(q, log_ref, beta)
        _, Pq = _transition_posterior(P, v, beta)
        kl_tr = jnp.sum(jnp.where(Pq > 0, Pq * (masked_log(Pq) - masked_log(P)), 0.0), -1)
        pi = jnp.exp(log_pi)
        r_pi = kl_regularized_reward(R - gamma * beta * kl_tr, pi, log_pi, log_ref, beta)
        v_pi = jnp.linalg.solve(jnp.eye(S, dtype=P.dtype) - gamma * jnp.einsum("sa,sat->st", pi, Pq),
                                r_pi)
        return R + gamma * (jnp.einsum("sat,t->sa", Pq, v_pi) - beta * kl_tr)

    cond = functools.partial(_keep_iterating, tol=tol, max_iter=max_iter)

    def body(state):
        q, it, delta, _ = state
        q_new = evaluate(q)
        return q_new, it + 1, jnp.max(jnp.abs(q_new - q)), delta

    q0 = R  # any start works (soft policy iteration on the joint action/transition policy)
    inf = jnp.asarray(jnp.inf, P.dtype)
    q, it, delta, _ = lax.while_loop(cond, body, (q0, jnp.asarray(0), inf, inf))
    v, log_pi = soft_improvement(q, log_ref, beta)
    return q, v, log_pi, it, delta


def trajectory_posterior_finite(P: Array, R: Array, log_ref: Array, beta: Array, gamma: Array
                                ) -> tuple[Array, Array, Array]:
    """Finite-horizon trajectory posterior; with ``gamma = 1`` exactly the action marginals of
    ``p(tau | O) ∝ mu(s_0) prod_t pi_ref(a_t|s_t) exp(r(s_t, a_t)/beta) P(s_{t+1}|s_t, a_t)``."""
    def step(v_next, log_ref_t):
        soft_next, _ = _transition_posterior(P, v_next, beta)
        q = R + gamma * soft_next
        v, log_pi = soft_improvement(q, log_ref_t, beta)
        return v, (q, v, log_pi)

    _, (q, v, log_pi) = lax.scan(step, jnp.zeros(P.shape[0], P.dtype), log_ref, reverse=True)
    return q, v, log_pi


def visitation_discounted(P: Array, policy: Array, initial: Array, gamma: Array) -> Array:
    """Normalized discounted occupancy ``d(s) = (1 - gamma) sum_t gamma^t Pr(s_t = s)``, i.e.
    ``d = (1 - gamma) mu^T (I - gamma P_pi)^{-1}``."""
    P_pi = jnp.einsum("sa,sat->st", policy, P)
    return (1.0 - gamma) * jnp.linalg.solve((jnp.eye(P.shape[0], dtype=P.dtype) - gamma * P_pi).T,
                                            initial)


def visitation_finite(P: Array, policy: Array, initial: Array) -> Array:
    """Per-time-step state marginals ``d_t(s) = Pr(s_t = s)``, ``t = 0..H-1`` (policy ``[H, S, A]``)."""
    def step(d, pi_t):
        return d @ jnp.einsum("sa,sat->st", pi_t, P), d

    _, ds = lax.scan(step, initial, policy)
    return ds


def k_step_identity(P: Array, R: Array, policy: Array, advantage: Array, v: Array,
                    gamma: Array, alive: Array, *, k: int) -> tuple[Array, Array]:
    """Both sides of the progress k-advantage identity, time-indexed ``[T, S, A]`` inputs
    (``T = H``; discounted: ``T = 1`` and the stationary slices repeated by the caller)::

        LHS_t(s, a) = A_t(s, a) + sum_{i=1}^{k-1} gamma^i D_i^t(s, a) . abar_{t+i}
        RHS_t(s, a) = r(s, a) + sum_{i=1}^{k-1} gamma^i D_i^t(s, a) . rbar_{t+i}
                      + gamma^k D_k^t(s, a) . V_{t+k} - V_t(s)

    with ``D_1^t = P``, ``D_{i+1}^t = D_i^t P_pi_{t+i}`` (matrix powers for a stationary policy),
    ``abar_t(s) = sum_a pi_t A_t``, ``rbar_t(s) = alive_t sum_a pi_t r``. ``policy``/``advantage``
    ``[T+k, S, A]``, ``v`` ``[T+k+1, S]`` and ``alive`` ``[T+k]`` (0 beyond a horizon, where the
    advantages and values are padded with 0) are already padded.
    """
    T = v.shape[0] - k - 1
    live = policy > 0
    abar = jnp.sum(jnp.where(live, policy * jnp.where(live, advantage, 0.0), 0.0), -1)  # [T+k, S]
    rbar = jnp.sum(policy * R, -1) * alive[:, None]
    P_pi = jnp.einsum("tsa,sau->tsu", policy, P)  # [T+k, S, S]
    lhs = advantage[:T]
    rhs = R[None] - v[:T, :, None]
    D = jnp.broadcast_to(P, (T,) + P.shape)  # D_1 for every t
    for i in range(1, k):
        lhs = lhs + gamma ** i * jnp.einsum("tsau,tu->tsa", D, abar[i:i + T])
        rhs = rhs + gamma ** i * jnp.einsum("tsau,tu->tsa", D, rbar[i:i + T])
        D = jnp.einsum("tsau,tuw->tsaw", D, P_pi[i:i + T])
    rhs = rhs + gamma ** k * jnp.einsum("tsau,tu->tsa", D, v[k:k + T])
    return jnp.where(live[:T], lhs, -jnp.inf), jnp.where(live[:T], rhs, -jnp.inf)


# ----------------------------------------------------------------------------------------------
# Host-facing API: validate on the host, then one jitted (and vmapped, for batches) call.
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _compiled(fn: Callable, batched: bool, **static) -> Callable:
    f = functools.partial(fn, **static) if static else fn
    return jax.jit(jax.vmap(f) if batched else f)


def _call(fn: Callable, batched: bool, *args, **static):
    """Run ``fn`` jitted (vmapped over axis 0 if ``batched``) in float64; return NumPy arrays."""
    with float64():
        out = _compiled(fn, batched, **static)(*[jnp.asarray(a) for a in args])
        return jax.tree.map(np.asarray, out)


def _per_mdp(mdp: TabularMDP, x: np.ndarray) -> np.ndarray:
    """Broadcast a scalar parameter to ``[N]`` for a batched MDP."""
    return np.broadcast_to(x, mdp.batch_shape).copy() if mdp.batch_shape else x


def _time_indexed(mdp: TabularMDP, pi: np.ndarray) -> np.ndarray:
    """``[.., S, A]`` -> ``[.., H, S, A]`` for a finite-horizon MDP (time-dependent form)."""
    if pi.ndim == len(mdp.batch_shape) + 3:
        return pi
    lead = mdp.batch_shape
    return np.broadcast_to(pi[..., None, :, :], lead + (mdp.horizon,) + pi.shape[-2:]).copy()


def _probs(log_pi: np.ndarray) -> np.ndarray:
    """``exp(log_pi)`` with subnormal results flushed to 0, as XLA on CPU does (so that the host
    and the kernels agree on which actions are alive, ``policy > 0``)."""
    p = np.exp(log_pi)
    return np.where(p < np.finfo(np.float64).tiny, 0.0, p)


def _log(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(p)


def solve_kl_regularized(mdp: TabularMDP, ref_policy, beta, *, tol: float = DEFAULT_TOL,
                         max_iter: int = DEFAULT_MAX_ITER, return_info: bool = False):
    """The optimal policy of the KL-regularized objective (module docstring), exactly.

    Discounted: soft policy iteration (:func:`soft_policy_iteration`) to ``tol``; finite horizon:
    exact backward induction (:func:`soft_backward_induction`), ``ref_policy`` ``[S, A]`` or
    time-dependent ``[H, S, A]``. Zeros in ``ref_policy`` give ``policy = 0`` and
    ``log_policy = advantage = -inf`` there. Batched MDPs (leading ``N``) are solved by one
    ``jit(vmap(...))`` call; ``beta`` may then be ``[N]``. Returns a :class:`Solution` of NumPy
    float64 arrays (``(Solution, SolveInfo)`` with ``return_info=True``).
    """
    ref = check_reference_policy(mdp, ref_policy)
    b = _per_mdp(mdp, check_beta(mdp, beta))
    g = _per_mdp(mdp, mdp.gamma)
    batched = bool(mdp.batch_shape)
    if mdp.horizon is None:
        q, v, log_pi, it, res = _call(soft_policy_iteration, batched, mdp.transitions, mdp.rewards,
                                      _log(ref), b, g, tol=float(tol), max_iter=int(max_iter))
    else:
        q, v, log_pi = _call(soft_backward_induction, batched, mdp.transitions, mdp.rewards,
                             _log(_time_indexed(mdp, ref)), b, g)
        it, res = np.ones(mdp.batch_shape, np.int64), np.zeros(mdp.batch_shape)
    adv = q - v[..., None]
    adv = np.where(np.isneginf(log_pi), -np.inf, adv)
    sol = Solution(q, v, _probs(log_pi), log_pi, adv)
    return (sol, SolveInfo(it, res)) if return_info else sol


def _check_policy_support(mdp: TabularMDP, policy: np.ndarray, ref: np.ndarray) -> None:
    if np.any((policy > 0) & (ref == 0)):
        raise ValueError("policy: puts probability on actions with ref_policy = 0 (the KL is "
                         "infinite); expected policy = 0 wherever ref_policy = 0")


def evaluate_policy(mdp: TabularMDP, policy, ref_policy, beta) -> tuple[np.ndarray, np.ndarray]:
    """Exact KL-regularized ``(Q^pi, V^pi)`` of ``policy`` (an independent code path from the
    solver: it takes probabilities, not log-probabilities or soft values).

    Discounted: one linear solve (:func:`evaluate_discounted`), stationary ``policy`` ``[S, A]``.
    Finite horizon: backward induction (:func:`evaluate_finite`); ``policy`` and ``ref_policy``
    ``[S, A]`` or ``[H, S, A]``; outputs ``[H, S, A]``, ``[H, S]``.
    """
    pi = check_reference_policy(mdp, policy, "policy")
    ref = check_reference_policy(mdp, ref_policy)
    b = _per_mdp(mdp, check_beta(mdp, beta))
    g = _per_mdp(mdp, mdp.gamma)
    batched = bool(mdp.batch_shape)
    if mdp.horizon is None:
        _check_policy_support(mdp, pi, ref)
        return _call(evaluate_discounted, batched, mdp.transitions, mdp.rewards, pi, ref, b, g)
    pi, ref = _time_indexed(mdp, pi), _time_indexed(mdp, ref)
    _check_policy_support(mdp, pi, ref)
    return _call(evaluate_finite, batched, mdp.transitions, mdp.rewards, pi, ref, b, g)


def regularized_return(mdp: TabularMDP, policy, ref_policy, beta) -> np.ndarray:
    """``J(pi) = sum_s mu(s) V^pi(s)`` (``V_0`` with a horizon) via :func:`evaluate_policy`."""
    _, v = evaluate_policy(mdp, policy, ref_policy, beta)
    v0 = v if mdp.horizon is None else v[..., 0, :]
    return np.sum(mdp.initial * v0, axis=-1)


def value_iteration(mdp: TabularMDP, *, action_mask=None, tol: float = 1e-12
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Unregularized optimal ``(Q, V)`` by plain value iteration (backward induction with a
    horizon), maximizing over ``action_mask`` (bool ``[S, A]``, or ``[H, S, A]`` with a horizon;
    default all actions): the ``beta -> 0`` limit of the KL-regularized problem when the mask is
    ``pi_ref > 0``. Discounted: iterates until ``|V - V*| <= tol``."""
    S, A = mdp.num_states, mdp.num_actions
    lead = mdp.batch_shape
    mask = np.ones(lead + (S, A), bool) if action_mask is None else np.asarray(action_mask, bool)
    ok = [lead + (S, A)] + ([lead + (mdp.horizon, S, A)] if mdp.horizon else [])
    if mask.shape not in ok or not np.all(mask.any(-1)):
        raise ValueError(f"action_mask: expected a bool array of shape {' or '.join(map(str, ok))} "
                         f"with an allowed action in every state, got shape {mask.shape}")
    g = _per_mdp(mdp, mdp.gamma)
    batched = bool(lead)
    if mdp.horizon is None:
        return _call(value_iteration_discounted, batched, mdp.transitions, mdp.rewards, mask, g,
                     tol=float(tol))
    return _call(value_iteration_finite, batched, mdp.transitions, mdp.rewards,
                 _time_indexed(mdp, mask), g)


def solve_trajectory_posterior(mdp: TabularMDP, ref_policy, beta, *, tol: float = DEFAULT_TOL,
                               max_iter: int = DEFAULT_MAX_ITER, return_info: bool = False):
    """The control-as-inference trajectory posterior policy (see
    :func:`trajectory_posterior_discounted`): equal to ``solve_kl_regularized`` on deterministic
    MDPs, different (optimistic about the environment) on stochastic ones."""
    ref = check_reference_policy(mdp, ref_policy)
    b = _per_mdp(mdp, check_beta(mdp, beta))
    g = _per_mdp(mdp, mdp.gamma)
    batched = bool(mdp.batch_shape)
    if mdp.horizon is None:
        q, v, log_pi, it, res = _call(trajectory_posterior_discounted, batched, mdp.transitions,
                                      mdp.rewards, _log(ref), b, g, tol=float(tol),
                                      max_iter=int(max_iter))
    else:
        q, v, log_pi = _call(trajectory_posterior_finite, batched, mdp.transitions, mdp.rewards,
                             _log(_time_indexed(mdp, ref)), b, g)
        it, res = np.ones(mdp.batch_shape, np.int64), np.zeros(mdp.batch_shape)
    adv = np.where(np.isneginf(log_pi), -np.inf, q - v[..., None])
    sol = Solution(q, v, _probs(log_pi), log_pi, adv)
    return (sol, SolveInfo(it, res)) if return_info else sol


def state_visitation(mdp: TabularMDP, policy) -> np.ndarray:
    """State occupancy of ``policy`` from ``mdp.initial``.

    Discounted: the normalized discounted occupancy ``d(s) = (1 - gamma) sum_t gamma^t Pr(s_t=s)``
    ``[S]`` (sums to 1; ``J = sum_s d(s) r_pi(s) / (1 - gamma)``). Finite horizon: per-time-step
    marginals ``Pr(s_t = s)`` ``[H, S]`` (each row sums to 1; not discounted).
    """
    pi = check_reference_policy(mdp, policy, "policy")
    batched = bool(mdp.batch_shape)
    if mdp.horizon is None:
        return _call(visitation_discounted, batched, mdp.transitions, pi, mdp.initial,
                     _per_mdp(mdp, mdp.gamma))
    return _call(visitation_finite, batched, mdp.transitions, _time_indexed(mdp, pi), mdp.initial)


def progress_k_advantage(mdp: TabularMDP, solution: Solution, k: int) -> KStepAdvantage:
    """Exact progress k-advantage from ``(s_t, a_t)`` following ``solution.policy`` (matrix powers)::

        E[sum_{i<k} gamma^i A*(s_{t+i}, a_{t+i})]  vs  E[sum_{i<k} gamma^i r_{t+i} + gamma^k V*(s_{t+k})] - V*(s_t)

    Both ``[S, A]`` (discounted) or ``[H, S, A]`` (horizon; sums truncated at ``H``, ``V_H = 0``),
    ``-inf`` where ``pi* = 0``. They agree because ``A* = r + gamma E V*(s') - V*`` telescopes.
    """
    if isinstance(k, bool) or int(k) != k or int(k) < 1:
        raise ValueError(f"k: expected an integer >= 1, got {k!r}")
    k = int(k)
    batched = bool(mdp.batch_shape)
    pi, adv, v = solution.policy, solution.advantage, solution.v
    lead = mdp.batch_shape
    if pi.shape[:len(lead)] != lead or pi.shape[-2:] != (mdp.num_states, mdp.num_actions):
        raise ValueError(f"solution: expected policy shape {lead + (mdp.num_states, mdp.num_actions)}"
                         f" (with a horizon, [H] before S), got {pi.shape}")
    if mdp.horizon is None:   # stationary: T = 1, padded with the same policy/value
        def reps(x: np.ndarray, n: int) -> np.ndarray:
            return np.repeat(np.expand_dims(x, len(lead)), n, axis=len(lead))
        alive = np.ones(lead + (1 + k,))
        lhs, rhs = _call(k_step_identity, batched, mdp.transitions, mdp.rewards, reps(pi, 1 + k),
                         reps(adv, 1 + k), reps(v, 2 + k), _per_mdp(mdp, mdp.gamma), alive, k=k)
        return KStepAdvantage(lhs[..., 0, :, :], rhs[..., 0, :, :])
    H = mdp.horizon
    pi_t = _time_indexed(mdp, pi)
    pad = [(0, 0)] * len(lead)
    pi_p = np.pad(pi_t, pad + [(0, k), (0, 0), (0, 0)], constant_values=1.0 / mdp.num_actions)
    adv_p = np.pad(adv, pad + [(0, k), (0, 0), (0, 0)])
    v_p = np.pad(v, pad + [(0, k + 1), (0, 0)])
    alive = np.broadcast_to((np.arange(H + k) < H).astype(np.float64), lead + (H + k,)).copy()
    lhs, rhs = _call(k_step_identity, batched, mdp.transitions, mdp.rewards, pi_p, adv_p, v_p,
                     _per_mdp(mdp, mdp.gamma), alive, k=k)
    return KStepAdvantage(lhs, rhs)
