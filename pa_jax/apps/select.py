"""Aggregation chosen without peeking: k-fold selection over tasks, and the authors' tuned presets.

A *candidate* is one way of turning a method's statistics into a score (``"method/token_agg/step_agg"``
for uq / bon; ``(token_agg, rule)`` for fa). Reporting each method's best candidate on the data it is
scored on is optimistic. Held-out selection instead:

1. tasks (all trials / rollouts of a task together) are dealt into K folds by a seeded permutation
   (:func:`task_folds`);
2. for each fold f the candidate with the highest metric on the other folds is chosen (first in
   candidate order on ties; NaN metrics never win) and its metric on fold f is the held-out value;
3. the held-out estimate is the mean of the K held-out values; its 95% interval is a percentile
   bootstrap that resamples, within every held-out fold, its tasks with replacement (the choices
   made on the training folds are kept), then averages the folds again.

Beside it, for the same method: the in-sample best (max over candidates on all tasks) and the
default candidate (the command's first aggregation), both on all tasks and as the same fold mean,
so the three can be read side by side.

A metric is any callable ``metric(candidate, task_idx) -> float`` over an array of task indices
(with repeats under the bootstrap); :func:`uq_metric`, :func:`bon_metric` and :func:`fa_metric`
build the ones of the three applications.
"""
from __future__ import annotations

from typing import Callable, Hashable, Mapping, Sequence

import numpy as np

TOKEN_AGGS = ("mean", "sum", "last", "min", "max")

# The authors' tuned aggregations, only where their repository states them (file cited per entry).
AUTHORS_PRESETS: dict[str, dict] = {
    "authors:qwen3.5-9b:tau2-uq-airline": {"token_agg": "max", "step_agg": "mean", "source": "scripts/tau2_uq_onpolicy.sh"},
    "authors:qwen3.5-9b:tau2-uq-retail": {"token_agg": "max", "step_agg": "last", "source": "scripts/tau2_uq_onpolicy.sh"},
    "authors:gemma4-4b:tau2-uq-airline": {"token_agg": "max", "step_agg": "min", "source": "scripts/tau2_uq_onpolicy.sh"},
    "authors:gemma4-4b:tau2-uq-retail": {"token_agg": "min", "step_agg": "last", "source": "scripts/tau2_uq_onpolicy.sh"},
    # tau2_bon8.sh passes --token-agg mean --step-agg min whatever the PAIR
    "authors:qwen3.5-9b:tau2-bon8": {"token_agg": "mean", "step_agg": "min", "source": "scripts/tau2_bon8.sh"},
    "authors:gemma4-4b:tau2-bon8": {"token_agg": "mean", "step_agg": "min", "source": "scripts/tau2_bon8.sh"},
    "authors:qwen3.5-9b:webshop-bon8": {"token_agg": "min", "step_agg": "last", "source": "scripts/webshop_bon8.sh"},
    "authors:gemma4-4b:webshop-bon8": {"token_agg": "max", "step_agg": "min", "source": "scripts/webshop_bon8.sh"},
    # fa.sh passes --token-aggs sum whatever the PAIR (failure attribution has no step aggregation)
    "authors:qwen3.5-9b:fa": {"token_agg": "sum", "step_agg": None, "source": "scripts/fa.sh"},
    "authors:gemma4-4b:fa": {"token_agg": "sum", "step_agg": None, "source": "scripts/fa.sh"},
}


def authors_preset(name: str) -> dict:
    """``{"token_agg", "step_agg", "source"}`` of a preset ``authors:<pair>:<task>`` of
    :data:`AUTHORS_PRESETS`; an unknown name is a ValueError listing the known ones."""
    if name not in AUTHORS_PRESETS:
        raise ValueError(f"--aggregation-preset {name!r} is not stated in the authors' repository; known presets: "
                         + ", ".join(sorted(AUTHORS_PRESETS)))
    return dict(AUTHORS_PRESETS[name])


# ---------------------------------------------------------------------------------------------- folds
def group_tasks(task_ids: Sequence[Hashable]) -> tuple[list, np.ndarray]:
    """Unique task ids in order of first appearance and, per item, the index of its task."""
    order: dict = {}
    item_task = np.array([order.setdefault(t, len(order)) for t in task_ids], np.int64)
    return list(order), item_task


def fold_of_tasks(n_tasks: int, num_folds: int, seed: int) -> np.ndarray:
    """Fold of each task ``[n_tasks]``: ``np.random.default_rng(seed).permutation(n_tasks)`` dealt
    round-robin (task perm[i] goes to fold i mod K), so fold sizes differ by at most one."""
    if not (isinstance(num_folds, (int, np.integer)) and 2 <= num_folds <= n_tasks):
        raise ValueError(f"--heldout-folds must be an int in [2, number of tasks = {n_tasks}], got {num_folds!r}")
    perm = np.random.default_rng(seed).permutation(n_tasks)
    folds = np.empty(n_tasks, np.int64)
    folds[perm] = np.arange(n_tasks) % num_folds
    return folds


def task_folds(task_ids: Sequence[Hashable], num_folds: int, seed: int) -> np.ndarray:
    """Fold of each item ``[n]``: every item of a task is in its task's fold (:func:`fold_of_tasks`)."""
    tasks, item_task = group_tasks(task_ids)
    return fold_of_tasks(len(tasks), num_folds, seed)[item_task]


def members(item_task: np.ndarray, n_tasks: int) -> list[np.ndarray]:
    """Item indices of every task."""
    order = np.argsort(item_task, kind="stable")
    bounds = np.searchsorted(item_task[order], np.arange(n_tasks + 1))
    return [order[bounds[i]:bounds[i + 1]] for i in range(n_tasks)]


def items_of(task_idx: np.ndarray, groups: Sequence[np.ndarray]) -> np.ndarray:
    """Item indices of the given task indices (repeated tasks repeat their items)."""
    if len(task_idx) == 0:
        return np.zeros(0, np.int64)
    return np.concatenate([groups[t] for t in task_idx])


# ---------------------------------------------------------------------------------------------- selection
def _best(candidates: Sequence, values: Sequence[float]) -> tuple[object, float]:
    """First candidate with the highest finite value (None, NaN when none is finite)."""
    best, bv = None, -np.inf
    for c, v in zip(candidates, values):
        if np.isfinite(v) and v > bv:
            best, bv = c, v
    return best, (float(bv) if best is not None else float("nan"))


def heldout_selection(
    candidates: Sequence, metric: Callable[[object, np.ndarray], float], n_tasks: int, *,
    default=None, num_folds: int = 5, seed: int = 0, num_resamples: int = 1000, alpha: float = 0.05,
) -> dict:
    """In-sample best, held-out (k-fold over tasks) and default of one method (module docstring).

    Returns ``{"in_sample": {candidate, value}, "heldout": {value, ci95, fold_values, fold_choices,
    default_fold_mean}, "default": {candidate, value, fold_mean}, "num_folds", "seed"}``.
    """
    candidates = list(candidates)
    if not candidates:
        raise ValueError("no candidate to select from")
    if default is None:
        default = candidates[0]
    if default not in candidates:
        raise ValueError(f"default {default!r} is not among the candidates {candidates}")
    folds = fold_of_tasks(n_tasks, num_folds, seed)
    every = np.arange(n_tasks)
    full = [float(metric(c, every)) for c in candidates]
    ins, ins_v = _best(candidates, full)
    rng = np.random.default_rng(seed)
    fold_vals, choices, default_vals, boot = [], [], [], []
    for f in range(num_folds):
        train, test = every[folds != f], every[folds == f]
        c, _ = _best(candidates, [float(metric(c, train)) for c in candidates])
        if c is None:
            c = default
        choices.append(c)
        fold_vals.append(float(metric(c, test)))
        default_vals.append(float(metric(default, test)))
        idx = rng.integers(0, len(test), size=(num_resamples, len(test)))
        boot.append([float(metric(c, test[row])) for row in idx])
    boot_arr = np.asarray(boot)  # [K, R]
    with np.errstate(invalid="ignore"):
        means = np.nanmean(boot_arr, axis=0) if boot_arr.size else np.array([])
    means = means[np.isfinite(means)]
    ci = [float(x) for x in np.quantile(means, [alpha / 2, 1 - alpha / 2])] if means.size else [float("nan")] * 2
    fv = np.asarray(fold_vals)
    dv = np.asarray(default_vals)
    return {
        "num_folds": int(num_folds), "seed": int(seed), "num_resamples": int(num_resamples),
        "in_sample": {"candidate": ins, "value": ins_v},
        "heldout": {"value": float(np.nanmean(fv)) if np.isfinite(fv).any() else float("nan"),
                    "ci95": ci, "fold_values": fold_vals, "fold_choices": choices},
        "default": {"candidate": default, "value": full[candidates.index(default)],
                    "fold_mean": float(np.nanmean(dv)) if np.isfinite(dv).any() else float("nan")},
    }


# ---------------------------------------------------------------------------------------------- method grouping
def method_of(config: str) -> str:
    """Method of a score name: ``"m/tok/step"`` -> ``m``; ``"m/tok"`` (tok a token aggregation) -> ``m``;
    anything else (``"self_certainty"``, ``"length_control/steps"``) is its own method."""
    parts = config.split("/")
    if len(parts) == 3 or (len(parts) == 2 and parts[1] in TOKEN_AGGS):
        return parts[0]
    return config


def group_by_method(configs: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for c in configs:
        out.setdefault(method_of(c), []).append(c)
    return out


def default_config(configs: Sequence[str], token_agg: str | None, step_agg: str | None) -> str:
    """``method/token_agg/step_agg`` (or ``method/token_agg``) if among ``configs``, else the first."""
    m = method_of(configs[0])
    for c in (f"{m}/{token_agg}/{step_agg}", f"{m}/{token_agg}", f"{m}/steps/{step_agg}"):
        if c in configs:
            return c
    return configs[0]


# ---------------------------------------------------------------------------------------------- metrics
def uq_metric(scores: Mapping[str, np.ndarray], labels: np.ndarray, groups: Sequence[np.ndarray]):
    """AUROC of ``scores[candidate]`` against ``labels`` over the items of the given tasks
    (NaN with one class), by the Mann-Whitney identity with mid-ranks."""
    from pa_jax.apps.uq import _auroc_rows

    y = np.asarray(labels, np.int64)

    def metric(c, task_idx):
        i = items_of(task_idx, groups)
        if len(i) == 0:
            return float("nan")
        return float(_auroc_rows(np.asarray(scores[c], np.float64)[i][None], y[i][None])[0])
    return metric


def bon_metric(success_by_task: Mapping[str, np.ndarray]):
    """Best-of-N success rate: mean over the given tasks of the success of the rollout the candidate
    selects (``success_by_task[candidate] [n_tasks]``, from :func:`pa_jax.apps.bon.best_of_n`)."""
    def metric(c, task_idx):
        v = np.asarray(success_by_task[c], np.float64)[task_idx]
        return float(v.mean()) if len(v) else float("nan")
    return metric


def fa_metric(correct: Mapping[object, np.ndarray], groups: Sequence[np.ndarray]):
    """Failure-attribution step accuracy: mean of ``correct[candidate] [n]`` (prediction ==
    mistake_step) over the items of the given tasks."""
    def metric(c, task_idx):
        i = items_of(task_idx, groups)
        return float(np.mean(np.asarray(correct[c], np.float64)[i])) if len(i) else float("nan")
    return metric


def select_all_methods(
    configs_by_method: Mapping[str, Sequence], metric, n_tasks: int, defaults: Mapping[str, object], **kw
) -> dict[str, dict]:
    """:func:`heldout_selection` for every method (its candidates, its default)."""
    return {m: heldout_selection(list(c), metric, n_tasks, default=defaults.get(m), **kw)
            for m, c in configs_by_method.items()}


def selection_rows(selection: Mapping[str, dict]) -> list[list]:
    """Table rows: method, in-sample best (candidate, value on all tasks), held-out (mean over the
    held-out folds, 95% CI), default (candidate, value on all tasks, and its mean over the same
    folds: the held-out value's like-for-like comparison)."""
    rows = []
    for m, s in selection.items():
        rows.append([m, str(s["in_sample"]["candidate"]), s["in_sample"]["value"], s["heldout"]["value"],
                     s["heldout"]["ci95"], str(s["default"]["candidate"]), s["default"]["value"],
                     s["default"]["fold_mean"]])
    return rows


SELECTION_HEADER = ["method", "in-sample best", "value", "held-out (fold mean)", "held-out 95% CI", "default",
                    "value", "default (fold mean)"]
