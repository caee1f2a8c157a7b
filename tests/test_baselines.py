"""pa_jax.baselines against NumPy loops over full-vocabulary distributions (tests/helpers.py)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pa_jax.advantage import STEP_AGGS, TOKEN_AGGS
from pa_jax.baselines import (
    all_baseline_scores,
    authors_deepconf_scores,
    deepconf_scores,
    negative_entropy_scores,
    policy_logprob_scores,
    reference_logprob_scores,
    self_certainty_scores,
    topk_mean_logprob_scores,
)
from pa_jax.head import head_statistics
from helpers import np_deepconf, np_log_softmax, np_value_scores

B, T, V, D, K, S = 3, 40, 64, 8, 5, 6
WINDOW, TAIL = 4, 6
TOL = dict(rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------


@st.composite
def problems(draw):
    sid = np.full((B, T), -1, np.int32)
    ns = np.zeros(B, np.int32)
    for b in range(B):
        n = draw(st.integers(0, S))
        t = draw(st.integers(0, 3))
        for s in range(n):
            length = max(0, min(draw(st.integers(0, 9)), T - t))
            sid[b, t : t + length] = s
            t = min(T, t + length + draw(st.integers(0, 3)))
        ns[b] = n
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    hidden = rng.normal(size=(B, T, D)).astype(np.float32)
    unemb = rng.normal(size=(V, D)).astype(np.float32) * draw(st.sampled_from([0.3, 1.0]))
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    return hidden, unemb, targets, sid, ns


@settings(max_examples=15)
@given(prob=problems(), aggs=st.lists(st.tuples(st.sampled_from(TOKEN_AGGS), st.sampled_from(STEP_AGGS)),
                                      min_size=1, max_size=3))
def test_baselines_match_numpy(prob, aggs):
    hidden, unemb, targets, sid, ns = prob
    stats = head_statistics(hidden, unemb, targets, top_k=K, vocab_chunk=24)
    lp = np_log_softmax(hidden, unemb)  # [B, T, V]
    target_lp = np.take_along_axis(lp, targets[..., None], -1)[..., 0]
    entropy = -(np.exp(lp) * lp).sum(-1)
    kl_uniform = (1.0 / V * (np.log(1.0 / V) - lp)).sum(-1)  # KL(U || p_t), straight from the definition
    topk_mean = np.sort(lp, -1)[..., ::-1][..., :K].mean(-1)

    # per-step machinery (every combination of the shared machinery is covered by test_advantage)
    for t, s in aggs:
        kw = dict(token_agg=t, step_agg=s, max_steps=S)
        np.testing.assert_allclose(policy_logprob_scores(stats.target_logprob, sid, ns, **kw),
                                   np_value_scores(target_lp, sid, ns, t, s, "zero"), **TOL)
        np.testing.assert_allclose(negative_entropy_scores(stats.entropy, sid, ns, **kw),
                                   np_value_scores(-entropy, sid, ns, t, s, "skip"), **TOL)
        np.testing.assert_allclose(topk_mean_logprob_scores(stats.topk_logprobs, sid, ns, **kw),
                                   np_value_scores(topk_mean, sid, ns, t, s, "skip"), **TOL)
    np.testing.assert_allclose(
        self_certainty_scores(stats.mean_logprob, V, sid, ns, token_agg="max", step_agg="min", max_steps=S),
        np_value_scores(kl_uniform, sid, ns, "max", "min", "skip"), **TOL)

    # token-level baselines, pooled over the scored tokens
    sc = self_certainty_scores(stats.mean_logprob, V, sid, ns)
    dc = deepconf_scores(stats.topk_logprobs, sid, ns, window=WINDOW, tail=TAIL)
    for b in range(B):
        scored = sid[b] >= 0
        np.testing.assert_allclose(sc[b], kl_uniform[b, scored].mean() if scored.any() else 0.0, **TOL)
        ref = np_deepconf(-topk_mean[b, scored], WINDOW, TAIL)
        for name, v in ref.items():
            np.testing.assert_allclose(dc[name][b], v, **TOL, err_msg=name)

    # the authors' DeepConf = top-k mean with step_agg last / bottom10
    np.testing.assert_allclose(authors_deepconf_scores(stats.topk_logprobs, sid, ns, variant="tail", max_steps=S),
                               np_value_scores(topk_mean, sid, ns, "mean", "last", "skip"), **TOL)
    np.testing.assert_allclose(authors_deepconf_scores(stats.topk_logprobs, sid, ns, variant="b10", max_steps=S),
                               np_value_scores(topk_mean, sid, ns, "mean", "bottom10", "skip"), **TOL)


def test_all_baselines_and_edge_cases():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(4, 12, D)).astype(np.float32)
    unemb = rng.normal(size=(V, D)).astype(np.float32)
    targets = rng.integers(0, V, size=(4, 12)).astype(np.int32)
    sid = np.full((4, 12), -1, np.int32)
    sid[0, 1:4], sid[0, 6] = 0, 2  # step 1 empty: skipped by certainty, 0.0 for log-prob
    ns = np.array([3, 0, 2, 1], np.int32)  # row 1: no steps; row 2: two empty steps
    sid[3, :] = 0  # row 3: every token is one long step
    stats = head_statistics(hidden, unemb, targets, top_k=K)
    ref_stats = head_statistics(hidden, unemb * 0.5, targets, top_k=K)
    out = all_baseline_scores(stats, sid, ns, vocab_size=V, reference=ref_stats, window=WINDOW, tail=TAIL)
    assert set(out) == {
        "policy_logprob", "reference_logprob", "negative_entropy", "self_certainty", "topk_mean_logprob",
        "authors_deepconf_tail", "authors_deepconf_bottom10", "deepconf_mean", "deepconf_tail",
        "deepconf_bottom10", "deepconf_lowest_group",
    }
    lp = np_log_softmax(hidden, unemb)
    tl = np.take_along_axis(lp, targets[..., None], -1)[..., 0]
    # log-prob: empty step counted as 0.0 -> row 0 = (mean(step0) + 0 + tl[0,6]) / 3
    np.testing.assert_allclose(out["policy_logprob"][0], (tl[0, 1:4].mean() + 0.0 + tl[0, 6]) / 3, **TOL)
    np.testing.assert_allclose(
        out["reference_logprob"],
        reference_logprob_scores(ref_stats.target_logprob, sid, ns), **TOL)
    # certainty: the empty step is skipped -> mean over two steps
    ent = -(np.exp(lp) * lp).sum(-1)
    np.testing.assert_allclose(out["negative_entropy"][0], -(ent[0, 1:4].mean() + ent[0, 6]) / 2, **TOL)
    for v in out.values():  # no scored token at all: 0.0 everywhere
        assert v.shape == (4,)
        np.testing.assert_array_equal(np.asarray(v)[1:3], 0.0)
    # Self-Certainty is >= 0 and 0 for the uniform distribution
    assert (np.asarray(out["self_certainty"]) >= 0).all()
    uni = head_statistics(hidden, np.zeros_like(unemb), targets, top_k=K)
    np.testing.assert_allclose(self_certainty_scores(uni.mean_logprob, V, sid, ns), 0.0, atol=1e-6)


def test_bad_input():
    sid = np.array([[0, 0, -1]])
    ns = np.array([1])
    topk = np.zeros((1, 3, K), np.float32)
    with pytest.raises(ValueError, match="topk_logprobs"):
        deepconf_scores(topk[:, :2], sid, ns)
    with pytest.raises(ValueError, match="topk_logprobs"):
        deepconf_scores(np.where(np.arange(K) == 1, np.nan, topk), sid, ns)
    with pytest.raises(ValueError, match="window"):
        deepconf_scores(topk, sid, ns, window=0)
    with pytest.raises(ValueError, match="k must"):
        topk_mean_logprob_scores(topk, sid, ns, k=K + 1)
    with pytest.raises(ValueError, match="variant"):
        authors_deepconf_scores(topk, sid, ns, variant="lowest")
    with pytest.raises(ValueError, match="vocab_size"):
        self_certainty_scores(np.zeros((1, 3)), 0, sid, ns)
    with pytest.raises(ValueError, match="mean_logprob"):
        self_certainty_scores(np.zeros((1, 2)), 10, sid, ns)
    with pytest.raises(ValueError, match="entropy"):
        negative_entropy_scores(np.full((1, 3), np.inf), sid, ns)
    with pytest.raises(ValueError, match="step_agg"):
        policy_logprob_scores(np.zeros((1, 3)), sid, ns, step_agg="median")
    with pytest.raises(ValueError, match="contiguous"):
        policy_logprob_scores(np.zeros((1, 3)), np.array([[0, -1, 0]]), ns)
