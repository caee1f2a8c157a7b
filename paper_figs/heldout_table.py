"""Held-out aggregation selection recomputed from existing results JSON (no model, no rescoring).

For files written before ``--heldout-folds`` existed, or to try other fold counts: ``uq`` files
carry every score and label, ``bon`` files the selected rollout of every task and score, ``fa``
files every rule's predictions (the mistake steps are read from ``--data``). Prints, per method, the
in-sample best, the held-out value with its 95% interval and the default, as a markdown table
(pa_jax.apps.select), and writes them as JSON with --json.

    python paper_figs/heldout_table.py docs/results/real_full/uq_airline.json --folds 5 [--json out.json]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _figio import need, read_json  # noqa: E402

from pa_jax.apps import select  # noqa: E402


def selection(res: dict, path: str, *, folds: int, seed: int, resamples: int, data: str | None = None) -> dict:
    """``{panel: {method: heldout_selection result}}`` of one results file (panel = '' or FA split)."""
    cfg = res.get("config", {})
    kind = cfg.get("command")
    ta0, sa0 = (cfg.get("token_agg") or [None])[0], (cfg.get("step_agg") or [None])[0]
    kw = dict(num_folds=folds, seed=seed, num_resamples=resamples)
    if kind == "uq":
        need(res, ["scores"], path)
        sc = res["scores"]
        ids = sc["ids"]
        tasks = [i.split("/trial")[0] if "/trial" in i else i for i in ids]  # tau-bench v1 ids: task/trialN
        names, item_task = select.group_tasks(tasks)
        configs = [k for k in sc if k not in ("ids", "labels")]
        scores = {k: np.array([np.nan if v is None else v for v in sc[k]], float) for k in configs}
        metric = select.uq_metric(scores, np.array(sc["labels"]), select.members(item_task, len(names)))
        by = select.group_by_method(configs)
        return {"": select.select_all_methods(by, metric, len(names),
                                              {m: select.default_config(c, ta0, sa0) for m, c in by.items()}, **kw)}
    if kind == "bon":
        thr = cfg.get("success_threshold", 1.0)
        first = next(iter(res["metrics"].values()))
        names = [s["task_id"] for s in first["selected"]]
        succ = {c: np.array([s["reward"] >= thr for s in m["selected"]], float) for c, m in res["metrics"].items()}
        for c, m in res["metrics"].items():
            if [s["task_id"] for s in m["selected"]] != names:
                raise ValueError(f"{path}: metrics[{c!r}] lists the tasks in another order")
        by = select.group_by_method(list(res["metrics"]))
        return {"": select.select_all_methods(by, select.bon_metric(succ), len(names),
                                              {m: select.default_config(c, ta0, sa0) for m, c in by.items()}, **kw)}
    if kind == "fa":
        if not data:
            raise ValueError(f"{path}: an fa results file needs --data (the mistake steps)")
        from pa_jax.data import load

        trajs: dict = {}
        for t in load(data).require("mistake_step").trajectories:
            trajs.setdefault(t.meta.get("split", t.format or "all"), []).append(t)
        out = {}
        for split, methods in res["metrics"].items():
            ts = trajs.get(split, [])
            truth = np.array([t.mistake_step for t in ts])
            names, item_task = select.group_tasks([t.task_id for t in ts])
            correct, by = {}, {}
            for key, rules in methods.items():
                for rule, m in rules.items():
                    if len(m["predictions"]) != len(ts):
                        raise ValueError(f"{path}: {split} has {len(m['predictions'])} predictions, --data {len(ts)}")
                    correct[f"{key}|{rule}"] = np.array(m["predictions"]) == truth
                    by.setdefault(key.rpartition("/")[0], []).append(f"{key}|{rule}")
            defaults = {m: next((c for c in cs if c.startswith(f"{m}/{ta0}|")), cs[0]) for m, cs in by.items()}
            out[split] = select.select_all_methods(by, select.fa_metric(correct, select.members(item_task, len(names))),
                                                   len(names), defaults, **kw)
        return out
    raise ValueError(f"{path}: config.command must be uq, bon or fa, got {kind!r}")


def markdown(panels: dict) -> str:
    lines = []
    for panel, sel in panels.items():
        if panel:
            lines.append(f"\n{panel}\n")
        lines.append("| " + " | ".join(select.SELECTION_HEADER) + " |")
        lines.append("|" + "---|" * len(select.SELECTION_HEADER))
        for row in select.selection_rows(sel):
            cells = [f"[{x[0]:.3f}, {x[1]:.3f}]" if isinstance(x, list) else f"{x:.3f}" if isinstance(x, float) else str(x)
                     for x in row]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="results JSON of pa-jax uq|bon|fa")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--data", default=None, help="Who&When data (fa files)")
    ap.add_argument("--json", default=None, help="also write the selection as JSON (pa_jax.io, strict)")
    a = ap.parse_args(argv)
    try:
        panels = selection(read_json(a.results), a.results, folds=a.folds, seed=a.seed, resamples=a.resamples,
                           data=a.data)
    except ValueError as exc:  # bad input: one line naming the file, exit status 2
        ap.error(str(exc))
    print(markdown(panels))
    if a.json:
        from pa_jax.io import atomic_write_json

        atomic_write_json(a.json, {"results": a.results, "folds": a.folds, "seed": a.seed, "selection": panels})
    return 0


if __name__ == "__main__":
    sys.exit(main())
