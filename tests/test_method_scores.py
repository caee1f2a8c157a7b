"""pa_jax.commands._common.trajectory_method_scores (what `uq`, `bon` and `score` rank by) against a
NumPy recomputation of each method from the cached per-token statistics, one trajectory at a time."""

import types

import numpy as np
import pytest

from pa_jax.advantage import STEP_AGGS, TOKEN_AGGS
from pa_jax.baselines import BASELINES
from pa_jax.commands import _common as C
from helpers import np_deepconf, np_step_agg, np_token_agg, np_value_scores

TOL = dict(rtol=1e-5, atol=1e-5)
V, K = 50, 4
NS = (3, 0, 4, 2, 5)  # row 1 has no steps


def _stats(rng, i, num_steps, reference):
    """One trajectory's cached statistics: steps of 0-4 tokens (some empty), with gaps of unscored tokens."""
    sid = [-1] * int(rng.integers(0, 3))
    for s in range(num_steps):
        sid += [s] * int(rng.integers(0, 5)) + [-1] * int(rng.integers(0, 2))
    sid = np.array(sid or [-1], np.int32)
    n = len(sid)
    topk = -np.sort(rng.exponential(2.0, (n, K)).astype(np.float32), axis=1)  # descending log-probs
    st = types.SimpleNamespace(
        id=f"t{i}", num_steps=num_steps, num_tokens=n, step_ids=sid,
        policy_logprob=(topk[:, 0] - rng.exponential(1.0, n)).astype(np.float32),
        policy_entropy=rng.uniform(0, 3, n).astype(np.float32),
        policy_mean_logprob=(-np.log(V) - rng.uniform(0, 2, n)).astype(np.float32),
        policy_topk=topk,
        reference_logprob=rng.normal(-2, 1, n).astype(np.float32) if reference else None,
        reference_entropy=rng.uniform(0, 3, n).astype(np.float32) if reference else None,
    )
    return st


def _scored(reference: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    stats = [_stats(rng, i, n, reference) for i, n in enumerate(NS)]
    rendered = [types.SimpleNamespace(truncation=types.SimpleNamespace(original_tokens=100 + 7 * i))
                for i in range(len(NS))]
    return C.Scored(dataset=None, trajectories=[], rendered=rendered, stats=stats, has_reference=reference,
                    reference_is_policy=False, vocab_size=V, timing={}, cache_dir=None)


def _padded(stats, field):
    """[B, N_max] (step ids pad with -1): the layout the oracle indexes; built here, not by the engine."""
    n = max(s.num_tokens for s in stats)
    first = getattr(stats[0], field)
    out = np.full((len(stats), n) + first.shape[1:], -1 if field == "step_ids" else 0, first.dtype)
    for b, s in enumerate(stats):
        out[b, : s.num_tokens] = getattr(s, field)
    return out


@pytest.mark.parametrize("reference", [True, False])
def test_trajectory_method_scores_match_numpy(reference):
    sc = _scored(reference)
    beta = 0.7
    token_aggs, step_aggs = ("mean", "min", "last"), ("sum", "bottom10", "max")
    out = C.trajectory_method_scores(sc, token_aggs, step_aggs, beta)

    st = sc.stats
    sid, ns = _padded(st, "step_ids"), np.array(NS)
    pol, ent = _padded(st, "policy_logprob"), _padded(st, "policy_entropy")
    topk_mean = _padded(st, "policy_topk").astype(np.float64).mean(-1)  # (1/k) sum_j log p_(j)
    kl_uniform = -np.log(V) - _padded(st, "policy_mean_logprob").astype(np.float64)

    # the labels, in the order the commands print them: progress advantage first, then per (token, step)
    # aggregation every baseline not listed yet (a pooled one once, the authors' DeepConf once per token agg)
    want_keys = []
    if reference:
        want_keys += [f"progress_advantage/{t}/{s}" for t in token_aggs for s in step_aggs]
    names = ["policy_logprob", "negative_entropy", "self_certainty", "topk_mean_logprob", "authors_deepconf_tail",
             "authors_deepconf_bottom10"] + (["reference_logprob"] if reference else []) + [
        f"deepconf_{v}" for v in ("bottom10", "lowest_group", "mean", "tail")]
    for t in token_aggs:
        for s in step_aggs:
            for name in names:
                if name == "self_certainty" or name.startswith("deepconf_"):
                    key = name
                elif name.startswith("authors_deepconf"):
                    key = f"{name}/{t}"
                else:
                    key = f"{name}/{t}/{s}"
                if key not in want_keys:
                    want_keys.append(key)
    want_keys += ["length_control/steps", "length_control/tokens"]
    assert list(out) == want_keys

    for t in token_aggs:
        for s in step_aggs:
            np.testing.assert_allclose(out[f"policy_logprob/{t}/{s}"], np_value_scores(pol, sid, ns, t, s, "zero"),
                                       **TOL)
            np.testing.assert_allclose(out[f"negative_entropy/{t}/{s}"],
                                       np_value_scores(-ent, sid, ns, t, s, "skip"), **TOL)
            np.testing.assert_allclose(out[f"topk_mean_logprob/{t}/{s}"],
                                       np_value_scores(topk_mean, sid, ns, t, s, "skip"), **TOL)
            if reference:
                ref = _padded(st, "reference_logprob")
                np.testing.assert_allclose(out[f"reference_logprob/{t}/{s}"],
                                           np_value_scores(ref, sid, ns, t, s, "zero"), **TOL)
                # per_model order: beta * (token_agg(policy) - token_agg(reference)) per step
                np.testing.assert_allclose(out[f"progress_advantage/{t}/{s}"],
                                           beta * _np_pa(pol, ref, sid, ns, t, s), **TOL)
        np.testing.assert_allclose(out[f"authors_deepconf_tail/{t}"],
                                   np_value_scores(topk_mean, sid, ns, t, "last", "skip"), **TOL)
        np.testing.assert_allclose(out[f"authors_deepconf_bottom10/{t}"],
                                   np_value_scores(topk_mean, sid, ns, t, "bottom10", "skip"), **TOL)
    for b in range(len(NS)):
        scored = sid[b] >= 0
        np.testing.assert_allclose(out["self_certainty"][b], kl_uniform[b, scored].mean() if scored.any() else 0.0,
                                   **TOL)
        for v, want in np_deepconf(-topk_mean[b, scored], 2048, 2048).items():
            np.testing.assert_allclose(out[f"deepconf_{v}"][b], want, **TOL, err_msg=v)
    np.testing.assert_array_equal(out["length_control/steps"], -np.array(NS, np.float64))
    np.testing.assert_array_equal(out["length_control/tokens"], -(100.0 + 7 * np.arange(len(NS))))


def _np_pa(pol, ref, sid, ns, token_agg, step_agg):
    """step_agg over steps s < n_b of (token_agg_{t in s} p_t - token_agg_{t in s} r_t); empty step = 0."""
    out = []
    for b in range(len(ns)):
        steps = []
        for s in range(ns[b]):
            idx = np.nonzero(sid[b] == s)[0]
            steps.append(np_token_agg(pol[b, idx].astype(np.float64), token_agg)
                         - np_token_agg(ref[b, idx].astype(np.float64), token_agg))
        out.append(np_step_agg(steps, step_agg))
    return np.array(out)


def test_every_baseline_declares_what_it_takes():
    """Each registry record's label matches the key shape it is stored under, and labels are distinct."""
    labels = {b.label(t, s) for b in BASELINES for t in TOKEN_AGGS for s in STEP_AGGS}
    n_full = sum(b.token_agg and b.step_agg for b in BASELINES)
    n_token = sum(b.token_agg and not b.step_agg for b in BASELINES)
    n_pooled = sum(not b.token_agg and not b.step_agg for b in BASELINES)
    assert len(labels) == n_full * len(TOKEN_AGGS) * len(STEP_AGGS) + n_token * len(TOKEN_AGGS) + n_pooled
    for b in BASELINES:
        assert b.model in ("policy", "reference") and b.reads
        with pytest.raises(ValueError, match="token_agg"):
            b.key("median", "mean")
