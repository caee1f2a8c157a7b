"""`pa-jax uq|bon|fa|score` with the issue-20 options, end to end on tiny random checkpoints:
held-out selection, external scores, authors' presets, FA parity options, per-token export."""
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pa_jax.apps import select
from helpers import authors_ids, cli_fails, cli_ok, tau_sim, torch_token_logprobs, who_and_when_split


def test_uq_heldout_extra_scores_preset(ckpts, tmp_path, capsys):
    d, tok, models = ckpts
    data = tmp_path / "sims.json"
    data.write_text(json.dumps({"simulations": [tau_sim(i, f"t{i // 2}", float(i % 2)) for i in range(12)]}))
    rng = np.random.default_rng(0)
    ext = {f"s{i}": float(rng.normal()) for i in range(12)}
    steps = {f"s{i}": list(rng.normal(size=3)) for i in range(12)}
    (tmp_path / "rm.jsonl").write_text("".join(json.dumps({"id": k, "score": v, "step_scores": steps[k]}) + "\n"
                                               for k, v in ext.items()))
    out = tmp_path / "uq.json"
    cli_ok(["uq", "--policy", str(d / "policy"), "--reference", str(d / "reference"), "--data", str(data),
            "--token-agg", "mean,min", "--step-agg", "mean,min", "--bootstrap", "20", "--no-progress",
            "--aggregation-preset", "authors:gemma4-4b:tau2-uq-airline", "--extra-scores", f"rm={tmp_path / 'rm.jsonl'}",
            "--heldout-folds", "3", "--heldout-resamples", "50", "--out", str(out), "--cache", str(tmp_path / "c")])
    res = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "held-out selection" in printed and "in-sample best" in printed
    # the preset (max / min) goes first and is the default
    assert res["config"]["token_agg"][0] == "max" and res["config"]["step_agg"][0] == "min"
    assert res["aggregation_preset"]["source"] == "scripts/tau2_uq_onpolicy.sh"
    labels = np.array(res["scores"]["labels"])
    ids = res["scores"]["ids"]
    want = roc_auc_score(labels, [ext[i] for i in ids])
    assert res["metrics"]["rm"]["auroc"] == pytest.approx(want)
    assert res["metrics"]["rm/steps/min"]["auroc"] == pytest.approx(roc_auc_score(labels, [min(steps[i]) for i in ids]))
    assert res["extra_scores"][0]["name"] == "rm" and len(res["extra_scores"][0]["sha256"]) == 64
    sel = res["selection"]
    assert {"progress_advantage", "rm", "self_certainty"} <= set(sel)
    pa = sel["progress_advantage"]
    assert pa["default"]["candidate"] == "progress_advantage/max/min"
    # held-out recomputed plainly from the stored scores
    tasks = [f"t{int(i[1:]) // 2}" for i in ids]
    fold = select.task_folds(tasks, 3, 0)
    cands = [k for k in res["scores"] if k.startswith("progress_advantage/")]
    vals = []
    for f in range(3):
        tr, te = fold != f, fold == f
        aucs = [roc_auc_score(labels[tr], np.array(res["scores"][c])[tr]) for c in cands]
        best = cands[int(np.argmax(aucs))]
        vals.append(roc_auc_score(labels[te], np.array(res["scores"][best])[te]))
    assert pa["heldout"]["value"] == pytest.approx(np.mean(vals))
    assert pa["in_sample"]["value"] == pytest.approx(max(res["metrics"][c]["auroc"] for c in cands))


def test_bad_analysis_options(ckpts, tmp_path, capsys):
    d, tok, models = ckpts
    data = tmp_path / "sims.json"
    data.write_text(json.dumps({"simulations": [tau_sim(i, f"t{i}", float(i % 2)) for i in range(4)]}))
    base = ["uq", "--policy", str(d / "policy"), "--data", str(data), "--no-progress", "--bootstrap", "10",
            "--cache", str(tmp_path / "cache")]

    def fails(extra, pattern):
        cli_fails(capsys, base + extra, pattern)

    fails(["--aggregation-preset", "authors:qwen3.5-9b:tau2-uq"], r"known presets: .*authors:qwen3.5-9b:tau2-uq-airline")
    (tmp_path / "bad.jsonl").write_text('{"id": "s0", "score": 1}\n{"id": "s1", "score": NaN}\n')
    fails(["--extra-scores", f"x={tmp_path / 'bad.jsonl'}"], r"bad.jsonl line 2: field 'score' is not finite")
    (tmp_path / "unk.jsonl").write_text("".join(json.dumps({"id": i, "score": 1}) + "\n" for i in ("s0", "s1", "s2", "zz")))
    fails(["--extra-scores", f"x={tmp_path / 'unk.jsonl'}"], r"1 ids not in the data: 'zz'")
    out = tmp_path / "r.json"
    fails(["--heldout-folds", "9", "--out", str(out)], r"--heldout-folds must be an int in \[2, number of tasks = 4\]")
    assert "metrics" in json.loads(out.read_text())  # the metrics were written before the selection failed


def test_fa_parity_options_and_heldout(ckpts, tmp_path):
    d, tok, models = ckpts
    who_and_when_split(tmp_path, 6)
    rng = np.random.default_rng(2)
    ext = {f"Algorithm-Generated/{i + 1}": list(rng.normal(size=5)) for i in range(6)}
    (tmp_path / "prm.jsonl").write_text("".join(json.dumps({"id": k, "step_scores": v}) + "\n" for k, v in ext.items()))
    out = tmp_path / "fa.json"
    cli_ok(["fa", "--policy", str(d / "policy"), "--reference", str(d / "reference"), "--data", str(tmp_path),
            "--out", str(out), "--no-progress", "--k", "2", "--gamma", "1", "0.5", "--threshold", "0", "0.5",
            "--self-certainty", "--extra-scores", f"prm={tmp_path / 'prm.jsonl'}", "--heldout-folds", "2",
            "--heldout-resamples", "20"])
    res = json.loads(out.read_text())
    m = res["metrics"]["Algorithm-Generated"]
    assert res["config"]["token_agg"] == ["sum"]  # the authors' FA script's aggregation is the default
    assert {"progress_advantage/sum", "self_certainty/sum", "topk_mean_logprob/sum", "prm/steps"} <= set(m)
    assert set(m["prm/steps"]) == {"min_cumulative", "sharpest_drop", "sharpest_consecutive_drop",
                                   "earliest_below_threshold(t=0)", "earliest_below_threshold(t=0.5)",
                                   "k_advantage(k=2)", "k_advantage(k=2,gamma=0.5)"}
    truth = [i % 5 for i in range(6)]
    order = [int(t.split("/")[-1]) - 1 for t in sorted(ext, key=lambda x: int(x.split("/")[-1]))]
    pred = []
    for i in order:  # every message is an action here: earliest below 0.5, else the lowest
        r = ext[f"Algorithm-Generated/{i + 1}"]
        below = [j for j, x in enumerate(r) if x < 0.5]
        pred.append(below[0] if below else int(np.argmin(r)))
    got = m["prm/steps"]["earliest_below_threshold(t=0.5)"]
    assert got["predictions"] == pred and got["step_accuracy"] == pytest.approx(np.mean(np.array(pred) == truth))
    assert res["chance_step_accuracy"]["Algorithm-Generated"] == pytest.approx(1 / 5)
    sel = res["selection"]["Algorithm-Generated"]
    assert sel["progress_advantage"]["default"]["candidate"] == "progress_advantage/sum|min_cumulative"
    assert sel["prm"]["in_sample"]["value"] == pytest.approx(max(v["step_accuracy"] for v in m["prm/steps"].values()))


def test_score_per_token_matches_pytorch(ckpts, tmp_path):
    d, tok, models = ckpts
    data = tmp_path / "sims.json"
    sims = [tau_sim(i, f"t{i}", 1.0) for i in range(2)]
    data.write_text(json.dumps({"simulations": sims}))
    pt = tmp_path / "pt.jsonl"
    cli_ok(["score", "--dtype", "float32", "--policy", str(d / "policy"), "--reference", str(d / "reference"), "--data", str(data),
            "--jsonl", str(tmp_path / "s.jsonl"), "--per-token", str(pt), "--beta", "0.5", "--no-progress"])
    recs = [json.loads(x) for x in pt.read_text().splitlines()]
    for sim, rec in zip(sims, recs):
        ids, spans = authors_ids(sim, tok)
        lp = {k: torch_token_logprobs(models[k], ids) for k in ("policy", "reference")}
        pos = np.concatenate([np.arange(s - 1, e - 1) for s, e in spans])
        np.testing.assert_allclose(rec["policy_logprob"], lp["policy"][pos], atol=2e-4)
        np.testing.assert_allclose(rec["beta_log_ratio"], 0.5 * (lp["policy"][pos] - lp["reference"][pos]), atol=2e-4)
        assert rec["token_ids"] == [ids[p + 1] for p in pos]
        assert rec["step_ids"] == [k for k, (s, e) in enumerate(spans) for _ in range(e - s)]
