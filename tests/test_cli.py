"""`pa-jax score|uq|bon|fa` end to end on tiny random checkpoints and small synthetic trajectory files."""
import hashlib
import json

import numpy as np
import pytest

from pa_jax.cli import main
from helpers import authors_ids, cli_fails, oracle_pa, tau_sim, who_and_when_split


def test_uq_end_to_end(ckpts, tmp_path, capsys):
    d, tok, models = ckpts
    data = tmp_path / "sims.json"
    data.write_text(json.dumps({"simulations": [tau_sim(i, f"t{i // 2}", float(i % 2)) for i in range(10)]}))
    out = tmp_path / "uq.json"
    rc = main(["uq", "--policy", str(d / "policy"), "--reference", str(d / "reference"), "--data", str(data),
               "--dtype", "float32", "--step-agg", "mean,min", "--token-agg", "mean", "--bootstrap", "50",
               "--out", str(out), "--no-progress", "--cache", str(tmp_path / "cache")])
    assert rc == 0
    res = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "progress_advantage/mean/mean" in printed and "AUROC" in printed
    assert res["inputs"] == {str(data): hashlib.sha256(data.read_bytes()).hexdigest()}
    assert res["versions"]["jax"] and res["config"]["beta"] == 1.0 and res["n_scored"] == 10
    pa = np.array(res["scores"]["progress_advantage/mean/mean"])
    np.testing.assert_allclose(pa, oracle_pa(models, tok, data), atol=2e-4)
    from sklearn.metrics import roc_auc_score

    m = res["metrics"]["progress_advantage/mean/mean"]
    assert m["auroc"] == pytest.approx(roc_auc_score(res["scores"]["labels"], pa))
    assert {"policy_logprob/mean/min", "self_certainty", "deepconf_tail"} <= set(res["metrics"])
    # length controls: minus the number of tokens / steps of each trajectory
    sims = json.loads(data.read_text())["simulations"]
    n_tok = np.array([len(authors_ids(sim, tok)[0]) for sim in sims], float)
    np.testing.assert_array_equal(res["scores"]["length_control/tokens"], -n_tok)
    np.testing.assert_array_equal(res["scores"]["length_control/steps"], -3.0)
    assert res["metrics"]["length_control/tokens"]["auroc"] == pytest.approx(
        roc_auc_score(res["scores"]["labels"], -n_tok))
    # second run: everything from the cache, same numbers
    rc = main(["uq", "--policy", str(d / "policy"), "--reference", str(d / "reference"), "--data", str(data),
               "--dtype", "float32", "--step-agg", "mean,min", "--bootstrap", "50", "--out", str(out),
               "--no-progress", "--cache", str(tmp_path / "cache")])
    res2 = json.loads(out.read_text())
    assert res2["timing"]["batches_computed"] == 0
    assert res2["scores"]["progress_advantage/mean/mean"] == res["scores"]["progress_advantage/mean/mean"]
    _check_figure(out, tmp_path)


def test_bon_score_and_same_model_sanity(ckpts, tmp_path):
    d, tok, models = ckpts
    for trial in range(3):
        (tmp_path / f"trial_{trial}").mkdir()
        sims = [tau_sim(10 * trial + k, f"task{k}", float((trial + k) % 2)) for k in range(3)]
        (tmp_path / f"trial_{trial}" / "airline.json").write_text(json.dumps({"simulations": sims}))
    out = tmp_path / "bon.json"
    assert main(["bon", "--policy", str(d / "policy"), "--reference", str(d / "policy"), "--data", str(tmp_path),
                 "--dtype", "float32", "--out", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    m = res["metrics"]["progress_advantage/mean/mean"]
    assert res["models"]["reference_is_policy"] and all(s["score"] == 0.0 for s in m["selected"])
    assert all(s["trial"] == 0 for s in m["selected"])  # all tied at 0 -> lowest trial
    rewards = np.array([[(t + k) % 2 for t in range(3)] for k in range(3)], float)
    assert m["pass_at_1"] == pytest.approx(rewards.mean()) and m["oracle_pass_at_n"] == 1.0
    assert m["bon_success_rate"] == pytest.approx(rewards[:, 0].mean())
    _check_figure(out, tmp_path)
    # per-step JSON lines, policy only
    jl = tmp_path / "s.jsonl"
    assert main(["score", "--policy", str(d / "policy"), "--data", str(tmp_path / "trial_1" / "airline.json"),
                 "--dtype", "float32", "--jsonl", str(jl), "--no-progress", "--max-length", "40"]) == 0
    lines = [json.loads(x) for x in jl.read_text().splitlines()]
    assert len(lines) == 3 and all(len(x["step_scores"]["policy_logprob"]) == x["num_steps"] == 3 for x in lines)
    assert all(x["truncation"]["dropped_tokens"] > 0 for x in lines) and "progress_advantage" not in lines[0]["step_scores"]


def test_fa_who_and_when(ckpts, tmp_path):
    d, tok, models = ckpts
    who_and_when_split(tmp_path, 4, unlabeled=True)
    out = tmp_path / "fa.json"
    assert main(["fa", "--policy", str(d / "policy"), "--reference", str(d / "reference"), "--data", str(tmp_path),
                 "--dtype", "float32", "--out", str(out), "--no-progress", "--k", "1", "2"]) == 0
    res = json.loads(out.read_text())
    assert res["n_scored"] == 4 and res["skipped"][0]["reason"] == "missing label 'mistake_step'"
    m = res["metrics"]["Algorithm-Generated"]["progress_advantage/sum"]  # the authors' FA script: token sum
    assert set(m) == {"min_cumulative", "sharpest_drop", "sharpest_consecutive_drop", "earliest_below_threshold(t=0)",
                      "k_advantage(k=1)", "k_advantage(k=2)"}
    truth = [i % 5 for i in range(4)]
    for rule, v in m.items():
        p = np.array(v["predictions"])
        assert v["step_accuracy"] == pytest.approx(np.mean(p == truth))
        assert v["mae"] == pytest.approx(np.mean(np.abs(p - truth)))
    _check_figure(out, tmp_path)


def _check_figure(results_json, tmp_path):
    """paper_figs/real_data.py draws a PNG from this results file and rejects one of another kind."""
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location(
        "real_fig", pathlib.Path(__file__).resolve().parents[1] / "paper_figs" / "real_data.py")
    fig = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fig)
    assert fig.main([str(results_json), "--out-dir", str(tmp_path / "figs")]) == 0
    png = tmp_path / "figs" / f"real_{results_json.stem}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = fig.markdown(fig.load(str(results_json))).splitlines()
    assert table[0].startswith("| ") or table[0].startswith("pass@1")
    assert sum(line.startswith("| ") for line in table) >= 4  # header, rule, and a row per method
    bad = tmp_path / "not_results.json"
    bad.write_text(json.dumps({"config": {"command": "score"}, "metrics": {}}))
    with pytest.raises(ValueError, match="config.command"):
        fig.load(str(bad))
    # a directory: the results file is drawn, a held-out selection file beside it is skipped with a line
    d = tmp_path / "dir"
    d.mkdir()
    (d / results_json.name).write_bytes(results_json.read_bytes())
    (d / "heldout_x.json").write_text(json.dumps({"results": "x.json", "folds": 5, "selection": {}}))
    assert fig.main([str(d), "--out-dir", str(tmp_path / "figs2")]) == 0
    assert (tmp_path / "figs2" / f"real_{results_json.stem}.png").is_file()
    assert not (tmp_path / "figs2" / "real_heldout_x.png").exists()


def test_cli_bad_inputs(ckpts, tmp_path, capsys, monkeypatch):
    d, tok, models = ckpts
    data = tmp_path / "sims.json"
    data.write_text(json.dumps({"simulations": [tau_sim(0, "t", 1.0)]}))
    monkeypatch.delenv("PA_JAX_TRACEBACK", raising=False)

    # bad input ends with exit status 2 and one line on stderr naming the problem
    cli_fails(capsys, ["uq", "--policy", str(d / "policy"), "--reference", str(d / "other"), "--data", str(data)],
              "tokenizers differ")
    cli_fails(capsys, ["uq", "--policy", str(d / "policy"), "--reference", str(d / "bert"), "--data", str(data)],
              "--reference .*bert.*causal LM")
    cli_fails(capsys, ["uq", "--policy", str(d / "policy"), "--data", str(tmp_path / "nope.json")], "no such file")
    cli_fails(capsys, ["uq", "--policy", str(d / "policy"), "--data", str(data), "--max-length", "1"], "--max-length")
    # with PA_JAX_TRACEBACK set the exception propagates (for debugging)
    monkeypatch.setenv("PA_JAX_TRACEBACK", "1")
    with pytest.raises(ValueError, match="tokenizers differ"):
        main(["uq", "--policy", str(d / "policy"), "--reference", str(d / "other"), "--data", str(data)])
    with pytest.raises(SystemExit):
        main(["uq", "--policy", str(d / "policy"), "--data", str(data), "--token-agg", "median"])
