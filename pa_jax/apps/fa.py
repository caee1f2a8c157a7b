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
* ``k_advantage`` (progress k-advantage): the action t with the lowest sum_{j=t}^{t+k-1} r_j (the
  window is cut at the last action; first on ties).

An empty trajectory (S = 0) predicts message 0, as the authors do.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

RULES = ("min_cumulative", "sharpest_drop", "sharpest_consecutive_drop", "k_advantage")


def _check(step_scores: np.ndarray, action_indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(step_scores, np.float64)
    a = np.asarray(action_indices, np.int64)
    if r.ndim != 1 or a.shape != r.shape:
        raise ValueError(f"step_scores and action_indices must be 1-D of equal length, got {r.shape}, {a.shape}")
    if not np.all(np.isfinite(r)):
        raise ValueError("step_scores must be finite")
    return r, a


def k_advantage(step_scores: np.ndarray, k: int) -> np.ndarray:
    """Progress k-advantage A^(k)_t = sum_{j=t}^{min(t+k, S)-1} r_j, for t = 0..S-1."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    r = np.asarray(step_scores, np.float64)
    c = np.concatenate([[0.0], np.cumsum(r)])
    t = np.arange(len(r))
    return c[np.minimum(t + k, len(r))] - c[t]


def decisive_step(step_scores: np.ndarray, action_indices: Sequence[int], rule: str, *, k: int = 1) -> int:
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
    elif rule == "k_advantage":
        t = int(np.argmin(k_advantage(r, k)))
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
    rules: Sequence[str] = RULES, k: int = 1,
) -> dict[str, dict]:
    """Predictions and metrics of every rule over a set of trajectories."""
    out = {}
    for rule in rules:
        preds = [decisive_step(s, a, rule, k=k) for s, a in zip(step_scores, action_indices)]
        pa = None
        if message_agents is not None:
            pa = [ag[p] if 0 <= p < len(ag) else None for ag, p in zip(message_agents, preds)]
        name = f"k_advantage(k={k})" if rule == "k_advantage" else rule
        m = attribution_metrics(preds, mistake_steps, predicted_agents=pa, true_agents=mistake_agents)
        m["predictions"] = preds
        out[name] = m
    return out
