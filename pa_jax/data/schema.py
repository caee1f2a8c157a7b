"""One trajectory type for every source format.

A `Trajectory` is an ordered list of `Message`s plus the labels the applications need:
a reward / success label (uncertainty quantification, best-of-N) or the decisive-error message
index and agent (failure attribution). `action_mask[i]` says whether message ``i`` is a scored
action; its positions among the actions are the *steps* ``0..num_steps-1``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class DataError(ValueError):
    """Bad input data; the message names the file and the item."""


@dataclass(frozen=True)
class ToolCall:
    """An assistant tool call: a name and its arguments (a dict, or the raw string if not JSON).

    arguments_text: the arguments exactly as the source stored them when it stored a JSON string
    (tau-bench v1, BFCL-style files); the reference rendering prints it verbatim.
    """

    name: str
    arguments: Any = None
    arguments_text: str | None = None


@dataclass(frozen=True)
class Message:
    """One message of a trajectory.

    role: the role as written in the source (``assistant``, ``user``, ``tool``, ``system``, or a
    Who&When agent role such as ``Orchestrator (thought)``); agent: the acting agent's base name
    where the source has one (Who&When), else None.
    """

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    agent: str | None = None


@dataclass(frozen=True)
class Trajectory:
    """A scored agent trajectory.

    id: unique within a dataset; task_id: groups the rollouts of one task (best-of-N);
    action_mask: one bool per message, True for the scored actions;
    reward: the environment reward (None if absent); success: ``reward >= 1`` by default;
    mistake_step: 0-based index into ``messages`` of the decisive error (failure attribution);
    mistake_agent: the agent blamed for it; source: the file it came from; item: where in the file.
    """

    id: str
    task_id: str
    messages: tuple[Message, ...]
    action_mask: tuple[bool, ...]
    reward: float | None = None
    success: bool | None = None
    mistake_step: int | None = None
    mistake_agent: str | None = None
    source: str = ""
    item: str = ""
    trial: int | None = None
    format: str = ""
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if len(self.action_mask) != len(self.messages):
            raise DataError(
                f"{self.source} [{self.item}]: action_mask has {len(self.action_mask)} entries for "
                f"{len(self.messages)} messages"
            )

    @property
    def action_indices(self) -> tuple[int, ...]:
        """Message indices of the scored actions, in order (step k -> message action_indices[k])."""
        return tuple(i for i, a in enumerate(self.action_mask) if a)

    @property
    def num_steps(self) -> int:
        return int(sum(self.action_mask))

    def replace(self, **kw: Any) -> "Trajectory":
        return dataclasses.replace(self, **kw)


@dataclass(frozen=True)
class Skipped:
    """An item that cannot be scored, with the reason (listed in results, never silently dropped)."""

    source: str
    item: str
    reason: str

    def as_dict(self) -> dict:
        return {"source": self.source, "item": self.item, "reason": self.reason}


@dataclass
class Dataset:
    """Loaded trajectories, the items skipped (with reasons) and the input files read."""

    trajectories: list[Trajectory]
    skipped: list[Skipped]
    files: list[str]

    def __len__(self) -> int:
        return len(self.trajectories)

    def groups(self) -> dict[str, list[Trajectory]]:
        """Trajectories grouped by task id, in first-seen task order; within a task by (trial, order)."""
        out: dict[str, list[Trajectory]] = {}
        for t in self.trajectories:
            out.setdefault(t.task_id, []).append(t)
        for k, v in out.items():
            out[k] = sorted(v, key=lambda t: (t.trial if t.trial is not None else -1))
        return out

    def require(self, label: str) -> "Dataset":
        """Keep trajectories that carry ``label`` ("reward" or "mistake_step"); move the rest to
        ``skipped`` with the reason."""
        if label not in ("reward", "mistake_step"):
            raise ValueError(f"label must be 'reward' or 'mistake_step', got {label!r}")
        keep, skipped = [], list(self.skipped)
        for t in self.trajectories:
            if getattr(t, label) is None:
                skipped.append(Skipped(t.source, t.item, f"missing label {label!r}"))
            else:
                keep.append(t)
        return Dataset(keep, skipped, list(self.files))
