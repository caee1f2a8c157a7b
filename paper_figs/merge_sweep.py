"""Figure 5 style: an application metric against the merge coefficient alpha, one line per merge method.

Reads a results JSON of a reference-merge sweep (``pa-jax uq|bon|fa|score --reference-merge ...`` or
``experiments/toy_pair_merge_sweep.py``)::

    {"metrics": {SCORE: {METRIC: value, ...}, ...},          # the unmerged reference
     "merges": [{"method": "ties", "alpha": 0.5, "metrics": {SCORE: {METRIC: value}}}, ...]}

and draws ``metrics[SCORE][METRIC]`` of every (method, alpha) block against alpha, one line per method
(sorted by alpha), the unmerged reference as a horizontal dashed line and alpha = 0 (the merge base) as a
vertical dotted line.

    python paper_figs/merge_sweep.py RESULTS.json --score progress_advantage/mean/mean --metric auroc \\
        --out docs/figures/merge_sweep.png
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pa_jax.io import atomic_write_bytes  # noqa: E402

# (format, line width, marker size): with one policy emr == linear and dare_ties == dare_linear, so the
# second of each pair is dashed and thinner to stay visible on top of the first
METHOD_STYLE = {"linear": ("o-", 2.6, 6), "ties": ("s-", 1.6, 4), "dare_linear": ("^-", 2.6, 6),
                "dare_ties": ("v--", 1.2, 4), "emr": ("D--", 1.2, 4)}


def _value(metrics, score: str, metric: str, where: str) -> float:
    if not isinstance(metrics, dict) or score not in metrics:
        have = sorted(metrics)[:8] if isinstance(metrics, dict) else []
        raise ValueError(f"{where}: no score {score!r} in metrics (have e.g. {have})")
    m = metrics[score]
    if not isinstance(m, dict) or metric not in m:
        raise ValueError(f"{where}: metrics[{score!r}] has no {metric!r}")
    v = m[metric]
    return float("nan") if v is None else float(v)


def series(result: dict, score: str, metric: str, path: str = "results") -> tuple[dict[str, list[tuple[float, float]]], float | None]:
    """({method: [(alpha, value)] sorted by alpha}, unmerged value or None) from a sweep results dict."""
    merges = result.get("merges") if isinstance(result, dict) else None
    if not isinstance(merges, list) or not merges:
        raise ValueError(f"{path}: no 'merges' list (a --reference-merge sweep results file)")
    out: dict[str, list[tuple[float, float]]] = {}
    for i, block in enumerate(merges):
        where = f"{path}: merges[{i}]"
        for k in ("method", "alpha", "metrics"):
            if k not in block:
                raise ValueError(f"{where} lacks {k!r}")
        out.setdefault(block["method"], []).append((float(block["alpha"]), _value(block["metrics"], score, metric, where)))
    for v in out.values():
        v.sort()
    base = None
    if isinstance(result.get("metrics"), dict) and result["metrics"]:
        base = _value(result["metrics"], score, metric, f"{path}: metrics (unmerged reference)")
    return out, base


def draw(result: dict, score: str, metric: str, *, title: str | None = None, path: str = "results"):
    lines, base = series(result, score, metric, path)
    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=150)
    for method, pts in lines.items():
        xs, ys = zip(*pts)
        fmt, lw, ms = METHOD_STYLE.get(method, ("x-", 1.4, 4))
        ax.plot(xs, ys, fmt, label=method, markersize=ms, linewidth=lw, alpha=0.9)
    if base is not None and math.isfinite(base):
        ax.axhline(base, color="k", linestyle="--", linewidth=1, label="unmerged reference")
    ax.axvline(0.0, color="gray", linestyle=":", linewidth=1, label=r"$\alpha=0$ (merge base)")
    ax.set_xlabel(r"merge coefficient $\alpha$  ($\pi_\alpha = \pi_{ref} + \alpha\,\tau$)")
    ax.set_ylabel(metric)
    ax.set_title(title or score, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="sweep results JSON")
    ap.add_argument("--score", required=True, help="key of metrics, e.g. progress_advantage/mean/mean")
    ap.add_argument("--metric", required=True, help="metric of that score, e.g. auroc, bon_success_rate, pearson")
    ap.add_argument("--title", default=None)
    ap.add_argument("--out", required=True, help="PNG path (written atomically)")
    args = ap.parse_args(argv)
    try:
        with open(args.results) as f:
            result = json.load(f)
        fig = draw(result, args.score, args.metric, title=args.title, path=args.results)
    except (OSError, json.JSONDecodeError, ValueError) as e:
        print(f"merge_sweep: error: {e}", file=sys.stderr)
        return 2
    atomic_write_bytes(args.out, lambda fh: fig.savefig(fh, format="png"))
    plt.close(fig)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
