"""Blocked (flash-style) attention against a NumPy oracle, and the in-place KV-buffer forward mode.

The oracle is written here from the mask rule of ``pa_jax.models.layers.attention_mask``: key k is visible
to query q iff k <= q (sequence indices, queries offset by a cached prefix), k is valid, q and k share a
segment, and q_pos - k_pos < window; plus k == q, so that no row is empty. Blocked attention is held to it
at the valid queries only: it skips the key blocks that only padding queries would need.
"""
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from pa_jax.models import layers as L


def numpy_attention(q, k, v, *, offset, valid, q_pos, k_pos, q_seg, k_seg, window, scale, softcap):
    b, t, n, hd = q.shape
    kh = k.shape[2]
    out = np.zeros((b, t, n, hd))
    for bi in range(b):
        for h in range(n):
            kk, vv = k[bi, :, h // (n // kh)].astype(np.float64), v[bi, :, h // (n // kh)].astype(np.float64)
            for i in range(t):
                qi = offset + i
                x = kk @ q[bi, i, h].astype(np.float64) * scale
                if softcap is not None:
                    x = softcap * np.tanh(x / softcap)
                ks = np.arange(k.shape[1])
                vis = (ks <= qi) & valid[bi]
                if q_seg is not None:
                    vis &= k_seg[bi] == q_seg[bi, i]
                if window is not None:
                    vis &= (q_pos[bi, i] - k_pos[bi]) < window
                vis |= ks == qi
                x = np.where(vis, x, -np.inf)
                p = np.exp(x - x.max())
                out[bi, i, h] = (p / p.sum()) @ vv
    return out


@settings(max_examples=20)
@given(
    b=st.integers(1, 2), prefix=st.integers(0, 9), t=st.integers(1, 40), kh=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 3]), window=st.sampled_from([None, 3, 11]), segments=st.booleans(),
    softcap=st.sampled_from([None, 4.0]), block_q=st.sampled_from([4, 8, 256]), block_k=st.sampled_from([4, 16, 512]),
    seed=st.integers(0, 2**16),
)
def test_blocked_attention_matches_numpy(b, prefix, t, kh, groups, window, segments, softcap, block_q, block_k, seed):
    rng = np.random.default_rng(seed)
    s, n, hd = prefix + t, kh * groups, 4
    q = rng.standard_normal((b, t, n, hd)).astype(np.float32)
    k = rng.standard_normal((b, s, kh, hd)).astype(np.float32)
    v = rng.standard_normal((b, s, kh, hd)).astype(np.float32)
    valid = rng.random((b, s)) > 0.25
    pos = np.maximum(np.cumsum(valid, 1) - 1, 0)
    segs = (np.cumsum(rng.random((b, s)) < 0.15, 1) if segments else None)
    args = dict(offset=prefix, valid=valid, q_pos=pos[:, prefix:], k_pos=pos, window=window, scale=0.5, softcap=softcap,
                q_seg=None if segs is None else segs[:, prefix:], k_seg=segs)
    want = numpy_attention(q, k, v, **args)
    spec = L.MaskSpec(prefix, jnp.asarray(valid), jnp.asarray(pos[:, prefix:]), jnp.asarray(pos),
                      None if segs is None else jnp.asarray(segs[:, prefix:]), None if segs is None else jnp.asarray(segs),
                      window)
    got = L.blocked_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), spec, scale=0.5, softcap=softcap,
                              block_q=block_q, block_k=block_k)
    q_valid = valid[:, prefix:]  # blocked attention leaves padding queries unspecified (it skips their blocks)
    np.testing.assert_allclose(np.asarray(got)[q_valid], want[q_valid], atol=2e-5)
    assert np.isfinite(np.asarray(got)).all()
    dense = L.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), spec.dense(), scale=0.5, softcap=softcap)
    np.testing.assert_allclose(np.asarray(dense), want, atol=2e-5)


@settings(max_examples=15)
@given(b=st.integers(1, 2), prefix=st.integers(0, 20), t=st.integers(1, 48), groups=st.sampled_from([1, 3]),
       block_q=st.sampled_from([4, 8, 16]), block_k=st.sampled_from([4, 8]), pad=st.floats(0.0, 0.6),
       seed=st.integers(0, 2**16))
def test_blocked_attention_unmasked_blocks_match_numpy(b, prefix, t, groups, block_q, block_k, pad, seed):
    """Without segments or a window, the key blocks wholly before a query block are visited with only the padding
    bias (no causal mask): small blocks, a cached prefix and random padding put many queries on that path."""
    rng = np.random.default_rng(seed)
    s, kh, hd = prefix + t, 1, 4
    n = kh * groups
    q = rng.standard_normal((b, t, n, hd)).astype(np.float32)
    k = rng.standard_normal((b, s, kh, hd)).astype(np.float32)
    v = rng.standard_normal((b, s, kh, hd)).astype(np.float32)
    valid = rng.random((b, s)) >= pad
    pos = np.maximum(np.cumsum(valid, 1) - 1, 0)
    want = numpy_attention(q, k, v, offset=prefix, valid=valid, q_pos=pos[:, prefix:], k_pos=pos, q_seg=None,
                           k_seg=None, window=None, scale=0.7, softcap=None)
    spec = L.MaskSpec(prefix, jnp.asarray(valid), jnp.asarray(pos[:, prefix:]), jnp.asarray(pos))
    got = np.asarray(L.blocked_attention(*map(jnp.asarray, (q, k, v)), spec, scale=0.7, block_q=block_q,
                                         block_k=block_k))
    q_valid = valid[:, prefix:]
    np.testing.assert_allclose(got[q_valid], want[q_valid], atol=2e-5)
    assert np.isfinite(got).all()


def test_blocked_attention_bf16_close_to_f32():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 300, 4, 16)).astype(np.float32) for _ in range(3))
    k, v = k[:, :, :2], v[:, :, :2]
    pos = np.arange(300)[None]
    spec = L.MaskSpec(0, jnp.ones((1, 300), bool), jnp.asarray(pos), jnp.asarray(pos))
    f32 = L.blocked_attention(*map(jnp.asarray, (q, k, v)), spec, scale=0.25, block_q=64, block_k=128)
    bf = L.blocked_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), spec, scale=0.25, block_q=64, block_k=128)
    assert bf.dtype == jnp.bfloat16
    assert float(jnp.abs(bf.astype(jnp.float32) - f32).max()) < 0.05


def test_blocked_attention_skips_padding_query_blocks():
    """A query block holding only padding visits no key block (output zero); valid queries are unaffected."""
    rng = np.random.default_rng(1)
    b, t, n, hd = 2, 12, 2, 4
    q, k, v = (rng.standard_normal((b, t, n, hd)).astype(np.float32) for _ in range(3))
    valid = np.ones((b, t), bool)
    valid[:, 8:] = False  # the last query block (block_q 4) is padding in both rows
    valid[1, 5:8] = False  # a partly padded block
    pos = np.arange(t)[None].repeat(b, 0)
    spec = L.MaskSpec(0, jnp.asarray(valid), jnp.asarray(pos), jnp.asarray(pos))
    got = np.asarray(L.blocked_attention(*map(jnp.asarray, (q, k, v)), spec, scale=0.5, block_q=4, block_k=4))
    dense = np.asarray(L.attention(*map(jnp.asarray, (q, k, v)), spec.dense(), scale=0.5))
    np.testing.assert_allclose(got[valid], dense[valid], atol=2e-5)
    assert (got[:, 8:] == 0).all()


def test_blocked_attention_recovers_from_overflowing_scores():
    """Scores far above a query's score against itself (here up to 400 nats) overflow the self-stabilized
    float32 sums; those rows are recomputed with raised stabilizers and still match the oracle."""
    rng = np.random.default_rng(2)
    b, t, n, hd = 1, 24, 2, 4
    q = rng.standard_normal((b, t, n, hd)).astype(np.float32)
    k = rng.standard_normal((b, t, 1, hd)).astype(np.float32)
    v = rng.standard_normal((b, t, 1, hd)).astype(np.float32)
    scale = 0.5
    u = q[0, 5, 0] / np.linalg.norm(q[0, 5, 0])

    def max_gap(c):  # largest score of key 0 = c u above a query's own score (queries 1.., which see key 0)
        kk = k[0, :, 0].copy()
        kk[0] = c * u
        x = np.einsum("qhd,kd->hqk", q[0], kk) * scale
        return (x[:, 1:, 0] - np.diagonal(x, axis1=1, axis2=2)[:, 1:]).max()

    lo, hi = 0.0, 1e4  # bisect c for a gap of 400 nats (the gap grows with c)
    for _ in range(60):
        lo, hi = ((lo + hi) / 2, hi) if max_gap((lo + hi) / 2) < 400 else (lo, (lo + hi) / 2)
    k[0, 0, 0] = lo * u
    assert 399 < max_gap(lo) < 401
    valid = np.ones((b, t), bool)
    pos = np.arange(t)[None]
    want = numpy_attention(q, k, v, offset=0, valid=valid, q_pos=pos, k_pos=pos, q_seg=None, k_seg=None,
                           window=None, scale=scale, softcap=None)
    spec = L.MaskSpec(0, jnp.asarray(valid), jnp.asarray(pos), jnp.asarray(pos))
    got = np.asarray(L.blocked_attention(*map(jnp.asarray, (q, k, v)), spec, scale=scale, block_q=8, block_k=8))
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_blocked_attention_gradient_matches_dense():
    """The gradient (that of the online-softmax form) equals dense attention's at the valid queries."""
    import jax

    rng = np.random.default_rng(3)
    b, prefix, t, n, hd = 2, 3, 13, 4, 8
    s = prefix + t
    q = jnp.asarray(rng.standard_normal((b, t, n, hd)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, s, 2, hd)), jnp.float32) for _ in range(2))
    valid = np.ones((b, s), bool)
    valid[1, -4:] = False  # padding queries (and keys) at the end of row 1
    valid[0, 1] = False  # an invalid prefix key
    pos = np.maximum(np.cumsum(valid, 1) - 1, 0)
    spec = L.MaskSpec(prefix, jnp.asarray(valid), jnp.asarray(pos[:, prefix:]), jnp.asarray(pos))
    w = jnp.asarray(rng.standard_normal((b, t, n, hd)), jnp.float32) * jnp.asarray(valid[:, prefix:])[:, :, None, None]

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v) * w).sum()

    blocked = jax.grad(loss(lambda q, k, v: L.blocked_attention(q, k, v, spec, scale=0.3, block_q=4, block_k=8)),
                       argnums=(0, 1, 2))(q, k, v)
    dense = jax.grad(loss(lambda q, k, v: L.attention(q, k, v, spec.dense(), scale=0.3)), argnums=(0, 1, 2))(q, k, v)
    for a, d in zip(blocked, dense):
        np.testing.assert_allclose(np.asarray(a), np.asarray(d), atol=2e-5)
