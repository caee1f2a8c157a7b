"""Gated DeltaNet kernels against a per-token NumPy recurrence and transformers' own torch functions."""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

jax.config.update("jax_enable_x64", False)

from pa_jax.models import deltanet as dn  # noqa: E402

B, HK, HV, DK, DV = 2, 2, 4, 8, 6


def naive_recurrence(q, k, v, g, beta, mask=None):
    """The gated delta rule written token by token in float64 NumPy (independent oracle).

    For each head: S <- exp(g_t) S; S <- S + k_t (beta_t (v_t - S^T k_t))^T; o_t = S^T q_t, with q, k
    l2-normalized (eps 1e-6), q scaled by 1/sqrt(d_k), key heads repeated to value heads, and padded
    positions (mask 0) skipped entirely.
    """
    q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
    b, t, hk, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    rep = hv // hk
    out = np.zeros((b, t, hv, dv))
    states = np.zeros((b, hv, dk, dv))
    for bi in range(b):
        for h in range(hv):
            s = np.zeros((dk, dv))
            for ti in range(t):
                if mask is not None and not mask[bi, ti]:
                    continue
                qt = q[bi, ti, h // rep]
                kt = k[bi, ti, h // rep]
                qt = qt / np.sqrt(qt @ qt + 1e-6) / np.sqrt(dk)
                kt = kt / np.sqrt(kt @ kt + 1e-6)
                s = np.exp(g[bi, ti, h]) * s
                delta = beta[bi, ti, h] * (v[bi, ti, h] - s.T @ kt)
                s = s + np.outer(kt, delta)
                out[bi, ti, h] = s.T @ qt
            states[bi, h] = s
    return out, states


def random_inputs(seed, t):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, t, HK, DK)).astype(np.float32)
    k = rng.normal(size=(B, t, HK, DK)).astype(np.float32)
    v = rng.normal(size=(B, t, HV, DV)).astype(np.float32)
    # realistic log-decays: -exp(A_log) * softplus(a + dt_bias), mostly in (-3, 0)
    g = (-np.exp(rng.uniform(np.log(0.01), np.log(2.0), size=(1, 1, HV))) *
         np.log1p(np.exp(rng.normal(size=(B, t, HV))))).astype(np.float32)
    beta = (1 / (1 + np.exp(-rng.normal(size=(B, t, HV))))).astype(np.float32)
    return q, k, v, g, beta


chunk_fn = jax.jit(dn.chunk_gated_delta_rule, static_argnames=("chunk_size", "use_qk_l2norm"))
recurrent_fn = jax.jit(dn.recurrent_gated_delta_rule, static_argnames=("use_qk_l2norm",))


@pytest.mark.parametrize("t", [64, 128, 50, 130])
def test_chunked_matches_naive_recurrence(t):
    q, k, v, g, beta = random_inputs(t, t)
    ref, ref_state = naive_recurrence(q, k, v, g, beta)
    out, state = chunk_fn(q, k, v, g, beta)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(state), ref_state, atol=1e-5, rtol=0)
    rout, rstate = recurrent_fn(q, k, v, g, beta)
    np.testing.assert_allclose(np.asarray(rout), ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(rstate), ref_state, atol=1e-5, rtol=0)


def test_small_chunk_many_chunks():
    q, k, v, g, beta = random_inputs(7, 50)
    ref, _ = naive_recurrence(q, k, v, g, beta)
    out, _ = chunk_fn(q, k, v, g, beta, chunk_size=16)  # 4 chunks, last one partial
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)


def test_padding_does_not_leak_into_state():
    """Left, middle and right padding: every real token's output equals the unpadded sequence's."""
    t = 50
    q, k, v, g, beta = random_inputs(3, t)
    mask = np.ones((B, t), bool)
    mask[0, :7] = False          # left padding
    mask[1, 20:26] = False       # a gap in the middle
    mask[1, 45:] = False         # right padding
    # garbage at padded positions must not matter
    q2, k2, v2 = (x.copy() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[~mask] = 1e3
    out, state = chunk_fn(q2, k2, v2, g, beta, mask)
    ref, ref_state = naive_recurrence(q, k, v, g, beta, mask)
    np.testing.assert_allclose(np.asarray(out)[mask], ref[mask], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(state), ref_state, atol=1e-5, rtol=0)
    # and row 0 (left padded) equals running the real tokens alone
    alone, _ = naive_recurrence(*(x[:1, 7:] for x in (q, k, v, g, beta)))
    np.testing.assert_allclose(np.asarray(out)[0, 7:], alone[0], atol=1e-5, rtol=0)


def test_causal_conv_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 9, 5)).astype(np.float32)
    w = rng.normal(size=(5, 4)).astype(np.float32)
    ref = np.zeros_like(x)
    for t in range(9):
        for j in range(4):
            src = t - 3 + j
            if src >= 0:
                ref[:, t] += w[:, j] * x[:, src]
    np.testing.assert_allclose(np.asarray(dn.causal_depthwise_conv1d(jnp.asarray(x), jnp.asarray(w))), ref,
                               atol=1e-6)


def test_segment_ids_refused():
    with pytest.raises(ValueError, match="segment_ids"):
        dn.check_no_segments(np.zeros((1, 4), np.int32))


torch = pytest.importorskip("torch")


def _hf_fns():
    try:
        from transformers.models.qwen3_5 import modeling_qwen3_5 as m
    except ImportError:  # pragma: no cover - transformers without qwen3_5
        pytest.skip("transformers has no qwen3_5")
    return m


@pytest.mark.parametrize("t", [64, 130])
def test_against_transformers_kernels(t):
    m = _hf_fns()
    q, k, v, g, beta = random_inputs(11 + t, t)
    tq, tk, tv, tg, tb = (torch.from_numpy(x) for x in (q, k, v, g, beta))
    ref_c, ref_cs = m.torch_chunk_gated_delta_rule(tq, tk, tv, g=tg, beta=tb, output_final_state=True,
                                                   use_qk_l2norm_in_kernel=True)
    ref_r, _ = m.torch_recurrent_gated_delta_rule(tq, tk, tv, g=tg, beta=tb, output_final_state=True,
                                                  use_qk_l2norm_in_kernel=True)
    out, state = chunk_fn(q, k, v, g, beta)
    np.testing.assert_allclose(np.asarray(out), ref_c.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(out), ref_r.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(state), ref_cs.numpy(), atol=1e-5, rtol=0)


def test_full_layer_against_transformers_module():
    """The whole token mixer (projections, conv, gates, kernel, gated norm) vs Qwen3_5GatedDeltaNet."""
    m = _hf_fns()
    from transformers import Qwen3_5TextConfig

    cfg = Qwen3_5TextConfig(hidden_size=32, linear_num_key_heads=HK, linear_num_value_heads=HV,
                            linear_key_head_dim=DK, linear_value_head_dim=DV, linear_conv_kernel_dim=4,
                            num_hidden_layers=1, layer_types=["linear_attention"], vocab_size=16)
    torch.manual_seed(0)
    layer = m.Qwen3_5GatedDeltaNet(cfg, 0).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    t = 70
    rng = np.random.default_rng(5)
    x = rng.normal(size=(B, t, 32)).astype(np.float32)
    mask = np.ones((B, t), np.int64)
    mask[1, :9] = 0  # left padding, as a tokenizer with padding_side="left" produces
    with torch.no_grad():
        ref = layer(torch.from_numpy(x), attention_mask=torch.from_numpy(mask)).numpy()
    sd = {name: p.detach().numpy() for name, p in layer.named_parameters()}
    dims = dn.DeltaNetDims(HK, HV, DK, DV, 4)
    out = jax.jit(lambda xx, mm: dn.gated_deltanet(
        xx, mm, in_proj_qkv=sd["in_proj_qkv.weight"], in_proj_z=sd["in_proj_z.weight"],
        in_proj_b=sd["in_proj_b.weight"], in_proj_a=sd["in_proj_a.weight"], conv_weight=sd["conv1d.weight"],
        a_log=sd["A_log"], dt_bias=sd["dt_bias"], norm_weight=sd["norm.weight"], out_proj=sd["out_proj.weight"],
        dims=dims, eps=cfg.rms_norm_eps))(x, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out)[valid], ref[valid], atol=1e-5, rtol=1e-5)
