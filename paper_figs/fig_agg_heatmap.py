"""Token x step aggregation heat maps of the metric (the paper's Figures 4, 7, 8).

One panel per (results file, method): rows are token aggregations, columns step aggregations
(``uq``: AUROC, ``bon``: best-of-N success rate); for ``fa`` one panel per (split, method) with the
decision rules as columns (exact step accuracy). The default aggregation (the command's first
``--token-agg`` / ``--step-agg``, or the held-out selection's default when the file has one) is
outlined, the in-sample best cell starred. Only methods with more than one cell are drawn.

    python paper_figs/fig_agg_heatmap.py uq.json [bon.json ...] --out heatmaps.png [--methods progress_advantage]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _figio import need, plt, read_json, save  # noqa: E402

METRIC = {"uq": "auroc", "bon": "bon_success_rate", "fa": "step_accuracy"}


def _short(path) -> str:
    name = os.path.basename(str(path or "-")).rsplit(".", 1)[0] if path else "-"
    return name if len(name) <= 22 else name[:21] + "~"


def _label(res: dict, path: str) -> str:
    """``<command> <data file>`` and the model pair (one name when the reference is the policy)."""
    cfg = res.get("config", {})
    models = res.get("models", {})
    pol, ref = models.get("policy") or cfg.get("policy"), models.get("reference") or cfg.get("reference")
    pair = _short(pol) + (" (ref = policy)" if pol == ref else f" / {_short(ref)}" if ref else " (no ref)")
    data = os.path.basename(str(cfg.get("data", path)).rstrip("/"))
    return f"{cfg.get('command', '')} {data}\n{pair}"


def grids(res: dict, path: str) -> list[dict]:
    """Panels ``{title, rows, cols, values [R, C], default (r, c) or None}`` of one results file."""
    kind = res.get("config", {}).get("command") or res.get("command")
    if kind not in METRIC:
        raise ValueError(f"{path}: config.command must be one of {tuple(METRIC)}, got {kind!r}")
    need(res, ["metrics"], path)
    cfg = res.get("config", {})
    ta0 = (cfg.get("token_agg") or [None])[0]
    sa0 = (cfg.get("step_agg") or [None])[0]
    sel = res.get("selection") or {}
    panels = []
    if kind in ("uq", "bon"):
        by: dict = {}
        for key, m in res["metrics"].items():
            parts = key.split("/")
            if len(parts) != 3:
                continue
            if METRIC[kind] not in m:
                raise ValueError(f"{path}: metrics[{key!r}] lacks {METRIC[kind]!r}")
            by.setdefault(parts[0], {})[(parts[1], parts[2])] = m[METRIC[kind]]
        for method, cells in by.items():
            d = sel.get(method, {}).get("default", {}).get("candidate")
            dflt = tuple(d.split("/")[1:]) if isinstance(d, str) and d.count("/") == 2 else (ta0, sa0)
            panels.append(_panel(f"{_label(res, path)}\n{method}", cells, dflt, METRIC[kind]))
    else:
        for split, methods in res["metrics"].items():
            by = {}
            for key, rules in methods.items():
                method, _, ta = key.rpartition("/")
                for rule, v in rules.items():
                    if not isinstance(v, dict) or "step_accuracy" not in v:
                        raise ValueError(f"{path}: metrics[{split!r}][{key!r}][{rule!r}] lacks 'step_accuracy'")
                    by.setdefault(method, {})[(ta, rule)] = v["step_accuracy"]
            for method, cells in by.items():
                first_rule = next(iter(cells))[1]
                lab = _label(res, path)
                lab = lab if lab.split("\n")[0].endswith(split) else f"{lab} {split}"
                panels.append(_panel(f"{lab}\n{method}", cells, (ta0, first_rule), "step accuracy"))
    return [p for p in panels if p["values"].size > 1]


def _panel(title, cells, default, metric) -> dict:
    rows = list(dict.fromkeys(r for r, _ in cells))
    cols = list(dict.fromkeys(c for _, c in cells))
    v = np.full((len(rows), len(cols)), np.nan)
    for (r, c), x in cells.items():
        v[rows.index(r), cols.index(c)] = np.nan if x is None else float(x)
    d = (rows.index(default[0]), cols.index(default[1])) if default[0] in rows and default[1] in cols else None
    return {"title": title, "rows": rows, "cols": cols, "values": v, "default": d, "metric": metric}


def draw(panels: list[dict]):
    if not panels:
        raise ValueError("no method with more than one aggregation in the given files")
    n = len(panels)
    ncol = min(3, n)
    nrow = -(-n // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.6 * nrow), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, p in zip(axes.flat, panels):
        v = p["values"]
        im = ax.imshow(v, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(p["cols"])), p["cols"], rotation=40, ha="right", fontsize=7)
        ax.set_yticks(range(len(p["rows"])), p["rows"], fontsize=7)
        for (i, j), x in np.ndenumerate(v):
            if np.isfinite(x):
                ax.text(j, i, f"{x:.2f}", ha="center", va="center", fontsize=6, color="w" if x < np.nanmean(v) else "k")
        if np.isfinite(v).any():
            bi, bj = np.unravel_index(np.nanargmax(v), v.shape)
            ax.plot(bj, bi, marker="*", ms=14, mfc="none", mec="red", mew=1.5, label="best")
        if p["default"] is not None:
            di, dj = p["default"]
            ax.add_patch(plt.Rectangle((dj - 0.5, di - 0.5), 1, 1, fill=False, ec="magenta", ls="--", lw=2.0, label="default"))
        ax.set_title(p["title"], fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, label=p["metric"])
    fig.tight_layout()
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower left", fontsize=7, ncol=2, bbox_to_anchor=(0.0, -0.03))
    return fig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="results JSON of pa-jax uq|bon|fa")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--methods", nargs="*", default=None, help="only these methods (default: all)")
    a = ap.parse_args(argv)
    panels = []
    for path in a.results:
        panels += grids(read_json(path), path)
    if a.methods:
        panels = [p for p in panels if p["title"].split("\n")[-1] in a.methods]
    save(draw(panels), a.out)
    print(f"wrote {a.out} ({len(panels)} panels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
