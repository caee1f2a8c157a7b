"""Gated DeltaNet (the linear-attention layers of Qwen 3.5), as pure JAX functions.

Reproduces transformers 5.23's ``Qwen3_5GatedDeltaNet`` (``modeling_qwen3_5.py``) without a cache:

    x            <- x * mask                                   (padding rows zeroed, as transformers does)
    qkv          =  SiLU(causal_depthwise_conv1d(x W_qkv^T))   (kernel K, no bias, zero left padding)
    q, k, v      =  split(qkv, [H_k d_k, H_k d_k, H_v d_v])
    q, k         <- l2norm(q), l2norm(k);  q <- q / sqrt(d_k)  (float32)
    q, k         <- each key head repeated to H_v / H_k consecutive value heads
    beta_t       =  sigmoid(b_t),   b = x W_b^T
    g_t          =  -exp(A_log) * softplus(a_t + dt_bias),  a = x W_a^T      (log of the decay, <= 0)
    S_t          =  exp(g_t) S_{t-1} + k_t (beta_t (v_t - S_{t-1}^T k_t))^T  (state [d_k, d_v] per head)
    o_t          =  S_t^T q_t
    y            =  (w * RMSNorm(o)) * SiLU(z),  z = x W_z^T    (per value head, float32 statistics)
    out          =  y W_out^T

Padding. At every position where ``mask`` is 0 the update is made the identity: k, v and beta are
zeroed and the log-decay g is set to 0 (decay 1), so a padded token neither writes to nor decays
the recurrent state, whether it sits on the left, the right or in the middle of a row. With left or
right padding this is exactly what transformers computes (its state is still zero before the first
real token, and right padding only follows the real tokens); for padding in the middle of a row
transformers would decay the state across the gap, pa-jax does not.

Packed rows (several sequences in one row) are refused for this family by the decoder
(:func:`check_no_segments`): resetting the state per segment is not implemented.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pa_jax.models import layers as L
from pa_jax.models.config import DeltaNetDims  # noqa: F401  (the sizes are configuration data; re-exported)

Array = jax.Array

CHUNK_SIZE = 64
L2NORM_EPS = 1e-6


def check_no_segments(segment_ids) -> None:
    """Packed rows are refused for models with Gated DeltaNet layers (no per-segment state reset)."""
    if segment_ids is not None:
        raise ValueError(
            "segment_ids (packed rows) are not supported for models with Gated DeltaNet "
            "(linear_attention) layers: the recurrent state would leak across segments; "
            "pass one sequence per row with an attention_mask instead"
        )


def causal_depthwise_conv1d(x: Array, weight: Array) -> Array:
    """Causal depthwise 1-D convolution: y[t, c] = sum_j w[c, j] x[t - (K-1) + j, c] (zeros before t=0).

    x: [B, T, C]; weight: [C, K] (HF ``conv1d.weight`` [C, 1, K] squeezed). Equals torch's
    ``F.conv1d(x, w[:, None], padding=K-1, groups=C)[..., :T]``.
    """
    kernel = weight.shape[-1]
    t = x.shape[1]
    xp = jnp.pad(x, ((0, 0), (kernel - 1, 0), (0, 0)))
    w = weight.astype(x.dtype)
    out = xp[:, 0:t, :] * w[:, 0]
    for j in range(1, kernel):  # loop over the (tiny) kernel taps, not over tokens
        out = out + xp[:, j : j + t, :] * w[:, j]
    return out


def l2norm(x: Array, eps: float = L2NORM_EPS) -> Array:
    """x / sqrt(sum(x^2) + eps) over the last axis (FLA's / transformers' ``l2norm``)."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def gate_params(a: Array, b: Array, a_log: Array, dt_bias: Array) -> tuple[Array, Array]:
    """beta = sigmoid(b); g = -exp(A_log) * softplus(a + dt_bias) ([B, T, H_v], returned in float32)."""
    beta = jax.nn.sigmoid(b).astype(jnp.float32)  # in b's dtype, as transformers
    g = -jnp.exp(a_log.astype(jnp.float32)) * jax.nn.softplus(
        a.astype(jnp.float32) + dt_bias.astype(jnp.float32)
    )
    return g, beta


def _prepare(q, k, v, g, beta, mask, use_qk_l2norm):
    """Common preprocessing: float32, head repetition, l2norm, 1/sqrt(d_k), padding -> identity update."""
    hk, hv = k.shape[2], v.shape[2]
    if hv % hk:
        raise ValueError(f"value heads ({hv}) must be a multiple of key heads ({hk})")
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    g = g.astype(jnp.float32)
    beta = beta.astype(jnp.float32)
    if hv != hk:
        q = jnp.repeat(q, hv // hk, axis=2)
        k = jnp.repeat(k, hv // hk, axis=2)
    if use_qk_l2norm:
        q = l2norm(q)
        k = l2norm(k)
    q = q * (q.shape[-1] ** -0.5)
    if mask is not None:
        m = mask.astype(bool)
        k = jnp.where(m[:, :, None, None], k, 0.0)
        v = jnp.where(m[:, :, None, None], v, 0.0)
        beta = jnp.where(m[:, :, None], beta, 0.0)
        g = jnp.where(m[:, :, None], g, 0.0)
    return q, k, v, g, beta


def recurrent_gated_delta_rule(
    q: Array,
    k: Array,
    v: Array,
    g: Array,
    beta: Array,
    mask: Array | None = None,
    *,
    initial_state: Array | None = None,
    use_qk_l2norm: bool = True,
) -> tuple[Array, Array]:
    """Token-by-token gated delta rule (``lax.scan`` over time), float32.

    S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - (exp(g_t) S_{t-1})^T k_t))^T;  o_t = S_t^T q_t.
    q, k: [B, T, H_k, d_k]; v: [B, T, H_v, d_v]; g, beta: [B, T, H_v]; mask: [B, T] (1 = real token).
    Returns (o [B, T, H_v, d_v] float32, final state [B, H_v, d_k, d_v]).
    """
    q, k, v, g, beta = _prepare(q, k, v, g, beta, mask, use_qk_l2norm)
    b, _, h, dk = k.shape
    dv = v.shape[-1]
    s0 = jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)

    def step(s, xs):
        q_t, k_t, v_t, g_t, b_t = xs  # [B,H,dk], [B,H,dk], [B,H,dv], [B,H], [B,H]
        s = s * jnp.exp(g_t)[..., None, None]
        kv_mem = jnp.einsum("bhkv,bhk->bhv", s, k_t)
        delta = (v_t - kv_mem) * b_t[..., None]
        s = s + k_t[..., :, None] * delta[..., None, :]
        o_t = jnp.einsum("bhkv,bhk->bhv", s, q_t)
        return s, o_t

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta))
    s, o = jax.lax.scan(step, s0, xs)
    return jnp.moveaxis(o, 0, 1), s


def unit_lower_inverse(a: Array) -> Array:
    """(I + N)^{-1} for a unit lower-triangular ``a = I + N`` [..., C, C] by recursive 2x2 block inversion.

    [[A, 0], [M, B]]^{-1} = [[A^{-1}, 0], [-B^{-1} M A^{-1}, B^{-1}]]  (depth ceil(log2 C), batched matmuls only).
    Only the lower triangle of ``a`` is read; its diagonal is taken to be 1.

    Used instead of ``jax.scipy.linalg.solve_triangular``: on CPU that lowers to a LAPACK ``trsm`` custom
    call which never returns when the program runs SPMD-partitioned over several (simulated) CPU devices,
    so a sharded Qwen 3.5 forward hung; plain matmuls partition and run everywhere.
    """
    c = a.shape[-1]
    if c == 1:
        return jnp.ones_like(a)
    h = c // 2
    hp = jax.lax.Precision.HIGHEST
    inv_a = unit_lower_inverse(a[..., :h, :h])
    inv_b = unit_lower_inverse(a[..., h:, h:])
    low = -jnp.einsum("...ij,...jk,...kl->...il", inv_b, a[..., h:, :h], inv_a, precision=hp)
    top = jnp.concatenate([inv_a, jnp.zeros((*inv_a.shape[:-1], c - h), a.dtype)], axis=-1)
    return jnp.concatenate([top, jnp.concatenate([low, inv_b], axis=-1)], axis=-2)


def chunk_gated_delta_rule(
    q: Array,
    k: Array,
    v: Array,
    g: Array,
    beta: Array,
    mask: Array | None = None,
    *,
    chunk_size: int = CHUNK_SIZE,
    initial_state: Array | None = None,
    use_qk_l2norm: bool = True,
) -> tuple[Array, Array]:
    """Chunked gated delta rule (the UT / WY form), float32, ``lax.scan`` over chunks.

    Within a chunk of C tokens with cumulative log-decay c_i = sum_{j<=i} g_j and
    D_ij = exp(c_i - c_j) for j <= i (0 above the diagonal):
        T   = (I + strict_lower((beta k) k^T * D))^{-1}        (unit lower-triangular solve)
        U   = T (beta v),   W = T (beta k * exp(c))
        V'  = U - W S                                           (the delta-rule corrected values)
        O   = (q * exp(c)) S + ((q k^T) * D) V'
        S  <- exp(c_C) S + (k * exp(c_C - c))^T V'
    which equals :func:`recurrent_gated_delta_rule` exactly in exact arithmetic. Shapes as there;
    T need not be a multiple of ``chunk_size`` (the tail is padded with identity updates).
    """
    q, k, v, g, beta = _prepare(q, k, v, g, beta, mask, use_qk_l2norm)
    b, t, h, dk = k.shape
    dv = v.shape[-1]
    c = chunk_size
    pad = (-t) % c
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        g, beta = (jnp.pad(x, ((0, 0), (0, pad), (0, 0))) for x in (g, beta))
    n = (t + pad) // c

    # [B, H, N, C, d] layout
    def chunks(x):
        x = jnp.moveaxis(x, 2, 1)  # [B, H, T, ...]
        return x.reshape(x.shape[0], x.shape[1], n, c, *x.shape[3:])

    q, k, v, g, beta = (chunks(x) for x in (q, k, v, g, beta))
    k_beta = k * beta[..., None]
    v_beta = v * beta[..., None]
    cum = jnp.cumsum(g, axis=-1)  # [B, H, N, C]
    lower = jnp.tril(jnp.ones((c, c), bool))
    diff = cum[..., :, None] - cum[..., None, :]
    decay = jnp.where(lower, jnp.exp(jnp.where(lower, diff, 0.0)), 0.0)  # [B,H,N,C,C]
    hp = jax.lax.Precision.HIGHEST
    ut = jnp.einsum("bhncd,bhned->bhnce", k_beta, k, precision=hp) * decay
    ut = jnp.where(jnp.tril(jnp.ones((c, c), bool), -1), ut, 0.0) + jnp.eye(c, dtype=jnp.float32)
    rhs = jnp.concatenate([v_beta, k_beta * jnp.exp(cum)[..., None]], axis=-1)
    sol = jnp.einsum("bhnce,bhned->bhncd", unit_lower_inverse(ut), rhs, precision=hp)
    new_values, k_cumdecay = sol[..., :dv], sol[..., dv:]
    intra = jnp.einsum("bhncd,bhned->bhnce", q, k, precision=hp) * decay
    q_dec = q * jnp.exp(cum)[..., None]
    k_dec = k * jnp.exp(cum[..., -1:] - cum)[..., None]
    chunk_decay = jnp.exp(cum[..., -1])  # [B, H, N]

    s0 = jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)

    def step(s, xs):
        u_i, w_i, q_i, k_i, a_i, d_i = xs
        v_new = u_i - jnp.einsum("bhck,bhkv->bhcv", w_i, s, precision=hp)
        o_i = jnp.einsum("bhck,bhkv->bhcv", q_i, s, precision=hp) + jnp.einsum(
            "bhce,bhev->bhcv", a_i, v_new, precision=hp
        )
        s = s * d_i[..., None, None] + jnp.einsum("bhck,bhcv->bhkv", k_i, v_new, precision=hp)
        return s, o_i

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (new_values, k_cumdecay, q_dec, k_dec, intra, chunk_decay))
    s, o = jax.lax.scan(step, s0, xs)  # o: [N, B, H, C, dv]
    o = jnp.moveaxis(o, 0, 2).reshape(b, h, n * c, dv)[:, :, :t]
    return jnp.moveaxis(o, 1, 2), s


def gated_rms_norm(x: Array, gate: Array, weight: Array, eps: float) -> Array:
    """transformers' ``Qwen3_5RMSNormGated``: (w * cast(x / rms(x))) * SiLU(gate), statistics in float32.

    x, gate: [..., d]; weight: [d] (plain w, initialized to ones). Output in x's dtype.
    """
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    var = jnp.mean(xf * xf, axis=-1, keepdims=True)
    y = (xf * jax.lax.rsqrt(var + eps)).astype(dtype)
    y = weight.astype(dtype) * y
    y = y.astype(jnp.float32) * jax.nn.silu(gate.astype(jnp.float32))
    return y.astype(dtype)


def _linear(x: Array, w: Array) -> Array:
    """x @ w^T with w in HF layout [out, in]."""
    return L.einsum_acc32("...i,oi->...o", x, w)


def gated_deltanet(
    x: Array,
    mask: Array | None,
    *,
    in_proj_qkv: Array,
    in_proj_z: Array,
    in_proj_b: Array,
    in_proj_a: Array,
    conv_weight: Array,
    a_log: Array,
    dt_bias: Array,
    norm_weight: Array,
    out_proj: Array,
    dims: DeltaNetDims,
    eps: float,
    chunk_size: int = CHUNK_SIZE,
) -> Array:
    """The whole Gated DeltaNet token mixer (see the module docstring). x: [B, T, D] -> [B, T, D].

    Weights in HF layout: in_proj_qkv [2 H_k d_k + H_v d_v, D], in_proj_z [H_v d_v, D],
    in_proj_b / in_proj_a [H_v, D], conv_weight [conv_dim, K] (or [conv_dim, 1, K]),
    a_log / dt_bias [H_v], norm_weight [d_v], out_proj [D, H_v d_v].
    """
    bsz, t, _ = x.shape
    if mask is not None:
        x = x * mask[:, :, None].astype(x.dtype)
    if conv_weight.ndim == 3:
        conv_weight = conv_weight[:, 0, :]
    mixed = _linear(x, in_proj_qkv)
    z = _linear(x, in_proj_z).reshape(bsz, t, dims.num_v_heads, dims.head_v_dim)
    b = _linear(x, in_proj_b)
    a = _linear(x, in_proj_a)
    mixed = jax.nn.silu(causal_depthwise_conv1d(mixed, conv_weight))
    q = mixed[..., : dims.key_dim].reshape(bsz, t, dims.num_k_heads, dims.head_k_dim)
    k = mixed[..., dims.key_dim : 2 * dims.key_dim].reshape(bsz, t, dims.num_k_heads, dims.head_k_dim)
    v = mixed[..., 2 * dims.key_dim :].reshape(bsz, t, dims.num_v_heads, dims.head_v_dim)
    g, beta = gate_params(a, b, a_log, dt_bias)
    o, _ = chunk_gated_delta_rule(q, k, v, g, beta, mask, chunk_size=chunk_size)
    o = gated_rms_norm(o.astype(x.dtype), z, norm_weight, eps)
    return _linear(o.reshape(bsz, t, dims.value_dim), out_proj)


# ---------------------------------------------------------------------------------------------- NNX module
class _Weight(nnx.Module):
    """A bare parameter holder named ``weight`` (keeps HF key names: ``linear_attn.<name>.weight``)."""

    def __init__(self, value: Array):
        self.weight = nnx.Param(value)


class GatedDeltaNet(nnx.Module):
    """Qwen 3.5's ``linear_attn`` block with parameters in Hugging Face names and layout.

    in_proj_qkv / in_proj_z / in_proj_b / in_proj_a / out_proj ``.weight`` [out, in];
    conv1d.weight [conv_dim, 1, K]; A_log, dt_bias [H_v]; norm.weight [d_v] (ones at init).
    Random init follows transformers (dt_bias = 1, A = U(0.01, 16), A_log = log A).
    """

    def __init__(self, hidden_size: int, dims: DeltaNetDims, eps: float, *, dtype, rngs, std: float):
        d = hidden_size

        def normal(shape):
            return jax.random.normal(rngs.params(), shape, dtype) * std

        self.dims = dims
        self.eps = eps
        self.in_proj_qkv = _Weight(normal((dims.conv_dim, d)))
        self.in_proj_z = _Weight(normal((dims.value_dim, d)))
        self.in_proj_b = _Weight(normal((dims.num_v_heads, d)))
        self.in_proj_a = _Weight(normal((dims.num_v_heads, d)))
        self.conv1d = _Weight(normal((dims.conv_dim, 1, dims.conv_kernel)))
        self.dt_bias = nnx.Param(jnp.ones((dims.num_v_heads,), dtype))
        a = jax.random.uniform(rngs.params(), (dims.num_v_heads,), jnp.float32, 0.01, 16.0)
        self.A_log = nnx.Param(jnp.log(a).astype(dtype))
        self.norm = _Weight(jnp.ones((dims.head_v_dim,), dtype))
        self.out_proj = _Weight(normal((d, dims.value_dim)))

    def __call__(self, x: Array, mask: Array | None) -> Array:
        return gated_deltanet(
            x,
            mask,
            in_proj_qkv=self.in_proj_qkv.weight[...],
            in_proj_z=self.in_proj_z.weight[...],
            in_proj_b=self.in_proj_b.weight[...],
            in_proj_a=self.in_proj_a.weight[...],
            conv_weight=self.conv1d.weight[...],
            a_log=self.A_log[...],
            dt_bias=self.dt_bias[...],
            norm_weight=self.norm.weight[...],
            out_proj=self.out_proj.weight[...],
            dims=self.dims,
            eps=self.eps,
        )
