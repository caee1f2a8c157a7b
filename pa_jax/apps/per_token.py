"""Per-token export of the cached statistics (for the per-token figure, Figure 3 of the paper).

One JSON object per trajectory, from its :class:`pa_jax.scoring.TrajectoryStats` (the N scored
action tokens in token order; nothing is recomputed)::

    {"id", "task_id", "success", "reward", "mistake_step", "action_message_indices",
     "decisive_action": index into the steps of the action at mistake_step (or null),
     "step_ids": [N], "token_ids": [N] (target tokens, when given),
     "policy_logprob": [N]  log pi_theta(a_t | s_t),
     "beta_log_ratio": [N]  beta * (log pi_theta(a_t | s_t) - log pi_ref(a_t | s_t))  (null without a reference),
     "beta": beta}
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def _floats(x: np.ndarray) -> list[float]:
    return [float(v) for v in np.asarray(x, np.float64)]


def per_token_record(traj: Any, stats: Any, beta: float, token_ids: Sequence[int] | None = None) -> dict:
    """The export line of one trajectory (module docstring). ``traj``: a pa_jax.data Trajectory;
    ``stats``: its TrajectoryStats."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    pol = np.asarray(stats.policy_logprob, np.float64)
    ref = None if stats.reference_logprob is None else np.asarray(stats.reference_logprob, np.float64)
    acts = list(traj.action_indices)
    ms = traj.mistake_step
    return {
        "id": traj.id, "task_id": traj.task_id, "success": traj.success, "reward": traj.reward,
        "mistake_step": ms, "action_message_indices": acts,
        "decisive_action": acts.index(ms) if ms is not None and ms in acts else None,
        "num_steps": int(stats.num_steps),
        "step_ids": [int(s) for s in stats.step_ids],
        "token_ids": None if token_ids is None else [int(t) for t in token_ids],
        "policy_logprob": _floats(pol),
        "beta_log_ratio": None if ref is None else _floats(beta * (pol - ref)),
        "beta": float(beta),
    }


def scored_token_ids(rendered: Any) -> np.ndarray:
    """Target token ids of the scored positions of a Rendered trajectory, in order (the tokens the
    statistics are about: ``input_ids[1:][step_ids[1:] >= 0]``)."""
    ids = np.asarray(rendered.input_ids)[1:]
    return ids[np.asarray(rendered.step_ids)[1:] >= 0]
