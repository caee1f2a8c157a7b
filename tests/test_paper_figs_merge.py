"""paper_figs/merge_sweep.py draws a sweep results file: the plotted lines hold exactly the file's values."""
from __future__ import annotations

import json
import pathlib
import sys

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "paper_figs"))
import merge_sweep  # noqa: E402

SCORE = "progress_advantage/mean/mean"


def synthetic():
    rng = np.random.default_rng(0)
    merges = []
    want = {}
    for method in ("linear", "ties", "emr"):
        for alpha in (0.75, 0.0, 0.25, 0.5):  # unsorted on purpose
            v = float(rng.uniform(0.5, 0.9))
            merges.append({"method": method, "alpha": alpha, "metrics": {SCORE: {"auroc": v}}})
            want.setdefault(method, []).append((alpha, v))
    return {"metrics": {SCORE: {"auroc": 0.71}}, "merges": merges}, {k: sorted(v) for k, v in want.items()}


def test_draw_lines_hold_the_values(tmp_path):
    res, want = synthetic()
    fig = merge_sweep.draw(res, SCORE, "auroc")
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    for method, pts in want.items():
        np.testing.assert_array_equal(lines[method].get_xdata(), [a for a, _ in pts])
        np.testing.assert_array_equal(lines[method].get_ydata(), [v for _, v in pts])
    np.testing.assert_array_equal(lines["unmerged reference"].get_ydata(), [0.71, 0.71])
    np.testing.assert_array_equal(lines[r"$\alpha=0$ (merge base)"].get_xdata(), [0.0, 0.0])
    f = tmp_path / "r.json"
    f.write_text(json.dumps(res))
    out = tmp_path / "fig.png"
    assert merge_sweep.main([str(f), "--score", SCORE, "--metric", "auroc", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "mutate, match",
    [(lambda r: r.pop("merges"), "no 'merges' list"),
     (lambda r: r["merges"][1].pop("alpha"), r"merges\[1\] lacks 'alpha'"),
     (lambda r: r["merges"][0]["metrics"].clear(), r"merges\[0\]: no score"),
     (lambda r: r["metrics"][SCORE].pop("auroc"), r"metrics \(unmerged reference\): metrics\[.*\] has no 'auroc'")],
)
def test_bad_results(mutate, match, tmp_path, capsys):
    res, _ = synthetic()
    mutate(res)
    with pytest.raises(ValueError, match=match):
        merge_sweep.draw(res, SCORE, "auroc")
    f = tmp_path / "r.json"
    f.write_text(json.dumps(res))
    assert merge_sweep.main([str(f), "--score", SCORE, "--metric", "auroc", "--out", str(tmp_path / "x.png")]) == 2
    assert "merge_sweep: error" in capsys.readouterr().err
