"""toy_mdp: the exact KL-regularized solver against independent NumPy oracles, Proposition 1 and
its consequences as hypothesis property tests, bad input, float64 isolation and batching.

Generated MDPs have S <= 30, A <= 10 and are padded to S=30, A=10 (unreachable absorbing states,
actions with pi_ref = 0) so that the jitted kernels compile once per horizon, not per example.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

import toy_mdp
from toy_mdp import TabularMDP

S_PAD, A_PAD = 30, 10
HORIZONS = (None, 1, 3, 8)


# ------------------------------------------------------------------------------------------------
# Independent NumPy oracles
# ------------------------------------------------------------------------------------------------

def np_log_ratio(pi, ref):
    out = np.zeros_like(pi)
    live = pi > 0
    out[live] = np.log(pi[live]) - np.log(ref[live])
    return out


def np_evaluate_sa(P, R, pi, ref, beta, gamma, horizon):
    """Evaluate in state-action space: Q = R + gamma P [sum_a' pi (Q - beta log pi/ref)].

    Discounted: the [SA, SA] linear system (I - gamma P Pi) Q = R - gamma P kl (not the [S, S]
    system of the package). Horizon: plain Python loops over t, s, a.
    """
    S, A = R.shape
    if horizon is None:
        kl = beta * np.sum(pi * np_log_ratio(pi, ref), -1)  # [S]
        Pi = np.zeros((S, S * A))
        for s in range(S):
            Pi[s, s * A:(s + 1) * A] = pi[s]
        M = np.eye(S * A) - gamma * P.reshape(S * A, S) @ Pi
        q = np.linalg.solve(M, R.reshape(-1) - gamma * P.reshape(S * A, S) @ kl).reshape(S, A)
        return q, np.sum(pi * (q - beta * np_log_ratio(pi, ref)), -1)
    pis = pi if pi.ndim == 3 else np.stack([pi] * horizon)
    refs = ref if ref.ndim == 3 else np.stack([ref] * horizon)
    qs, vs = np.zeros((horizon, S, A)), np.zeros((horizon, S))
    v_next = np.zeros(S)
    for t in reversed(range(horizon)):
        for s in range(S):
            for a in range(A):
                qs[t, s, a] = R[s, a] + gamma * sum(P[s, a, u] * v_next[u] for u in range(S))
            lr = np_log_ratio(pis[t, s], refs[t, s])
            vs[t, s] = sum(pis[t, s, a] * (qs[t, s, a] - beta * lr[a]) for a in range(A))
        v_next = vs[t]
    return qs, vs


def np_soft_value_iteration(P, R, ref, beta, gamma, iters):
    """Soft value iteration Q <- R + gamma P beta log sum_a ref exp(Q/beta) (NumPy/SciPy)."""
    from scipy.special import logsumexp
    q = np.zeros_like(R)
    with np.errstate(divide="ignore"):
        lr = np.log(ref)
    for _ in range(iters):
        q = R + gamma * P @ (beta * logsumexp(lr + q / beta, axis=-1))
    return q


def np_value_iteration(P, R, mask, gamma, iters):
    v = np.zeros(R.shape[0])
    for _ in range(iters):
        v = np.where(mask, R + gamma * P @ v, -np.inf).max(-1)
    return R + gamma * P @ v


# ------------------------------------------------------------------------------------------------
# Generated problems, padded to fixed shapes
# ------------------------------------------------------------------------------------------------

def pad_problem(mdp: TabularMDP, ref: np.ndarray) -> tuple[TabularMDP, np.ndarray]:
    """Pad to S_PAD states (absorbing, reward 0, never reached) and A_PAD actions (pi_ref = 0)."""
    S, A = mdp.num_states, mdp.num_actions
    P = np.zeros((S_PAD, A_PAD, S_PAD))
    P[:S, :A, :S] = mdp.transitions
    P[:S, A:, :S] = mdp.transitions[:, :1, :]
    for s in range(S, S_PAD):
        P[s, :, s] = 1.0
    R = np.zeros((S_PAD, A_PAD))
    R[:S, :A] = mdp.rewards
    mu = np.zeros(S_PAD)
    mu[:S] = mdp.initial
    lead = ref.shape[:-2]
    ref_p = np.zeros(lead + (S_PAD, A_PAD))
    ref_p[..., :S, :A] = ref
    ref_p[..., S:, 0] = 1.0
    return TabularMDP(P, R, mdp.gamma, mdp.horizon, mu), ref_p


def unpad(x: np.ndarray, S: int, A: int | None = None) -> np.ndarray:
    return x[..., :S] if A is None else x[..., :S, :A]


@st.composite
def problems(draw, horizons=HORIZONS, deterministic=None, max_gamma=0.99):
    S = draw(st.integers(1, S_PAD))
    A = draw(st.integers(1, A_PAD))
    horizon = draw(st.sampled_from(horizons))
    det = draw(st.booleans()) if deterministic is None else deterministic
    gamma = draw(st.sampled_from([0.0, 0.5, 0.9, max_gamma] + ([1.0] if horizon else [])))
    beta = 10.0 ** draw(st.floats(-2, 2))
    min_prob = draw(st.sampled_from([1e-8, 1e-4, 0.3]))
    zeros = draw(st.integers(0, A - 1))
    time_dependent = horizon is not None and draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    mdp = toy_mdp.random_mdp(seed, S, A, deterministic=det, gamma=gamma, horizon=horizon,
                             reward_scale=scale)
    ref = toy_mdp.random_reference_policy(seed + 1, S, A, min_prob=min_prob, num_zeros=zeros,
                                          horizon=horizon if time_dependent else None)
    return mdp, ref, beta


def ref_as_time(mdp, ref):
    if mdp.horizon is None or ref.ndim == 3:
        return ref
    return np.stack([ref] * mdp.horizon)


def prop1_error(sol, q, v, ref, beta):
    mask = ref > 0
    if q.ndim == 3:
        mask = np.broadcast_to(mask, q.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        lhs = beta * (sol.log_policy - np.log(np.broadcast_to(ref, q.shape)))
    return np.max(np.where(mask, np.abs(lhs - (q - v[..., None])), 0.0))


# ------------------------------------------------------------------------------------------------
# 1. Proposition 1 (+ the evaluator and solver against NumPy oracles)
# ------------------------------------------------------------------------------------------------

@settings(max_examples=60)
@given(problems())
def test_proposition1(problem):
    mdp, ref, beta = problem
    S, A = mdp.num_states, mdp.num_actions
    pm, pref = pad_problem(mdp, ref)
    sol = toy_mdp.solve_kl_regularized(pm, pref, beta)
    q, v = toy_mdp.evaluate_policy(pm, sol.policy, pref, beta)
    assert prop1_error(sol, q, v, pref, beta) <= 1e-8
    # zeros of pi_ref: pi* = 0 and A* = -inf there; elsewhere finite
    dead = np.broadcast_to(pref == 0, sol.policy.shape)
    assert np.all(sol.policy[dead] == 0) and np.all(np.isneginf(sol.advantage[dead]))
    assert np.all(np.isfinite(sol.advantage[~dead]))
    # the padding did not change the answer on the real states: evaluate unpadded with NumPy
    pi = unpad(sol.policy, S, A)
    q_np, v_np = np_evaluate_sa(mdp.transitions, mdp.rewards, pi, ref, beta, float(mdp.gamma),
                                mdp.horizon)
    scale = 1.0 + np.max(np.abs(q_np))
    assert np.max(np.abs(unpad(q, S, A) - q_np)) <= 1e-9 * scale
    assert np.max(np.abs(unpad(v, S) - v_np)) <= 1e-9 * scale
    assert np.max(np.abs(unpad(sol.q, S, A) - q_np)) <= 1e-9 * scale


@settings(max_examples=15)
@given(problems(horizons=(None,), max_gamma=0.9))
def test_solver_matches_numpy_soft_value_iteration(problem):
    mdp, ref, beta = problem
    pm, pref = pad_problem(mdp, ref)
    sol = toy_mdp.solve_kl_regularized(pm, pref, beta)
    q_np = np_soft_value_iteration(mdp.transitions, mdp.rewards, ref, beta, float(mdp.gamma), 400)
    S, A = mdp.num_states, mdp.num_actions
    assert np.max(np.abs(unpad(sol.q, S, A) - q_np)) <= 1e-9 * (1 + np.max(np.abs(q_np)))


# ------------------------------------------------------------------------------------------------
# 2. Optimality, 3. identities
# ------------------------------------------------------------------------------------------------

@settings(max_examples=40)
@given(problems(), st.integers(0, 2 ** 31 - 1))
def test_optimality_and_identities(problem, seed):
    mdp, ref, beta = problem
    pm, pref = pad_problem(mdp, ref)
    sol = toy_mdp.solve_kl_regularized(pm, pref, beta)
    J = lambda pi: toy_mdp.regularized_return(pm, pi, pref, beta)  # noqa: E731
    j_star = J(sol.policy)
    scale = 1e-9 * (1.0 + np.max(np.abs(sol.q)))
    assert j_star >= J(pref) - scale
    rng = np.random.default_rng(seed)
    for eps in (1e-3, 0.1, 1.0):
        noise = np.where(sol.policy > 0, rng.standard_normal(sol.policy.shape) * eps, -np.inf)
        with np.errstate(divide="ignore"):
            logits = np.log(sol.policy) + noise
        pert = np.exp(logits - logits.max(-1, keepdims=True))
        pert /= pert.sum(-1, keepdims=True)
        assert j_star >= J(pert) - scale
    # identities with A* from the independent evaluator
    q, v = toy_mdp.evaluate_policy(pm, sol.policy, pref, beta)
    adv = q - v[..., None]
    refb = np.broadcast_to(pref, adv.shape)
    live = refb > 0
    norm = np.sum(np.where(live, refb * np.exp(np.where(live, adv, 0.0) / beta), 0.0), -1)
    assert np.max(np.abs(norm - 1.0)) <= 1e-7
    e_adv = np.sum(np.where(sol.policy > 0, sol.policy * np.where(live, adv, 0.0), 0.0), -1)
    kl = beta * np.sum(sol.policy * np_log_ratio(sol.policy, np.where(live, refb, 1.0)), -1)
    assert np.max(np.abs(e_adv - kl)) <= 1e-8 * (1 + np.max(np.abs(kl)))


# ------------------------------------------------------------------------------------------------
# 4. Limits against plain value iteration
# ------------------------------------------------------------------------------------------------

@settings(max_examples=20)
@given(problems(horizons=(None, 3)))
def test_limits(problem):
    mdp, ref, _ = problem
    pm, pref = pad_problem(mdp, ref)
    rt = ref_as_time(mdp, pref)
    g = float(mdp.gamma)
    span = np.ptp(pm.rewards[: mdp.num_states, : mdp.num_actions])
    eff = (mdp.horizon or 1.0 / (1.0 - g))  # effective horizon bound
    # large beta: |log pi*/pi_ref| <= span(r) * eff / beta, and V* -> V^{pi_ref}
    big = 1e6
    sol = toy_mdp.solve_kl_regularized(pm, pref, big)
    live = np.broadcast_to(pref > 0, sol.policy.shape)
    lr = np.where(live, sol.log_policy - np.log(np.where(live, np.broadcast_to(pref, live.shape), 1)), 0)
    assert np.max(np.abs(lr)) <= 2 * span * eff / big + 1e-12
    _, v_ref = toy_mdp.evaluate_policy(pm, rt if mdp.horizon else pref, pref, big)
    assert np.max(np.abs(sol.v - v_ref)) <= 2 * span * eff ** 2 / big * (1 + span) + 1e-9
    # small beta: 0 <= V_VI - V*_beta <= beta * max(-log pi_ref(a_VI)) * eff; pi* on the argmax
    small = 1e-8
    mask = pref > 0  # [S, A] or, time-dependent, [H, S, A]: the actions with finite KL
    q_vi, v_vi = toy_mdp.value_iteration(pm, action_mask=mask)
    q_np = np_value_iteration(pm.transitions, pm.rewards, mask, g, 20000) if mdp.horizon is None \
        else None
    if q_np is not None:
        assert np.max(np.abs(np.where(mask, q_vi - q_np, 0))) <= 1e-8 * (1 + np.max(np.abs(q_np)))
    sol = toy_mdp.solve_kl_regularized(pm, pref, small)
    mask = np.broadcast_to(mask, q_vi.shape)
    a_vi = np.argmax(np.where(mask, q_vi, -np.inf), -1)
    refb = np.broadcast_to(pref, q_vi.shape)
    cost = -np.log(np.take_along_axis(refb, a_vi[..., None], -1)[..., 0])
    gap_bound = small * np.max(cost) * eff
    assert np.all(v_vi - sol.v >= -1e-9 * (1 + np.abs(v_vi)))
    assert np.max(v_vi - sol.v) <= gap_bound + 1e-9 * (1 + np.max(np.abs(v_vi)))
    srt = np.sort(np.where(mask, q_vi, -np.inf), -1)
    gap = srt[..., -1] - srt[..., -2]
    clear = gap > 4 * gap_bound + 1e-6  # states with a clear unregularized winner
    mass = np.take_along_axis(sol.policy, a_vi[..., None], -1)[..., 0]
    assert np.all(mass[clear] >= 1 - 1e-9)


# ------------------------------------------------------------------------------------------------
# 5. Progress k-advantage: exact (matrix powers) and Monte Carlo
# ------------------------------------------------------------------------------------------------

@settings(max_examples=25)
@given(problems(), st.sampled_from([1, 2, 5]))
def test_k_advantage_telescopes_exactly(problem, k):
    mdp, ref, beta = problem
    pm, pref = pad_problem(mdp, ref)
    sol = toy_mdp.solve_kl_regularized(pm, pref, beta)
    ks = toy_mdp.progress_k_advantage(pm, sol, k)
    live = sol.policy > 0
    assert np.all(np.isneginf(ks.advantage_sum[~live]))
    scale = 1.0 + np.max(np.abs(sol.q))
    assert np.max(np.abs(ks.advantage_sum[live] - ks.telescoped[live])) <= 1e-9 * scale
    # oracle for the right-hand side on the real states: NumPy loops over paths for k <= 2
    if k <= 2 and mdp.horizon is None:
        S, A = mdp.num_states, mdp.num_actions
        P, R, g = mdp.transitions, mdp.rewards, float(mdp.gamma)
        pi, v = unpad(sol.policy, S, A), unpad(sol.v, S)
        rhs = R - v[:, None]
        if k == 1:
            rhs = rhs + g * P @ v
        else:  # r + gamma E[r_1] + gamma^2 E[V(s_2)] - V(s), with explicit sums over u, a', w
            rbar = np.sum(pi * R, -1)
            v2 = np.einsum("ub,ubw,w->u", pi, P, v)
            rhs = rhs + g * P @ rbar + g * g * P @ v2
        mask = unpad(live, S, A)
        assert np.max(np.abs(unpad(ks.telescoped, S, A)[mask] - rhs[mask])) <= 1e-9 * scale


def np_monte_carlo_k_advantage(mdp, sol, k, n, seed):
    """Mean and standard error of sum_{i<k} gamma^i A*(s_i, a_i) from every (s, a), a_i ~ pi*."""
    rng = np.random.default_rng(seed)
    S, A = mdp.num_states, mdp.num_actions
    g = float(mdp.gamma)
    s0 = np.repeat(np.arange(S), A * n)
    a0 = np.tile(np.repeat(np.arange(A), n), S)
    s, a, total = s0.copy(), a0.copy(), np.zeros(S * A * n)
    cum_p = np.cumsum(mdp.transitions, -1)
    cum_pi = np.cumsum(sol.policy, -1)
    for i in range(k):
        total += g ** i * sol.advantage[s, a]
        s = np.minimum((cum_p[s, a] < rng.random((s.size, 1))).sum(-1), S - 1)
        a = np.minimum((cum_pi[s] < rng.random((s.size, 1))).sum(-1), A - 1)
    total = total.reshape(S, A, n)
    return total.mean(-1), total.std(-1) / np.sqrt(n)


def test_k_advantage_monte_carlo():
    """Monte Carlo estimate within 5 standard errors (+1e-9) of the exact telescoped value."""
    mdp = toy_mdp.random_mdp(3, 6, 3, gamma=0.9)
    ref = toy_mdp.random_reference_policy(4, 6, 3, min_prob=0.05)
    sol = toy_mdp.solve_kl_regularized(mdp, ref, 0.5)
    for k in (1, 3, 6):
        exact = toy_mdp.progress_k_advantage(mdp, sol, k).telescoped
        mean, se = np_monte_carlo_k_advantage(mdp, sol, k, 4000, seed=k)
        assert np.all(np.abs(mean - exact) <= 5 * se + 1e-9), (k, np.max(np.abs(mean - exact) / se))


# ------------------------------------------------------------------------------------------------
# 6. Where the identity breaks: the trajectory posterior of control-as-inference
# ------------------------------------------------------------------------------------------------

@settings(max_examples=25)
@given(problems(deterministic=True))
def test_trajectory_posterior_equals_pi_star_on_deterministic_mdps(problem):
    mdp, ref, beta = problem
    pm, pref = pad_problem(mdp, ref)
    a = toy_mdp.solve_kl_regularized(pm, pref, beta)
    b = toy_mdp.solve_trajectory_posterior(pm, pref, beta)
    assert np.max(np.abs(a.policy - b.policy)) <= 1e-9
    assert np.max(np.abs(a.v - b.v)) <= 1e-9 * (1 + np.max(np.abs(a.v)))


@settings(max_examples=25)
@given(problems(deterministic=False), st.integers(0, 2 ** 31 - 1))
@example(  # found by hypothesis: a small beta saturates both policies (1 - 1e-25 vs 1 - 1e-33), so they
    # differ only in log space
    (toy_mdp.TabularMDP(transitions=np.ones((1, 1, 1)), rewards=np.array([[-0.01321049]]), gamma=np.array(0.0),
                        horizon=None, initial=np.array([1.0])), np.array([[1.0]]), 0.01), 0)
def test_trajectory_posterior_differs_on_stochastic_mdps(problem, seed):
    mdp, ref, beta = problem
    g = float(mdp.gamma)
    S, A = mdp.num_states, mdp.num_actions
    if S < 2 or A < 2 or g == 0.0 or (mdp.horizon is not None and mdp.horizon < 2) or \
            np.all((ref > 0).sum(-1) < 2):
        # non-degenerate by construction: the posterior's optimism needs a future and a choice
        mdp = toy_mdp.random_mdp(seed, max(S, 2), max(A, 2), gamma=max(g, 0.5),
                                 horizon=None if mdp.horizon is None else max(mdp.horizon, 2))
        ref = toy_mdp.random_reference_policy(seed + 1, max(S, 2), max(A, 2), min_prob=0.3)
        S, A = mdp.num_states, mdp.num_actions
    pm, pref = pad_problem(mdp, ref)
    a = toy_mdp.solve_kl_regularized(pm, pref, beta)
    b = toy_mdp.solve_trajectory_posterior(pm, pref, beta)
    # the posterior is optimistic (Jensen: log E exp >= E log) ...
    assert np.all(b.v >= a.v - 1e-9 * (1 + np.abs(a.v)))
    # ... its policy differs from pi*, and Proposition 1 fails for it: its log-ratio is not its
    # own advantage, and it is suboptimal for the KL-regularized objective
    support = np.broadcast_to(pref > 0, a.log_policy.shape)  # log-policies are finite there
    assert np.max(np.abs(a.log_policy[support] - b.log_policy[support])) > 1e-9
    q, v = toy_mdp.evaluate_policy(pm, b.policy, pref, beta)
    assert prop1_error(b, q, v, pref, beta) > 1e-9
    j = lambda pi: toy_mdp.regularized_return(pm, pi, pref, beta)  # noqa: E731
    assert j(a.policy) >= j(b.policy) - 1e-9 * (1 + np.max(np.abs(a.q)))


def test_trajectory_posterior_is_the_bayesian_posterior():
    """With a horizon and gamma = 1 the posterior's first-step policy equals the marginal of
    p(tau | O) ∝ mu pi_ref exp(sum r / beta) P, enumerated over all trajectories."""
    S, A, H, beta = 3, 2, 3, 0.7
    mdp = toy_mdp.random_mdp(11, S, A, gamma=1.0, horizon=H)
    ref = toy_mdp.random_reference_policy(12, S, A, min_prob=0.1, horizon=H)
    post = toy_mdp.solve_trajectory_posterior(mdp, ref, beta)
    joint = np.zeros((S, A))
    for s0 in range(S):
        for acts in itertools.product(range(A), repeat=H):
            for nxt in itertools.product(range(S), repeat=H - 1):
                states = (s0,) + nxt
                w = 1.0
                for t in range(H):
                    w *= ref[t, states[t], acts[t]] * np.exp(mdp.rewards[states[t], acts[t]] / beta)
                    if t + 1 < H:
                        w *= mdp.transitions[states[t], acts[t], states[t + 1]]
                joint[s0, acts[0]] += w
    np.testing.assert_allclose(post.policy[0], joint / joint.sum(-1, keepdims=True), rtol=1e-10)
    sol = toy_mdp.solve_kl_regularized(mdp, ref, beta)
    assert np.max(np.abs(sol.policy[0] - post.policy[0])) > 1e-6


# ------------------------------------------------------------------------------------------------
# State visitation, batching, float64 isolation
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("horizon", [None, 4])
def test_state_visitation_matches_forward_simulation(horizon):
    mdp = toy_mdp.random_mdp(5, 7, 3, gamma=0.8 if horizon is None else 0.9, horizon=horizon)
    pi = toy_mdp.random_reference_policy(6, 7, 3, min_prob=0.1)
    d = toy_mdp.state_visitation(mdp, pi)
    P_pi = np.einsum("sa,sat->st", pi, mdp.transitions)
    marg = [mdp.initial]
    for _ in range(400 if horizon is None else horizon - 1):
        marg.append(marg[-1] @ P_pi)
    if horizon is None:
        g = 0.8
        expect = (1 - g) * sum(g ** t * m for t, m in enumerate(marg))
        np.testing.assert_allclose(d, expect, atol=1e-12)
        # J = sum_s d(s) r_pi(s) / (1 - gamma) for beta -> pi = ref (no KL)
        j = toy_mdp.regularized_return(mdp, pi, pi, 1.0)
        assert abs(j - np.sum(d * np.sum(pi * mdp.rewards, -1)) / (1 - g)) <= 1e-10
    else:
        np.testing.assert_allclose(d, np.stack(marg), atol=1e-12)


def test_batched_equals_single_and_vmap_kernel():
    N, S, A = 5, 8, 4
    mdp = toy_mdp.random_mdp(7, S, A, gamma=0.95, num_mdps=N)
    ref = toy_mdp.random_reference_policy(8, S, A, min_prob=1e-6, num_mdps=N)
    betas = np.array([0.01, 0.1, 1.0, 10.0, 100.0])
    sol = toy_mdp.solve_kl_regularized(mdp, ref, betas)
    q, v = toy_mdp.evaluate_policy(mdp, sol.policy, ref, betas)
    assert sol.policy.shape == (N, S, A) and v.shape == (N, S)
    for i in range(N):
        one = toy_mdp.solve_kl_regularized(mdp[i], ref[i], betas[i])
        np.testing.assert_allclose(sol.policy[i], one.policy, rtol=1e-10, atol=1e-14)
        q1, v1 = toy_mdp.evaluate_policy(mdp[i], one.policy, ref[i], betas[i])
        np.testing.assert_allclose(v[i], v1, rtol=1e-10, atol=1e-12)
    stacked = toy_mdp.stack([mdp[i] for i in range(N)])
    np.testing.assert_allclose(stacked.transitions, mdp.transitions, rtol=1e-15, atol=0)
    # the pure kernel under a user's own jit(vmap) inside toy_mdp.float64()
    from toy_mdp.solve import soft_policy_iteration
    with toy_mdp.float64():
        out = jax.jit(jax.vmap(soft_policy_iteration))(
            jnp.asarray(mdp.transitions), jnp.asarray(mdp.rewards), jnp.log(jnp.asarray(ref)),
            jnp.asarray(betas), jnp.asarray(mdp.gamma))
        assert out[2].dtype == jnp.float64
    np.testing.assert_allclose(np.exp(np.asarray(out[2])), sol.policy, rtol=1e-10, atol=1e-14)
    # finite horizon, batched with a time-dependent reference
    mh = toy_mdp.random_mdp(9, S, A, gamma=1.0, horizon=4, num_mdps=N)
    rh = toy_mdp.random_reference_policy(10, S, A, horizon=4, num_mdps=N)
    sh = toy_mdp.solve_kl_regularized(mh, rh, 0.5)
    assert sh.q.shape == (N, 4, S, A)
    np.testing.assert_allclose(sh.q[2], toy_mdp.solve_kl_regularized(mh[2], rh[2], 0.5).q, rtol=1e-12)


def test_float64_inside_float32_outside():
    assert jnp.zeros(1).dtype == jnp.float32
    mdp = toy_mdp.random_mdp(0, 4, 2, gamma=0.9)
    ref = toy_mdp.random_reference_policy(1, 4, 2)
    sol, info = toy_mdp.solve_kl_regularized(mdp, ref, 1.0, return_info=True)
    assert toy_mdp.Solution._fields == ("q", "v", "policy", "log_policy", "advantage")
    assert 1 <= int(info.iterations) <= 100 and float(info.residual) <= 1e-10
    assert sol.q.dtype == np.float64 and sol.policy.dtype == np.float64
    toy_mdp.evaluate_policy(mdp, sol.policy, ref, 1.0)
    toy_mdp.progress_k_advantage(mdp, sol, 3)
    assert jnp.zeros(1).dtype == jnp.float32
    assert jnp.asarray(1.0).dtype == jnp.float32
    assert not jax.config.jax_enable_x64


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

def _good():
    P = np.full((3, 2, 3), 1 / 3)
    R = np.zeros((3, 2))
    return P, R, np.full((3, 2), 0.5)


@pytest.mark.parametrize("mutate, match", [
    (lambda P, R: (P * 1.1, R, 0.9, None), "transitions.*sum to 1"),
    (lambda P, R: (np.where(np.arange(3) == 0, -0.1, P + 0.05), R, 0.9, None), "transitions.*non-negative"),
    (lambda P, R: (P, np.where(R == 0, np.nan, R), 0.9, None), "rewards.*finite"),
    (lambda P, R: (P, R + np.inf, 0.9, None), "rewards.*finite"),
    (lambda P, R: (P, R, 1.0, None), "gamma.*< 1"),
    (lambda P, R: (P, R, -0.1, None), "gamma"),
    (lambda P, R: (P, R, 1.5, 3), "gamma.*<= 1"),
    (lambda P, R: (P, R, np.nan, None), "gamma.*finite"),
    (lambda P, R: (P, R[:2], 0.9, None), "rewards.*shape"),
    (lambda P, R: (P[:, :, :2], R, 0.9, None), "transitions.*shape"),
    (lambda P, R: (P, R, 0.9, 0), "horizon"),
])
def test_bad_mdp(mutate, match):
    P, R, _ = _good()
    with pytest.raises(ValueError, match=match):
        TabularMDP(*mutate(P, R))


def test_bad_initial():
    P, R, _ = _good()
    with pytest.raises(ValueError, match="initial"):
        TabularMDP(P, R, 0.9, initial=np.array([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="initial.*shape"):
        TabularMDP(P, R, 0.9, initial=np.array([0.5, 0.5]))


def test_bad_solver_input():
    P, R, ref = _good()
    mdp = TabularMDP(P, R, 0.9)
    for beta in (0.0, -1.0, np.nan, np.inf):
        with pytest.raises(ValueError, match="beta"):
            toy_mdp.solve_kl_regularized(mdp, ref, beta)
    with pytest.raises(ValueError, match="ref_policy.*sum to 1"):
        toy_mdp.solve_kl_regularized(mdp, ref * 0.9, 1.0)
    with pytest.raises(ValueError, match="ref_policy.*non-negative"):
        toy_mdp.solve_kl_regularized(mdp, np.array([[1.5, -0.5]] * 3), 1.0)
    with pytest.raises(ValueError, match="ref_policy.*finite"):
        toy_mdp.solve_kl_regularized(mdp, np.array([[np.nan, 0.5]] * 3), 1.0)
    with pytest.raises(ValueError, match="ref_policy.*shape"):
        toy_mdp.solve_kl_regularized(mdp, ref[:2], 1.0)
    with pytest.raises(ValueError, match="ref_policy.*shape"):  # time-dependent needs a horizon
        toy_mdp.solve_kl_regularized(mdp, np.stack([ref] * 4), 1.0)
    with pytest.raises(ValueError, match="policy.*ref_policy = 0"):
        zero_ref = np.array([[1.0, 0.0]] * 3)
        toy_mdp.evaluate_policy(mdp, ref, zero_ref, 1.0)
    with pytest.raises(ValueError, match="k"):
        toy_mdp.progress_k_advantage(mdp, toy_mdp.solve_kl_regularized(mdp, ref, 1.0), 0)


def test_float32_policies_are_accepted_and_renormalized():
    """A float32 softmax (rows off by ~1e-7) is a valid policy; a row off by 1e-3 is not."""
    mdp = toy_mdp.random_mdp(2, 5, 4, gamma=0.9)
    logits = jax.random.normal(jax.random.key(0), (5, 4))
    pi32 = np.asarray(jax.nn.softmax(logits * 30.0, axis=-1))
    assert pi32.dtype == np.float32
    d = toy_mdp.state_visitation(mdp, pi32)
    assert abs(d.sum() - 1.0) <= 1e-12
    with pytest.raises(ValueError, match="policy.*sum to 1"):
        toy_mdp.state_visitation(mdp, pi32 * (1 + 1e-3))


def test_exact_zeros_are_supported():
    """An exact zero in pi_ref is allowed: pi* = 0 there and A* = -inf; the rest is the solution
    of the MDP without that action."""
    P, R, _ = _good()
    R = np.array([[1.0, 5.0], [0.0, 2.0], [3.0, -1.0]])
    mdp = TabularMDP(P, R, 0.9)
    ref = np.array([[1.0, 0.0], [0.3, 0.7], [0.5, 0.5]])
    sol = toy_mdp.solve_kl_regularized(mdp, ref, 0.5)
    assert sol.policy[0, 1] == 0.0 and np.isneginf(sol.advantage[0, 1])
    assert np.isneginf(sol.log_policy[0, 1]) and sol.policy[0, 0] == 1.0
    assert sol.advantage[0, 0] == pytest.approx(0.0, abs=1e-12)
    q, v = toy_mdp.evaluate_policy(mdp, sol.policy, ref, 0.5)
    assert prop1_error(sol, q, v, ref, 0.5) <= 1e-10
