"""Figures of the real-data runs (issue 8): one PNG per results JSON of `pa-jax uq|bon|fa`.

* ``uq``: AUROC of every score (method / token aggregation / step aggregation) against success, one
  row per method; dots are its aggregations, the best one is drawn with its bootstrap 95% interval;
  the dotted line is chance (0.5).
* ``bon``: best-of-N success rate of the rollout each score selects, one row per method (dots: its
  aggregations), against pass@1 (mean over the N rollouts) and oracle pass@N.
* ``fa``: exact step accuracy of each (method / token aggregation) x decision rule, one heat map
  per split, with the within-1 accuracy in brackets.

    python paper_figs/real_data.py docs/results/real_full --out-dir docs/figures [--markdown]

``--markdown`` also prints, per file, a table of each method's best aggregation (the tables in
README.md come from it).

The command is read from each file's ``config.command``; files of other kinds are rejected with the
field that is missing.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pa_jax.io import atomic_write_bytes  # noqa: E402

KINDS = ("uq", "bon", "fa")


def _read(path: str):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the results JSON ({exc})") from exc


def load(path: str) -> dict:
    """A results JSON of `pa-jax uq|bon|fa`, checked for the fields the figures read."""
    return checked(_read(path), path)


def checked(result, path: str) -> dict:
    """``result`` (read from ``path``) if it is a `pa-jax uq|bon|fa` results object with the fields the
    figures read, else ValueError naming the file and field."""
    kind = result.get("config", {}).get("command") if isinstance(result, dict) else None
    if kind not in KINDS:
        raise ValueError(f"{path}: config.command must be one of {KINDS} (a `pa-jax uq|bon|fa` results file), "
                         f"got {kind!r}")
    if not isinstance(result.get("metrics"), dict) or not result["metrics"]:
        raise ValueError(f"{path}: no 'metrics' object")
    need = {"uq": ("auroc", "auroc_ci95"), "bon": ("bon_success_rate", "pass_at_1", "oracle_pass_at_n")}.get(kind)
    if need:
        for key, m in result["metrics"].items():
            missing = [f for f in need if f not in m]
            if missing:
                raise ValueError(f"{path}: metrics[{key!r}] lacks {missing}")
    _nulls_to_nan(result["metrics"])
    return result


def _num(m: dict, field: str) -> float:
    """A metric as a float: NaN where it is absent or null (strict JSON writes an undefined value as null)."""
    v = m.get(field)
    return float("nan") if v is None else float(v)


_METRIC_FIELDS = frozenset({"auroc", "spearman", "brier", "ece", "auroc_ci95", "spearman_ci95", "bon_success_rate",
                            "bon_mean_reward", "pass_at_1", "oracle_pass_at_n", "step_accuracy", "within1_accuracy",
                            "mae", "agent_accuracy"})


def _nulls_to_nan(obj) -> None:
    """Results are strict JSON: an undefined metric is null (its reason under "undefined"); the tables and
    figures show it as nan."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in _METRIC_FIELDS and v is None:
                obj[k] = float("nan")
            elif k in _METRIC_FIELDS and isinstance(v, list):
                obj[k] = [float("nan") if x is None else x for x in v]
            else:
                _nulls_to_nan(v)


def _family(key: str) -> str:
    return key.split("/")[0]


def _by_family(metrics: dict, field: str) -> dict[str, list[tuple[str, float]]]:
    out: dict[str, list[tuple[str, float]]] = {}
    for key, m in metrics.items():
        v = m.get(field)
        out.setdefault(_family(key), []).append((key, np.nan if v is None else float(v)))
    return out


def _best(items):
    finite = [kv for kv in items if np.isfinite(kv[1])]
    return max(finite, key=lambda kv: kv[1]) if finite else None


def _best_per_method(metrics: dict, field: str) -> list[tuple[str, str, dict]]:
    """(method, key of its best aggregation by ``field``, that entry's metrics), best method first;
    methods with no finite value are left out."""
    fam = _by_family(metrics, field)
    best = [(f, _best(items)) for f, items in fam.items()]
    return [(f, b[0], metrics[b[0]]) for f, b in sorted((x for x in best if x[1] is not None), key=lambda x: -x[1][1])]


def _title(result: dict) -> str:
    cfg, models = result["config"], result.get("models", {})
    pol = os.path.basename(str(cfg.get("policy", "?")))
    ref = "= policy (progress advantage == 0)" if models.get("reference_is_policy") else \
        os.path.basename(str(cfg.get("reference") or "none"))
    ml = cfg.get("max_length")
    return (f"{os.path.basename(str(cfg.get('data', '?')))}: {result.get('n_scored', '?')} scored, "
            f"{result.get('n_skipped', 0)} skipped, {result.get('n_truncated', 0)} truncated"
            f"{'' if ml is None else f' (max length {ml})'}\npolicy {pol}, reference {ref}, {cfg.get('dtype', '')}")


def _rows_panel(ax, fam: dict[str, list[tuple[str, float]]], errors: Optional[dict] = None) -> None:
    names = sorted(fam, key=lambda f: (_best(fam[f]) or ("", -np.inf))[1])
    for y, f in enumerate(names):
        vals = np.array([v for _, v in fam[f]], float)
        ax.scatter(vals, np.full(len(vals), y), s=14, color="tab:gray", alpha=0.6, zorder=2)
        best = _best(fam[f])
        if best is None:
            continue
        key, v = best
        if errors and key in errors and errors[key] is not None and all(e is not None for e in errors[key]):
            lo, hi = errors[key]
            ax.errorbar(v, y, xerr=[[v - lo], [hi - v]], fmt="o", color="tab:blue", capsize=3, zorder=3)
        else:
            ax.scatter([v], [y], color="tab:blue", zorder=3)
        ax.annotate(key, (v, y), textcoords="offset points", xytext=(6, 5), fontsize=7)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.grid(alpha=0.3, axis="x")


def _at_mean(metrics: dict, family: str, field: str) -> str:
    m = metrics.get(f"{family}/mean/mean")
    return "" if m is None or m.get(field) is None else f"{m[field]:.3f}"


def markdown(result: dict) -> str:
    """A markdown table per results file: each method's best aggregation (uq: by AUROC, bon: by
    best-of-N success rate, fa: by exact step accuracy over rules, per split). The best is chosen on
    the evaluation data itself, so it is optimistic; uq and bon also show the default (mean tokens,
    mean steps) aggregation."""
    kind, metrics = result["config"]["command"], result["metrics"]
    lines = []
    if kind == "uq":
        lines += ["| method | best aggregation | AUROC [95% CI] | Spearman | Brier | ECE | AUROC at mean/mean |",
                  "|---|---|---|---|---|---|---|"]
        for f, key, m in _best_per_method(metrics, "auroc"):
            lo, hi = m["auroc_ci95"]
            lines.append(f"| {f} | {key} | {_num(m, 'auroc'):.3f} [{lo:.2f}, {hi:.2f}] | {_num(m, 'spearman'):.3f} "
                         f"| {_num(m, 'brier'):.3f} | {_num(m, 'ece'):.3f} | {_at_mean(metrics, f, 'auroc')} |")
    elif kind == "bon":
        any_m = next(iter(metrics.values()))
        lines += [f"pass@1 {any_m['pass_at_1']:.3f}, oracle pass@N {any_m['oracle_pass_at_n']:.3f} "
                  f"({any_m.get('n_tasks')} tasks, {any_m.get('n_rollouts')} rollouts)", "",
                  "| method | best aggregation | best-of-N success | mean reward | success at mean/mean |", "|---|---|---|---|---|"]
        for f, key, m in _best_per_method(metrics, "bon_success_rate"):
            lines.append(f"| {f} | {key} | {_num(m, 'bon_success_rate'):.3f} | {_num(m, 'bon_mean_reward'):.3f} | "
                         f"{_at_mean(metrics, f, 'bon_success_rate')} |")
    else:
        lines += ["| split | method | best token agg / rule | step acc | within-1 | MAE | agent acc | n |",
                  "|---|---|---|---|---|---|---|---|"]
        for split, per in metrics.items():
            best: dict[str, tuple] = {}
            for key, rules in per.items():
                for rule, v in rules.items():
                    cand = (_num(v, "step_accuracy"), _num(v, "within1_accuracy"), key, rule, v)
                    if _family(key) not in best or cand[:2] > best[_family(key)][:2]:
                        best[_family(key)] = cand
            for f, (acc, w1, key, rule, v) in sorted(best.items(), key=lambda kv: -kv[1][0]):
                lines.append(f"| {split} | {f} | {key.split('/', 1)[1]} / {rule} | {acc:.3f} | {w1:.3f} | "
                             f"{_num(v, 'mae'):.2f} | {_num(v, 'agent_accuracy'):.3f} | {v['n']} |")
    return "\n".join(lines)


def draw(result: dict, out: str) -> None:
    kind = result["config"]["command"]
    metrics = result["metrics"]
    if kind == "fa":
        splits = list(metrics)
        fig, axes = plt.subplots(1, len(splits), figsize=(7.5 * len(splits), 0.42 * max(
            len(metrics[s]) for s in splits) + 2.6), constrained_layout=True, squeeze=False)
        for ax, split in zip(axes[0], splits):
            methods = list(metrics[split])
            rules = list(metrics[split][methods[0]])
            acc = np.array([[metrics[split][m][r]["step_accuracy"] for r in rules] for m in methods], float)
            w1 = np.array([[metrics[split][m][r]["within1_accuracy"] for r in rules] for m in methods], float)
            im = ax.imshow(acc, cmap="viridis", vmin=0, vmax=max(0.05, float(np.nanmax(acc))), aspect="auto")
            for i in range(len(methods)):
                for j in range(len(rules)):
                    ax.text(j, i, f"{acc[i, j]:.2f}\n({w1[i, j]:.2f})", ha="center", va="center", fontsize=6.5,
                            color="white" if acc[i, j] < 0.6 * np.nanmax(acc) else "black")
            ax.set_xticks(range(len(rules)))
            ax.set_xticklabels(rules, rotation=30, ha="right", fontsize=8)
            ax.set_yticks(range(len(methods)))
            ax.set_yticklabels(methods, fontsize=8)
            n = metrics[split][methods[0]][rules[0]].get("n", "?")
            ax.set_title(f"{split} (n={n}): step accuracy (within-1)", fontsize=10)
            fig.colorbar(im, ax=ax, shrink=0.8)
    else:
        fam = _by_family(metrics, "auroc" if kind == "uq" else "bon_success_rate")
        fig, ax = plt.subplots(figsize=(9, 0.42 * len(fam) + 2.2), constrained_layout=True)
        if kind == "uq":
            _rows_panel(ax, fam, {k: m.get("auroc_ci95") for k, m in metrics.items()})
            ax.axvline(0.5, color="gray", ls=":", lw=1)
            ax.set_xlabel("AUROC of the trajectory score against success (best aggregation: 95% bootstrap CI)")
        else:
            _rows_panel(ax, fam)
            any_m = next(iter(metrics.values()))
            ax.axvline(any_m["pass_at_1"], color="tab:red", ls="--", lw=1, label=f"pass@1 = {any_m['pass_at_1']:.3f}")
            ax.axvline(any_m["oracle_pass_at_n"], color="tab:green", ls="--", lw=1,
                       label=f"oracle pass@N = {any_m['oracle_pass_at_n']:.3f}")
            ax.legend(fontsize=8, loc="lower right")
            ax.set_xlabel(f"best-of-N success rate ({any_m.get('n_tasks', '?')} tasks, "
                          f"{any_m.get('n_rollouts', '?')} rollouts)")
    fig.suptitle(f"pa-jax {kind}: " + _title(result), fontsize=9)
    try:
        atomic_write_bytes(out, lambda f: fig.savefig(f, dpi=110, format="png"))
    finally:
        plt.close(fig)


def _other_json(obj) -> bool:
    """Whether a JSON object found in a directory is some other JSON (an object without ``config.command``,
    e.g. a held-out selection file), to be skipped; anything else goes to :func:`checked`, which reports
    what is wrong with it."""
    return isinstance(obj, dict) and isinstance(obj.get("config", {}), dict) and obj.get("config", {}).get("command") is None


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", help="results JSON files of `pa-jax uq|bon|fa`, or directories of them")
    p.add_argument("--markdown", action="store_true", help="also print each method's best aggregation as a table")
    p.add_argument("--out-dir", default=None, help="where the PNGs go (default: beside each JSON); "
                   "each is named real_<JSON stem>.png")
    args = p.parse_args(argv)
    files: list[str] = []
    listed: set[str] = set()  # found in a directory (other JSON there, e.g. held-out selections, is skipped)
    for x in args.inputs:
        if os.path.isdir(x):
            found = sorted(glob.glob(os.path.join(x, "*.json")))
            files += found
            listed.update(found)
        else:
            files.append(x)
    if not files:
        p.error(f"no JSON files in {args.inputs}")
    for f in files:
        try:
            obj = _read(f)
            if f in listed and _other_json(obj):
                print(f"skipped {f}: not a `pa-jax uq|bon|fa` results file (no config.command)")
                continue
            result = checked(obj, f)
        except ValueError as exc:
            p.error(str(exc))
        out = os.path.join(args.out_dir or os.path.dirname(os.path.abspath(f)),
                           "real_" + os.path.splitext(os.path.basename(f))[0] + ".png")
        draw(result, out)
        print(f"wrote {out}")
        if args.markdown:
            print(f"\n{f}:\n{markdown(result)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
