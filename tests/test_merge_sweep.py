"""`pa-jax uq|bon|score --reference-merge` on the shipped toy pair: the policy is scored once and every
reference once (forwards counted), a second sweep computes nothing, and each block equals an independent
run: alpha = 0 is the unmerged reference, linear alpha = 1 gives progress advantage 0, the unmerged block
equals the plain paired run, and a TIES block equals `pa-jax uq` against the checkpoint that
merge_checkpoints writes to disk."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

import pa_jax.merging as M
import pa_jax.scoring as S
from pa_jax.cli import main

PAIR = pathlib.Path(__file__).resolve().parents[1] / "pa_jax" / "assets" / "toy_pair"
POL, REF = str(PAIR / "policy"), str(PAIR / "reference")
PA = "progress_advantage/mean/mean"
WORDS = ["jump", "ahead", "walk", "cross", "to", "stone", "2", "1", "landed", "slipped", "back", "moved", "fell"]


def _sims(n=8):
    rng = np.random.default_rng(0)
    say = lambda k: " ".join(rng.choice(WORDS, k))  # noqa: E731
    return {"simulations": [
        {"id": f"s{i}", "task_id": f"t{i // 2}", "trial": i % 2, "reward_info": {"reward": float(i % 3 == 0)},
         "messages": [{"role": "user", "content": say(3)}, {"role": "assistant", "content": say(2 + i % 3)},
                      {"role": "user", "content": say(4)}, {"role": "assistant", "content": say(3)}]}
        for i in range(n)]}


@pytest.fixture()
def data(tmp_path):
    f = tmp_path / "sims.json"
    f.write_text(json.dumps(_sims()))
    return f


@pytest.fixture()
def counted(monkeypatch):
    """Every score_rendered call: (id of the model scored, is there a paired reference, batches computed)."""
    calls = []
    orig = S.score_rendered

    def wrapper(rendered, policy, reference=None, **kw):
        res = orig(rendered, policy, reference, **kw)
        calls.append((id(policy[1]), reference is not None, res.batches_computed, res.batches_from_cache))
        return res

    monkeypatch.setattr(S, "score_rendered", wrapper)
    return calls


def _uq(data, out, *extra):
    return ["uq", "--dtype", "float32", "--policy", POL, "--reference", REF, "--data", str(data), "--token-agg", "mean",
            "--step-agg", "mean", "--bootstrap", "20", "--no-progress", "--out", str(out), *extra]


def test_uq_sweep_forwards_and_oracles(data, tmp_path, counted, capsys):
    out = tmp_path / "sweep.json"
    cache = tmp_path / "cache"
    args = _uq(data, out, "--cache", str(cache), "--reference-merge", "linear:0,0.5,1", "--reference-merge", "ties:0.5")
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "ties" in printed and "auroc" in printed
    res = json.loads(out.read_text())
    # forwards: policy once, the unmerged reference once, each of the 4 merged references once
    assert len(counted) == 6 and not any(paired for _, paired, _, _ in counted)
    assert len({m for m, *_ in counted}) == 6  # six different models, each scored by exactly one call
    assert all(computed > 0 and cached == 0 for _, _, computed, cached in counted)
    assert res["reference_merge"]["forwards"] == {"policy": 1, "references": 5}
    blocks = {(b["method"], b["alpha"]): b for b in res["merges"]}
    assert set(blocks) == {("linear", 0.0), ("linear", 0.5), ("linear", 1.0), ("ties", 0.5)}
    assert blocks[("ties", 0.5)]["options"] == {"method": "ties", "density": 0.2, "rescale": False}
    unmerged = np.array(res["scores"][PA])
    # alpha = 0 is the reference bit for bit; linear alpha = 1 is the policy: progress advantage 0
    np.testing.assert_array_equal(blocks[("linear", 0.0)]["scores"][PA], unmerged)
    np.testing.assert_allclose(blocks[("linear", 1.0)]["scores"][PA], 0.0, atol=1e-6)
    assert not np.allclose(blocks[("linear", 0.5)]["scores"][PA], unmerged)
    # policy-only scores are the same in every block
    for b in res["merges"]:
        assert b["scores"]["policy_logprob/mean/mean"] == res["scores"]["policy_logprob/mean/mean"]
        assert b["metrics"][PA]["auroc"] == pytest.approx(
            __import__("sklearn.metrics", fromlist=["roc_auc_score"]).roc_auc_score(b["scores"]["labels"], b["scores"][PA]))

    # the unmerged block equals the plain paired run
    plain = tmp_path / "plain.json"
    assert main(_uq(data, plain)) == 0
    np.testing.assert_allclose(json.loads(plain.read_text())["scores"][PA], unmerged, atol=1e-5)
    # the TIES block equals a run against the merged checkpoint written to disk
    M.merge_checkpoints(REF, POL, tmp_path / "ties05", 0.5, "ties")
    disk = tmp_path / "disk.json"
    args_disk = _uq(data, disk)
    args_disk[args_disk.index("--reference") + 1] = str(tmp_path / "ties05")
    assert main(args_disk) == 0
    np.testing.assert_allclose(json.loads(disk.read_text())["scores"][PA], blocks[("ties", 0.5)]["scores"][PA], atol=1e-5)

    # a second sweep over the same cache: no forward at all, same numbers
    counted.clear()
    out2 = tmp_path / "sweep2.json"
    assert main(_uq(data, out2, "--cache", str(cache), "--reference-merge", "linear:0,0.5,1",
                    "--reference-merge", "ties:0.5")) == 0
    assert len(counted) == 6 and all(computed == 0 for _, _, computed, _ in counted)
    res2 = json.loads(out2.read_text())
    for b1, b2 in zip(res["merges"], res2["merges"]):
        assert b1["scores"][PA] == b2["scores"][PA]


def test_bon_and_score_sweeps(data, tmp_path, counted):
    out = tmp_path / "bon.json"
    assert main(["bon", "--policy", POL, "--reference", REF, "--data", str(data), "--no-progress", "--out", str(out),
                 "--reference-merge", "dare_ties:0.5,1", "--merge-density", "0.5", "--merge-seed", "3"]) == 0
    res = json.loads(out.read_text())
    assert [(b["method"], b["alpha"]) for b in res["merges"]] == [("dare_ties", 0.5), ("dare_ties", 1.0)]
    assert res["merges"][0]["options"] == {"method": "dare_ties", "density": 0.5, "seed": 3, "rescale": True}
    assert "bon_success_rate" in res["merges"][0]["metrics"][PA]
    assert len(counted) == 4
    counted.clear()
    out = tmp_path / "score.json"
    assert main(["score", "--policy", POL, "--reference", REF, "--data", str(data), "--no-progress", "--out", str(out),
                 "--reference-merge", "emr:0.5"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "score.emr-0.5.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and PA in lines[0]["trajectory_scores"]
    assert (tmp_path / "score.jsonl").is_file()
    assert len(counted) == 3


@pytest.mark.parametrize(
    "extra, match",
    [(["--reference-merge", "slerp:0.5"], "unknown merge method 'slerp'"),
     (["--reference-merge", "linear:0.5,20"], r"\|alpha\| <= 10"),
     (["--reference-merge", "ties:0.5", "--reference-merge", "ties:1"], "method 'ties' given twice"),
     (["--reference-merge", "linear:0.5", "--merge-extra-policy", POL], "--merge-extra-policy: linear"),
     (["--reference-merge", "ties:0.5", "--merge-density", "1.5"], "density=1.5")],
)
def test_sweep_bad_options(data, tmp_path, extra, match, capsys):
    assert main(_uq(data, tmp_path / "x.json", *extra)) == 2
    err = capsys.readouterr().err
    assert "pa-jax uq: error:" in err and __import__("re").search(match, err), err


def test_sweep_other_architecture(data, tmp_path, capsys):
    """An extra policy of another shape is refused naming the tensor."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(PAIR / "policy", other)
    from pa_jax.models.load import open_safetensors_dir, write_safetensors

    t = {k: v.read() for k, v in open_safetensors_dir(other).items()}
    t["model.norm.weight"] = np.ones(65, np.float32)
    write_safetensors(other / "model.safetensors", t)
    rc = main(_uq(data, tmp_path / "x.json", "--reference-merge", "ties:0.5", "--merge-extra-policy", str(other)))
    assert rc == 2
    err = capsys.readouterr().err
    assert "model.norm.weight" in err, err


def test_sweep_needs_reference(data, tmp_path, capsys):
    rc = main(["uq", "--policy", POL, "--data", str(data), "--reference-merge", "ties:0.5", "--no-progress"])
    assert rc == 2 and "--reference-merge needs --reference" in capsys.readouterr().err
