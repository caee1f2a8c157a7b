"""Held-out aggregation selection (issue 20, section 1): folds over tasks, and the held-out value
recomputed here by a plain loop with scikit-learn's AUROC."""
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pa_jax.apps import select


def test_task_folds_keep_tasks_together_and_are_deterministic():
    rng = np.random.default_rng(0)
    tasks = [f"t{int(x)}" for x in rng.integers(0, 23, 200)]
    f1 = select.task_folds(tasks, 5, seed=3)
    f2 = select.task_folds(tasks, 5, seed=3)
    np.testing.assert_array_equal(f1, f2)
    for t in set(tasks):
        assert len({int(f) for f, u in zip(f1, tasks) if u == t}) == 1
    per_task = {t: int(f) for f, t in zip(f1, tasks)}
    sizes = np.bincount(list(per_task.values()), minlength=5)
    assert sizes.max() - sizes.min() <= 1 and set(per_task.values()) == set(range(5))
    assert not np.array_equal(f1, select.task_folds(tasks, 5, seed=4)) or len(set(tasks)) < 3
    with pytest.raises(ValueError, match="heldout-folds"):
        select.task_folds(["a", "a", "b"], 3, 0)


def test_heldout_equals_plain_recomputation():
    rng = np.random.default_rng(1)
    n_tasks, per = 30, 3
    tasks = np.repeat([f"task{i}" for i in range(n_tasks)], per)
    labels = rng.integers(0, 2, len(tasks))
    scores = {f"m/{t}/mean": labels * w + rng.normal(size=len(tasks)) for t, w in (("mean", 0.2), ("max", 1.0), ("min", 0.0))}
    scores["other"] = rng.normal(size=len(tasks))
    names, item_task = select.group_tasks(list(tasks))
    groups = select.members(item_task, len(names))
    metric = select.uq_metric(scores, labels, groups)
    cands = ["m/mean/mean", "m/max/mean", "m/min/mean"]
    res = select.heldout_selection(cands, metric, len(names), default="m/mean/mean", num_folds=5, seed=7,
                                   num_resamples=200)
    # plain recomputation: same task -> fold map, choose on the training items by sklearn AUROC
    fold = select.task_folds(list(tasks), 5, seed=7)
    vals, chosen = [], []
    for f in range(5):
        tr, te = fold != f, fold == f
        best = max(cands, key=lambda c: (roc_auc_score(labels[tr], scores[c][tr]), -cands.index(c)))
        chosen.append(best)
        vals.append(roc_auc_score(labels[te], scores[best][te]))
    assert res["heldout"]["fold_choices"] == chosen
    np.testing.assert_allclose(res["heldout"]["fold_values"], vals, rtol=1e-12)
    assert res["heldout"]["value"] == pytest.approx(np.mean(vals))
    full = {c: roc_auc_score(labels, scores[c]) for c in cands}
    assert res["in_sample"]["value"] == pytest.approx(max(full.values()))
    assert res["in_sample"]["candidate"] == max(cands, key=lambda c: (full[c], -cands.index(c)))
    assert res["default"]["value"] == pytest.approx(full["m/mean/mean"])
    assert res["default"]["fold_mean"] == pytest.approx(np.mean(
        [roc_auc_score(labels[fold == f], scores["m/mean/mean"][fold == f]) for f in range(5)]))
    lo, hi = res["heldout"]["ci95"]
    assert lo <= res["heldout"]["value"] <= hi and lo < hi


def test_bon_and_fa_metrics_by_hand():
    succ = {"a": np.array([1, 0, 1, 1.0]), "b": np.array([0, 0, 1, 0.0])}
    m = select.bon_metric(succ)
    assert m("a", np.array([0, 1, 3])) == pytest.approx(2 / 3)
    assert m("b", np.array([2, 2])) == 1.0
    groups = [np.array([0, 1]), np.array([2])]
    fm = select.fa_metric({"x": np.array([1, 0, 1])}, groups)
    assert fm("x", np.array([0])) == 0.5 and fm("x", np.array([1, 1, 0])) == pytest.approx(3 / 4)


def test_method_grouping_and_defaults():
    cfg = ["progress_advantage/mean/mean", "progress_advantage/max/min", "self_certainty",
           "authors_deepconf_tail/mean", "authors_deepconf_tail/max", "length_control/steps", "ext/steps/mean", "ext/steps/min"]
    g = select.group_by_method(cfg)
    assert g == {"progress_advantage": cfg[:2], "self_certainty": ["self_certainty"],
                 "authors_deepconf_tail": cfg[3:5], "length_control/steps": ["length_control/steps"], "ext": cfg[6:]}
    assert select.default_config(g["progress_advantage"], "max", "min") == "progress_advantage/max/min"
    assert select.default_config(g["authors_deepconf_tail"], "max", "min") == "authors_deepconf_tail/max"
    assert select.default_config(g["ext"], "mean", "min") == "ext/steps/min"


def test_authors_presets():
    p = select.authors_preset("authors:qwen3.5-9b:tau2-uq-airline")
    assert (p["token_agg"], p["step_agg"]) == ("max", "mean") and p["source"].startswith("scripts/")
    assert select.authors_preset("authors:gemma4-4b:fa")["token_agg"] == "sum"
    with pytest.raises(ValueError, match="known presets: .*authors:gemma4-4b:fa"):
        select.authors_preset("authors:llama:tau2-uq")
