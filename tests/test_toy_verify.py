"""`python -m toy_mdp verify`: the report passes on a small run, writes JSON, fails loudly."""
from __future__ import annotations

import json

import numpy as np
import pytest

from toy_mdp import __main__ as cli
from toy_mdp import verify


def test_verify_small_run_passes_and_writes_json(tmp_path, capsys):
    out = tmp_path / "sub" / "report.json"
    rc = cli.main(["verify", "--num-mdps", "8", "--seed", "3", "--states", "5", "--actions", "3",
                   "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "ALL CHECKS PASSED" in text and "Proposition 1" in text
    report = json.loads(out.read_text())
    assert report["passed"] and report["num_mdps"] == 8
    rows = {r["check"]: r for r in report["checks"]}
    prop1 = next(r for name, r in rows.items() if name.startswith("1. Proposition 1"))
    assert prop1["passed"] and 0 <= prop1["worst"] <= 1e-8
    assert not list(out.parent.glob("*.tmp"))  # atomic write left no temp file (pa_jax.io: <name>.<random>.tmp)


def test_verify_exits_nonzero_when_a_check_fails(monkeypatch, capsys):
    bad = [verify.Check("fake check", 1.0, 1e-8), verify.Check("must differ", 0.0, 1e-6, "min")]
    monkeypatch.setattr(verify, "run_checks", lambda *a, **k: bad)
    assert cli.main(["verify", "--num-mdps", "4"]) == 1
    text = capsys.readouterr().out
    assert "FAIL" in text and "SOME CHECKS FAILED" in text
    assert not verify.Check("nan", float("nan"), 1.0).passed


def test_verify_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        cli.main(["verify", "--num-mdps", "2"])
    with pytest.raises(SystemExit):
        cli.main(["verify", "--actions", "1"])
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])


def test_json_write_is_atomic(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")
    with pytest.raises(TypeError):
        verify.write_json_atomic(str(path), {"x": object()})
    assert path.read_text() == "old" and not list(tmp_path.glob("*.tmp"))
    verify.write_json_atomic(str(path), {"x": np.float64(1.5).item()})
    assert json.loads(path.read_text()) == {"x": 1.5}
