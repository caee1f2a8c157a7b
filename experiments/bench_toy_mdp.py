"""Benchmark: solve 1,000 random MDPs (S=50, A=10, gamma=0.99) to a Proposition-1 error < 1e-10.

    python experiments/bench_toy_mdp.py [--num-mdps 1000] [--states 50] [--actions 10] [--beta 1.0]

Batched soft policy iteration (one jit(vmap) call) after compilation, timed as the best of
``--repeats`` runs; the Proposition-1 error ``max |beta log(pi*/pi_ref) - (Q^pi* - V^pi*)|`` uses
the independent evaluator ``toy_mdp.evaluate_policy``. Baseline measured in the same run: the
same batch under soft *value* iteration (the contraction ``Q <- r + gamma P V_soft(Q)``), timed
for ``--baseline-sweeps`` sweeps and extrapolated to the ``log(1e-13) / log(gamma)`` sweeps it needs
(~3,000 at gamma=0.99; a full run takes minutes), reporting the speed ratio. Target: < 5 s.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import toy_mdp
from toy_mdp.solve import soft_improvement


def _soft_value_iteration(P, R, log_ref, beta, gamma, *, tol, max_iter):
    """Baseline: ``Q <- R + gamma P V_soft(Q)`` until ``max |dQ| <= tol * (1 - gamma)``."""
    def cond(state):
        _, delta, it = state
        return (delta > tol * (1 - gamma)) & (it < max_iter)

    def body(state):
        q, _, it = state
        v, _ = soft_improvement(q, log_ref, beta)
        q_new = R + gamma * (P @ v)
        return q_new, jnp.max(jnp.abs(q_new - q)), it + 1

    q, _, it = lax.while_loop(cond, body, (R, jnp.asarray(jnp.inf, R.dtype), jnp.asarray(0)))
    v, log_pi = soft_improvement(q, log_ref, beta)
    return log_pi, it


def prop1_error(mdp, ref, beta, log_policy) -> float:
    policy = np.exp(log_policy)
    q, v = toy_mdp.evaluate_policy(mdp, policy, ref, beta)
    mask = ref > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        lhs = beta * (log_policy - np.log(ref))
    return float(np.max(np.where(mask, np.abs(lhs - (q - v[..., None])), 0.0)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-mdps", type=int, default=1000)
    p.add_argument("--states", type=int, default=50)
    p.add_argument("--actions", type=int, default=10)
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline-sweeps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    mdp = toy_mdp.random_mdp(args.seed, args.states, args.actions, gamma=args.gamma,
                             num_mdps=args.num_mdps)
    ref = toy_mdp.random_reference_policy(args.seed + 1, args.states, args.actions, min_prob=1e-3,
                                          num_mdps=args.num_mdps)
    print(f"{args.num_mdps} MDPs, S={args.states}, A={args.actions}, gamma={args.gamma}, "
          f"beta={args.beta}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")

    t0 = time.perf_counter()
    sol = toy_mdp.solve_kl_regularized(mdp, ref, args.beta)  # compiles
    print(f"soft policy iteration: first call (with compilation) {time.perf_counter() - t0:.2f} s")
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        sol, info = toy_mdp.solve_kl_regularized(mdp, ref, args.beta, return_info=True)
        times.append(time.perf_counter() - t0)
    t_spi = min(times)
    err = prop1_error(mdp, ref, args.beta, sol.log_policy)
    print(f"soft policy iteration: {t_spi:.3f} s (best of {args.repeats}), iterations max "
          f"{int(info.iterations.max())}, Proposition-1 worst error {err:.3e} "
          f"({'PASS' if err < 1e-10 else 'FAIL'} < 1e-10; {'PASS' if t_spi < 5 else 'FAIL'} < 5 s)")

    with toy_mdp.float64():
        fn = jax.jit(jax.vmap(lambda P, R, L, b, g: _soft_value_iteration(
            P, R, L, b, g, tol=0.0, max_iter=args.baseline_sweeps)))
        with np.errstate(divide="ignore"):
            inputs = [jnp.asarray(x) for x in (mdp.transitions, mdp.rewards, np.log(ref),
                                                np.full(args.num_mdps, args.beta), mdp.gamma)]
        jax.block_until_ready(fn(*inputs))
        t0 = time.perf_counter()
        log_pi, it = jax.block_until_ready(fn(*inputs))
        t_svi = time.perf_counter() - t0
        log_pi, it = np.asarray(log_pi), np.asarray(it)
    needed = int(np.ceil(np.log(1e-13) / np.log(args.gamma)))
    t_full = t_svi / int(it.max()) * needed
    print(f"baseline soft value iteration: {t_svi:.3f} s for {int(it.max())} sweeps -> "
          f"~{t_full:.0f} s for the {needed} sweeps to 1e-13 (extrapolated)")
    print(f"speed-up of soft policy iteration over soft value iteration: {t_full / t_spi:.0f}x")

if __name__ == "__main__":
    main()
