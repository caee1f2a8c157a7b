"""Failure-attribution step accuracy as bars per method and rule (the paper's Figures 2, 6).

From a results JSON of ``pa-jax fa``: one panel per split, a group of bars per decision rule, one
bar per method (method / token aggregation); the dashed line is chance (a uniformly random scored
action: ``chance_step_accuracy`` of the file), an optional dotted reference line (e.g. a number
from the paper) is given with --reference VALUE [--reference-label TEXT].

    python paper_figs/fig_fa_bars.py fa.json --out fa_bars.png [--reference 0.2 --reference-label "paper"]

Results files written before ``chance_step_accuracy`` existed get the chance line from the data
with ``--data DIR`` (the Who&When items with a mistake step, as `pa-jax fa` loads them; no model).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _figio import need, plt, read_json, save  # noqa: E402


def table(res: dict, path: str) -> dict[str, dict[str, dict[str, float]]]:
    """``{split: {rule: {method: step_accuracy}}}``."""
    kind = res.get("config", {}).get("command") or res.get("command")
    if kind != "fa":
        raise ValueError(f"{path}: config.command must be 'fa', got {kind!r}")
    need(res, ["metrics"], path)
    out: dict = {}
    for split, methods in res["metrics"].items():
        for method, rules in methods.items():
            for rule, v in rules.items():
                if not isinstance(v, dict) or "step_accuracy" not in v:
                    raise ValueError(f"{path}: metrics[{split!r}][{method!r}][{rule!r}] lacks 'step_accuracy'")
                out.setdefault(split, {}).setdefault(rule, {})[method] = v["step_accuracy"]
    if not out:
        raise ValueError(f"{path}: 'metrics' is empty")
    return out


def chance_from_data(data: str, n_expected: dict[str, int] | None = None) -> dict[str, float]:
    """Step accuracy of a uniformly random scored action per split, from the trajectories of ``data``."""
    from pa_jax.apps.fa import chance_step_accuracy
    from pa_jax.data import load

    splits: dict = {}
    for t in load(data).require("mistake_step").trajectories:
        splits.setdefault(t.meta.get("split", t.format or "all"), []).append(t)
    out = {}
    for split, ts in splits.items():
        if n_expected and split in n_expected and n_expected[split] != len(ts):
            raise ValueError(f"--data {data}: {len(ts)} trajectories in split {split!r}, the results have {n_expected[split]}")
        out[split] = chance_step_accuracy([t.action_indices for t in ts], [t.mistake_step for t in ts])
    return out


def draw(tab, chance: dict, reference: float | None, reference_label: str):
    splits = list(tab)
    fig, axes = plt.subplots(len(splits), 1, figsize=(max(7, 1.6 * max(len(r) for r in tab.values())), 3.2 * len(splits)),
                             squeeze=False)
    for ax, split in zip(axes[:, 0], splits):
        rules = list(tab[split])
        methods = list(dict.fromkeys(m for r in rules for m in tab[split][r]))
        w = 0.8 / len(methods)
        families = list(dict.fromkeys(m.rpartition("/")[0] or m for m in methods))
        aggs = list(dict.fromkeys(m.rpartition("/")[2] for m in methods))
        hatches = ["", "//", "..", "xx", "\\\\", "oo", "--"]
        for j, m in enumerate(methods):  # colour = method, hatch = token aggregation
            y = [tab[split][r].get(m, np.nan) for r in rules]
            fam, agg = m.rpartition("/")[0] or m, m.rpartition("/")[2]
            ax.bar(np.arange(len(rules)) + (j - (len(methods) - 1) / 2) * w, y, w, label=m,
                   color=f"C{families.index(fam) % 10}", hatch=hatches[aggs.index(agg) % len(hatches)],
                   edgecolor="white", lw=0.3)
        c = chance.get(split)
        if c is not None:
            ax.axhline(c, color="k", ls="--", lw=1, label=f"chance ({c:.3f})")
        if reference is not None:
            ax.axhline(reference, color="0.3", ls=":", lw=1.2, label=reference_label)
        ax.set_xticks(range(len(rules)), rules, rotation=20, ha="right", fontsize=7)
        ax.set_ylabel("step accuracy")
        ax.set_title(split, fontsize=9)
        ax.legend(fontsize=6, ncol=1 + len(methods) // 12, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="results JSON of pa-jax fa")
    ap.add_argument("--out", required=True)
    ap.add_argument("--reference", type=float, default=None, help="a reference accuracy to draw (dotted)")
    ap.add_argument("--reference-label", default="reference")
    ap.add_argument("--token-agg", nargs="*", default=None, help="only these token aggregations (default: all)")
    ap.add_argument("--data", default=None, help="Who&When data, for the chance line of older results files")
    a = ap.parse_args(argv)
    res = read_json(a.results)
    chance = res.get("chance_step_accuracy") or {}
    if not chance and a.data:
        n = {s: next(iter(next(iter(m.values())).values()))["n"] for s, m in res["metrics"].items()}
        chance = chance_from_data(a.data, n)
    tab = table(res, a.results)
    if a.token_agg:
        tab = {sp: {r: {m: v for m, v in ms.items() if m.rpartition("/")[2] in a.token_agg} for r, ms in rules.items()}
               for sp, rules in tab.items()}
    save(draw(tab, chance, a.reference, a.reference_label), a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
