"""The analysis options shared by `pa-jax uq|bon|fa` (issue 20): the authors' aggregation presets,
external scores, held-out aggregation selection. Thin glue over pa_jax.apps.select and
pa_jax.data.extra_scores; the commands call these after scoring, so a failing selection or a bad
external-scores file never loses scores already computed (they are in the cache)."""
from __future__ import annotations

import argparse
from typing import Mapping, Sequence

import numpy as np

from pa_jax.apps import select


def add_arguments(p: argparse.ArgumentParser, *, kind: str) -> None:
    p.add_argument("--aggregation-preset", default=None, metavar="authors:<pair>:<task>",
                   help="the authors' tuned aggregation, where their scripts state one (known: "
                        + ", ".join(k for k in sorted(select.AUTHORS_PRESETS)) + "); it goes first in --token-agg / "
                        "--step-agg and so is the default; other requested aggregations are kept")
    p.add_argument("--extra-scores", action="append", default=[], metavar="NAME=FILE.jsonl",
                   help="external scores, one JSON object per line: {\"id\": ..., \"score\": x} and/or "
                        "{\"id\": ..., \"step_scores\": [...]} (repeatable); treated like the built-in methods")
    p.add_argument("--heldout-folds", type=int, default=None, metavar="K",
                   help="choose each method's aggregation" + (" and rule" if kind == "fa" else "")
                        + " on K-1 folds of the tasks and report it on the held-out fold (K-fold over tasks; "
                        "in-sample best, held-out and default side by side)")
    p.add_argument("--heldout-resamples", type=int, default=1000, help="bootstrap resamples of the held-out 95%% CI")
    p.add_argument("--heldout-seed", type=int, default=0, help="seed of the fold assignment and the bootstrap")


def apply_preset(args: argparse.Namespace) -> dict | None:
    """Put the preset's aggregation first in ``args.token_agg`` / ``args.step_agg``; returns the preset."""
    if not getattr(args, "aggregation_preset", None):
        return None
    p = select.authors_preset(args.aggregation_preset)
    args.token_agg = [p["token_agg"]] + [t for t in args.token_agg if t != p["token_agg"]]
    if p["step_agg"] is not None:
        args.step_agg = [p["step_agg"]] + [s for s in args.step_agg if s != p["step_agg"]]
    return {"name": args.aggregation_preset, **p}


def check(args: argparse.Namespace) -> None:
    """Cheap checks before any model is loaded."""
    from pa_jax.data.extra_scores import parse_spec

    if args.heldout_folds is not None and args.heldout_folds < 2:
        raise ValueError(f"--heldout-folds must be >= 2, got {args.heldout_folds}")
    if args.heldout_resamples < 1:
        raise ValueError(f"--heldout-resamples must be >= 1, got {args.heldout_resamples}")
    names = [parse_spec(s)[0] for s in args.extra_scores]
    if len(set(names)) != len(names):
        raise ValueError(f"--extra-scores: a NAME is given twice ({names})")


def load_extras(args: argparse.Namespace, sc) -> list:
    """The --extra-scores files validated against the scored trajectories."""
    from pa_jax.data.extra_scores import load_extra_scores, parse_spec

    ids = [t.id for t in sc.trajectories]
    steps = [int(t.num_steps) for t in sc.trajectories]
    return [load_extra_scores(*parse_spec(s), ids, steps) for s in args.extra_scores]


def record_extras(res: dict, extras: Sequence) -> None:
    """Name, file, SHA-256 and fields of every external scorer in the results JSON."""
    from pa_jax.commands._common import sha256_file

    res["extra_scores"] = [{"name": e.name, "path": e.path, "sha256": sha256_file(e.path),
                            "score": e.score is not None, "step_scores": e.step_scores is not None} for e in extras]


def guarded(compute):
    """``(compute(), None)``, or ``(None, error)`` for a ValueError: the caller writes the results it
    has, then raises the error (a failing selection loses nothing already computed)."""
    try:
        return compute(), None
    except ValueError as e:
        return None, e


def add_trajectory_extras(scores: dict, extras: Sequence, step_aggs: Sequence[str]) -> dict:
    """``scores`` plus every external scorer's trajectory scores (a name clash is an error)."""
    from pa_jax.data.extra_scores import trajectory_scores

    out = dict(scores)
    for ex in extras:
        for k, v in trajectory_scores(ex, step_aggs).items():
            if k in out or select.method_of(k) in {select.method_of(x) for x in scores}:
                raise ValueError(f"--extra-scores {ex.name}: the name clashes with a built-in method")
            out[k] = v
    return out


def _run(configs: Sequence[str], metric, n_tasks: int, args, token_agg, step_agg) -> dict:
    by = select.group_by_method(configs)
    defaults = {m: select.default_config(c, token_agg, step_agg) for m, c in by.items()}
    return select.select_all_methods(by, metric, n_tasks, defaults, num_folds=args.heldout_folds,
                                     seed=args.heldout_seed, num_resamples=args.heldout_resamples)


def uq_selection(args, task_ids: Sequence, scores: Mapping[str, np.ndarray], labels: np.ndarray) -> dict:
    names, item_task = select.group_tasks(task_ids)
    metric = select.uq_metric(scores, labels, select.members(item_task, len(names)))
    return _run(list(scores), metric, len(names), args, args.token_agg[0], args.step_agg[0])


def bon_selection(args, task_ids: Sequence, metrics: Mapping[str, dict], threshold: float) -> dict:
    names, _ = select.group_tasks(task_ids)
    succ = {}
    for c, m in metrics.items():
        by_task = {s["task_id"]: s["reward"] >= threshold for s in m["selected"]}
        succ[c] = np.array([by_task[t] for t in names], np.float64)
    return _run(list(metrics), select.bon_metric(succ), len(names), args, args.token_agg[0], args.step_agg[0])


def fa_selection(args, task_ids: Sequence, split_metrics: Mapping[str, dict], truth: Sequence[int],
                 default_key: Mapping[str, str]) -> dict:
    """Per method: candidates ``"<method>/<token_agg>|<rule>"``; default = the command's first token
    aggregation with ``min_cumulative``. ``split_metrics``: ``{"method/ta": {rule: metrics}}``."""
    names, item_task = select.group_tasks(task_ids)
    groups = select.members(item_task, len(names))
    g = np.asarray(truth)
    correct, by = {}, {}
    for key, rules in split_metrics.items():
        method = key.rpartition("/")[0]
        for rule, m in rules.items():
            c = f"{key}|{rule}"
            correct[c] = np.asarray(m["predictions"]) == g
            by.setdefault(method, []).append(c)
    defaults = {m: default_key.get(m, by[m][0]) for m in by}
    defaults = {m: d if d in by[m] else by[m][0] for m, d in defaults.items()}
    return select.select_all_methods(by, select.fa_metric(correct, groups), len(names), defaults,
                                     num_folds=args.heldout_folds, seed=args.heldout_seed,
                                     num_resamples=args.heldout_resamples)


def print_selection(selection: Mapping[str, dict], table, title: str) -> None:
    first = next(iter(selection.values()))
    print(f"\n{title}: held-out selection, {first['num_folds']}-fold over tasks (seed {first['seed']}); "
          "held-out CI: bootstrap of tasks within held-out folds")
    print(table(select.selection_rows(selection), select.SELECTION_HEADER))
