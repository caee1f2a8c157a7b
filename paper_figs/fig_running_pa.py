"""Running progress advantage over the steps of a trajectory, successes vs failures (Figure 9).

From the JSON lines of ``pa-jax score`` (``step_scores[method]`` and ``success`` per trajectory):
three panels, the running sum R_s = sum_{j<=s} A_j, the running mean R_s / (s + 1) and the
running last A_s, each as the mean over successful and over failed trajectories at step s with a
band of +-1.96 standard errors (trajectories shorter than s + 1 steps drop out; steps where a
group has fewer than --min-count trajectories are not drawn).

    python paper_figs/fig_running_pa.py scores.jsonl --out running.png [--method progress_advantage]

An external scorer's step scores (--extra-scores NAME=FILE.jsonl, the format of pa-jax's
--extra-scores, validated against the ids and step counts of scores.jsonl) are drawn with
--method NAME; the success labels still come from scores.jsonl.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _figio import plt, read_jsonl, save  # noqa: E402

KINDS = ("sum", "mean", "last")


def running(a: np.ndarray, kind: str) -> np.ndarray:
    """Running sum cumsum(A), running mean cumsum(A) / (s + 1), running last A."""
    a = np.asarray(a, float)
    if kind == "sum":
        return np.cumsum(a)
    if kind == "mean":
        return np.cumsum(a) / np.arange(1, len(a) + 1)
    if kind == "last":
        return a.copy()
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def band(curves: list[np.ndarray], min_count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per step s: mean over the curves that reach s, 1.96 standard errors, and the count."""
    smax = max((len(c) for c in curves), default=0)
    mean, half, count = np.full(smax, np.nan), np.full(smax, np.nan), np.zeros(smax, int)
    for s in range(smax):
        v = np.array([c[s] for c in curves if len(c) > s])
        count[s] = len(v)
        if len(v) >= min_count:
            mean[s] = v.mean()
            half[s] = 1.96 * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0
    return mean, half, count


def collect(records: list[dict], path: str, method: str, extra: dict | None = None) -> dict[bool, list[np.ndarray]]:
    """Step scores of ``method`` grouped by success; ``extra``: ``{id: step scores}`` of an external scorer."""
    groups: dict[bool, list[np.ndarray]] = {True: [], False: []}
    for i, r in enumerate(records):
        if "skipped" in r:
            continue
        where = f"{path} line {i + 1}"
        steps = r.get("step_scores") if extra is None else {method: extra[str(r["id"])]}
        if not isinstance(steps, dict) or method not in steps:
            have = sorted(steps) if isinstance(steps, dict) else None
            raise ValueError(f"{where}: no step_scores[{method!r}] (has {have})")
        if r.get("success") is None:
            raise ValueError(f"{where}: no 'success' label")
        groups[bool(r["success"])].append(np.asarray(steps[method], float))
    if not groups[True] or not groups[False]:
        raise ValueError(f"{path}: needs successful and failed trajectories, got {len(groups[True])} and {len(groups[False])}")
    return groups


def draw(groups, method: str, min_count: int):
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, kind in zip(axes, KINDS):
        for ok, color, name in ((True, "C2", "success"), (False, "C3", "failure")):
            m, h, n = band([running(a, kind) for a in groups[ok]], min_count)
            s = np.arange(len(m))
            ax.plot(s, m, color=color, label=f"{name} (n={len(groups[ok])})")
            ax.fill_between(s, m - h, m + h, color=color, alpha=0.2, lw=0)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(f"running {kind}", fontsize=9)
        ax.set_xlabel("step")
    axes[0].set_ylabel(method)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scores", help="JSON lines of pa-jax score")
    ap.add_argument("--out", required=True)
    ap.add_argument("--method", default="progress_advantage", help="step_scores key (default progress_advantage)")
    ap.add_argument("--min-count", type=int, default=3, help="fewest trajectories per group to draw a step")
    ap.add_argument("--extra-scores", default=None, metavar="NAME=FILE.jsonl", help="an external scorer's step scores")
    a = ap.parse_args(argv)
    records = read_jsonl(a.scores)
    extra = None
    if a.extra_scores:
        from pa_jax.data.extra_scores import load_extra_scores, parse_spec

        name, file = parse_spec(a.extra_scores)
        rows = [r for r in records if "skipped" not in r]
        for i, r in enumerate(rows):
            if "id" not in r or "num_steps" not in r:
                raise ValueError(f"{a.scores}: record {i + 1} lacks 'id' or 'num_steps'")
        ex = load_extra_scores(name, file, [str(r["id"]) for r in rows], [int(r["num_steps"]) for r in rows])
        if ex.step_scores is None:
            raise ValueError(f"--extra-scores {a.extra_scores}: the file has no 'step_scores'")
        extra = {str(r["id"]): s for r, s in zip(rows, ex.step_scores)}
        a.method = name
    groups = collect(records, a.scores, a.method, extra)
    save(draw(groups, a.method, a.min_count), a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
