"""Failure attribution: which step was the decisive error.

Inputs per trajectory: ``step_scores [S]`` (one score per scored action, e.g. the step progress
advantage) and ``action_indices [S]`` (the message index of each action). Predictions are message
indices, comparable with Who&When's ``mistake_step``. The three rules follow the authors'
released code (runners/fa.py), where non-action messages carry reward 0 and are never predicted:

* ``min_cumulative``: the action where the running sum sum_{j<=t} r_j is lowest (first on ties).
* ``sharpest_drop``: the action with the lowest r_t (first on ties); if every r_t >= 0, the first
  action.
* ``sharpest_consecutive_drop``: the action t (t >= 1) with the lowest r_t - r_{t-1} over
  consecutive actions (first on ties); the first action when there are fewer than two actions
  or no difference is <= 0.
* ``earliest_below_threshold`` (authors' ``runners/baselines.py::_predict_earliest_below``, used
  there for ThinkPRM with threshold 0.5 on P(correct)): the first action with r_t < threshold; if
  none, the action with the lowest r_t (first on ties; their ``_predict_min_step``). For a
  log-ratio signal such as the progress advantage the natural threshold is 0 (the default here).
* ``k_advantage`` (progress k-advantage): the action t with the lowest
  sum_{j=t}^{t+k-1} gamma^(j-t) r_j (the window is cut at the last action; first on ties);
  gamma = 1 (default) is the undiscounted window.

Token aggregation: the authors' FA script (``scripts/fa.sh``) runs ``--token-aggs sum`` (their
``runners/fa.py`` argument default is ``min``, overridden by the script), so ``pa-jax fa`` defaults
to ``sum`` over each step's tokens.

An empty trajectory (S = 0) predicts message 0, as the authors do.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

RULES = ("min_cumulative", "sharpest_drop", "sharpest_consecutive_drop", "earliest_below_threshold", "k_advantage")


def _check(step_scores: np.ndarray, action_indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(step_scores, np.float64)
    a = np.asarray(action_indices, np.int64)
    if r.ndim != 1 or a.shape != r.shape:
        raise ValueError(f"step_scores and action_indices must be 1-D of equal length, got {r.shape}, {a.shape}")
    if not np.all(np.isfinite(r)):
        raise ValueError("step_scores must be finite")
    return r, a


def k_advantage(step_scores: np.ndarray, k: int, gamma: float = 1.0) -> np.ndarray:
    """Progress k-advantage A^(k,gamma)_t = sum_{j=t}^{min(t+k, S)-1} gamma^(j-t) r_j, t = 0..S-1
    (gamma = 1: the undiscounted window)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not (0.0 < gamma <= 1.0):
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    r = np.asarray(step_scores, np.float64)
    if gamma == 1.0:
        c = np.concatenate([[0.0], np.cumsum(r)])
        t = np.arange(len(r))
        return c[np.minimum(t + k, len(r))] - c[t]
    s = len(r)
    out = np.zeros(s)
    w = gamma ** np.arange(k)
    for d in range(k):  # out[t] += gamma^d r[t+d] for t + d < S
        if d < s:
            out[: s - d] += w[d] * r[d:]
    return out


def rule_name(rule: str, *, k: int = 1, gamma: float = 1.0, threshold: float = 0.0) -> str:
    """The key of a rule in results: ``k_advantage(k=2)``, ``k_advantage(k=2,gamma=0.9)``,
    ``earliest_below_threshold(t=0)``; other rules by their name."""
    if rule == "k_advantage":
        return f"k_advantage(k={k})" if gamma == 1.0 else f"k_advantage(k={k},gamma={gamma:g})"
    if rule == "earliest_below_threshold":
        return f"earliest_below_threshold(t={threshold:g})"
    return rule


def decisive_step(step_scores: np.ndarray, action_indices: Sequence[int], rule: str, *, k: int = 1,
                  gamma: float = 1.0, threshold: float = 0.0) -> int:
    """Predicted message index of the decisive error under ``rule`` (module docstring)."""
    r, a = _check(step_scores, action_indices)
    if len(r) == 0:
        return 0
    if rule == "min_cumulative":
        t = int(np.argmin(np.cumsum(r)))
    elif rule == "sharpest_drop":
        t = 0 if np.all(r >= 0) else int(np.argmin(r))
    elif rule == "sharpest_consecutive_drop":
        if len(r) < 2:
            t = 0
        else:
            d = np.diff(r)
            t = 0 if not np.any(d <= 0) else int(np.argmin(d)) + 1
    elif rule == "earliest_below_threshold":
        below = np.flatnonzero(r < threshold)
        t = int(below[0]) if below.size else int(np.argmin(r))
    elif rule == "k_advantage":
        t = int(np.argmin(k_advantage(r, k, gamma)))
    else:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    return int(a[t])


def attribution_metrics(
    predicted: Sequence[int], truth: Sequence[int], *, predicted_agents: Sequence[str | None] | None = None,
    true_agents: Sequence[str | None] | None = None,
) -> dict:
    """Exact step accuracy mean[p == g], within-1 accuracy mean[|p - g| <= 1], mean absolute error
    mean|p - g| (in messages), and agent accuracy mean[agent(p) == mistake_agent]."""
    p = np.asarray(predicted, np.int64)
    g = np.asarray(truth, np.int64)
    if p.shape != g.shape or p.ndim != 1:
        raise ValueError(f"predicted and truth must be 1-D of equal length, got {p.shape}, {g.shape}")
    d = np.abs(p - g)
    out = {
        "n": int(len(p)),
        "step_accuracy": float(np.mean(d == 0)) if len(p) else float("nan"),
        "within1_accuracy": float(np.mean(d <= 1)) if len(p) else float("nan"),
        "mae": float(np.mean(d)) if len(p) else float("nan"),
    }
    if predicted_agents is not None and true_agents is not None:
        if len(predicted_agents) != len(p) or len(true_agents) != len(p):
            raise ValueError("agent lists must have one entry per trajectory")
        out["agent_accuracy"] = float(np.mean([a is not None and a == b for a, b in zip(predicted_agents, true_agents)])) if len(p) else float("nan")
    return out


def attribute(
    step_scores: Sequence[np.ndarray], action_indices: Sequence[Sequence[int]], mistake_steps: Sequence[int],
    *, message_agents: Sequence[Sequence[str | None]] | None = None, mistake_agents: Sequence[str | None] | None = None,
    rules: Sequence[str] = RULES, k: int = 1, gamma: float = 1.0, threshold: float = 0.0,
) -> dict[str, dict]:
    """Predictions and metrics of every rule over a set of trajectories (keys: :func:`rule_name`)."""
    out = {}
    for rule in rules:
        preds = [decisive_step(s, a, rule, k=k, gamma=gamma, threshold=threshold)
                 for s, a in zip(step_scores, action_indices)]
        pa = None
        if message_agents is not None:
            pa = [ag[p] if 0 <= p < len(ag) else None for ag, p in zip(message_agents, preds)]
        name = rule_name(rule, k=k, gamma=gamma, threshold=threshold)
        m = attribution_metrics(preds, mistake_steps, predicted_agents=pa, true_agents=mistake_agents)
        m["predictions"] = preds
        out[name] = m
    return out


def chance_step_accuracy(action_indices: Sequence[Sequence[int]], mistake_steps: Sequence[int]) -> float:
    """Step accuracy of a uniformly random action: mean over trajectories of
    [mistake_step is an action] / (number of actions)."""
    v = [(1.0 if g in set(a) else 0.0) / len(a) if len(a) else float(g == 0)
         for a, g in zip(action_indices, mistake_steps)]
    return float(np.mean(v)) if v else float("nan")


def self_certainty_steps(mean_logprob, step_ids, num_steps, vocab_size: int, token_agg: str = "sum") -> list[np.ndarray]:
    """Kang et al.'s Self-Certainty per step: ``token_agg_{t in s} KL(U || p_t)`` with
    ``KL(U || p_t) = -log V - (1/V) sum_v log p_t(v)`` (:func:`pa_jax.baselines.self_certainty_token`),
    ``[B, T]`` inputs as in :mod:`pa_jax.advantage`; empty steps score 0.0 (the authors' FA rule).
    Returns one ``[n_b]`` array per trajectory (higher = more certain)."""
    from pa_jax.advantage import step_values
    from pa_jax.baselines import self_certainty_token

    tok = np.asarray(self_certainty_token(np.asarray(mean_logprob, np.float32), int(vocab_size)))
    ns = np.asarray(num_steps)
    v, _ = step_values(tok, step_ids, ns, token_agg=token_agg, empty="zero", max_steps=max(1, int(ns.max())),
                       name="policy_mean_logprob")
    v = np.asarray(v)
    return [v[b, : ns[b]] for b in range(len(ns))]
