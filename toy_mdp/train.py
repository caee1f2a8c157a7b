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
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import tempfile
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from toy_mdp.mdp import random_mdp, random_reference_policy
from toy_mdp.solve import solve_kl_regularized

Array = jax.Array

ALGOS: tuple[str, ...] = ("exact_pg", "reinforce_kl", "grpo", "ppo_clip", "ppo_kl")
METRICS: tuple[str, ...] = (
    "worst_abs_error", "worst_abs_error_all", "mean_abs_error", "pearson", "spearman",
    "pair_agreement", "top1_agreement", "beta_eff", "beta_eff_residual", "return_gap", "kl")


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EnvConfig:
    """The batch of random MDPs and the KL coefficient ``beta`` that defines ``A*``.

    ``horizon=None`` gives discounted MDPs (``gamma < 1``); sampled algorithms then truncate episodes
    at ``rollout_len`` steps (bias ``<= gamma^rollout_len * max|r| / (1 - gamma)``).
    """

    num_mdps: int = 8
    num_states: int = 8
    num_actions: int = 4
    horizon: Optional[int] = 5
    gamma: float = 1.0
    beta: float = 0.5
    reward_scale: float = 1.0
    ref_min_prob: float = 0.05
    deterministic: bool = False
    rollout_len: int = 50
    min_weight: float = 1e-3

    def validate(self) -> None:
        for name in ("num_mdps", "num_states", "num_actions", "rollout_len"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {getattr(self, name)!r}")
        if self.num_actions < 2:
            raise ValueError(f"num_actions: expected >= 2, got {self.num_actions}")
        if self.horizon is not None and int(self.horizon) < 1:
            raise ValueError(f"horizon: expected None or >= 1, got {self.horizon!r}")
        if self.horizon is None and not 0 <= self.gamma < 1:
            raise ValueError(f"gamma: expected 0 <= gamma < 1 without a horizon, got {self.gamma}")
        if self.horizon is not None and not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma: expected 0 <= gamma <= 1 with a horizon, got {self.gamma}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta: expected a finite beta > 0, got {self.beta}")
        if not 0 < self.ref_min_prob <= 1:
            raise ValueError(f"ref_min_prob: expected 0 < ref_min_prob <= 1, got {self.ref_min_prob}")
        if not 0 <= self.min_weight < 1:
            raise ValueError(f"min_weight: expected 0 <= min_weight < 1, got {self.min_weight}")


@dataclasses.dataclass(frozen=True)
class AlgoConfig:
    """Hyperparameters of one training run (recorded in the JSON).

    ``kl_coef`` is the KL coefficient used *in training* (``beta`` of the env for KL algorithms,
    0 for ``ppo_clip``); ``episodes`` is per MDP per step; ``lr`` decays by a cosine schedule to
    ``lr * lr_final_frac`` over all updates.
    """

    algo: str
    steps: int
    lr: float
    kl_coef: float
    lr_final_frac: float = 0.05
    adam_b2: float = 0.999
    episodes: int = 256
    group_size: int = 8
    value_lr: float = 0.1
    clip_eps: float = 0.2
    epochs: int = 4
    gae_lambda: float = 0.95
    normalize_advantages: bool = True
    grpo_kl: str = "k3_loss"          # "k3_loss" (GRPO) or "reward" (k1 penalty in the outcome)
    grpo_std_normalize: bool = True   # divide by the group std (GRPO) or not (Dr. GRPO)
    eval_every: int = 0  # 0: steps // 50

    def validate(self) -> None:
        if self.algo not in ALGOS:
            raise ValueError(f"algo: expected one of {ALGOS}, got {self.algo!r}")
        for name in ("steps", "episodes", "group_size", "epochs"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {getattr(self, name)!r}")
        if self.algo == "grpo" and (self.episodes % self.group_size or self.group_size < 2):
            raise ValueError(f"episodes: expected a multiple of group_size >= 2 for grpo, got "
                             f"episodes={self.episodes}, group_size={self.group_size}")
        for name in ("lr", "value_lr", "clip_eps"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name}: expected a finite value > 0, got {v}")
        if not (math.isfinite(self.kl_coef) and self.kl_coef >= 0):
            raise ValueError(f"kl_coef: expected a finite value >= 0, got {self.kl_coef}")
        if not 0 < self.lr_final_frac <= 1:
            raise ValueError(f"lr_final_frac: expected 0 < lr_final_frac <= 1, got {self.lr_final_frac}")
        if not 0 < self.adam_b2 < 1:
            raise ValueError(f"adam_b2: expected 0 < adam_b2 < 1, got {self.adam_b2}")
        if not 0 <= self.gae_lambda <= 1:
            raise ValueError(f"gae_lambda: expected 0 <= gae_lambda <= 1, got {self.gae_lambda}")
        if self.grpo_kl not in ("k3_loss", "reward"):
            raise ValueError(f"grpo_kl: expected 'k3_loss' or 'reward', got {self.grpo_kl!r}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every: expected >= 0, got {self.eval_every}")


# Default hyperparameters per algorithm (steps, lr, ...); ``kl_coef`` is filled from the env.
DEFAULTS: dict[str, dict[str, Any]] = {
    "exact_pg": dict(steps=3000, lr=0.3, lr_final_frac=0.001, adam_b2=0.99),
    "reinforce_kl": dict(steps=2000, lr=0.05),
    "grpo": dict(steps=2000, lr=0.05, group_size=8),
    "ppo_clip": dict(steps=2000, lr=0.02),
    "ppo_kl": dict(steps=2000, lr=0.02),
}


def default_algo_config(algo: str, beta: float, **overrides: Any) -> AlgoConfig:
    """The default :class:`AlgoConfig` of ``algo`` (``kl_coef = beta``, 0 for ``ppo_clip``)."""
    if algo not in ALGOS:
        raise ValueError(f"algo: expected one of {ALGOS}, got {algo!r}")
    kw = dict(DEFAULTS[algo])
    kw["kl_coef"] = 0.0 if algo == "ppo_clip" else float(beta)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    cfg = AlgoConfig(algo=algo, **kw)
    cfg.validate()
    return cfg


# ----------------------------------------------------------------------------------------------
# The problem: a batch of MDPs with their exact solution
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Exact quantities (differentiable)
# ----------------------------------------------------------------------------------------------
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


def regularized_return(logits: Array, prob: Problem, beta: float | Array,
                       horizon: Optional[int]) -> Array:
    """``J(pi) = sum_s mu(s) V_pi(s)`` at t = 0 (the objective exact_pg maximises)."""
    v = regularized_values(logits, prob.ref_log, prob.transitions, prob.rewards, prob.gamma, beta,
                           horizon)
    return prob.initial @ v[0]


def state_visitation(policy: Array, transitions: Array, initial: Array, gamma: Array,
                     horizon: Optional[int]) -> Array:
    """Normalised state visitation ``d_pi [Hp, S]`` (sums to 1) of ``policy [Hp, S, A]``.

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


# ----------------------------------------------------------------------------------------------
# Metrics (pure functions; flat weighted arrays)
# ----------------------------------------------------------------------------------------------
# Below this weighted variance a log-ratio counts as constant (pi = pi_ref up to rounding):
# correlations and beta_eff are then undefined (NaN), and log-ratio differences below TIE_TOL tie.
VAR_TOL = 1e-20
TIE_TOL = 1e-10


def weighted_pearson(x: Array, y: Array, w: Array) -> Array:
    """``cov_w(x, y) / sqrt(var_w(x) var_w(y))`` with weights ``w >= 0`` (normalised); NaN if a
    weighted variance is <= ``VAR_TOL`` (a constant input)."""
    w = w / jnp.sum(w)
    xc, yc = x - jnp.sum(w * x), y - jnp.sum(w * y)
    cov = jnp.sum(w * xc * yc)
    vx, vy = jnp.sum(w * xc ** 2), jnp.sum(w * yc ** 2)
    ok = (vx > VAR_TOL) & (vy > VAR_TOL)
    return jnp.where(ok, cov / jnp.sqrt(jnp.where(ok, vx * vy, 1.0)), jnp.nan)


def weighted_midranks(x: Array, w: Array) -> Array:
    """Weighted mid-ranks ``r_i = sum_j w_j ([x_j < x_i] + [x_j == x_i] / 2)`` (O(N^2))."""
    less = (x[None, :] < x[:, None]).astype(w.dtype)
    equal = (x[None, :] == x[:, None]).astype(w.dtype)
    return (less + 0.5 * equal) @ w


def weighted_spearman(x: Array, y: Array, w: Array) -> Array:
    """Weighted Spearman: weighted Pearson of the weighted mid-ranks of ``x`` and ``y``
    (with equal weights, an affine map of average ranks: ``scipy.stats.spearmanr``); NaN if ``x``
    or ``y`` is constant (weighted variance <= ``VAR_TOL``)."""
    w = w / jnp.sum(w)
    rho = weighted_pearson(weighted_midranks(x, w), weighted_midranks(y, w), w)
    const = (_wvar(x, w) <= VAR_TOL) | (_wvar(y, w) <= VAR_TOL)
    return jnp.where(const, jnp.nan, rho)


def _wvar(x: Array, w: Array) -> Array:
    return jnp.sum(w * (x - jnp.sum(w * x)) ** 2)


def effective_beta(log_ratio: Array, adv: Array, w: Array) -> tuple[Array, Array]:
    """Weighted least squares ``A* ~ beta_eff * log_ratio`` (no intercept):
    ``beta_eff = sum w l A / sum w l^2``; residual ``sqrt(sum w (A - beta_eff l)^2 / sum w)``.
    ``beta_eff`` is NaN when the log-ratio is 0 everywhere (``sum w l^2 <= VAR_TOL``: pi = pi_ref)."""
    w = w / jnp.sum(w)
    sll = jnp.sum(w * log_ratio ** 2)
    ok = sll > VAR_TOL
    b = jnp.where(ok, jnp.sum(w * log_ratio * adv) / jnp.where(ok, sll, 1.0), jnp.nan)
    resid = jnp.sqrt(jnp.sum(w * (adv - jnp.nan_to_num(b) * log_ratio) ** 2))
    return b, resid


def ranking_agreement(log_ratio: Array, adv: Array, state_w: Array) -> tuple[Array, Array]:
    """Action rankings of ``log_ratio [..., A]`` vs ``adv [..., A]``, weighted by ``state_w [...]``.

    Pairwise: per state, the fraction of action pairs with ``A*_a != A*_b`` ordered alike by the
    log-ratio (a log-ratio tie, ``|l_a - l_b| <= TIE_TOL``, counts 1/2; 1 if no such pair). Top-1: ``argmax log_ratio == argmax A*``.
    Both averaged over states with weights ``state_w``.
    """
    dl = log_ratio[..., :, None] - log_ratio[..., None, :]
    da = adv[..., :, None] - adv[..., None, :]
    A = log_ratio.shape[-1]
    upper = jnp.triu(jnp.ones((A, A), bool), k=1)
    valid = upper & (da != 0)
    score = jnp.where(jnp.abs(dl) <= TIE_TOL, 0.5, jnp.where(dl * da > 0, 1.0, 0.0))
    n = jnp.sum(valid, axis=(-2, -1))
    pair = jnp.where(n > 0, jnp.sum(jnp.where(valid, score, 0.0), axis=(-2, -1)) / jnp.maximum(n, 1),
                     1.0)
    top1 = (jnp.argmax(log_ratio, -1) == jnp.argmax(adv, -1)).astype(state_w.dtype)
    sw = state_w / jnp.sum(state_w)
    return jnp.sum(sw * pair), jnp.sum(sw * top1)


def policy_metrics(logits: Array, prob: Problem, *, beta: float, horizon: Optional[int],
                   min_weight: float = 1e-3) -> dict[str, Array]:
    """All metrics of the policy ``softmax(logits [Hp, S, A])`` against ``A*`` (see module docstring).

    One MDP; ``jax.vmap`` it over a batch. ``error = beta * log(pi/pi_ref) - A*``.
    """
    logp = jax.nn.log_softmax(logits, axis=-1)
    pi = jnp.exp(logp)
    lr = logp - prob.ref_log
    adv = prob.adv_star
    err = jnp.abs(beta * lr - adv)
    d = state_visitation(pi, prob.transitions, prob.initial, prob.gamma, horizon)  # [Hp, S]
    w = d[..., None] * pi
    pair, top1 = ranking_agreement(lr, adv, d)
    b_eff, resid = effective_beta(lr.ravel(), adv.ravel(), w.ravel())
    j = regularized_return(logits, prob, beta, horizon)
    j_star = regularized_return(prob.log_pi_star, prob, beta, horizon)
    return {
        "worst_abs_error": jnp.max(jnp.where(w >= min_weight, err, 0.0)),
        "worst_abs_error_all": jnp.max(err),
        "mean_abs_error": jnp.sum(w * err),
        "pearson": weighted_pearson((beta * lr).ravel(), adv.ravel(), w.ravel()),
        "spearman": weighted_spearman(lr.ravel(), adv.ravel(), w.ravel()),
        "pair_agreement": pair,
        "top1_agreement": top1,
        "beta_eff": b_eff,
        "beta_eff_residual": resid,
        "return_gap": j_star - j,
        "kl": jnp.sum(w * lr),
    }


# ----------------------------------------------------------------------------------------------
# Sampling (pure JAX)
# ----------------------------------------------------------------------------------------------
class Episodes(NamedTuple):
    states: Array       # [N, T] int
    actions: Array      # [N, T] int
    rewards: Array      # [N, T]
    last_state: Array   # [N] the state after the last step (bootstrap for truncated episodes)


def _time_index(T: int, hp: int) -> Array:
    """Row of the logits table used at each step t < T: ``min(t, Hp - 1)`` (0 when stationary)."""
    return jnp.minimum(jnp.arange(T), hp - 1)


def sample_episode(key: Array, logits: Array, transitions: Array, rewards: Array, s0: Array,
                   T: int) -> tuple[Array, Array, Array, Array]:
    """One episode of ``T`` steps from ``s0``: ``a_t ~ softmax(logits[min(t, Hp-1), s_t])``,
    ``s_{t+1} ~ P(.|s_t, a_t)``, both by inverse-CDF sampling of one uniform each
    (``x = #{i : CDF_i < u}``); ``lax.scan`` over time."""
    hp = logits.shape[0]
    cdf_pi = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)   # [Hp, S, A]
    cdf_p = jnp.cumsum(transitions, axis=-1)                         # [S, A, S]
    A, S = cdf_pi.shape[-1], cdf_p.shape[-1]
    u = jax.random.uniform(key, (T, 2), dtype=cdf_pi.dtype)

    def step(s, inp):
        t, u_t = inp
        a = jnp.minimum(jnp.sum(cdf_pi[t, s] < u_t[0]), A - 1)
        s_next = jnp.minimum(jnp.sum(cdf_p[s, a] < u_t[1]), S - 1)
        return s_next, (s, a, rewards[s, a])

    last, (states, actions, rews) = jax.lax.scan(step, s0, (_time_index(T, hp), u))
    return states, actions, rews, last


def sample_initial(key: Array, initial: Array, n: int) -> Array:
    """``n`` draws of ``s_0 ~ mu`` (inverse CDF)."""
    u = jax.random.uniform(key, (n,), dtype=initial.dtype)
    return jnp.minimum(jnp.sum(jnp.cumsum(initial)[None, :] < u[:, None], axis=1),
                       initial.shape[0] - 1)


def sample_episodes(key: Array, logits: Array, prob: Problem, num_episodes: int, T: int,
                    s0: Optional[Array] = None) -> Episodes:
    """``num_episodes`` episodes (``vmap``); ``s0 [N]`` given or drawn from ``mu``."""
    k0, ke = jax.random.split(key)
    if s0 is None:
        s0 = sample_initial(k0, prob.initial, num_episodes)
    keys = jax.random.split(ke, num_episodes)
    st, ac, rw, last = jax.vmap(sample_episode, in_axes=(0, None, None, None, 0, None))(
        keys, logits, prob.transitions, prob.rewards, s0, T)
    return Episodes(st, ac, rw, last)


def _discount_matrix(factor: Array, T: int) -> Array:
    """``D[t, u] = factor^(u - t)`` for ``u >= t``, else 0 (so ``x @ D.T`` is a reverse discounted sum)."""
    t = jnp.arange(T)
    diff = t[None, :] - t[:, None]
    return jnp.where(diff >= 0, factor ** jnp.maximum(diff, 0), 0.0)


def _gather(table: Array, ep: Episodes) -> Array:
    """``table[min(t, Hp-1), s_t, a_t]`` for every step of every episode: ``[N, T]``."""
    tix = _time_index(ep.states.shape[1], table.shape[0])
    return table[tix[None, :], ep.states, ep.actions]


def _values(value: Array, ep: Episodes, horizon: Optional[int]) -> tuple[Array, Array]:
    """Critic values ``V(t, s_t)`` and ``V(t+1, s_{t+1})`` (0 after the horizon, bootstrap otherwise)."""
    T = ep.states.shape[1]
    hp = value.shape[0]
    tix = _time_index(T, hp)
    v = value[tix[None, :], ep.states]
    nxt = jnp.concatenate([ep.states[:, 1:], ep.last_state[:, None]], axis=1)
    tn = jnp.minimum(jnp.arange(1, T + 1), hp - 1)
    v_next = value[tn[None, :], nxt]
    if horizon is not None:
        v_next = v_next.at[:, -1].set(0.0)
    return v, v_next


# ----------------------------------------------------------------------------------------------
# Losses / update steps (one MDP; vmapped by the driver)
# ----------------------------------------------------------------------------------------------
def exact_pg_loss(params: dict, prob: Problem, cfg: AlgoConfig, horizon: Optional[int],
                  T: int, key: Array) -> Array:
    """``-J(theta)``: the exact regularized return (linear solve / backward induction)."""
    del T, key
    return -regularized_return(params["logits"], prob, cfg.kl_coef, horizon)


def reinforce_kl_loss(params: dict, prob: Problem, cfg: AlgoConfig, horizon: Optional[int],
                      T: int, key: Array) -> Array:
    """REINFORCE on ``r_t - beta log(pi/pi_ref)(a_t|s_t)`` (penalty stop-gradient):
    ``-mean_n sum_t log pi(a_t|s_t) (G_t - b(s_t))`` + critic ``1/2 (b(s_t) - G_t)^2``,
    ``G_t = sum_{u>=t} gamma^(u-t) r~_u``."""
    logits = jax.lax.stop_gradient(params["logits"])
    ep = sample_episodes(key, logits, prob, cfg.episodes, T)
    logp = _gather(jax.nn.log_softmax(params["logits"], -1), ep)
    lref = _gather(prob.ref_log, ep)
    r = ep.rewards - cfg.kl_coef * jax.lax.stop_gradient(logp - lref)
    G = r @ _discount_matrix(prob.gamma, T).T
    v, _ = _values(params["value"], ep, horizon)
    adv = jax.lax.stop_gradient(G - v)
    pg = -jnp.mean(jnp.sum(logp * adv, axis=1))
    vloss = 0.5 * jnp.mean(jnp.sum((v - jax.lax.stop_gradient(G)) ** 2, axis=1))
    return pg + vloss


def grpo_loss(params: dict, prob: Problem, cfg: AlgoConfig, horizon: Optional[int],
              T: int, key: Array) -> Array:
    """GRPO: ``-mean_{i,t} [rho_{i,t} Â_i - beta k3_{i,t}]``, ``rho = pi/stop_grad(pi)`` (on-policy),
    ``Â_i = (R_i - mean_g R)/(std_g R + 1e-6)`` within groups sharing ``s_0``,
    ``R_i = sum_t gamma^t r_t``, ``k3 = pi_ref/pi - log(pi_ref/pi) - 1`` (KL in the loss).

    On-policy, ``E_{a~pi}[grad k3] = pi - pi_ref`` = the gradient of the *forward* KL(pi_ref || pi),
    not of KL(pi || pi_ref). Ablations: ``grpo_kl="reward"`` puts the k1 penalty in the outcome
    instead (``R_i = sum_t gamma^t (r_t - beta log(pi/pi_ref)(a_t|s_t))``, no KL loss);
    ``grpo_std_normalize=False`` drops the std (Dr. GRPO). With both, the update is REINFORCE with
    a group-mean baseline on the regularized return, whose fixed point is ``pi*``.
    """
    del horizon
    k0, ke = jax.random.split(key)
    groups = cfg.episodes // cfg.group_size
    s0 = sample_initial(k0, prob.initial, groups)
    s0 = jnp.repeat(s0, cfg.group_size)
    ep = sample_episodes(ke, jax.lax.stop_gradient(params["logits"]), prob, cfg.episodes, T, s0=s0)
    logp = _gather(jax.nn.log_softmax(params["logits"], -1), ep)
    lref = _gather(prob.ref_log, ep)
    r = ep.rewards
    if cfg.grpo_kl == "reward":
        r = r - cfg.kl_coef * jax.lax.stop_gradient(logp - lref)
    R = (r * prob.gamma ** jnp.arange(T)).sum(1).reshape(groups, cfg.group_size)
    adv = R - R.mean(1, keepdims=True)
    if cfg.grpo_std_normalize:
        adv = adv / (R.std(1, keepdims=True) + 1e-6)
    adv = adv.reshape(-1)
    rho = jnp.exp(logp - jax.lax.stop_gradient(logp))
    log_r = lref - logp
    k3 = jnp.exp(log_r) - log_r - 1.0
    kl_loss = cfg.kl_coef * k3 if cfg.grpo_kl == "k3_loss" else 0.0
    return -jnp.mean(rho * adv[:, None] - kl_loss)


def _ppo_update(params: dict, opt_state: Any, opt: optax.GradientTransformation, prob: Problem,
                cfg: AlgoConfig, horizon: Optional[int], T: int, key: Array) -> tuple[dict, Any]:
    """One PPO iteration: roll out with pi_old, GAE on ``r_t - kl_coef log(pi_old/pi_ref)``, then
    ``epochs`` full-batch steps on ``-min(rho Â, clip(rho, 1 +- eps) Â) + 1/2 (V - R^lambda)^2``."""
    ep = sample_episodes(key, params["logits"], prob, cfg.episodes, T)
    logp_old = _gather(jax.nn.log_softmax(params["logits"], -1), ep)
    lref = _gather(prob.ref_log, ep)
    r = ep.rewards - cfg.kl_coef * (logp_old - lref)
    v, v_next = _values(params["value"], ep, horizon)
    delta = r + prob.gamma * v_next - v
    adv = delta @ _discount_matrix(prob.gamma * cfg.gae_lambda, T).T
    returns = adv + v
    if cfg.normalize_advantages:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)

    def loss_fn(p):
        logp = _gather(jax.nn.log_softmax(p["logits"], -1), ep)
        rho = jnp.exp(logp - logp_old)
        surr = jnp.minimum(rho * adv, jnp.clip(rho, 1 - cfg.clip_eps, 1 + cfg.clip_eps) * adv)
        vv, _ = _values(p["value"], ep, horizon)
        return -jnp.mean(surr) + 0.5 * jnp.mean((vv - returns) ** 2)

    def epoch(carry, _):
        p, s = carry
        g = jax.grad(loss_fn)(p)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    (params, opt_state), _ = jax.lax.scan(epoch, (params, opt_state), None, length=cfg.epochs)
    return params, opt_state


LOSSES: dict[str, Callable] = {"exact_pg": exact_pg_loss, "reinforce_kl": reinforce_kl_loss,
                               "grpo": grpo_loss}


def make_optimizer(cfg: AlgoConfig) -> optax.GradientTransformation:
    """Adam(``b2=adam_b2``) on the logits (cosine decay ``lr -> lr * lr_final_frac``),
    Adam(``value_lr``) on the critic."""
    updates = cfg.steps * (cfg.epochs if cfg.algo.startswith("ppo") else 1)
    sched = optax.cosine_decay_schedule(cfg.lr, decay_steps=updates, alpha=cfg.lr_final_frac)
    return optax.multi_transform({"policy": optax.adam(sched, b2=cfg.adam_b2),
                                  "value": optax.adam(cfg.value_lr)},
                                 {"logits": "policy", "value": "value"})


def make_step(cfg: AlgoConfig, opt: optax.GradientTransformation, horizon: Optional[int],
              T: int) -> Callable:
    """``step(params, opt_state, key, prob) -> (params, opt_state)`` for one MDP."""
    if cfg.algo.startswith("ppo"):
        def step(params, opt_state, key, prob):
            return _ppo_update(params, opt_state, opt, prob, cfg, horizon, T, key)
        return step
    loss = LOSSES[cfg.algo]

    def step(params, opt_state, key, prob):
        g = jax.grad(loss)(params, prob, cfg, horizon, T, key)
        u, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, u), opt_state
    return step


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def _eval_steps(steps: int, eval_every: int) -> list[int]:
    every = eval_every or max(1, steps // 50)
    return sorted(set([0] + list(range(every, steps, every)) + [steps]))


@functools.lru_cache(maxsize=64)
def _compiled_chunk(cfg: AlgoConfig, horizon: Optional[int], T: int):
    """``(optimizer, chunk)``; ``chunk(params, opt_state, key, steps [n], prob)`` runs ``n`` training
    steps on every MDP (``lax.scan`` over steps, ``vmap`` over MDPs; step ``i`` uses key
    ``fold_in(key, i)`` split over MDPs). Cached so equal configs reuse the compilation."""
    opt = make_optimizer(cfg)
    step = jax.vmap(make_step(cfg, opt, horizon, T))

    @jax.jit
    def chunk(params, opt_state, key, idx, prob):
        M = prob.initial.shape[0]

        def body(carry, i):
            p, s = carry
            keys = jax.random.split(jax.random.fold_in(key, i), M)
            return step(p, s, keys, prob), None
        (params, opt_state), _ = jax.lax.scan(body, (params, opt_state), idx)
        return params, opt_state
    return opt, chunk


@functools.lru_cache(maxsize=64)
def _compiled_metrics(beta: float, horizon: Optional[int], min_weight: float) -> Callable:
    return jax.jit(jax.vmap(lambda lg, pr: policy_metrics(
        lg, pr, beta=beta, horizon=horizon, min_weight=min_weight)))


def train_algorithm(problem: Problem, env: EnvConfig, cfg: AlgoConfig, key: Array,
                    ) -> tuple[dict[str, Any], Array]:
    """Train ``cfg.algo`` on every MDP of ``problem`` (``vmap``) from ``pi_ref``.

    Returns ``(history, final_logits [M, Hp, S, A])``; ``history`` holds ``step`` and, per metric of
    :func:`policy_metrics`, an ``[E, M]`` NumPy array (E evaluations). Runs in float64
    (``jax.enable_x64(True)`` scoped to the call).
    """
    cfg.validate()
    env.validate()
    with jax.enable_x64(True):
        return _train(problem, env, cfg, key)


def _train(problem: Problem, env: EnvConfig, cfg: AlgoConfig, key: Array,
           ) -> tuple[dict[str, Any], Array]:
    M, hp, S, _ = problem.ref_log.shape
    T = int(env.horizon) if env.horizon is not None else int(env.rollout_len)
    opt, chunk = _compiled_chunk(cfg, env.horizon, T)
    params = {"logits": problem.ref_log, "value": jnp.zeros((M, hp, S), problem.ref_log.dtype)}
    opt_state = jax.vmap(opt.init)(params)
    metrics = _compiled_metrics(float(env.beta), env.horizon, float(env.min_weight))
    steps_at = _eval_steps(cfg.steps, cfg.eval_every)
    rows = [jax.device_get(metrics(params["logits"], problem))]
    for lo, hi in zip(steps_at[:-1], steps_at[1:]):
        params, opt_state = chunk(params, opt_state, key, jnp.arange(lo, hi), problem)
        rows.append(jax.device_get(metrics(params["logits"], problem)))
    history = {"step": steps_at}
    for m in METRICS:
        history[m] = np.stack([np.asarray(r[m], np.float64) for r in rows])
    return history, params["logits"]


def _clean(x: Any) -> Any:
    """JSON-safe: NumPy -> Python, non-finite floats -> None."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _summarise(history: dict[str, Any]) -> dict[str, Any]:
    """History (mean over MDPs per evaluation; worst errors also max over MDPs) and final values."""
    out_hist: dict[str, Any] = {"step": list(history["step"])}
    final: dict[str, Any] = {}
    for m in METRICS:
        a = history[m]  # [E, M]
        with np.errstate(all="ignore"):
            mean = np.where(np.isfinite(a).all(1), a.mean(1), np.nan)
        out_hist[m] = mean
        final[m] = mean[-1]
        final[m + "_per_mdp"] = a[-1]
        if m.startswith("worst"):
            out_hist[m + "_max"] = a.max(1)
            final[m + "_max"] = a[-1].max()
        if m in ("pearson", "spearman"):
            final[m + "_min"] = a[-1].min()
    return {"history": out_hist, "final": final}


def run(env: EnvConfig, algos: Sequence[str], seed: int, steps: Optional[int] = None,
        overrides: Optional[dict[str, Any]] = None, log: Callable[[str], None] = lambda s: None,
        ) -> dict[str, Any]:
    """Train every algorithm of ``algos`` (default hyperparameters, ``steps``/``overrides`` applied
    to all) on the same MDPs from ``seed``; JSON-ready result dict (see :func:`run_configs`)."""
    env.validate()
    for a in algos:
        if a not in ALGOS:
            raise ValueError(f"algo: expected one of {ALGOS} or 'all', got {a!r}")
    overrides = dict(overrides or {})
    cfgs = [(a, default_algo_config(a, env.beta, steps=steps, **overrides)) for a in algos]
    result = run_configs(env, cfgs, seed, log=log)
    result["config"]["steps"] = steps
    return result


def run_configs(env: EnvConfig, configs: Sequence[tuple[str, AlgoConfig]], seed: int,
                log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Train each ``(label, config)`` on the MDPs of ``seed`` (all runs see the same MDPs; runs of
    one algorithm share their sampling keys). Returns ``{"config": ..., "runs": {label: {"config",
    "history", "final", "wall_s"}}}`` with NaN/inf as None."""
    env.validate()
    labels = [lab for lab, _ in configs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"configs: expected unique labels, got {labels}")
    for _, c in configs:
        c.validate()
    _, _, problem = make_problem(env, seed)
    result: dict[str, Any] = {
        "config": {"algos": labels, "seed": int(seed), "env": dataclasses.asdict(env),
                   "hyperparameters": {lab: dataclasses.asdict(c) for lab, c in configs},
                   "versions": {"jax": jax.__version__, "optax": optax.__version__}},
        "runs": {},
    }
    root = jax.random.key(int(seed))
    for label, cfg in configs:
        t0 = time.perf_counter()
        key = jax.random.fold_in(jax.random.fold_in(root, 2), ALGOS.index(cfg.algo))
        history, _ = train_algorithm(problem, env, cfg, key)
        run_out = _summarise(history)
        run_out["config"] = dataclasses.asdict(cfg)
        run_out["wall_s"] = time.perf_counter() - t0
        result["runs"][label] = run_out
        f = run_out["final"]
        log(f"{label:>13s}  steps={cfg.steps}  worst|err|={f['worst_abs_error']:.3g}  "
            f"mean|err|={f['mean_abs_error']:.3g}  pearson={f['pearson']:.4f}  "
            f"spearman={f['spearman']:.4f}  beta_eff={f['beta_eff']:.3g}  "
            f"resid={f['beta_eff_residual']:.3g}  ({run_out['wall_s']:.1f}s)")
    return _clean(result)


def write_json_atomic(obj: Any, path: str) -> None:
    """Write JSON to ``path`` atomically (temp file in the same directory + ``os.replace``)."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=".json")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=1, allow_nan=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def format_table(result: dict[str, Any]) -> str:
    """Markdown table of the final metrics (mean over MDPs; worst error also the max)."""
    beta = result["config"]["env"]["beta"]
    lines = [f"beta = {beta}; means over {result['config']['env']['num_mdps']} MDPs "
             f"(worst error: mean / max over MDPs)", "",
             "| algorithm | steps | worst abs error | mean abs error | Pearson | Spearman | "
             "pair agreement | beta_eff | residual |",
             "|---|---|---|---|---|---|---|---|---|"]

    def f(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    for algo, r in result["runs"].items():
        fi = r["final"]
        lines.append(
            f"| {algo} | {r['config']['steps']} | {f(fi['worst_abs_error'], '.2e')} / "
            f"{f(fi['worst_abs_error_max'], '.2e')} | {f(fi['mean_abs_error'], '.2e')} | "
            f"{f(fi['pearson'], '.4f')} | {f(fi['spearman'], '.4f')} | "
            f"{f(fi['pair_agreement'], '.3f')} | {f(fi['beta_eff'], '.3f')} | "
            f"{f(fi['beta_eff_residual'], '.3f')} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m toy_mdp train",
        description="Train tabular policies from pi_ref with exact PG / REINFORCE-KL / GRPO / PPO "
                    "on random MDPs and track |beta log(pi/pi_ref) - A*| during training.")
    p.add_argument("--algo", default="all", choices=ALGOS + ("all",))
    p.add_argument("--steps", type=int, default=None,
                   help="training steps for every algorithm (default: per algorithm, see DEFAULTS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-mdps", type=int, default=EnvConfig.num_mdps)
    p.add_argument("--num-states", type=int, default=EnvConfig.num_states)
    p.add_argument("--num-actions", type=int, default=EnvConfig.num_actions)
    p.add_argument("--horizon", type=int, default=EnvConfig.horizon,
                   help="finite horizon H (0: discounted, infinite horizon; needs --gamma < 1)")
    p.add_argument("--gamma", type=float, default=None,
                   help="discount (default 1.0 with a horizon, 0.9 without)")
    p.add_argument("--beta", type=float, default=EnvConfig.beta)
    p.add_argument("--reward-scale", type=float, default=EnvConfig.reward_scale)
    p.add_argument("--ref-min-prob", type=float, default=EnvConfig.ref_min_prob)
    p.add_argument("--deterministic", action="store_true", help="deterministic transitions")
    p.add_argument("--rollout-len", type=int, default=EnvConfig.rollout_len,
                   help="episode truncation for sampled algorithms when discounted")
    p.add_argument("--episodes", type=int, default=None, help="episodes per MDP per step")
    p.add_argument("--lr", type=float, default=None, help="policy learning rate (all algorithms)")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--json", required=True, help="output JSON path (written atomically)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m toy_mdp train ...``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _main(args, argv)
    except ValueError as exc:  # bad hyperparameters: a usage error naming the field
        parser.error(str(exc))
        return 2


def _main(args: argparse.Namespace, argv: Optional[Sequence[str]]) -> int:
    horizon = args.horizon if args.horizon and args.horizon > 0 else None
    gamma = args.gamma if args.gamma is not None else (1.0 if horizon else 0.9)
    env = EnvConfig(num_mdps=args.num_mdps, num_states=args.num_states,
                    num_actions=args.num_actions, horizon=horizon, gamma=gamma, beta=args.beta,
                    reward_scale=args.reward_scale, ref_min_prob=args.ref_min_prob,
                    deterministic=args.deterministic, rollout_len=args.rollout_len)
    algos = list(ALGOS) if args.algo == "all" else [args.algo]
    overrides = {"episodes": args.episodes, "lr": args.lr, "eval_every": args.eval_every}
    result = run(env, algos, args.seed, steps=args.steps, overrides=overrides,
                 log=lambda s: print(s, flush=True))
    result["config"]["argv"] = list(argv) if argv is not None else sys.argv[1:]
    write_json_atomic(result, args.json)
    print(format_table(result))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
