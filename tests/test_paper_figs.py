"""The figure scripts of paper_figs/ (issue 20, section 2) drawn from small synthetic results files."""
import importlib.util
import json
import pathlib

import numpy as np
import pytest

FIGS = pathlib.Path(__file__).resolve().parents[1] / "paper_figs"
PNG = b"\x89PNG\r\n\x1a\n"


def _mod(name):
    spec = importlib.util.spec_from_file_location(name, FIGS / f"{name}.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def _uq(tmp_path):
    metrics = {}
    vals = {("mean", "mean"): 0.6, ("mean", "min"): 0.7, ("max", "mean"): 0.55, ("max", "min"): 0.8}
    for (t, s), v in vals.items():
        metrics[f"progress_advantage/{t}/{s}"] = {"auroc": v, "auroc_ci95": [v - 0.1, v + 0.1]}
        metrics[f"policy_logprob/{t}/{s}"] = {"auroc": 1 - v, "auroc_ci95": [0.1, 0.9]}
    metrics["self_certainty"] = {"auroc": 0.5, "auroc_ci95": [0.4, 0.6]}
    res = {"config": {"command": "uq", "token_agg": ["mean", "max"], "step_agg": ["mean", "min"], "data": "x/air.json"},
           "models": {"policy": "p", "reference": "r"}, "metrics": metrics}
    p = tmp_path / "uq.json"
    p.write_text(json.dumps(res))
    return p


def _fa(tmp_path):
    rules = {"min_cumulative": 0.2, "sharpest_drop": 0.1, "k_advantage(k=2)": 0.3}
    metrics = {"Algorithm-Generated": {f"{m}/{t}": {r: {"step_accuracy": v * (1 + (t == "sum")) * (1 + (m == "policy_logprob"))}
                                                   for r, v in rules.items()}
                                       for m in ("progress_advantage", "policy_logprob") for t in ("sum", "min")}}
    res = {"config": {"command": "fa", "token_agg": ["sum", "min"]}, "metrics": metrics,
           "chance_step_accuracy": {"Algorithm-Generated": 0.08}}
    p = tmp_path / "fa.json"
    p.write_text(json.dumps(res))
    return p


def test_heatmap(tmp_path):
    fig = _mod("fig_agg_heatmap")
    uq = _uq(tmp_path)
    panels = fig.grids(json.loads(uq.read_text()), str(uq))
    pa = next(p for p in panels if p["title"].endswith("progress_advantage"))
    assert pa["rows"] == ["mean", "max"] and pa["cols"] == ["mean", "min"]
    np.testing.assert_array_equal(pa["values"], [[0.6, 0.7], [0.55, 0.8]])
    assert pa["default"] == (0, 0)
    assert not any(p["title"].endswith("self_certainty") for p in panels)  # single cell: not drawn
    fa = _fa(tmp_path)
    fpanels = fig.grids(json.loads(fa.read_text()), str(fa))
    pl = next(p for p in fpanels if p["title"].endswith("policy_logprob"))
    assert pl["rows"] == ["sum", "min"] and pl["values"][0, 2] == pytest.approx(0.3 * 2 * 2)
    out = tmp_path / "h.png"
    assert fig.main([str(uq), str(fa), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"config": {"command": "score"}, "metrics": {}}))
    with pytest.raises(ValueError, match="config.command"):
        fig.main([str(bad), "--out", str(out)])


def test_token_signal(tmp_path):
    fig = _mod("fig_token_signal")
    rng = np.random.default_rng(0)
    recs = [{"id": f"t{i}", "step_ids": [0, 0, 1, 1, 1, 2], "policy_logprob": list(-rng.random(6)),
             "beta_log_ratio": list(rng.normal(size=6)), "success": False, "mistake_step": 3, "decisive_action": 1}
            for i in range(2)]
    p = tmp_path / "pt.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "s.png"
    assert fig.main([str(p), "--out", str(out), "--id", "t1"]) == 0
    assert out.read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="no trajectory with id 'zz'"):
        fig.main([str(p), "--out", str(out), "--id", "zz"])
    p.write_text(json.dumps({"id": "a", "step_ids": [0]}) + "\n")
    with pytest.raises(ValueError, match=r"record 1: missing field\(s\) \['policy_logprob', 'beta_log_ratio'\]"):
        fig.main([str(p), "--out", str(out)])


def test_running_pa(tmp_path):
    fig = _mod("fig_running_pa")
    a = np.array([1.0, -2.0, 0.5, 3.0])
    np.testing.assert_allclose(fig.running(a, "sum"), [1, -1, -0.5, 2.5])
    np.testing.assert_allclose(fig.running(a, "mean"), [1, -0.5, -0.5 / 3, 2.5 / 4])
    np.testing.assert_allclose(fig.running(a, "last"), a)
    curves = [np.array([1.0, 2.0]), np.array([3.0]), np.array([5.0, 4.0, 7.0])]
    m, h, n = fig.band(curves, min_count=2)
    np.testing.assert_array_equal(n, [3, 2, 1])
    assert m[0] == pytest.approx(3.0) and m[1] == pytest.approx(3.0) and np.isnan(m[2])
    assert h[0] == pytest.approx(1.96 * np.std([1, 3, 5], ddof=1) / np.sqrt(3))
    rng = np.random.default_rng(1)
    lines = [{"id": f"t{i}", "success": bool(i % 2), "step_scores": {"progress_advantage": list(rng.normal(size=3 + i % 4))}}
             for i in range(12)] + [{"skipped": "empty", "source": "x", "item": "y"}]
    p = tmp_path / "s.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "r.png"
    assert fig.main([str(p), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match=r"line 1: no step_scores\['nope'\]"):
        fig.main([str(p), "--out", str(out), "--method", "nope"])


def test_fa_bars(tmp_path):
    fig = _mod("fig_fa_bars")
    fa = _fa(tmp_path)
    tab = fig.table(json.loads(fa.read_text()), str(fa))
    assert tab["Algorithm-Generated"]["sharpest_drop"]["progress_advantage/min"] == pytest.approx(0.1)
    out = tmp_path / "b.png"
    assert fig.main([str(fa), "--out", str(out), "--reference", "0.25", "--reference-label", "paper"]) == 0
    assert out.read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="must be 'fa'"):
        fig.main([str(_uq(tmp_path)), "--out", str(out)])
