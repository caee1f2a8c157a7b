"""`pa-jax uq`: uncertainty quantification -- how well each trajectory score predicts success.

For every method and aggregation: AUROC and Spearman against success (reward >= 1) with bootstrap
95% intervals, and Brier score / expected calibration error after cross-validated isotonic
calibration (pa_jax.apps.uq).
"""
from __future__ import annotations

import argparse

import numpy as np

from pa_jax.apps import uq
from pa_jax.commands import _analyses as X
from pa_jax.commands import _common as C
from pa_jax.commands import _merge as M


def add_arguments(p: argparse.ArgumentParser) -> None:
    C.add_common_arguments(p, token_agg="mean", step_agg="mean,last,max,min,bottom10")
    M.add_merge_arguments(p)  # --reference-merge: a sweep over merged references (pa_jax.commands._merge)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds for isotonic calibration")
    p.add_argument("--bins", type=int, default=10, help="equal-width bins of the ECE")
    p.add_argument("--seed", type=int, default=0)
    X.add_arguments(p, kind="uq")


def run(args: argparse.Namespace) -> int:
    X.check(args)
    preset = X.apply_preset(args)
    sc = C.prepare(args, require="reward", command="uq")
    labels = np.array([bool(t.success) for t in sc.trajectories], np.int64)
    scores = C.trajectory_method_scores(sc, args.token_agg, args.step_agg, args.beta)
    extras = X.load_extras(args, sc)
    scores = X.add_trajectory_extras(scores, extras, args.step_agg)
    metrics = uq.uq_report(scores, labels, num_resamples=args.bootstrap, seed=args.seed,
                           num_folds=min(args.folds, len(labels)), num_bins=args.bins)
    res = C.base_results(args, "uq", sc)
    res["n_success"] = int(labels.sum())
    res["metrics"] = metrics
    res["aggregation_preset"] = preset
    X.record_extras(res, extras)
    err = None
    if args.heldout_folds:
        tasks = [t.task_id for t in sc.trajectories]
        res["selection"], err = X.guarded(lambda: X.uq_selection(args, tasks, scores, labels))
    res["scores"] = {"ids": [t.id for t in sc.trajectories], "labels": labels.tolist(),
                     **{k: v.tolist() for k, v in scores.items()}}
    C.write_results(args.out, res)
    if err is not None:
        raise err
    rows = [[k, m["auroc"], m["auroc_ci95"], m["spearman"], m["brier"], m["ece"]] for k, m in metrics.items()]
    print(C.table(rows, ["method/token_agg/step_agg", "AUROC", "95% CI", "Spearman", "Brier", "ECE"]))
    print(f"{len(labels)} trajectories, {int(labels.sum())} successes")
    if args.heldout_folds:
        X.print_selection(res["selection"], C.table, "AUROC")
    if labels.sum() in (0, len(labels)):
        print(f"note: metrics undefined (null in the results): {uq.undefined_reasons(labels, labels, 2)['auroc']}")
    C.print_footer(sc, args.out)
    return 0
