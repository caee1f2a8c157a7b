"""The scoring engine against a transformers + PyTorch oracle on tiny random llama checkpoints."""
import numpy as np
import pytest
import torch

from pa_jax.data import Message, ToolCall, Trajectory, render
from pa_jax.data.tokenizers import check_tokenizers
from pa_jax.scoring import ScoringOptions, score_rendered
from helpers import CORPUS, save_tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from pa_jax.models import load

    d = tmp_path_factory.mktemp("pair")
    tp = save_tiny_llama(d / "policy", 320, 0)
    tr = save_tiny_llama(d / "reference", 384, 1)  # same tokenizer, a padded (larger) embedding
    tr2 = save_tiny_llama(d / "reference320", 320, 2)
    return {
        "torch": (tp, tr, tr2),
        "policy": load(d / "policy", dtype="float32"),
        "reference": load(d / "reference", dtype="float32"),
        "reference320": load(d / "reference320", dtype="float32"),
    }


def _trajs(n, shared_system):
    """n trajectories; shared_system: True (all share one long system prompt), False (none), "mixed" (all
    but every third)."""
    rng = np.random.default_rng(0)
    words = CORPUS[0].split()
    out = []
    for i in range(n):
        shared = shared_system is True or (shared_system == "mixed" and i % 3 != 0)
        sys = " ".join(words * 3) if shared else " ".join(rng.choice(words, 5 + 7 * i))
        msgs = [Message("system", sys), Message("user", " ".join(rng.choice(words, 3 + i)))]
        for j in range(1 + i % 3):
            msgs.append(Message("assistant", " ".join(rng.choice(words, 2 + 3 * j + i)),
                                (ToolCall("f", {"x": j}),) if j % 2 else ()))
            msgs.append(Message("tool", " ".join(rng.choice(words, 4))))
        out.append(Trajectory(f"t{i}", f"task{i % 2}", tuple(msgs), tuple(m.role == "assistant" for m in msgs),
                              reward=float(i % 2), format="tau2"))
    return out


def _oracle(model, r):
    """Per scored-token statistics from the full-vocabulary log-softmax of a PyTorch forward (batch 1)."""
    with torch.no_grad():
        logits = model(torch.tensor(r.input_ids[None], dtype=torch.long)).logits[0].double()
    lp = torch.log_softmax(logits, -1).numpy()
    q = np.flatnonzero(r.step_ids >= 0)
    q = q[q >= 1]
    rows = lp[q - 1]
    return {
        "logprob": rows[np.arange(len(q)), r.input_ids[q]],
        "entropy": -(np.exp(rows) * rows).sum(-1),
        "mean": rows.mean(-1),
        "topk": -np.sort(-rows, axis=-1)[:, :5],
        "rows": rows,
        "steps": r.step_ids[q],
    }


@pytest.mark.parametrize("shared_system", [True, False, "mixed"])
def test_engine_matches_torch(pair, tok, shared_system):
    rendered = [render(t, tok) for t in _trajs(6, shared_system)]
    # shared system prompt: prefix KV reuse + rows run in 128-token chunks; otherwise packed rows; mixed: the
    # four sharing it in prefixed chunked rows, the two others whole, in batches of their own
    chunk = {True: 128, False: 512, "mixed": 32}[shared_system]
    opts = ScoringOptions(top_k=5, max_batch_tokens=256, min_prefix=16, bucket_lengths=(256, 512), pack_length=512,
                          attention_chunk=chunk)
    from pa_jax.scoring import Engine

    class Counting(Engine):  # counts the prefix's KV computations (once per model when there is a prefix)
        prefix_calls = 0

        def prefix_buffer(self, *a, **k):
            Counting.prefix_calls += 1
            return super().prefix_buffer(*a, **k)

    res = score_rendered(rendered, pair["policy"], pair["reference320"], options=opts, pad_id=2, engine=Counting())
    assert Counting.prefix_calls == (2 if shared_system else 0)
    if shared_system == "mixed":
        assert res.plan.prefix_length >= 16 and res.plan.prefix_members == (1, 2, 4, 5)
        assert {b.prefixed for b in res.plan.batches} == {True, False}
        assert any(b.chunked and not b.prefixed for b in res.plan.batches)  # a whole row in chunks
    elif shared_system:
        # every row runs in 128-token chunks against a KV buffer holding the prefix; some rows take several
        assert res.plan.prefix_length >= 16 and all(b.chunked and b.length % 128 == 0 for b in res.plan.batches)
        assert any(b.length > 128 for b in res.plan.batches)
    else:
        assert res.plan.prefix_length == 0 and any(len(row) > 1 for b in res.plan.batches for row in b.rows)
    assert len(res.plan.batches) > 1
    tp, _, tr2 = pair["torch"]
    for r, s in zip(rendered, res.stats):
        o, orf = _oracle(tp, r), _oracle(tr2, r)
        np.testing.assert_array_equal(s.step_ids, o["steps"])
        np.testing.assert_allclose(s.policy_logprob, o["logprob"], atol=2e-4)
        np.testing.assert_allclose(s.policy_entropy, o["entropy"], atol=2e-4)
        np.testing.assert_allclose(s.policy_mean_logprob, o["mean"], atol=2e-4)
        np.testing.assert_allclose(s.policy_topk, o["topk"], atol=2e-4)
        np.testing.assert_allclose(s.reference_logprob, orf["logprob"], atol=2e-4)
        kl = (np.exp(o["rows"]) * (o["rows"] - orf["rows"])).sum(-1)
        np.testing.assert_allclose(s.kl, kl, atol=2e-4)


@pytest.mark.parametrize("shared_system", [True, False])
def test_concurrent_models_give_identical_statistics(pair, tok, shared_system):
    """Policy and reference forwards in two threads with large allocations mmapped (the defaults) or
    one after the other with the allocator left alone: same bits, and the plan gives every chunked
    batch one KV buffer size (one compiled step program)."""
    rendered = [render(t, tok) for t in _trajs(5, shared_system)]
    kw = dict(top_k=5, max_batch_tokens=256, min_prefix=16, bucket_lengths=(256, 512), attention_chunk=128,
              head_positions=40)
    a = score_rendered(rendered, pair["policy"], pair["reference320"], options=ScoringOptions(**kw), pad_id=2)
    b = score_rendered(rendered, pair["policy"], pair["reference320"],
                       options=ScoringOptions(**kw, concurrent_models=False, mmap_threshold=None), pad_id=2)
    assert len(a.plan.batches) > 1
    assert len({bt.buffer for bt in a.plan.batches if bt.chunked}) <= 1
    for x, y in zip(a.stats, b.stats):
        for f in ("step_ids", "policy_logprob", "policy_entropy", "policy_topk", "reference_logprob", "kl"):
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f))


def test_different_embedding_sizes_same_tokenizer(pair, tok):
    rendered = [render(t, tok) for t in _trajs(3, False)]
    res = score_rendered(rendered, pair["policy"], pair["reference"], options=ScoringOptions(top_k=5, bucket_lengths=(256,)), pad_id=2)
    _, tr, _ = pair["torch"]
    for r, s in zip(rendered, res.stats):
        o = _oracle(tr, r)  # log-softmax over the reference's own 384 rows
        np.testing.assert_allclose(s.reference_logprob, o["logprob"], atol=2e-4)
        assert np.all(np.isnan(s.kl))


def test_interrupted_run_resumes_identically(pair, tok, tmp_path):
    rendered = [render(t, tok) for t in _trajs(6, False)]
    # head blocks of 24 positions span batches, and the resumed run groups them differently
    opts = ScoringOptions(top_k=5, max_batch_tokens=256, pack=False, bucket_lengths=(256,), attention_chunk=128,
                          head_positions=24)
    full = score_rendered(rendered, pair["policy"], pair["reference320"], options=opts, pad_id=2)
    assert len(full.plan.batches) >= 4

    class Stop(Exception):
        pass

    seen = []

    def interrupt(batch, tokens):
        seen.append(batch.index)
        if len(seen) == 2:
            raise Stop

    with pytest.raises(Stop):
        score_rendered(rendered, pair["policy"], pair["reference320"], options=opts, pad_id=2,
                       cache_dir=tmp_path, progress=interrupt)
    res = score_rendered(rendered, pair["policy"], pair["reference320"], options=opts, pad_id=2, cache_dir=tmp_path)
    assert res.batches_from_cache == 2 and res.batches_computed == len(full.plan.batches) - 2
    for a, b in zip(full.stats, res.stats):
        for f in ("step_ids", "policy_logprob", "policy_entropy", "policy_topk", "reference_logprob", "kl"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    again = score_rendered(rendered, pair["policy"], pair["reference320"], options=opts, pad_id=2, cache_dir=tmp_path)
    assert again.batches_computed == 0


def test_tokenizer_mismatch_refused(tok):
    other = tiny_tokenizer(("completely different words here",))
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_tokenizers(tok, other)
    check_tokenizers(tok, tiny_tokenizer(CORPUS))


def test_token_outside_vocab_refused(pair, tok):
    r = render(_trajs(1, False)[0], tok)
    bad = type(r)(r.trajectory_id, r.input_ids.copy(), r.step_ids, r.num_steps, r.truncation)
    bad.input_ids[3] = 999
    with pytest.raises(ValueError, match="outside the model vocabulary"):
        score_rendered([bad], pair["policy"], None)


@pytest.mark.parametrize("field, value", [("head_positions", 0), ("attention_chunk", -512), ("top_k", 2.5),
                                          ("vocab_chunk", None)])
def test_bad_scoring_options_refused(field, value):
    with pytest.raises(ValueError, match=f"ScoringOptions.{field} must be an integer"):
        ScoringOptions(**{field: value})


def test_own_engine_gives_identical_statistics(pair, tok):
    """An Engine of one's own, with no lookahead and a memo so small that programs are evicted and
    rebuilt mid-run, computes the same bits as the default engine."""
    from pa_jax.scoring import Engine

    rendered = [render(t, tok) for t in _trajs(5, True)]
    opts = ScoringOptions(top_k=5, max_batch_tokens=256, min_prefix=16, bucket_lengths=(256, 512), attention_chunk=128,
                          head_positions=40)
    a = score_rendered(rendered, pair["policy"], pair["reference320"], options=opts, pad_id=2)
    with Engine(max_programs=2, lookahead=0) as engine:
        b = score_rendered(rendered, pair["policy"], pair["reference320"], options=opts, pad_id=2, engine=engine)
        assert len(engine._programs) <= 2
    for x, y in zip(a.stats, b.stats):
        for f in ("step_ids", "policy_logprob", "policy_entropy", "policy_topk", "reference_logprob", "kl"):
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f))


def test_engine_memo_executors_and_allocator_option(monkeypatch):
    from concurrent.futures import CancelledError

    from pa_jax.scoring import Engine, SyncExecutor, programs

    engine = Engine(max_programs=2)
    made = []

    def make(k):
        made.append(k)
        return k

    for k in ("a", "b", "a", "c", "a", "b"):  # least recently used is dropped: b (after c), then c
        assert engine.memo(k, lambda k=k: make(k)) == k
    assert made == ["a", "b", "c", "b"] and list(engine._programs) == ["a", "b"]

    ran = []
    ex = SyncExecutor()
    t1, t2, t3 = (ex.submit(lambda i=i: ran.append(i) or i) for i in range(3))
    assert ran == []  # nothing runs before its result is asked for
    assert t2.result() == 1 and t1.result() == 0 and t2.result() == 1 and ran == [1, 0]
    assert t3.cancel() and not t1.cancel()  # a task that ran cannot be cancelled
    with pytest.raises(CancelledError):
        t3.result()
    assert ran == [1, 0]  # a cancelled task never runs

    with engine:
        fut = engine.executor(True).submit(lambda: np.arange(3))
        np.testing.assert_array_equal(fut.result(), np.arange(3))
    assert engine._pool is None and not engine._programs  # closed: threads stopped, programs dropped

    calls = []
    monkeypatch.setattr(programs, "set_mmap_threshold", lambda n: calls.append(n) or True)
    engine.apply_allocator(None)  # None: the allocator is left alone
    engine.apply_allocator(1 << 20)
    engine.apply_allocator(1 << 20)  # already applied by this engine
    engine.apply_allocator(1 << 21)
    assert calls == [1 << 20, 1 << 21] and engine.mmap_threshold == 1 << 21
