"""The per-token cache verifies what it reads (issue 18): checksums, shapes and dtypes per batch, and the plan.

A batch that does not verify (edited, shortened, truncated, swapped, missing) or an index that cannot be used
(invalid JSON, wrong structure, an earlier format without checksums) is recomputed, never used, and the repair
is recorded. The oracle for "recomputed" is a fresh, uncached ``score_rendered`` of the same inputs (bitwise
equal); the oracle for a checksum is ``hashlib.sha256`` of the array's bytes computed here.
"""
import hashlib
import json

import numpy as np
import pytest

from pa_jax.data import Message, Trajectory, render
from pa_jax.scoring import ScoringOptions, score_rendered
from pa_jax.scoring.cache import INDEX, BatchCache, save_batch, verify_batch
from helpers import CORPUS, save_tiny_llama, tiny_tokenizer

FIELDS = ("step_ids", "policy_logprob", "policy_entropy", "policy_mean_logprob", "policy_topk",
          "reference_logprob", "reference_entropy", "kl")
# one trajectory a batch (no packing, small batches): several batch files to corrupt one of
OPTS = ScoringOptions(top_k=3, max_batch_tokens=64, pack=False, bucket_lengths=(64,), attention_chunk=64,
                      head_positions=16)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pa_jax.models import load

    d = tmp_path_factory.mktemp("pair")
    save_tiny_llama(d / "policy", 320, 0)
    save_tiny_llama(d / "reference", 320, 1)
    tok = tiny_tokenizer(CORPUS)
    rng = np.random.default_rng(0)
    words = CORPUS[0].split()
    trajs = []
    for i in range(3):
        msgs = (Message("user", " ".join(rng.choice(words, 4 + i))), Message("assistant", " ".join(rng.choice(words, 5))),
                Message("tool", " ".join(rng.choice(words, 3))), Message("assistant", " ".join(rng.choice(words, 2 + i))))
        trajs.append(Trajectory(f"t{i}", "task", msgs, tuple(m.role == "assistant" for m in msgs), reward=1.0,
                                format="tau2"))
    rendered = [render(t, tok) for t in trajs]
    models = (load(d / "policy", dtype="float32"), load(d / "reference", dtype="float32"))
    fresh = score_rendered(rendered, *models, options=OPTS, pad_id=2)  # the oracle: no cache at all
    assert len(fresh.plan.batches) >= 3
    return rendered, models, fresh


def _score(setup, cache):
    rendered, models, _ = setup
    return score_rendered(rendered, *models, options=OPTS, pad_id=2, cache_dir=cache)


def _assert_same(a, b):
    for x, y in zip(a.stats, b.stats):
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f), err_msg=f)


def _filled(setup, tmp_path):
    """A cache filled by a first run; its key directory."""
    first = _score(setup, tmp_path)
    assert first.batches_computed == len(first.plan.batches) and not first.cache_repairs
    (key_dir,) = tmp_path.iterdir()
    return key_dir


def _rewrite(path, edit):
    z = dict(np.load(path))
    edit(z)
    with open(path, "wb") as f:
        np.savez(f, **z)


def _rerun_repairs(setup, tmp_path, n_repaired=1):
    """Rerun over the cache: the result equals the fresh one; ``n_repaired`` batches recomputed; a third run
    takes everything from the (repaired) cache."""
    res = _score(setup, tmp_path)
    _assert_same(res, setup[2])
    assert res.batches_computed == n_repaired and len(res.cache_repairs) >= 1
    again = _score(setup, tmp_path)
    assert again.batches_computed == 0 and again.cache_repairs == []
    _assert_same(again, setup[2])
    return res.cache_repairs


# ---------------------------------------------------------------------------------------------- checksums
def test_checksum_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    topk = rng.normal(size=(5, 6)).astype(np.float32)
    stats = {0: {"policy_logprob": np.array([-1.5, np.nan, np.inf, -0.0], np.float32),
                 "policy_topk": topk[:, ::2],  # not contiguous: recorded in C order
                 "step_ids": np.arange(4, dtype=np.int32)},
             7: {"policy_logprob": np.zeros(0, np.float32), "step_ids": np.zeros(0, np.int32)}}
    rec = save_batch(tmp_path / "b.npz", stats)
    for i, d in stats.items():
        for k, a in d.items():
            c = np.ascontiguousarray(a)
            assert rec[f"{i}/{k}"] == {"shape": list(a.shape), "dtype": a.dtype.str,
                                       "sha256": hashlib.sha256(c.data.tobytes()).hexdigest()}
    got, why = verify_batch(tmp_path / "b.npz", json.loads(json.dumps(rec)))  # through JSON, as in index.json
    assert why is None and set(got) == {0, 7}
    for i, d in stats.items():
        for k, a in d.items():
            assert got[i][k].dtype == a.dtype
            np.testing.assert_array_equal(got[i][k], a)
    # the same through BatchCache: save, reopen (index read back from disk), load
    r = [type("R", (), {"trajectory_id": "x", "input_ids": np.arange(3), "step_ids": np.array([-1, 0, 0])})()]
    c = BatchCache.open(tmp_path / "c", r, {"m": 1}, num_batches=2)
    c.save(1, stats)
    c2 = BatchCache.open(tmp_path / "c", r, {"m": 1}, num_batches=2)
    assert c2.load(0) is None and c2.repairs == []
    got = c2.load(1)
    np.testing.assert_array_equal(got[0]["policy_topk"], topk[:, ::2])
    assert c2.repairs == []


def test_flipped_byte_in_npz_is_caught(tmp_path):
    a = np.linspace(-3, 0, 64, dtype=np.float32)
    rec = save_batch(tmp_path / "b.npz", {0: {"policy_logprob": a}})
    raw = bytearray((tmp_path / "b.npz").read_bytes())
    at = bytes(raw).find(a[10:12].tobytes())
    raw[at] ^= 0x01
    (tmp_path / "b.npz").write_bytes(bytes(raw))
    got, why = verify_batch(tmp_path / "b.npz", rec)
    assert got is None and why is not None  # the zip CRC or the SHA-256: either way not used


# ---------------------------------------------------------------------------------------------- batches
def test_edited_array_recomputed_equal_to_fresh(setup, tmp_path):
    key_dir = _filled(setup, tmp_path)
    f = key_dir / "batch_00001.npz"
    _rewrite(f, lambda z: z.update({k: v + np.float32(0.5) for k, v in z.items() if k.endswith("/reference_logprob")}))
    (rep,) = _rerun_repairs(setup, tmp_path)
    assert rep["file"] == str(f) and rep["batch"] == 1 and rep["action"] == "recomputed"
    assert "reference_logprob" in rep["reason"] and "SHA-256" in rep["reason"]


def test_shortened_array_recomputed_not_zero_padded(setup, tmp_path):
    key_dir = _filled(setup, tmp_path)
    f = key_dir / "batch_00002.npz"
    _rewrite(f, lambda z: z.update({k: v[:-1] for k, v in z.items() if k.endswith("/policy_logprob")}))
    (rep,) = _rerun_repairs(setup, tmp_path)
    assert rep["file"] == str(f) and "shape" in rep["reason"]
    fresh = setup[2]
    traj = next(i for i in fresh.plan.batches[2].rows[0])
    assert fresh.stats[traj].policy_logprob[-1] != 0.0  # what zero-padding would have put there


def test_shortened_array_with_matching_index_caught_by_the_plan(setup, tmp_path):
    """An index edited along with the file (or a batch file and entry from another plan) still does not pass:
    the arrays must have one row per scored token of the trajectories the plan puts in the batch."""
    key_dir = _filled(setup, tmp_path)
    index = json.loads((key_dir / INDEX).read_text())
    index["done"]["0"], index["done"]["1"] = index["done"]["1"], index["done"]["0"]  # swapped entries
    (key_dir / INDEX).write_text(json.dumps(index))
    reps = _rerun_repairs(setup, tmp_path, n_repaired=2)
    assert [r["batch"] for r in reps] == [0, 1] and all("the plan puts" in r["reason"] for r in reps)


@pytest.mark.parametrize("keep", [0.0, 0.3, 0.9, 0.995])
def test_truncated_npz_recomputed(setup, tmp_path, keep):
    key_dir = _filled(setup, tmp_path)
    f = key_dir / "batch_00000.npz"
    b = f.read_bytes()
    f.write_bytes(b[: int(len(b) * keep)])
    (rep,) = _rerun_repairs(setup, tmp_path)
    assert rep["file"] == str(f) and "not a readable .npz file" in rep["reason"]


def test_missing_npz_recomputed(setup, tmp_path):
    key_dir = _filled(setup, tmp_path)
    (key_dir / "batch_00001.npz").unlink()
    (rep,) = _rerun_repairs(setup, tmp_path)
    assert rep["batch"] == 1 and rep["reason"].startswith("missing")


# ---------------------------------------------------------------------------------------------- index
def _old_format(index):
    return {k: v for k, v in index.items() if k != "format"} | {"done": {i: e["file"] for i, e in index["done"].items()}}


@pytest.mark.parametrize("corrupt, reason", [
    (lambda s: s[: len(s) // 2], "not valid JSON"),
    (lambda s: b"\xff\xfe garbage", "not valid JSON"),
    (lambda s: b"[]", "a JSON list, expected an object"),
    (lambda s: json.dumps(json.loads(s) | {"done": []}).encode(), "field 'done' missing or not a dict"),
    (lambda s: json.dumps(json.loads(s) | {"key": "0" * 24}).encode(), "written for cache key"),
    (lambda s: json.dumps(json.loads(s) | {"trajectory_ids": ["a"]}).encode(), "other trajectories"),
    (lambda s: json.dumps(_old_format(json.loads(s))).encode(), "earlier pa-jax without checksums"),
], ids=["truncated", "not_utf8", "list", "done_not_dict", "other_key", "other_trajectories", "format_1"])
def test_corrupted_index_starts_afresh(setup, tmp_path, corrupt, reason):
    key_dir = _filled(setup, tmp_path)
    idx = key_dir / INDEX
    idx.write_bytes(corrupt(idx.read_bytes()))
    n = len(setup[2].plan.batches)
    (rep,) = _rerun_repairs(setup, tmp_path, n_repaired=n)
    assert rep["file"] == str(idx) and rep["batch"] is None and reason in rep["reason"]
    assert rep["action"] == f"the cache of this key starts afresh ({n} batch(es) to compute)"


def test_malformed_index_entry_recomputes_that_batch(setup, tmp_path):
    key_dir = _filled(setup, tmp_path)
    index = json.loads((key_dir / INDEX).read_text())
    index["done"]["2"] = {"file": "../../elsewhere.npz", "arrays": {}}
    (key_dir / INDEX).write_text(json.dumps(index))
    (rep,) = _rerun_repairs(setup, tmp_path)
    assert rep["batch"] == 2 and "not a .npz file of the cache directory" in rep["reason"]
