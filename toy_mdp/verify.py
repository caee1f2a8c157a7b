"""The Proposition 1 report: every check of issue 2 over a batch of random MDPs.

``python -m toy_mdp verify [--num-mdps N] [--seed S] [--json PATH]`` generates N random MDPs in
four equal groups (discounted / finite horizon x stochastic / deterministic transitions; S=30,
A=10 by default), with per-MDP gamma (discounted U[0.5, 0.99], horizon H=10 with U[0.5, 1]),
beta log-uniform in [1e-2, 1e2], and reference policies with probabilities down to ~1e-8 and
exact zeros (time-dependent with a horizon). Each group is solved in one batched call. Prints a
table (check, worst error, tolerance, pass) and returns non-zero if any check fails.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional, Sequence

import numpy as np

from pa_jax.io import atomic_write_json
from toy_mdp.mdp import TabularMDP, random_mdp, random_reference_policy
from toy_mdp.solve import (evaluate_policy, progress_k_advantage, regularized_return,
                           solve_kl_regularized, solve_trajectory_posterior, value_iteration)

BETA_LARGE = 1e8
BETA_SMALL = 1e-8
K_VALUES = (1, 3, 10)


@dataclasses.dataclass
class Check:
    """One row of the report. ``kind="max"``: pass iff ``value <= tolerance``; ``kind="min"``:
    pass iff ``value >= tolerance`` (a quantity that must stay away from 0); ``"info"``: no test."""
    name: str
    value: float
    tolerance: float
    kind: str = "max"
    detail: str = ""

    @property
    def passed(self) -> bool:
        if self.kind == "info":
            return True
        ok = self.value <= self.tolerance if self.kind == "max" else self.value >= self.tolerance
        return bool(ok and np.isfinite(self.value))


@dataclasses.dataclass
class Group:
    name: str
    mdp: TabularMDP
    ref: np.ndarray
    beta: np.ndarray

    @property
    def deterministic(self) -> bool:
        return "deterministic" in self.name


def make_groups(num_mdps: int, seed: int, num_states: int = 30, num_actions: int = 10,
                horizon: int = 10) -> list[Group]:
    """Four batched groups of random problems (see module docstring)."""
    rng = np.random.default_rng(seed)
    groups = []
    kinds = [(None, False), (None, True), (horizon, False), (horizon, True)]
    sizes = [num_mdps // 4 + (i < num_mdps % 4) for i in range(4)]
    for (H, det), n in zip(kinds, sizes):
        if n == 0:
            continue
        base = random_mdp(int(rng.integers(2 ** 31)), num_states, num_actions, deterministic=det,
                          horizon=H, num_mdps=n)
        gammas = rng.uniform(0.5, 0.99, n) if H is None else rng.uniform(0.5, 1.0, n)
        gammas[0] = 0.99 if H is None else 1.0
        mdp = TabularMDP(base.transitions, base.rewards, gammas, H)
        min_probs = np.array([1e-8, 1e-4, 0.3])[np.arange(n) % 3]
        # exact zeros in every other MDP, always leaving >= 2 actions (a choice) per state
        zeros = np.where(np.arange(n) % 2 == 0, 0, min(2, num_actions - 2))
        ref = np.stack([random_reference_policy(int(rng.integers(2 ** 31)), num_states, num_actions,
                                                min_prob=float(mp), num_zeros=int(z), horizon=H)
                        for mp, z in zip(min_probs, zeros)])
        beta = 10.0 ** rng.uniform(-2, 2, n)
        name = f"{'discounted' if H is None else f'horizon {H}'}, " \
               f"{'deterministic' if det else 'stochastic'}"
        groups.append(Group(name, mdp, ref, beta))
    return groups


def _masked_max(x: np.ndarray, mask: np.ndarray) -> float:
    return float(np.max(np.where(mask, x, -np.inf))) if np.any(mask) else 0.0


def _log_ratio(pi_log: np.ndarray, ref: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ref > 0, pi_log - np.log(np.where(ref > 0, ref, 1.0)), 0.0)


def _bcast(ref: np.ndarray, shape: tuple) -> np.ndarray:
    """A stationary ``[N, S, A]`` reference broadcast to ``[N, H, S, A]`` where needed."""
    return ref if ref.shape == shape else np.broadcast_to(ref[:, None], shape)


def _prop1_errors(g: Group, log_policy: np.ndarray) -> np.ndarray:
    """Per-MDP ``max |beta log(pi/pi_ref) - (Q^pi - V^pi)|`` with the independent evaluator."""
    q, v = evaluate_policy(g.mdp, np.exp(log_policy), g.ref, g.beta)
    ref = _bcast(g.ref, q.shape)
    b = g.beta.reshape((-1,) + (1,) * (q.ndim - 1))
    err = np.where(ref > 0, np.abs(b * _log_ratio(log_policy, ref) - (q - v[..., None])), 0.0)
    return err.reshape(err.shape[0], -1).max(-1)


def monte_carlo_k_advantage(mdp: TabularMDP, policy: np.ndarray, advantage: np.ndarray, k: int,
                            num_samples: int, rng: np.random.Generator
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Monte Carlo ``E[sum_{i<k} gamma^i A(s_i, a_i) | s_0 = s, a_0 = a]``, ``a_i ~ policy``,
    from every ``(s, a)`` of a single discounted MDP: ``(mean, standard error)``, ``[S, A]``."""
    S, A = mdp.num_states, mdp.num_actions
    g = float(mdp.gamma)
    s = np.repeat(np.arange(S), A * num_samples)
    a = np.tile(np.repeat(np.arange(A), num_samples), S)
    total = np.zeros(s.size)
    cum_p, cum_pi = np.cumsum(mdp.transitions, -1), np.cumsum(policy, -1)
    for i in range(k):
        adv = advantage[s, a]
        total += g ** i * np.where(np.isneginf(adv), 0.0, adv)
        if i + 1 < k:
            s = np.minimum((cum_p[s, a] < rng.random((s.size, 1))).sum(-1), S - 1)
            a = np.minimum((cum_pi[s] < rng.random((s.size, 1))).sum(-1), A - 1)
    total = total.reshape(S, A, num_samples)
    return total.mean(-1), total.std(-1, ddof=1) / np.sqrt(num_samples)


@np.errstate(invalid="ignore", divide="ignore")  # -inf - -inf on masked entries (selected away)
def run_checks(num_mdps: int = 500, seed: int = 0, *, num_states: int = 30, num_actions: int = 10,
               mc_mdps: int = 4, mc_samples: int = 2000,
               log: Optional[Callable[[str], None]] = None) -> list[Check]:
    """Run every check of issue 2 and return the rows of the report."""
    log = log or (lambda msg: None)
    groups = make_groups(num_mdps, seed, num_states, num_actions)
    acc: dict[str, list[float]] = {}

    def add(key: str, values) -> None:
        acc.setdefault(key, []).extend(np.atleast_1d(np.asarray(values, np.float64)).tolist())

    rng = np.random.default_rng(seed + 12345)
    for g in groups:
        t0 = time.perf_counter()
        mdp, ref, beta = g.mdp, g.ref, g.beta
        n = beta.shape[0]
        sol, info = solve_kl_regularized(mdp, ref, beta, return_info=True)
        refb = _bcast(ref, sol.q.shape)
        live = refb > 0
        bcol = beta.reshape((-1,) + (1,) * (sol.q.ndim - 1))
        flat = lambda x: x.reshape(n, -1)  # noqa: E731
        # 1. Proposition 1
        add("prop1", _prop1_errors(g, sol.log_policy))
        add("masked", [np.all(sol.policy[~live] == 0) and np.all(np.isneginf(sol.advantage[~live]))
                       and np.all(np.isfinite(sol.advantage[live]))])
        # 2. optimality: J(pi*) >= J(pi_ref), J(perturbed pi*)
        j_star = regularized_return(mdp, sol.policy, ref, beta)
        scale = 1.0 + np.abs(j_star)
        others = [regularized_return(mdp, refb, ref, beta)]
        for eps in (1e-3, 1e-1, 1.0):
            logits = np.where(sol.policy > 0, sol.log_policy + eps * rng.standard_normal(sol.q.shape),
                              -np.inf)
            pert = np.exp(logits - logits.max(-1, keepdims=True))
            others.append(regularized_return(mdp, pert / pert.sum(-1, keepdims=True), ref, beta))
        add("optimality", np.max([(j - j_star) / scale for j in others], axis=0))
        add("optimality_margin_ref", (j_star - others[0]) / scale)
        # 3. identities with A* from the evaluator
        q, v = evaluate_policy(mdp, sol.policy, ref, beta)
        adv = np.where(live, q - v[..., None], 0.0)
        norm = np.sum(np.where(live, refb * np.exp(adv / bcol), 0.0), -1)
        add("normalization", flat(np.abs(norm - 1.0)).max(-1))
        e_adv = np.sum(np.where(sol.policy > 0, sol.policy * adv, 0.0), -1)
        kl = np.sum(np.where(sol.policy > 0, sol.policy * _log_ratio(sol.log_policy, refb), 0.0), -1)
        add("kl_identity", flat(np.abs(e_adv - bcol[..., 0] * kl)).max(-1))
        # 4. limits vs plain value iteration
        big = solve_kl_regularized(mdp, ref, BETA_LARGE)
        add("limit_large", flat(np.abs(np.where(live, _log_ratio(big.log_policy, refb), 0.0))).max(-1))
        small = solve_kl_regularized(mdp, ref, BETA_SMALL)
        mask = ref > 0
        q_vi, v_vi = value_iteration(mdp, action_mask=mask)
        add("limit_small_value", flat(np.abs(v_vi - small.v)).max(-1))
        a_vi = np.argmax(np.where(_bcast(mask, q_vi.shape), q_vi, -np.inf), -1)
        srt = np.sort(np.where(_bcast(mask, q_vi.shape), q_vi, -np.inf), -1)
        gap = srt[..., -1] - srt[..., -2]
        clear = ~(gap <= 1e-3)  # a clear unregularized winner (inf gap: one allowed action)
        mass = np.take_along_axis(small.policy, a_vi[..., None], -1)[..., 0]
        add("limit_small_argmax", flat(np.where(clear, 1.0 - mass, 0.0)).max(-1))
        add("limit_small_states", [clear.mean()])
        # 5. progress k-advantage (exact)
        for k in K_VALUES:
            ks = progress_k_advantage(mdp, sol, k)
            alive = sol.policy > 0
            add("k_exact", flat(np.where(alive, np.abs(ks.advantage_sum - ks.telescoped), 0.0)).max(-1)
                / (1.0 + flat(np.abs(sol.q)).max(-1)))
        # 5b. Monte Carlo on a few discounted stochastic MDPs
        if mdp.horizon is None and not g.deterministic:
            for i in range(min(mc_mdps, n)):
                one = mdp[i]
                one_sol = solve_kl_regularized(one, ref[i], beta[i])
                for k in (2, 5):
                    exact = progress_k_advantage(one, one_sol, k).telescoped
                    mean, se = monte_carlo_k_advantage(one, one_sol.policy, one_sol.advantage, k,
                                                       mc_samples, rng)
                    alive = one_sol.policy > 0
                    z = np.abs(mean - exact) / np.maximum(se, 1e-12)
                    add("k_mc", [np.max(np.where(alive & (se > 0), z, 0.0))])
                    add("k_mc_abs", [np.max(np.where(alive, np.abs(mean - exact), 0.0))])
        # 6. trajectory posterior
        post = solve_trajectory_posterior(mdp, ref, beta)
        diff = flat(np.abs(post.policy - sol.policy)).max(-1)
        if g.deterministic:
            add("posterior_det", diff)
        else:
            # in advantage units (beta log pi_post / pi* = A_post - A*): comparable across beta
            add("posterior_sto", flat(np.where(live, np.abs(post.advantage - sol.advantage),
                                               0.0)).max(-1))
            add("posterior_sto_pi", diff)
            add("posterior_prop1", _prop1_errors(g, post.log_policy))
            j_post = regularized_return(mdp, post.policy, ref, beta)
            add("posterior_regret", (j_star - j_post) / scale)
            add("posterior_v_gap", flat(post.v - sol.v).max(-1))
        log(f"  {g.name}: {n} MDPs, {time.perf_counter() - t0:.1f} s "
            f"(soft policy iteration steps <= {int(np.max(info.iterations))})")

    mx = lambda key: float(np.max(acc[key])) if acc.get(key) else 0.0  # noqa: E731
    mn = lambda key: float(np.min(acc[key])) if acc.get(key) else float("nan")  # noqa: E731
    md = lambda key: float(np.median(acc[key])) if acc.get(key) else float("nan")  # noqa: E731
    n_sto = len(acc.get("posterior_sto", []))
    return [
        Check("1. Proposition 1: |beta log(pi*/pi_ref) - (Q^pi* - V^pi*)|", mx("prop1"), 1e-8),
        Check("1. pi_ref = 0 -> pi* = 0, A* = -inf (violations)",
              float(len(acc["masked"]) - sum(acc["masked"])), 0.0),
        Check("2. optimality: max (J(pi) - J(pi*)) / (1 + |J*|), pi = pi_ref or perturbed",
              max(mx("optimality"), 0.0), 1e-12,
              detail=f"median margin over pi_ref {md('optimality_margin_ref'):.3g}"),
        Check("3. |sum_a pi_ref exp(A*/beta) - 1|", mx("normalization"), 1e-7),
        Check("3. |E_pi*[A*] - beta KL(pi* || pi_ref)|", mx("kl_identity"), 1e-8),
        Check(f"4. beta={BETA_LARGE:g}: max |log pi*/pi_ref|", mx("limit_large"), 1e-4),
        Check(f"4. beta={BETA_SMALL:g}: max |V*_beta - V_VI| (value iteration)",
              mx("limit_small_value"), 1e-4),
        Check(f"4. beta={BETA_SMALL:g}: max 1 - pi*(argmax Q_VI) (gap > 1e-3)",
              mx("limit_small_argmax"), 1e-9,
              detail=f"{np.mean(acc['limit_small_states']):.1%} of states have a clear winner"),
        Check(f"5. k-advantage telescopes (exact, k in {K_VALUES}), / (1 + max|Q*|)",
              mx("k_exact"), 1e-11),
        Check("5. k-advantage Monte Carlo (k in (2, 5)): max |z| = |MC - exact| / s.e.",
              mx("k_mc"), 6.0, detail=f"max |MC - exact| {mx('k_mc_abs'):.3g}, "
              f"{mc_samples} samples per (s, a)"),
        Check("6. trajectory posterior = pi* on deterministic MDPs: max |diff|",
              mx("posterior_det"), 1e-9),
        Check("6. trajectory posterior != pi* on stochastic MDPs: min max |A_post - A*|",
              mn("posterior_sto"), 1e-6, kind="min",
              detail=f"median {md('posterior_sto'):.3g} over {n_sto} MDPs; max |pi_post - pi*| "
                     f"median {md('posterior_sto_pi'):.3g}"),
        Check("6. (info) Prop. 1 error of the posterior policy, stochastic: median",
              md("posterior_prop1"), float("nan"), kind="info",
              detail=f"max {mx('posterior_prop1'):.3g}, min {mn('posterior_prop1'):.3g}"),
        Check("6. (info) regret J(pi*) - J(posterior) / (1 + |J*|), stochastic: median",
              md("posterior_regret"), float("nan"), kind="info",
              detail=f"max {mx('posterior_regret'):.3g}, min {mn('posterior_regret'):.3g}; "
                     f"posterior V - V* up to {mx('posterior_v_gap'):.3g}"),
    ]


def format_table(checks: Sequence[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'check':<{width}}  {'worst':>10}  {'tolerance':>11}  pass",
             "-" * (width + 32)]
    for c in checks:
        tol = "" if c.kind == "info" else ("<= " if c.kind == "max" else ">= ") + f"{c.tolerance:.0e}"
        status = "-" if c.kind == "info" else ("PASS" if c.passed else "FAIL")
        lines.append(f"{c.name:<{width}}  {c.value:>10.3e}  {tol:>11}  {status}"
                     + (f"   ({c.detail})" if c.detail else ""))
    return "\n".join(lines)


def write_json_atomic(path: str, payload: dict) -> None:
    """Write ``payload`` as strict JSON to ``path`` atomically (``pa_jax.io.atomic_write_json``)."""
    atomic_write_json(path, payload)


def main(num_mdps: int = 500, seed: int = 0, json_path: Optional[str] = None, *,
         num_states: int = 30, num_actions: int = 10, quiet: bool = False) -> int:
    """Run the report, print it, optionally write JSON; return 0 iff every check passes."""
    if num_mdps < 4:
        raise ValueError(f"--num-mdps: expected >= 4 (one per group), got {num_mdps}")
    if num_states < 2 or num_actions < 2:
        raise ValueError(f"--states, --actions: expected >= 2 (check 6 needs a choice and a "
                         f"random next state), got {num_states}, {num_actions}")
    say = (lambda m: None) if quiet else (lambda m: print(m, flush=True))
    t0 = time.perf_counter()
    say(f"Proposition 1 verification: {num_mdps} random MDPs (S={num_states}, A={num_actions}), "
        f"seed {seed}")
    checks = run_checks(num_mdps, seed, num_states=num_states, num_actions=num_actions, log=say)
    elapsed = time.perf_counter() - t0
    ok = all(c.passed for c in checks)
    print(format_table(checks))
    print(f"{'ALL CHECKS PASSED' if ok else 'SOME CHECKS FAILED'} ({elapsed:.1f} s)")
    if json_path:
        write_json_atomic(json_path, {
            "num_mdps": num_mdps, "seed": seed, "num_states": num_states,
            "num_actions": num_actions, "passed": ok, "seconds": elapsed,
            "checks": [{"check": c.name, "worst": c.value, "tolerance": c.tolerance,
                        "kind": c.kind, "passed": c.passed, "detail": c.detail}
                       for c in checks],
        })
    return 0 if ok else 1
