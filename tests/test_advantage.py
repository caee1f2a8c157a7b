"""pa_jax.advantage against a per-trajectory NumPy loop (float64; shared ones in tests/helpers.py)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pa_jax.advantage import (
    STEP_AGGS,
    TOKEN_AGGS,
    aggregate_all,
    all_trajectory_scores,
    k_step_advantage,
    running_advantage,
    step_advantages,
    step_values,
    trajectory_scores,
)
from helpers import np_step_agg, np_token_agg, np_value_scores

B, T, S = 4, 48, 8  # one padded shape for every hypothesis example: compiled once per order
TOL = dict(rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# the oracle: a plain reading of the method, one trajectory at a time


def np_step_advantages(p, r, sid, n, token_agg, beta, order):
    out = []
    for s in range(n):
        idx = np.nonzero(sid == s)[0]
        ps, rs = p[idx].astype(np.float64), r[idx].astype(np.float64)
        if order == "per_model":
            out.append(beta * (np_token_agg(ps, token_agg) - np_token_agg(rs, token_agg)))
        else:
            out.append(beta * np_token_agg(ps - rs, token_agg))
    return out


def np_scores(p, r, sid, ns, token_agg, step_agg, beta, order):
    return np.array(
        [np_step_agg(np_step_advantages(p[b], r[b], sid[b], ns[b], token_agg, beta, order), step_agg)
         for b in range(len(ns))]
    )


# ----------------------------------------------------------------------------------------------
# random ragged batches in one padded shape


@st.composite
def batches(draw, bsz=B, tlen=T, smax=S, max_len=5):
    sid = np.full((bsz, tlen), -1, np.int32)
    ns = np.zeros(bsz, np.int32)
    for b in range(bsz):
        n = draw(st.integers(0, smax))
        lens = draw(st.lists(st.integers(0, max_len), min_size=n, max_size=n))
        gaps = draw(st.lists(st.integers(0, 3), min_size=n + 1, max_size=n + 1))
        t = gaps[0]
        for s in range(n):
            length = max(0, min(lens[s], tlen - t))  # running past T truncates: empty steps
            sid[b, t : t + length] = s
            t = min(tlen, t + length + gaps[s + 1])
        ns[b] = n
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    p = rng.uniform(-8, 0, (bsz, tlen)).astype(np.float32)
    r = (p + rng.normal(0, 1, (bsz, tlen))).astype(np.float32)
    if draw(st.booleans()):  # coarse values: ties inside steps and across steps
        p, r = np.round(p), np.round(r)
    return p, r, sid, ns


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["per_model", "token_level"])
@settings(max_examples=20)
@given(data=batches(), beta=st.floats(0.05, 5.0))
def test_all_combinations_match_numpy(order, data, beta):
    p, r, sid, ns = data
    table = all_trajectory_scores(p, r, sid, ns, beta=beta, order=order, max_steps=S)
    assert set(table) == {(t, s) for t in TOKEN_AGGS for s in STEP_AGGS}
    for (t, s), got in table.items():
        assert got.shape == (B,)
        np.testing.assert_allclose(np.asarray(got), np_scores(p, r, sid, ns, t, s, beta, order), **TOL,
                                   err_msg=f"{order} {t} {s}")


@settings(max_examples=15)
@given(data=batches(), k=st.integers(1, 5), token_agg=st.sampled_from(TOKEN_AGGS))
def test_step_outputs_match_numpy(data, k, token_agg):
    p, r, sid, ns = data
    adv, mask = step_advantages(p, r, sid, ns, token_agg=token_agg, beta=0.5, max_steps=S)
    run = running_advantage(adv, mask)
    kadv = k_step_advantage(adv, mask, k)
    assert adv.shape == mask.shape == (B, S)
    for b in range(B):
        ref = np_step_advantages(p[b], r[b], sid[b], ns[b], token_agg, 0.5, "per_model")
        n = ns[b]
        np.testing.assert_array_equal(np.asarray(mask[b]), np.arange(S) < n)
        np.testing.assert_allclose(np.asarray(adv[b, :n]), ref, **TOL)
        np.testing.assert_allclose(np.asarray(adv[b, n:]), 0.0)
        np.testing.assert_allclose(np.asarray(run[b, :n]), np.cumsum(ref), **TOL)
        np.testing.assert_allclose(np.asarray(kadv[b, :n]), [sum(ref[s : s + k]) for s in range(n)], **TOL)
        np.testing.assert_allclose(np.asarray(kadv[b, n:]), 0.0)


@pytest.mark.parametrize("empty", ["zero", "skip"])
@settings(max_examples=10)
@given(data=batches())
def test_value_aggregation_empty_rules(empty, data):
    v, _, sid, ns = data
    table = aggregate_all(v, sid, ns, empty=empty, max_steps=S)
    for (t, s), got in table.items():
        np.testing.assert_allclose(np.asarray(got), np_value_scores(v, sid, ns, t, s, empty), **TOL)
    sv, mask = step_values(v, sid, ns, token_agg="sum", empty=empty, max_steps=S)
    for b in range(B):
        counts = np.array([(sid[b] == s).sum() for s in range(S)])
        expect = (np.arange(S) < ns[b]) & ((counts > 0) if empty == "skip" else True)
        np.testing.assert_array_equal(np.asarray(mask[b]), expect)


# ----------------------------------------------------------------------------------------------
# invariances


@settings(max_examples=15)
@given(data=batches(), perm_seed=st.integers(0, 1000))
def test_invariances(data, perm_seed):
    p, r, sid, ns = data
    base = all_trajectory_scores(p, r, sid, ns, beta=1.0, max_steps=S)
    # extra padding (tokens and steps) changes nothing
    pad = lambda x, val: np.concatenate([x, np.full((B, 16), val, x.dtype)], axis=1)  # noqa: E731
    padded = all_trajectory_scores(pad(p, 0.0), pad(r, 0.0), pad(sid, -1), ns, beta=1.0, max_steps=2 * S)
    # permuting trajectories permutes the scores
    perm = np.random.default_rng(perm_seed).permutation(B)
    permuted = all_trajectory_scores(p[perm], r[perm], sid[perm], ns[perm], beta=1.0, max_steps=S)
    # linear in beta (beta > 0: the step aggregation acts on beta-scaled values, as in the authors' code)
    scaled = all_trajectory_scores(p, r, sid, ns, beta=2.5, max_steps=S)
    same = all_trajectory_scores(p, p, sid, ns, beta=3.0, max_steps=S)
    for key, v in base.items():
        v = np.asarray(v)
        np.testing.assert_allclose(np.asarray(padded[key]), v, **TOL)
        np.testing.assert_allclose(np.asarray(permuted[key]), v[perm], **TOL)
        np.testing.assert_allclose(np.asarray(scaled[key]), 2.5 * v, rtol=1e-5, atol=3e-5)
        np.testing.assert_array_equal(np.asarray(same[key]), 0.0)


# ----------------------------------------------------------------------------------------------
# ragged edge cases


def test_edge_cases():
    p = np.array([[-1.0, -2.0, -3.0, -4.0, 0.0, 0.0]] * 4, np.float32)
    r = np.array([[-2.0, -2.0, -1.0, -1.0, 0.0, 0.0]] * 4, np.float32)
    sid = np.array(
        [
            [0, 1, 2, 3, -1, -1],  # one-token steps
            [-1, -1, -1, -1, -1, -1],  # no action tokens and no steps
            [-1, -1, -1, -1, -1, -1],  # three steps, all empty (truncated)
            [-1, 0, 0, -1, -1, -1],  # step 0 has tokens, steps 1 and 2 are empty
        ],
        np.int32,
    )
    ns = np.array([4, 0, 3, 3], np.int32)
    for order in ("per_model", "token_level"):
        table = all_trajectory_scores(p, r, sid, ns, order=order)
        for (t, s), got in table.items():
            np.testing.assert_allclose(np.asarray(got), np_scores(p, r, sid, ns, t, s, 1.0, order), **TOL)
    # hand-checked: one-token steps have A = p - r for every token aggregation
    np.testing.assert_allclose(np.asarray(trajectory_scores(p, r, sid, ns, step_agg="sum"))[0], -10 + 6)
    np.testing.assert_allclose(np.asarray(trajectory_scores(p, r, sid, ns, step_agg="min"))[0], -3.0)
    # empty steps count as 0.0 for the advantage: trajectory 3 mean = (mean(-2, -3) - mean(-2, -1) + 0 + 0) / 3
    np.testing.assert_allclose(np.asarray(trajectory_scores(p, r, sid, ns))[1:], [0.0, 0.0, -1.0 / 3], **TOL)
    # ... and are skipped by the certainty rule: mean over the single non-empty step
    skip = aggregate_all(p, sid, ns, empty="skip")
    np.testing.assert_allclose(np.asarray(skip[("mean", "mean")]), [-2.5, 0.0, 0.0, -2.5], **TOL)


def test_very_long_trajectory():
    rng = np.random.default_rng(0)
    tlen, n = 20_000, 300
    bounds = np.sort(rng.choice(np.arange(1, tlen), size=2 * n, replace=False)).reshape(n, 2)
    sid = np.full((2, tlen), -1, np.int32)
    for s, (a, b) in enumerate(bounds):
        sid[0, a:b] = s
    sid[1, : tlen // 2] = 0
    ns = np.array([n, 1], np.int32)
    p = rng.uniform(-6, 0, (2, tlen)).astype(np.float32)
    r = (p + rng.normal(0, 0.3, (2, tlen))).astype(np.float32)
    table = all_trajectory_scores(p, r, sid, ns, beta=0.1)
    for (t, s), got in table.items():
        np.testing.assert_allclose(np.asarray(got), np_scores(p, r, sid, ns, t, s, 0.1, "per_model"), rtol=1e-5,
                                   atol=1e-4, err_msg=f"{t} {s}")


# ----------------------------------------------------------------------------------------------
# bad input


def test_bad_input():
    p = np.zeros((2, 5), np.float32)
    sid = np.array([[0, 0, 1, -1, -1], [0, -1, -1, -1, -1]])
    ns = np.array([2, 1])
    with pytest.raises(ValueError, match="reference_logprobs"):
        trajectory_scores(p, p[:, :4], sid, ns)
    with pytest.raises(ValueError, match="num_steps"):
        trajectory_scores(p, p, sid, ns[:1])
    with pytest.raises(ValueError, match="step_ids"):
        trajectory_scores(p, p, sid[:, :4], ns)
    with pytest.raises(ValueError, match="step_ids out of range"):
        trajectory_scores(p, p, sid, np.array([1, 1]))
    with pytest.raises(ValueError, match="step_ids"):
        trajectory_scores(p, p, np.where(sid == 1, -2, sid), ns)
    with pytest.raises(ValueError, match="contiguous"):
        trajectory_scores(p, p, np.array([[0, -1, 0, 1, -1], [0, -1, -1, -1, -1]]), ns)
    with pytest.raises(ValueError, match="policy_logprobs"):
        trajectory_scores(np.where(sid == 0, np.nan, p), p, sid, ns)
    with pytest.raises(ValueError, match="reference_logprobs"):
        trajectory_scores(p, np.full_like(p, -np.inf), sid, ns)
    with pytest.raises(ValueError, match="token_agg"):
        trajectory_scores(p, p, sid, ns, token_agg="median")
    with pytest.raises(ValueError, match="step_agg"):
        trajectory_scores(p, p, sid, ns, step_agg="bottom5")
    with pytest.raises(ValueError, match="order"):
        trajectory_scores(p, p, sid, ns, order="tokens")
    with pytest.raises(ValueError, match="beta"):
        trajectory_scores(p, p, sid, ns, beta=float("nan"))
    with pytest.raises(ValueError, match="max_steps"):
        step_advantages(p, p, sid, ns, max_steps=1)
    with pytest.raises(ValueError, match="num_steps"):
        trajectory_scores(p, p, sid, np.array([2, -1]))
    with pytest.raises(ValueError, match="k"):
        k_step_advantage(np.zeros((2, 2)), np.ones((2, 2), bool), 0)


def test_inside_jit_with_static_max_steps():
    """Callable inside a caller's jit (log-probs traced, step structure concrete): same result."""
    import jax

    rng = np.random.default_rng(1)
    p = rng.uniform(-3, 0, (2, 6)).astype(np.float32)
    r = rng.uniform(-3, 0, (2, 6)).astype(np.float32)
    sid = np.array([[0, 0, 1, 1, -1, 2], [-1, 0, 0, 0, -1, -1]], np.int32)
    ns = np.array([3, 2], np.int32)
    f = jax.jit(lambda a, b: trajectory_scores(a, b, sid, ns, token_agg="max", step_agg="bottom10", max_steps=S))
    np.testing.assert_allclose(np.asarray(f(p, r)), np_scores(p, r, sid, ns, "max", "bottom10", 1.0, "per_model"),
                               **TOL)
    g = jax.jit(lambda a, b, s, n: step_advantages(a, b, s, n, max_steps=S)[0])
    np.testing.assert_allclose(np.asarray(g(p, r, sid, ns)), np.asarray(step_advantages(p, r, sid, ns, max_steps=S)[0]))
