"""`pa-jax bon`: best-of-N selection by trajectory score.

Rollouts are grouped by task id (a best-of-N directory ``trial_<i>/<domain>.json`` or a file with
several trials per task, such as tau-bench v1's airline file). For every method: success rate and
mean reward of the selected rollouts, against pass@1 (mean over the N) and oracle pass@N. Ties go
to the lowest trial index (pa_jax.apps.bon).
"""
from __future__ import annotations

import argparse

import numpy as np

from pa_jax.apps import bon
from pa_jax.commands import _analyses as X
from pa_jax.commands import _common as C
from pa_jax.commands import _merge as M


def add_arguments(p: argparse.ArgumentParser) -> None:
    C.add_common_arguments(p, token_agg="mean", step_agg="mean")
    M.add_merge_arguments(p)  # --reference-merge: a sweep over merged references (pa_jax.commands._merge)
    p.add_argument("--success-threshold", type=float, default=1.0, help="success = reward >= this (default 1)")
    X.add_arguments(p, kind="bon")


def run(args: argparse.Namespace) -> int:
    X.check(args)
    preset = X.apply_preset(args)
    sc = C.prepare(args, require="reward", command="bon")
    tasks = [t.task_id for t in sc.trajectories]
    trials = [t.trial if t.trial is not None else i for i, t in enumerate(sc.trajectories)]
    rewards = np.array([t.reward for t in sc.trajectories], np.float64)
    scores = C.trajectory_method_scores(sc, args.token_agg, args.step_agg, args.beta)
    extras = X.load_extras(args, sc)
    scores = X.add_trajectory_extras(scores, extras, args.step_agg)
    metrics = {k: bon.best_of_n(tasks, v, rewards, trials=trials, success_threshold=args.success_threshold)
               for k, v in scores.items()}
    res = C.base_results(args, "bon", sc)
    res["metrics"] = metrics
    res["aggregation_preset"] = preset
    X.record_extras(res, extras)
    err = None
    if args.heldout_folds:
        res["selection"], err = X.guarded(lambda: X.bon_selection(args, tasks, metrics, args.success_threshold))
    C.write_results(args.out, res)
    if err is not None:
        raise err
    first = next(iter(metrics.values()))
    rows = [[k, m["bon_success_rate"], m["bon_mean_reward"]] for k, m in metrics.items()]
    print(C.table(rows, ["method/token_agg/step_agg", "BoN success", "BoN mean reward"]))
    print(f"{first['n_tasks']} tasks, N per task {first['n_per_task']}: pass@1 (mean of N) = {first['pass_at_1']:.3f}, "
          f"oracle pass@N = {first['oracle_pass_at_n']:.3f}")
    if args.heldout_folds:
        X.print_selection(res["selection"], C.table, "BoN success")
    C.print_footer(sc, args.out)
    return 0
