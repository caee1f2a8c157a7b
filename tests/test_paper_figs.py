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
    # an external scorer's step scores, matched by id; the labels from the scores file
    for x in lines[:-1]:
        x["num_steps"] = len(x["step_scores"]["progress_advantage"])
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    ext = tmp_path / "prm.jsonl"
    ext.write_text("".join(json.dumps({"id": x["id"], "step_scores": [float(x["success"])] * x["num_steps"]}) + "\n"
                           for x in lines[:-1]))
    assert fig.main([str(p), "--out", str(out), "--extra-scores", f"prm={ext}"]) == 0
    recs = [json.loads(x) for x in p.read_text().splitlines()]
    g = fig.collect(recs, str(p), "prm", {x["id"]: np.full(x["num_steps"], float(x["success"])) for x in lines[:-1]})
    assert all(np.all(a == 1.0) for a in g[True]) and all(np.all(a == 0.0) for a in g[False])
    ext.write_text(json.dumps({"id": "t0", "step_scores": [1.0]}) + "\n")
    with pytest.raises(ValueError, match="no line for 11 trajectories"):
        fig.main([str(p), "--out", str(out), "--extra-scores", f"prm={ext}"])


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


def test_fa_bars_chance_from_data(tmp_path):
    """Older results files without chance_step_accuracy: the chance line from the Who&When data."""
    fig = _mod("fig_fa_bars")
    split = tmp_path / "data" / "Algorithm-Generated"
    split.mkdir(parents=True)
    # 4 messages with content (4 actions) and mistake 1; 2 actions (one empty message) and mistake 2
    hists = [(["a", "b", "c", "d"], 1), (["a", "", "c"], 2)]
    for i, (contents, ms) in enumerate(hists):
        hist = [{"role": "assistant", "name": "A", "content": c} for c in contents]
        (split / f"{i + 1}.json").write_text(json.dumps({"history": hist, "mistake_step": str(ms)}))
    assert fig.chance_from_data(str(tmp_path / "data")) == {"Algorithm-Generated": pytest.approx((1 / 4 + 1 / 2) / 2)}
    with pytest.raises(ValueError, match="2 trajectories in split 'Algorithm-Generated', the results have 5"):
        fig.chance_from_data(str(tmp_path / "data"), {"Algorithm-Generated": 5})
    res = json.loads(_fa(tmp_path).read_text())
    del res["chance_step_accuracy"]
    for rules in res["metrics"]["Algorithm-Generated"].values():
        for v in rules.values():
            v["n"] = 2
    p = tmp_path / "old_fa.json"
    p.write_text(json.dumps(res))
    out = tmp_path / "b.png"
    assert fig.main([str(p), "--out", str(out), "--data", str(tmp_path / "data"), "--token-agg", "sum"]) == 0
    assert out.read_bytes()[:8] == PNG


def test_heldout_table_from_uq_results(tmp_path, capsys):
    """paper_figs/heldout_table.py on a uq results file: held-out AUROC recomputed by a plain loop."""
    from sklearn.metrics import roc_auc_score

    from pa_jax.apps import select

    tab = _mod("heldout_table")
    rng = np.random.default_rng(3)
    ids = [f"{t}/trial{k}" for t in range(15) for k in range(2)]
    y = rng.integers(0, 2, len(ids))
    sc = {"ids": ids, "labels": y.tolist(),
          "pa/mean/mean": list(y * 0.3 + rng.normal(size=len(ids))), "pa/max/mean": list(y + rng.normal(size=len(ids))),
          "sc": list(rng.normal(size=len(ids)))}
    p = tmp_path / "uq.json"
    p.write_text(json.dumps({"config": {"command": "uq", "token_agg": ["mean"], "step_agg": ["mean"]}, "scores": sc}))
    out = tmp_path / "sel.json"
    assert tab.main([str(p), "--folds", "3", "--resamples", "30", "--json", str(out)]) == 0
    assert "| pa | pa/" in capsys.readouterr().out
    got = json.loads(out.read_text())["selection"][""]["pa"]
    fold = select.task_folds([i.split("/")[0] for i in ids], 3, 0)
    vals = []
    for f in range(3):
        tr, te = fold != f, fold == f
        best = max(("pa/mean/mean", "pa/max/mean"), key=lambda c: roc_auc_score(y[tr], np.array(sc[c])[tr]))
        vals.append(roc_auc_score(y[te], np.array(sc[best])[te]))
    assert got["heldout"]["value"] == pytest.approx(np.mean(vals))
    assert got["default"]["candidate"] == "pa/mean/mean"
    with pytest.raises(SystemExit) as exc:  # bad input: one line naming the file, exit status 2
        tab.main([str(_fa(tmp_path)), "--folds", "2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "fa.json: an fa results file needs --data" in err and "Traceback" not in err
