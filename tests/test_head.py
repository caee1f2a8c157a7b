"""pa_jax.head against a full-vocabulary log_softmax written here in NumPy (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pa_jax.head import (
    HeadStats,
    head_statistics,
    head_statistics_at,
    paired_head_statistics,
    paired_head_statistics_at,
)

ATOL = 2e-6


def np_log_softmax(hidden, unembedding, softcap=None):
    logits = np.asarray(hidden, np.float64) @ np.asarray(unembedding, np.float64).T
    if softcap is not None:
        logits = softcap * np.tanh(logits / softcap)
    mx = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - mx).sum(-1, keepdims=True)) + mx
    return logits - lse, lse[..., 0]


def np_stats(hidden, unembedding, targets, softcap, k):
    lp, lse = np_log_softmax(hidden, unembedding, softcap)
    order = np.argsort(-lp, axis=-1, kind="stable")[..., :k]
    return dict(
        target_logprob=np.take_along_axis(lp, targets[..., None], -1)[..., 0],
        logsumexp=lse,
        entropy=-(np.exp(lp) * lp).sum(-1),
        topk_logprobs=np.take_along_axis(lp, order, -1),
        topk_ids=order,
        mean_logprob=lp.mean(-1),
    ), lp


def make(rng, lead, d, v, scale=0.4):
    hidden = rng.normal(size=lead + (d,)).astype(np.float32)
    unemb = (scale * rng.normal(size=(v, d)) / np.sqrt(d) * 3).astype(np.float32)
    targets = rng.integers(0, v, size=lead).astype(np.int32)
    return hidden, unemb, targets


def assert_stats(stats: HeadStats, ref: dict, atol=ATOL):
    for name in ("target_logprob", "logsumexp", "entropy", "topk_logprobs", "mean_logprob"):
        got = np.asarray(getattr(stats, name))
        assert got.dtype == np.float32, name
        np.testing.assert_allclose(got, ref[name], rtol=0, atol=atol, err_msg=name)
    np.testing.assert_array_equal(np.asarray(stats.topk_ids), ref["topk_ids"])
    assert stats.topk_ids.dtype == jnp.int32


# V = 1000 with vocab_chunk = 96: 10 full chunks + a tail of 40 (not a multiple); token_block = 16
# over B*T = 2*19 = 38 tokens: the last block is padded.
@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("lead", [(2, 19), (38,)])
def test_matches_full_log_softmax(softcap, lead):
    rng = np.random.default_rng(0)
    hidden, unemb, targets = make(rng, lead, 32, 1000)
    stats = head_statistics(hidden, unemb, targets, softcap=softcap, top_k=20, vocab_chunk=96, token_block=16)
    ref, _ = np_stats(hidden, unemb, targets, softcap, 20)
    assert stats.target_logprob.shape == lead and stats.topk_ids.shape == lead + (20,)
    assert_stats(stats, ref)


def test_default_chunks_and_single_chunk():
    """Default chunk sizes (V < vocab_chunk: one static chunk) and top_k larger than the tail."""
    rng = np.random.default_rng(1)
    hidden, unemb, targets = make(rng, (3, 5), 16, 300)
    ref, _ = np_stats(hidden, unemb, targets, None, 20)
    assert_stats(head_statistics(hidden, unemb, targets), ref)
    # vocab_chunk=64 -> tail of 44 < ... and chunk smaller than top_k=70
    ref70, _ = np_stats(hidden, unemb, targets, None, 70)
    assert_stats(head_statistics(hidden, unemb, targets, top_k=70, vocab_chunk=64, token_block=4), ref70)


def test_top_k_zero_and_full_vocab():
    rng = np.random.default_rng(2)
    hidden, unemb, targets = make(rng, (7,), 8, 50)
    s0 = head_statistics(hidden, unemb, targets, top_k=0, vocab_chunk=16)
    assert s0.topk_ids.shape == (7, 0)
    ref, _ = np_stats(hidden, unemb, targets, None, 50)
    assert_stats(head_statistics(hidden, unemb, targets, top_k=50, vocab_chunk=16), ref)
    # top_k > V (e.g. the default 20 on a tiny toy vocabulary) returns all V, sorted
    assert_stats(head_statistics(hidden, unemb, targets, top_k=64, vocab_chunk=16), ref)


def test_inside_jit_and_bf16():
    rng = np.random.default_rng(3)
    hidden, unemb, targets = make(rng, (2, 9), 32, 777)
    hb = jnp.asarray(hidden, jnp.bfloat16)
    wb = jnp.asarray(unemb, jnp.bfloat16)
    f = jax.jit(lambda h, w, t: head_statistics(h, w, t, softcap=4.0, vocab_chunk=128, token_block=8))
    stats = f(hb, wb, targets)
    # oracle on the bf16-rounded inputs: products of bf16 numbers are exact in float32, so only the
    # float32 accumulation differs from float64.
    ref, _ = np_stats(np.asarray(hb, np.float32), np.asarray(wb, np.float32), targets, 4.0, 20)
    assert_stats(stats, ref, atol=1e-5)


@pytest.mark.parametrize("caps", [(None, None), (3.0, 5.0)])
def test_paired_kl(caps):
    rng = np.random.default_rng(4)
    ph, pw, targets = make(rng, (2, 11), 24, 1000)
    # the reference: a perturbed copy (a realistic small KL) with a different width D
    rh = np.concatenate([ph, rng.normal(size=ph.shape[:-1] + (8,)).astype(np.float32)], -1)
    rw = np.concatenate([pw + 0.05 * rng.normal(size=pw.shape), 0.1 * rng.normal(size=(1000, 8))], -1)
    rw = rw.astype(np.float32)
    p, q, kl = paired_head_statistics(
        ph, pw, rh, rw, targets, policy_softcap=caps[0], reference_softcap=caps[1], vocab_chunk=96, token_block=8
    )
    pref, lp = np_stats(ph, pw, targets, caps[0], 20)
    qref, lq = np_stats(rh, rw, targets, caps[1], 20)
    assert_stats(p, pref)
    assert_stats(q, qref)
    kl_ref = (np.exp(lp) * (lp - lq)).sum(-1)
    assert kl.shape == targets.shape
    np.testing.assert_allclose(np.asarray(kl), kl_ref, rtol=1e-6, atol=ATOL)


def test_paired_kl_far_apart_and_zero():
    rng = np.random.default_rng(5)
    ph, pw, targets = make(rng, (13,), 16, 500, scale=1.0)
    rh, rw, _ = make(rng, (13,), 16, 500, scale=1.0)
    _, _, kl = paired_head_statistics(ph, pw, rh, rw, targets, vocab_chunk=64)
    _, lp = np_stats(ph, pw, targets, None, 1)
    _, lq = np_stats(rh, rw, targets, None, 1)
    np.testing.assert_allclose(np.asarray(kl), (np.exp(lp) * (lp - lq)).sum(-1), rtol=1e-6, atol=ATOL)
    _, _, kl0 = paired_head_statistics(ph, pw, ph, pw, targets, vocab_chunk=64)
    np.testing.assert_allclose(np.asarray(kl0), 0.0, atol=ATOL)


def test_at_positions():
    rng = np.random.default_rng(6)
    hidden, unemb, targets = make(rng, (2, 10), 16, 200)
    rh, rw, _ = make(rng, (2, 10), 16, 200)
    positions = np.array([[0, 3, 9], [5, 5, 1]], np.int32)
    ref, _ = np_stats(np.take_along_axis(hidden, positions[..., None], 1), unemb,
                      np.take_along_axis(targets, positions, 1), None, 5)
    assert_stats(head_statistics_at(hidden, unemb, targets, positions, top_k=5, vocab_chunk=64), ref)
    p, q, kl = paired_head_statistics_at(hidden, unemb, rh, rw, targets, positions, top_k=5, vocab_chunk=64)
    assert_stats(p, ref)
    full_kl = paired_head_statistics(hidden, unemb, rh, rw, targets, top_k=5, vocab_chunk=64)[2]
    np.testing.assert_allclose(np.asarray(kl), np.take_along_axis(np.asarray(full_kl), positions, 1), atol=ATOL)


def test_memory_never_builds_tokens_by_vocab():
    """T=2048, V=151,936, D=64: compiled temporary memory < 10% of one [T, V] float32 array."""
    t, v, d = 2048, 151_936, 64
    args = (
        jax.ShapeDtypeStruct((1, t, d), jnp.float32),
        jax.ShapeDtypeStruct((v, d), jnp.float32),
        jax.ShapeDtypeStruct((1, t), jnp.int32),
    )
    compiled = jax.jit(lambda h, w, y: head_statistics(h, w, y)).lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 0.1 * t * v * 4, temp
    paired = jax.jit(lambda h, w, y: paired_head_statistics(h, w, h, w, y)).lower(*args).compile()
    assert paired.memory_analysis().temp_size_in_bytes < 0.1 * t * v * 4


def test_bad_input():
    rng = np.random.default_rng(7)
    hidden, unemb, targets = make(rng, (2, 4), 8, 30)
    with pytest.raises(ValueError, match="unembedding"):
        head_statistics(hidden, unemb[:, :4], targets)
    with pytest.raises(ValueError, match="unembedding"):
        head_statistics(hidden, unemb[None], targets)
    with pytest.raises(ValueError, match="hidden"):
        head_statistics(hidden[:, :3], unemb, targets)
    with pytest.raises(ValueError, match="targets"):
        head_statistics(hidden, unemb, targets.astype(np.float32))
    with pytest.raises(ValueError, match="targets"):
        head_statistics(hidden, unemb, np.full((2, 4), 30))
    with pytest.raises(ValueError, match="targets"):
        head_statistics(hidden, unemb, np.full((2, 4), -1))
    with pytest.raises(ValueError, match="top_k"):
        head_statistics(hidden, unemb, targets, top_k=-1)
    with pytest.raises(ValueError, match="vocab_chunk"):
        head_statistics(hidden, unemb, targets, vocab_chunk=0)
    with pytest.raises(ValueError, match="softcap"):
        head_statistics(hidden, unemb, targets, softcap=-1.0)
    with pytest.raises(ValueError, match="reference_unembedding"):
        paired_head_statistics(hidden, unemb, hidden, unemb[:20], targets)
    with pytest.raises(ValueError, match="positions"):
        head_statistics_at(hidden, unemb, targets, np.array([[0], [4]]))
