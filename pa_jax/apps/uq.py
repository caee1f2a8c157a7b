"""Uncertainty quantification: how well a trajectory score predicts success.

All functions are pure NumPy/SciPy/scikit-learn on host arrays: ``scores [n]`` (higher = more
confident of success) and binary ``labels [n]`` (1 = success).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
from scipy.stats import rankdata


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels)
    if s.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"scores and labels must be 1-D of equal length, got {s.shape} and {y.shape}")
    if not np.all(np.isin(y, (0, 1))):
        raise ValueError("labels must be binary (0/1 or bool)")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite (list unscorable trajectories separately)")
    return s, y.astype(np.int64)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC by the Mann-Whitney identity: (sum of positive ranks - n1(n1+1)/2) / (n1 n0), ties
    given mid-ranks (= probability a random success outscores a random failure, ties count 1/2).
    NaN when only one class is present."""
    s, y = _check(scores, labels)
    return float(_auroc_rows(s[None], y[None])[0])


def _auroc_rows(s: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise AUROC of [B, n] scores/labels (NaN for rows with one class)."""
    r = rankdata(s, axis=1)
    n1 = y.sum(axis=1).astype(np.float64)
    n0 = y.shape[1] - n1
    with np.errstate(invalid="ignore", divide="ignore"):
        out = ((r * y).sum(axis=1) - n1 * (n1 + 1) / 2) / (n1 * n0)
    out[(n1 == 0) | (n0 == 0)] = np.nan
    return out


def _spearman_rows(s: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise Spearman rho = Pearson correlation of the mid-ranks (NaN for a constant row)."""
    a = rankdata(s, axis=1)
    b = rankdata(y, axis=1)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(axis=1) / np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))


def spearman(scores: np.ndarray, labels: np.ndarray) -> float:
    """Spearman rank correlation between scores and labels (mid-ranks for ties)."""
    s, y = _check(scores, labels)
    return float(_spearman_rows(s[None], y[None].astype(np.float64))[0])


def bootstrap_indices(n: int, num_resamples: int, seed: int) -> np.ndarray:
    """[num_resamples, n] indices drawn with replacement by ``np.random.default_rng(seed)``."""
    return np.random.default_rng(seed).integers(0, n, size=(num_resamples, n))


def bootstrap_ci(
    scores: np.ndarray, labels: np.ndarray, *, num_resamples: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap (1-alpha) intervals of AUROC and Spearman: resample trajectories with
    replacement; resamples with a single class are left out (their AUROC is undefined)."""
    s, y = _check(scores, labels)
    idx = bootstrap_indices(len(s), num_resamples, seed)
    bs, by = s[idx], y[idx]
    out = {}
    for name, vals in (("auroc", _auroc_rows(bs, by)), ("spearman", _spearman_rows(bs, by.astype(np.float64)))):
        vals = vals[np.isfinite(vals)]
        if vals.size == 0:
            out[name] = (float("nan"), float("nan"))
        else:
            lo, hi = np.quantile(vals, [alpha / 2, 1 - alpha / 2])
            out[name] = (float(lo), float(hi))
    return out


def fold_ids(labels: np.ndarray, num_folds: int, seed: int) -> np.ndarray:
    """Stratified fold assignment: within each class, a seeded permutation dealt round-robin."""
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    folds = np.empty(len(y), np.int64)
    offset = 0
    for c in (0, 1):
        where = np.flatnonzero(y == c)
        perm = rng.permutation(where)
        folds[perm] = (np.arange(len(perm)) + offset) % num_folds
        offset += len(perm)
    return folds


def cross_validated_isotonic(
    scores: np.ndarray, labels: np.ndarray, *, num_folds: int = 5, seed: int = 0
) -> np.ndarray:
    """Out-of-fold success probabilities: for each fold, a non-decreasing (isotonic) map
    score -> P(success) is fit on the other folds and applied to this fold (clipped to the fit's
    score range). A fold whose training part has one class gets that class's frequency."""
    from sklearn.isotonic import IsotonicRegression

    s, y = _check(scores, labels)
    if num_folds < 2 or num_folds > len(s):
        raise ValueError(f"num_folds must be in [2, {len(s)}], got {num_folds}")
    folds = fold_ids(y, num_folds, seed)
    p = np.empty(len(s))
    for f in range(num_folds):
        test, train = folds == f, folds != f
        if not test.any():
            continue
        ir = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
        ir.fit(s[train], y[train].astype(np.float64))
        p[test] = ir.predict(s[test])
    return p


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Brier score: mean (p_i - y_i)^2."""
    p = np.asarray(probs, np.float64)
    return float(np.mean((p - np.asarray(labels, np.float64)) ** 2))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, *, num_bins: int = 10) -> float:
    """ECE = sum_b (n_b / n) |mean(y in b) - mean(p in b)| over equal-width bins of [0, 1]
    (bin b holds p in [b/B, (b+1)/B), the last bin also holds p = 1)."""
    p = np.asarray(probs, np.float64)
    y = np.asarray(labels, np.float64)
    b = np.clip(np.floor(p * num_bins).astype(np.int64), 0, num_bins - 1)
    n = np.bincount(b, minlength=num_bins)
    sp = np.bincount(b, weights=p, minlength=num_bins)
    sy = np.bincount(b, weights=y, minlength=num_bins)
    return float(np.sum(np.abs(sy - sp)) / len(p))


def uq_metrics(
    scores: np.ndarray, labels: np.ndarray, *, num_resamples: int = 1000, seed: int = 0,
    num_folds: int = 5, num_bins: int = 10,
) -> dict:
    """AUROC and Spearman with bootstrap 95% intervals; Brier and ECE after cross-validated
    isotonic calibration. Degenerate inputs (one class) give NaN metrics rather than errors."""
    s, y = _check(scores, labels)
    out: dict = {"n": int(len(s)), "n_success": int(y.sum()), "auroc": auroc(s, y), "spearman": spearman(s, y)}
    ci = bootstrap_ci(s, y, num_resamples=num_resamples, seed=seed)
    out["auroc_ci95"], out["spearman_ci95"] = list(ci["auroc"]), list(ci["spearman"])
    if 0 < y.sum() < len(y) and len(y) >= num_folds:
        p = cross_validated_isotonic(s, y, num_folds=num_folds, seed=seed)
        out["brier"] = brier(p, y)
        out["ece"] = expected_calibration_error(p, y, num_bins=num_bins)
    else:
        out["brier"] = out["ece"] = float("nan")
    reasons = undefined_reasons(s, y, num_folds)
    undefined = {k: v for k, v in reasons.items() if not np.all(np.isfinite(out[k]))}
    if undefined:  # NaN metrics are written as null; this says why
        out["undefined"] = undefined
    return out


def undefined_reasons(scores: np.ndarray, labels: np.ndarray, num_folds: int) -> dict[str, str]:
    """Why a metric of ``uq_metrics`` is undefined (NaN, written as null in JSON), metric -> reason."""
    n, k = len(labels), int(np.sum(labels))
    out: dict[str, str] = {}
    if k in (0, n):
        why = (f"every one of the {n} trajectories is a {'success' if k == n else 'failure'}: AUROC, Spearman "
               "and calibration need both successes and failures")
        return {m: why for m in ("auroc", "spearman", "auroc_ci95", "spearman_ci95", "brier", "ece")}
    if np.all(scores == scores[0]):
        out["spearman"] = out["spearman_ci95"] = "the scores are all equal (no ranking)"
    if n < num_folds:
        out["brier"] = out["ece"] = f"{n} trajectories are fewer than the {num_folds} calibration folds"
    out.setdefault("auroc_ci95", "no bootstrap resample had both classes")
    out.setdefault("spearman_ci95", "no bootstrap resample had both classes and varying scores")
    return out


def uq_report(method_scores: Mapping[str, np.ndarray], labels: np.ndarray, **kw) -> dict[str, dict]:
    """``uq_metrics`` for every named score array (e.g. ``"progress_advantage/mean/mean"``)."""
    return {name: uq_metrics(s, labels, **kw) for name, s in method_scores.items()}
