"""pa_jax.apps against scikit-learn / scipy and hand-written NumPy oracles."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import spearmanr
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import brier_score_loss, roc_auc_score

from pa_jax.apps import bon, fa, uq


# ---------------------------------------------------------------- uq
@settings(max_examples=40)
@given(st.integers(4, 40), st.integers(0, 2**31 - 1), st.booleans())
def test_auroc_spearman_match_sklearn_scipy(n, seed, ties):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[0], y[1] = 0, 1
    s = rng.normal(size=n)
    if ties:
        s = np.round(s)
    assert uq.auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    rho = spearmanr(s, y).statistic
    if np.isnan(rho):
        assert np.isnan(uq.spearman(s, y))
    else:
        assert uq.spearman(s, y) == pytest.approx(rho, abs=1e-12)


def test_auroc_one_class_is_nan():
    assert np.isnan(uq.auroc([0.1, 0.2, 0.3], [1, 1, 1]))


def test_bootstrap_ci_matches_loop_oracle():
    rng = np.random.default_rng(0)
    n = 30
    y = rng.integers(0, 2, n)
    s = y + rng.normal(size=n)
    ci = uq.bootstrap_ci(s, y, num_resamples=200, seed=3)
    idx = np.random.default_rng(3).integers(0, n, size=(200, n))
    aucs, rhos = [], []
    for row in idx:
        if len(set(y[row])) < 2:
            continue
        aucs.append(roc_auc_score(y[row], s[row]))
        rhos.append(spearmanr(s[row], y[row]).statistic)
    assert ci["auroc"] == pytest.approx(tuple(np.quantile(aucs, [0.025, 0.975])), abs=1e-12)
    assert ci["spearman"] == pytest.approx(tuple(np.quantile(rhos, [0.025, 0.975])), abs=1e-12)


def test_ece_and_brier_oracles():
    rng = np.random.default_rng(1)
    p = rng.uniform(size=50)
    p[:3] = [0.0, 1.0, 0.1]
    y = rng.integers(0, 2, 50)
    # loop oracle for ECE over 10 equal-width bins
    ece = 0.0
    for b in range(10):
        lo, hi = b / 10, (b + 1) / 10
        m = (p >= lo) & ((p < hi) if b < 9 else (p <= hi))
        if m.any():
            ece += m.sum() / len(p) * abs(y[m].mean() - p[m].mean())
    assert uq.expected_calibration_error(p, y) == pytest.approx(ece, abs=1e-12)
    assert uq.brier(p, y) == pytest.approx(brier_score_loss(y, p), abs=1e-12)


def test_cross_validated_isotonic_is_out_of_fold():
    rng = np.random.default_rng(2)
    n = 60
    y = rng.integers(0, 2, n)
    s = y * 0.5 + rng.normal(size=n)
    p = uq.cross_validated_isotonic(s, y, num_folds=5, seed=7)
    folds = uq.fold_ids(y, 5, 7)
    # stratified: each fold holds both classes in near-equal counts
    assert set(np.bincount(folds)) <= {n // 5, n // 5 + 1}
    for f in range(5):
        te, tr = folds == f, folds != f
        ir = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(s[tr], y[tr])
        np.testing.assert_allclose(p[te], ir.predict(s[te]))
        order = np.argsort(s[te])
        assert np.all(np.diff(p[te][order]) >= -1e-12)  # monotone within a fold
    m = uq.uq_metrics(s, y, num_resamples=100, seed=7)
    assert m["brier"] == pytest.approx(brier_score_loss(y, p))
    assert m["auroc_ci95"][0] <= m["auroc"] <= m["auroc_ci95"][1]


def test_uq_rejects_bad_input():
    with pytest.raises(ValueError, match="binary"):
        uq.auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="finite"):
        uq.auroc([np.nan, 0.2], [0, 1])
    with pytest.raises(ValueError, match="equal length"):
        uq.auroc([0.1, 0.2, 0.3], [0, 1])


# ---------------------------------------------------------------- bon
def test_best_of_n_hand_checked():
    # task a: trials 0..2, scores tie between trial 0 and 2 at 0.9 -> trial 0 (reward 0)
    # task b: trial 1 best (reward 1); task c: all NaN -> first (reward 1)
    tasks = ["a", "a", "a", "b", "b", "c", "c"]
    trials = [2, 1, 0, 0, 1, 0, 1]
    scores = [0.9, 0.1, 0.9, -1.0, 2.0, np.nan, np.nan]
    rewards = [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    r = bon.best_of_n(tasks, scores, rewards, trials=trials)
    sel = {d["task_id"]: d for d in r["selected"]}
    assert sel["a"]["trial"] == 0 and sel["a"]["reward"] == 0.0
    assert sel["b"]["trial"] == 1 and sel["c"]["trial"] == 0
    assert r["bon_success_rate"] == pytest.approx(2 / 3)
    assert r["bon_mean_reward"] == pytest.approx(2 / 3)
    assert r["pass_at_1"] == pytest.approx((2 / 3 + 1 / 2 + 1 / 2) / 3)
    assert r["oracle_pass_at_n"] == 1.0


@settings(max_examples=30)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_best_of_n_loop_oracle(num_tasks, n, seed):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.normal(size=(num_tasks, n)), 1)
    rewards = rng.integers(0, 2, (num_tasks, n)).astype(float)
    tasks = np.repeat(np.arange(num_tasks), n)
    r = bon.best_of_n(list(tasks), scores.ravel(), rewards.ravel())
    sel = []
    for t in range(num_tasks):
        best = 0
        for j in range(1, n):
            if scores[t, j] > scores[t, best]:
                best = j
        sel.append(rewards[t, best])
    assert r["bon_success_rate"] == pytest.approx(np.mean(sel))
    assert r["pass_at_1"] == pytest.approx(rewards.mean())
    assert r["oracle_pass_at_n"] == pytest.approx(np.mean(rewards.max(axis=1)))


def test_bon_bad_input():
    with pytest.raises(ValueError, match="one entry per rollout"):
        bon.best_of_n(["a", "b"], [1.0], [1.0, 0.0])


# ---------------------------------------------------------------- fa
def _authors_style(rewards, valid, rule):
    """Loop oracle over per-message rewards (0 at non-actions) with a validity mask."""
    idx = [i for i, v in enumerate(valid) if v]
    if not idx:
        return 0
    if rule == "min_cumulative":
        run, best, bv = 0.0, idx[0], np.inf
        for i, r in enumerate(rewards):
            run += r
            if valid[i] and run < bv:
                best, bv = i, run
        return best
    if rule == "sharpest_drop":
        if all(rewards[i] >= 0 for i in idx):
            return idx[0]
        return min(idx, key=lambda i: (rewards[i], i))
    if rule == "sharpest_consecutive_drop":
        if len(idx) < 2:
            return idx[0]
        deltas = [(rewards[idx[j]] - rewards[idx[j - 1]], idx[j]) for j in range(1, len(idx))]
        if not any(d <= 0 for d, _ in deltas):
            return idx[0]
        best = deltas[0]
        for d in deltas[1:]:
            if d[0] < best[0]:
                best = d
        return best[1]
    raise ValueError(rule)


@settings(max_examples=60)
@given(st.integers(0, 12), st.integers(0, 2**31 - 1))
def test_fa_rules_match_loop_oracle(m, seed):
    rng = np.random.default_rng(seed)
    valid = list(rng.integers(0, 2, m).astype(bool))
    r = np.round(rng.normal(size=m), 1) * np.array(valid)
    acts = [i for i, v in enumerate(valid) if v]
    for rule in ("min_cumulative", "sharpest_drop", "sharpest_consecutive_drop"):
        assert fa.decisive_step(r[acts], acts, rule) == _authors_style(list(r), valid, rule)


def test_k_advantage_hand_checked():
    r = np.array([0.5, -1.0, 0.2, -0.4, 0.1])
    np.testing.assert_allclose(fa.k_advantage(r, 2), [-0.5, -0.8, -0.2, -0.3, 0.1])
    acts = [1, 3, 4, 6, 8]
    assert fa.decisive_step(r, acts, "k_advantage", k=1) == 3
    assert fa.decisive_step(r, acts, "k_advantage", k=2) == 3
    np.testing.assert_allclose(fa.k_advantage(r, 5), [-0.6, -1.1, -0.1, -0.3, 0.1])
    r2 = np.array([0.0, -1.0, 1.5, -0.8, -0.5])  # k=1: step 1; k=2 windows [-1, .5, .7, -1.3, -.5]: step 3
    assert fa.decisive_step(r2, acts, "k_advantage", k=1) == 3
    assert fa.decisive_step(r2, acts, "k_advantage", k=2) == 6


def test_attribution_metrics_hand_checked():
    m = fa.attribution_metrics([3, 5, 0, 9], [3, 4, 2, 9], predicted_agents=["A", "B", None, "C"],
                               true_agents=["A", "A", "B", "C"])
    assert m["step_accuracy"] == 0.5 and m["within1_accuracy"] == 0.75
    assert m["mae"] == pytest.approx(3 / 4) and m["agent_accuracy"] == 0.5
    res = fa.attribute([np.array([1.0, -2.0]), np.array([])], [[1, 2], []], [2, 0],
                       message_agents=[["h", "A", "B"], ["h"]], mistake_agents=["B", "h"])
    assert res["sharpest_drop"]["predictions"] == [2, 0]
    assert res["sharpest_drop"]["step_accuracy"] == 1.0 and res["sharpest_drop"]["agent_accuracy"] == 1.0
    with pytest.raises(ValueError, match="rule"):
        fa.decisive_step([1.0], [0], "nope")
