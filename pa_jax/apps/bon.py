"""Best-of-N selection: pick, per task, the rollout with the highest trajectory score.

Tie-breaking is deterministic: among rollouts with the maximal score, the one that comes first
in candidate order wins (candidates are ordered by trial index, then by input order), exactly as
the authors' stable ``sort(reverse=True)`` does. A NaN score (an unscorable rollout) ranks below
every real score, so it is selected only if every rollout of the task is NaN.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def select_best(scores: np.ndarray) -> int:
    """Index of the first maximal score; NaN counts as -inf."""
    s = np.asarray(scores, np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D array, got shape {s.shape}")
    return int(np.argmax(np.where(np.isnan(s), -np.inf, s)))


def best_of_n(
    task_ids: Sequence, scores: np.ndarray, rewards: np.ndarray, *, trials: Sequence[int] | None = None,
    success_threshold: float = 1.0,
) -> dict:
    """Best-of-N metrics over tasks.

    success = reward >= success_threshold.
    bon_success_rate = mean over tasks of success(selected); bon_mean_reward = mean reward(selected);
    pass_at_1 = mean over tasks of the mean success of its N rollouts (random selection);
    oracle_pass_at_n = fraction of tasks with at least one successful rollout.
    """
    scores = np.asarray(scores, np.float64)
    rewards = np.asarray(rewards, np.float64)
    n = len(task_ids)
    if scores.shape != (n,) or rewards.shape != (n,):
        raise ValueError(f"task_ids, scores and rewards must have one entry per rollout ({n}), got "
                         f"{scores.shape} and {rewards.shape}")
    if np.any(~np.isfinite(rewards)):
        raise ValueError("rewards must be finite")
    order = np.arange(n) if trials is None else np.lexsort((np.arange(n), np.asarray(trials)))
    groups: dict = {}
    for i in order:
        groups.setdefault(task_ids[i], []).append(int(i))
    selected = []
    sel_r, pass1, oracle = [], [], []
    for tid, idx in groups.items():
        j = idx[select_best(scores[idx])]
        succ = rewards[idx] >= success_threshold
        selected.append({"task_id": tid, "selected": j, "score": float(scores[j]),
                         "reward": float(rewards[j]), "n_candidates": len(idx),
                         "trial": None if trials is None else int(trials[j])})
        sel_r.append(rewards[j])
        pass1.append(succ.mean())
        oracle.append(succ.any())
    sel_r = np.asarray(sel_r)
    ns = sorted({len(v) for v in groups.values()})
    return {
        "n_tasks": len(groups), "n_rollouts": n, "n_per_task": ns,
        "bon_success_rate": float(np.mean(sel_r >= success_threshold)) if len(groups) else float("nan"),
        "bon_mean_reward": float(np.mean(sel_r)) if len(groups) else float("nan"),
        "pass_at_1": float(np.mean(pass1)) if len(groups) else float("nan"),
        "oracle_pass_at_n": float(np.mean(oracle)) if len(groups) else float("nan"),
        "selected": selected,
    }
