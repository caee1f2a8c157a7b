"""Failure-attribution parity with the authors' released rules (issue 20, section 4).

Oracles are plain Python loops over per-message rewards written here from the authors' description
(runners/baselines.py: first action below the threshold, else the lowest action), not pa_jax code.
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pa_jax.apps import fa


def _earliest_below_loop(rewards, valid, threshold):
    for i, ok in enumerate(valid):
        if ok and rewards[i] < threshold:
            return i
    best_i, best_v = -1, math.inf
    for i, ok in enumerate(valid):
        if ok and rewards[i] < best_v:
            best_i, best_v = i, rewards[i]
    return best_i if best_i >= 0 else 0


def _discounted_window_loop(r, k, gamma):
    out = []
    for t in range(len(r)):
        acc, w = 0.0, 1.0
        for j in range(t, min(t + k, len(r))):
            acc += w * r[j]
            w *= gamma
        out.append(acc)
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 12), st.integers(0, 2**31 - 1), st.sampled_from([0.0, 0.5, -0.3]))
def test_earliest_below_threshold_matches_loop(m, seed, thr):
    rng = np.random.default_rng(seed)
    valid = list(rng.integers(0, 2, m).astype(bool))
    r = np.round(rng.normal(size=m), 1) * np.array(valid) + np.where(valid, 0.0, 1.0)  # non-actions 1.0
    acts = [i for i, v in enumerate(valid) if v]
    got = fa.decisive_step(r[acts], acts, "earliest_below_threshold", threshold=thr)
    assert got == _earliest_below_loop(list(r), valid, thr)


def test_earliest_below_threshold_hand_checked():
    acts = [1, 3, 4, 6]
    assert fa.decisive_step([0.9, 0.4, 0.2, 0.1], acts, "earliest_below_threshold", threshold=0.5) == 3
    # none below: the lowest action (first on ties)
    assert fa.decisive_step([0.9, 0.7, 0.6, 0.6], acts, "earliest_below_threshold", threshold=0.5) == 4
    assert fa.rule_name("earliest_below_threshold", threshold=0.5) == "earliest_below_threshold(t=0.5)"


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10), st.integers(1, 5), st.sampled_from([1.0, 0.9, 0.5]), st.integers(0, 2**31 - 1))
def test_discounted_k_advantage_matches_loop(m, k, gamma, seed):
    r = np.random.default_rng(seed).normal(size=m)
    np.testing.assert_allclose(fa.k_advantage(r, k, gamma), _discounted_window_loop(list(r), k, gamma), atol=1e-12)
    if m:
        acts = list(range(0, 2 * m, 2))
        want = acts[int(np.argmin(_discounted_window_loop(list(r), k, gamma)))]
        assert fa.decisive_step(r, acts, "k_advantage", k=k, gamma=gamma) == want


def test_discounted_k_advantage_hand_checked():
    # r = [1, -2, 3], k = 2, gamma = 0.5: [1 - 1, -2 + 1.5, 3] = [0, -0.5, 3]
    np.testing.assert_allclose(fa.k_advantage([1.0, -2.0, 3.0], 2, 0.5), [0.0, -0.5, 3.0])
    assert fa.rule_name("k_advantage", k=2, gamma=0.5) == "k_advantage(k=2,gamma=0.5)"
    with pytest.raises(ValueError, match="gamma"):
        fa.k_advantage([1.0], 1, 0.0)


def test_self_certainty_steps_numpy_oracle():
    rng = np.random.default_rng(0)
    vocab = 7
    # two trajectories, per-token full distributions -> mean log-prob; step ids with an empty step
    logits = rng.normal(size=(2, 6, vocab))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    mean_lp = logp.mean(-1)
    sid = np.array([[-1, 0, 0, 1, 1, 1], [-1, -1, 0, 0, -1, -1]])
    ns = np.array([2, 2])  # second trajectory's step 1 has no token
    for agg, f in (("sum", np.sum), ("mean", np.mean), ("min", np.min)):
        got = fa.self_certainty_steps(mean_lp, sid, ns, vocab, token_agg=agg)
        for b in range(2):
            want = []
            for s in range(ns[b]):
                kl = [np.sum((1 / vocab) * np.log((1 / vocab) / np.exp(logp[b, t]))) for t in range(6) if sid[b, t] == s]
                want.append(f(kl) if kl else 0.0)
            np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-5)


def test_chance_step_accuracy():
    assert fa.chance_step_accuracy([[1, 2], [0, 1, 2, 3]], [2, 9]) == pytest.approx((0.5 + 0.0) / 2)
