"""External scores brought by the user (trained reward models, LLM judges) as JSON lines.

``--extra-scores NAME=FILE.jsonl``: one JSON object per line, keyed by trajectory id (the ``id`` of
``pa-jax score``'s output), with a trajectory score and/or per-step scores (one per scored action,
in order; higher = better / more confident)::

    {"id": "airline/0/trial0", "score": 0.83}
    {"id": "Hand-Crafted/12", "step_scores": [0.9, 0.7, 0.2]}

Validation (a `DataError` naming the file, and the line where there is one): each line is a JSON
object with a string or integer ``id``; ``score`` a finite number; ``step_scores`` a list of finite
numbers whose length is the trajectory's number of scored actions; at least one of the two; no id
twice; every line of a file gives the same fields; ids that the data lacks, and trajectories of the
data the file lacks, are listed. Blank lines are ignored.
"""
from __future__ import annotations

import math
import pathlib
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from pa_jax.data.schema import DataError
from pa_jax.io import JSONLError, iter_jsonl

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True)
class ExtraScores:
    """Scores of one external scorer aligned with the data's trajectories.

    score: ``[n]`` trajectory scores or None; step_scores: one ``[n_b]`` array per trajectory or None.
    """

    name: str
    path: str
    score: np.ndarray | None
    step_scores: list[np.ndarray] | None


def parse_spec(spec: str) -> tuple[str, str]:
    """``NAME=FILE`` -> (name, file); NAME may hold letters, digits, ``_ . -``."""
    if "=" not in spec:
        raise ValueError(f"--extra-scores {spec!r}: expected NAME=FILE.jsonl")
    name, path = spec.split("=", 1)
    if not _NAME_RE.match(name):
        raise ValueError(f"--extra-scores {spec!r}: NAME must be letters, digits, '_', '.', '-', got {name!r}")
    if not path:
        raise ValueError(f"--extra-scores {spec!r}: no file given")
    return name, path


def _finite(v, where: str, field: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise DataError(f"{where}: field {field!r} must be a number, got {v!r}")
    if not math.isfinite(v):
        raise DataError(f"{where}: field {field!r} is not finite ({v!r})")
    return float(v)


def _listing(xs: Sequence[str], limit: int = 10) -> str:
    head = ", ".join(repr(x) for x in xs[:limit])
    return head + (f" ... ({len(xs)} in all)" if len(xs) > limit else "")


def _lines(name: str, path: pathlib.Path):
    """(line number, object) of each line (pa_jax.io.iter_jsonl), its errors as DataError."""
    try:
        yield from iter_jsonl(path)
    except FileNotFoundError:
        raise DataError(f"--extra-scores {name}={path}: no such file") from None
    except JSONLError as e:
        raise DataError(str(e)) from None


def load_extra_scores(name: str, path: str | pathlib.Path, ids: Sequence[str],
                      num_steps: Sequence[int] | Mapping[str, int]) -> ExtraScores:
    """Read and validate ``path`` against the trajectories ``ids`` (with their numbers of scored
    actions ``num_steps``); the result is aligned with ``ids``."""
    path = pathlib.Path(path)
    steps_of = dict(num_steps) if isinstance(num_steps, Mapping) else dict(zip(ids, num_steps))
    known = set(ids)
    rows: dict[str, dict] = {}
    fields: tuple | None = None
    unknown: list[str] = []
    for ln, obj in _lines(name, path):
        where = f"{path} line {ln}"
        if "id" not in obj:
            raise DataError(f"{where}: missing field 'id'")
        tid = obj["id"]
        if isinstance(tid, bool) or not isinstance(tid, (str, int)):
            raise DataError(f"{where}: field 'id' must be a string or integer, got {tid!r}")
        tid = str(tid)
        has = tuple(f for f in ("score", "step_scores") if f in obj)
        if not has:
            raise DataError(f"{where}: needs 'score' and/or 'step_scores'")
        if fields is None:
            fields = has
        elif has != fields:
            raise DataError(f"{where}: gives {list(has)} but earlier lines give {list(fields)} (every line the same)")
        row: dict = {"line": ln}
        if "score" in obj:
            row["score"] = _finite(obj["score"], where, "score")
        if "step_scores" in obj:
            ss = obj["step_scores"]
            if not isinstance(ss, list):
                raise DataError(f"{where}: field 'step_scores' must be a list, got {type(ss).__name__}")
            row["step_scores"] = np.array([_finite(v, f"{where} step {j}", "step_scores") for j, v in enumerate(ss)],
                                          np.float64)
        if tid in rows:
            raise DataError(f"{where}: id {tid!r} already given on line {rows[tid]['line']}")
        rows[tid] = row
        if tid not in known:
            unknown.append(tid)
    if not rows:
        raise DataError(f"{path}: no score lines")
    if unknown:
        raise DataError(f"{path}: {len(unknown)} ids not in the data: {_listing(unknown)}")
    missing = [t for t in ids if t not in rows]
    if missing:
        raise DataError(f"{path}: no line for {len(missing)} trajectories of the data: {_listing(missing)}")
    score = np.array([rows[t]["score"] for t in ids], np.float64) if "score" in fields else None
    steps = None
    if "step_scores" in fields:
        steps = []
        for t in ids:
            s = rows[t]["step_scores"]
            if t in steps_of and len(s) != int(steps_of[t]):
                raise DataError(f"{path} line {rows[t]['line']}: id {t!r} has {len(s)} step_scores, the data has "
                                f"{int(steps_of[t])} scored actions")
            steps.append(s)
    return ExtraScores(name, str(path), score, steps)


def _aggregate(v: np.ndarray, step_agg: str) -> float:
    """Step aggregation of the authors (pa/aggregations.py): mean, sum, last, min, max,
    bottom10 = mean of the ceil(n/10) (at least 1) smallest; 0.0 for no step."""
    if len(v) == 0:
        return 0.0
    if step_agg == "bottom10":
        k = max(1, -(-len(v) // 10))
        return float(np.mean(np.sort(v)[:k]))
    return float({"mean": np.mean, "sum": np.sum, "last": lambda x: x[-1], "min": np.min, "max": np.max}[step_agg](v))


def trajectory_scores(extra: ExtraScores, step_aggs: Sequence[str]) -> dict[str, np.ndarray]:
    """Trajectory-level score arrays of one external scorer, named like the built-in methods:
    ``NAME`` (its own trajectory score) and ``NAME/steps/<step_agg>`` (its step scores aggregated)."""
    out: dict[str, np.ndarray] = {}
    if extra.score is not None:
        out[extra.name] = extra.score
    if extra.step_scores is not None:
        for sa in step_aggs:
            out[f"{extra.name}/steps/{sa}"] = np.array([_aggregate(s, sa) for s in extra.step_scores])
    return out
