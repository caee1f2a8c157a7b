"""pa_jax.io: the one atomic writer, strict JSON, and the clean-up of temp files left by killed writers."""
import ast
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from pa_jax.io import (JSONLError, atomic_write_bytes, atomic_write_json, atomic_write_text, dumps_strict, iter_jsonl,
                       read_jsonl, remove_stale_temps)

IO_PATH = pathlib.Path(__file__).resolve().parents[1] / "pa_jax" / "io.py"


def _strict_loads(text: str):
    """json.loads that refuses the non-standard NaN / Infinity tokens Python's json accepts by default."""
    def refuse(token):
        raise ValueError(f"non-JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_atomic_write_replaces_whole_file_with_usual_permissions(tmp_path):
    """Results files are replaced whole (a failing writer leaves the old one and no temp file) and get
    the permissions of an ordinary file (0666 minus the umask), not mkstemp's private 0600."""
    path = tmp_path / "out" / "results.json"
    atomic_write_json(path, {"a": 1})
    mask = os.umask(0o022)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~mask
    assert json.loads(path.read_text()) == {"a": 1}

    def failing(f):
        f.write(b"partial")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        atomic_write_bytes(path, failing)
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]


def test_bytes_text_and_callable_writers(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01\xff")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01\xff"
    atomic_write_text(tmp_path / "b.txt", "caf\u00e9\n")
    assert (tmp_path / "b.txt").read_bytes() == "caf\u00e9\n".encode("utf-8")
    arrays = {"x": np.arange(5, dtype=np.int32), "y": np.linspace(0, 1, 3)}
    atomic_write_bytes(tmp_path / "c.npz", lambda f: np.savez(f, **arrays))
    with np.load(tmp_path / "c.npz") as z:
        np.testing.assert_array_equal(z["x"], arrays["x"])
        np.testing.assert_array_equal(z["y"], arrays["y"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "c.npz"]


def test_dumps_strict_writes_null_for_nan_and_plain_values_for_numpy():
    obj = {
        "nan": float("nan"), "inf": math.inf, "ninf": -math.inf, "ok": 0.25,
        "np_float": np.float32(0.5), "np_nan": np.float64("nan"), "np_int": np.int64(7), "np_bool": np.bool_(True),
        "array": np.array([1.0, np.nan, np.inf]), "int_array": np.arange(3, dtype=np.int16),
        "nested": [{"x": (np.float16(2.0), float("nan"))}], 3: "int key", "path": pathlib.Path("a/b.json"),
    }
    text = dumps_strict(obj)
    assert "NaN" not in text and "Infinity" not in text
    back = _strict_loads(text)
    assert back == {
        "nan": None, "inf": None, "ninf": None, "ok": 0.25,
        "np_float": 0.5, "np_nan": None, "np_int": 7, "np_bool": True,
        "array": [1.0, None, None], "int_array": [0, 1, 2],
        "nested": [{"x": [2.0, None]}], "3": "int key", "path": "a/b.json",
    }
    assert type(back["np_int"]) is int and type(back["np_bool"]) is bool
    # what json.dumps itself would write for plain values is unchanged (indent 2 by default; one line on request)
    plain = {"a": [1, 2.5, "s", None, True], "b": {"c": -3}}
    assert dumps_strict(plain) == json.dumps(plain, indent=2)
    assert dumps_strict(plain, indent=None) == json.dumps(plain)
    with pytest.raises(TypeError):
        dumps_strict({"x": object()})


def test_atomic_write_json_is_strict_with_a_final_newline(tmp_path):
    path = tmp_path / "r.json"
    atomic_write_json(path, {"auroc": np.float64("nan"), "n": np.int32(4)})
    text = path.read_text()
    assert text.endswith("}\n")
    assert _strict_loads(text) == {"auroc": None, "n": 4}


def test_remove_stale_temps_removes_only_this_writers_temp_files(tmp_path):
    for name in ("results.json", "results.json.abc123.tmp", "results.json.zz_9.tmp", "other.json.q1w2.tmp",
                 "notes.tmp", "keep.txt"):
        (tmp_path / name).write_text("x")
    removed = remove_stale_temps(tmp_path, "results.json")
    assert sorted(p.name for p in removed) == ["results.json.abc123.tmp", "results.json.zz_9.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "notes.tmp", "other.json.q1w2.tmp",
                                                          "results.json"]
    removed = remove_stale_temps(tmp_path)  # every '<name>.<random>.tmp'; 'notes.tmp' is no such name
    assert [p.name for p in removed] == ["other.json.q1w2.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "notes.tmp", "results.json"]
    assert remove_stale_temps(tmp_path / "missing") == []


def test_remove_stale_temps_cleans_up_after_a_killed_writer(tmp_path):
    """A process killed in the middle of a write leaves the old file whole and one temp file, which
    remove_stale_temps finds (io.py is loaded by path: it needs nothing of pa_jax)."""
    target = tmp_path / "index.json"
    target.write_text('{"old": true}')
    script = (
        "import importlib.util, os, sys\n"
        f"spec = importlib.util.spec_from_file_location('io_alone', {str(IO_PATH)!r})\n"
        "io = importlib.util.module_from_spec(spec); spec.loader.exec_module(io)\n"
        "assert not any(m == 'jax' or m.startswith(('jax.', 'pa_jax')) for m in sys.modules)\n"
        "def die(f):\n"
        "    f.write(b'{\"new\": tr'); f.flush(); os._exit(3)\n"
        f"io.atomic_write_bytes({str(target)!r}, die)\n"
    )
    rc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert rc.returncode == 3, rc.stderr
    assert target.read_text() == '{"old": true}'
    left = [p.name for p in tmp_path.iterdir() if p.name != "index.json"]
    assert len(left) == 1 and left[0].startswith("index.json.") and left[0].endswith(".tmp")
    assert [p.name for p in remove_stale_temps(tmp_path, "index.json")] == left
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]


def test_read_jsonl_objects_in_order_and_bad_lines_named(tmp_path):
    """One JSON object per non-blank line, in order, blank lines skipped but counted; a bad line is an
    error naming the file and its line number; a missing file raises FileNotFoundError itself."""
    p = tmp_path / "s.jsonl"
    p.write_text('{"id": "a", "x": [1, 2]}\n\n   \n{"id": "b", "x": null}\n')
    assert read_jsonl(p) == [{"id": "a", "x": [1, 2]}, {"id": "b", "x": None}]
    assert [ln for ln, _ in iter_jsonl(p)] == [1, 4]
    (tmp_path / "empty.jsonl").write_text("\n")
    assert read_jsonl(tmp_path / "empty.jsonl") == []
    for body, line, what in [('{"a": 1}\n\n{"a": \n', 3, "malformed JSON"),
                             ('{"a": 1}\n[1, 2]\n', 2, "expected a JSON object, got list"),
                             ('"text"\n', 1, "expected a JSON object, got str")]:
        p.write_text(body)
        with pytest.raises(JSONLError, match=f"^{re.escape(str(p))} line {line}: {what}"):
            read_jsonl(p)
    p.write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(JSONLError, match=f"^{re.escape(str(p))}: not UTF-8 text"):
        read_jsonl(p)
    assert issubclass(JSONLError, ValueError)
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "nope.jsonl")


def test_io_imports_only_the_standard_library_and_numpy():
    tree = ast.parse(IO_PATH.read_text())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mods.add((node.module or "").split(".")[0])
    outside = {m for m in mods if m not in sys.stdlib_module_names and m not in ("numpy", "__future__")}
    assert not outside, f"pa_jax/io.py imports {sorted(outside)}"
