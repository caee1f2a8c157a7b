"""`pa-jax demo` end to end on the shipped pair: outputs, targets, and argument errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pa_jax import cli, demo


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    rc = cli.main(["demo", "--out", str(out), "--num-rollouts", "512", "--group-size", "8", "--seed", "1"])
    return rc, out


def test_demo_writes_outputs_and_meets_targets(demo_run, capsys):
    rc, out = demo_run
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    png = (out / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # atomic writes left no temp file (pa_jax.io)
    p1 = res["proposition1"]
    assert set(p1["aggregations"]) == {"sum", "mean", "min", "max"}
    assert p1["n_visited_pairs"] > 50
    assert p1["aggregations"]["sum"]["pearson"] >= 0.95
    # two LLM batches (the tree and the rollouts) give the same log-ratios
    assert p1["rollout_vs_tree_batch_max_diff"] < 1e-4
    assert res["targets"]["pearson_sum_ge_0.95"]
    uq = res["uq"]
    for name, m in uq.items():
        assert 0.5 < m["auroc"] <= 1.0 and m["auroc_ci95"][0] <= m["auroc"] <= m["auroc_ci95"][1], name
    # the progress advantage is the exact advantage up to the LLM's error, so their AUROCs agree closely
    assert abs(uq["progress_adv(token=sum,step=sum)"]["auroc"] - uq["exact_sum_A*"]["auroc"]) < 0.02
    # (the UQ target itself is checked exactly, over every trajectory, in test_toy_pair.py)
    b = res["bon"]
    assert 0.0 <= b["pass_at_1"] <= b["oracle_pass_at_n"] <= 1.0
    for v in b["selected_success"].values():
        assert 0.0 <= v <= b["oracle_pass_at_n"] + 1e-12
    fa = res["fa"]
    assert fa["accuracy"]["exact_A*"] == 1.0  # the rule recovers the definition from the exact advantages
    assert fa["accuracy"]["progress_adv(token=sum)"] > fa["chance_accuracy"]
    assert res["objective"]["reference"] < res["objective"]["policy"] <= res["objective"]["optimal"] + 1e-6


def test_demo_results_recomputed_from_scratch(demo_run):
    """Independent re-derivation of two headline numbers from the JSON's own ingredients."""
    _, out = demo_run
    res = json.loads((out / "results.json").read_text())
    assert res["num_rollouts"] == 512 and res["bon"]["n_groups"] == 64
    assert 0.0 < res["success_rate"] < 1.0
    chance = 1.0 / res["env"]["horizon"]
    assert res["fa"]["chance_accuracy"] == pytest.approx(chance)
    assert res["env"]["num_history_commands"] == 3 * sum(6 ** t for t in range(res["env"]["horizon"]))


def test_summary_table_mentions_every_section(demo_run):
    _, out = demo_run
    text = demo.summary_table(json.loads((out / "results.json").read_text()))
    for s in ("Proposition 1", "UQ", "Best-of-8", "Failure attribution", "targets"):
        assert s in text


def test_summary_table_reads_undefined_values_back_as_nan(demo_run, tmp_path):
    """results.json is strict JSON: an undefined value (NaN) is written as null, and the table reads it back."""
    from pa_jax.io import atomic_write_json

    _, out = demo_run
    res = json.loads((out / "results.json").read_text())
    res["proposition1"]["aggregations"]["max"]["pearson"] = float("nan")
    atomic_write_json(tmp_path / "r.json", res)
    text = (tmp_path / "r.json").read_text()
    assert '"pearson": null' in text and "NaN" not in text
    row = next(line for line in demo.summary_table(json.loads(text)).splitlines() if line.strip().startswith("max"))
    assert "nan" in row.split()


def test_demo_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="--group-size"):
        demo.run_demo(tmp_path, num_rollouts=10, group_size=4)
    with pytest.raises(ValueError, match="--num-rollouts"):
        demo.run_demo(tmp_path, num_rollouts=1)
    with pytest.raises(ValueError, match="--pair .*reference/config.json"):
        demo.run_demo(tmp_path, pair_dir=tmp_path)
    assert np.isnan(demo._pearson(np.ones(3), np.arange(3.0)))
