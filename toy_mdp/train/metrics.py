"""How close ``beta * log(pi/pi_ref)`` is to ``A*``: pure functions on flat weighted arrays, and
:func:`policy_metrics`, all of them for one policy (see the package docstring for the definitions)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from toy_mdp.train.problem import Problem, regularized_return_of_logits, visitation_weights

Array = jax.Array

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
    d = visitation_weights(pi, prob.transitions, prob.initial, prob.gamma, horizon)  # [Hp, S]
    w = d[..., None] * pi
    pair, top1 = ranking_agreement(lr, adv, d)
    b_eff, resid = effective_beta(lr.ravel(), adv.ravel(), w.ravel())
    j = regularized_return_of_logits(logits, prob, beta, horizon)
    j_star = regularized_return_of_logits(prob.log_pi_star, prob, beta, horizon)
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
