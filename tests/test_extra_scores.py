"""External scores (issue 20, section 3): parsing, validation errors, aggregation vs NumPy."""
import json

import numpy as np
import pytest

from pa_jax.data.extra_scores import load_extra_scores, parse_spec, trajectory_scores
from pa_jax.data.schema import DataError

IDS = ["a", "b", "c"]
STEPS = [2, 3, 1]


def _write(tmp_path, lines, name="x.jsonl"):
    p = tmp_path / name
    p.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return p


def test_load_aligned_and_aggregated(tmp_path):
    rows = [{"id": "c", "score": 0.5, "step_scores": [1.0]}, {"id": "a", "score": 2, "step_scores": [3.0, -1.0]},
            "", {"id": "b", "score": -1.5, "step_scores": [0.0, 4.0, 2.0]}]
    ex = load_extra_scores("rm", _write(tmp_path, rows), IDS, STEPS)
    np.testing.assert_array_equal(ex.score, [2.0, -1.5, 0.5])
    assert [list(s) for s in ex.step_scores] == [[3.0, -1.0], [0.0, 4.0, 2.0], [1.0]]
    t = trajectory_scores(ex, ["mean", "min", "last", "bottom10"])
    np.testing.assert_array_equal(t["rm"], [2.0, -1.5, 0.5])
    np.testing.assert_allclose(t["rm/steps/mean"], [1.0, 2.0, 1.0])
    np.testing.assert_allclose(t["rm/steps/min"], [-1.0, 0.0, 1.0])
    np.testing.assert_allclose(t["rm/steps/last"], [-1.0, 2.0, 1.0])
    np.testing.assert_allclose(t["rm/steps/bottom10"], [-1.0, 0.0, 1.0])
    assert parse_spec("ThinkPRM-7B=/x/y.jsonl") == ("ThinkPRM-7B", "/x/y.jsonl")


@pytest.mark.parametrize("lines,pattern", [
    ([{"id": "a", "score": 1}, '{"id": "b", "score": NaN}', {"id": "c", "score": 1}], r"line 2: field 'score' is not finite"),
    ([{"id": "a", "score": 1}, {"id": "b", "score": 1}, '{"id": "c", "score": Infinity}'], r"line 3: .*not finite"),
    ([{"id": "a", "step_scores": [1, 2]}, {"id": "b", "step_scores": [1, "x", 2]}, {"id": "c", "step_scores": [1]}],
     r"line 2 step 1: field 'step_scores' must be a number"),
    ([{"id": "a", "score": 1}, {"id": "zz", "score": 1}, {"id": "yy", "score": 2}], r"2 ids not in the data: 'zz', 'yy'"),
    ([{"id": "a", "score": 1}], r"no line for 2 trajectories of the data: 'b', 'c'"),
    ([{"id": "a", "score": 1}, {"id": "a", "score": 2}], r"line 2: id 'a' already given on line 1"),
    ([{"id": "a", "score": 1}, {"id": "b", "step_scores": [1, 2, 3]}], r"line 2: gives \['step_scores'\]"),
    ([{"id": "a", "step_scores": [1]}, {"id": "b", "step_scores": [1, 2, 3]}, {"id": "c", "step_scores": [1]}],
     r"line 1: id 'a' has 1 step_scores, the data has 2"),
    (["not json"], r"line 1: malformed JSON"),
    ([{"score": 1}], r"line 1: missing field 'id'"),
    ([{"id": "a"}], r"line 1: needs 'score' and/or 'step_scores'"),
    ([{"id": "a", "score": True}], r"line 1: field 'score' must be a number"),
])
def test_bad_files_name_the_line(tmp_path, lines, pattern):
    p = _write(tmp_path, lines)
    with pytest.raises(DataError, match=pattern) as e:
        load_extra_scores("rm", p, IDS, STEPS)
    assert str(p) in str(e.value)


def test_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="NAME=FILE"):
        parse_spec("just_a_file.jsonl")
    with pytest.raises(ValueError, match="NAME must be"):
        parse_spec("a b=x.jsonl")
    with pytest.raises(DataError, match="no such file"):
        load_extra_scores("rm", tmp_path / "nope.jsonl", IDS, STEPS)
