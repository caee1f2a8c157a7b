"""Pure functions of the decoder: RMSNorm variants, RoPE variants, masks, attention, gated MLPs.

Each function states the equation it implements and follows transformers 5.23's numerics (which
operations run in float32, where casts happen) so that float32 forwards agree to ~1e-6.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from pa_jax.models.config import RopeConfig

Array = jax.Array


# ---------------------------------------------------------------------------------------------- norms
def rms_norm(
    x: Array, weight: Array, eps: float, *, offset: bool = False, weight_f32: bool = False
) -> Array:
    """RMSNorm: y = x / sqrt(mean(x^2) + eps) * g, computed in float32, returned in x.dtype.

    g = w (llama) or 1 + w (gemma, ``offset=True``). With ``weight_f32=False`` (llama/qwen) the normalized
    activations are cast back to x.dtype before multiplying by w; with ``weight_f32=True`` (olmo, gemma) the
    product is formed in float32 and then cast.
    """
    in_dtype = x.dtype
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if offset:
        return (normed * (1.0 + weight.astype(jnp.float32))).astype(in_dtype)
    if weight_f32:
        return (normed * weight.astype(jnp.float32)).astype(in_dtype)
    return weight * normed.astype(in_dtype)


# ---------------------------------------------------------------------------------------------- rope
def rope_inv_freq(rope: RopeConfig, head_dim: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies [rot_dim / 2] (float32) and the cos/sin scaling factor of a RoPE variant.

    default: inv_i = theta^(-2i/d); linear: inv_i / factor; llama3: wavelength-dependent interpolation
    between inv_i and inv_i / factor; yarn: ramp between extrapolated and interpolated frequencies with
    attention factor 0.1 ln(factor) + 1 (or mscale ratio). d = int(head_dim * partial_rotary_factor).
    """
    if rope.rope_type == "proportional":  # gemma4: [head_dim / 2] entries, the non-rotated pairs 0
        from pa_jax.models.gemma4 import proportional_inv_freq

        return proportional_inv_freq(rope.theta, head_dim, rope.partial_rotary_factor, rope.factor or 1.0), 1.0
    dim = int(head_dim * rope.partial_rotary_factor)
    base = np.float32(rope.theta)
    exps = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv = (np.float32(1.0) / (base**exps)).astype(np.float32)
    scaling = 1.0
    if rope.rope_type == "default":
        pass
    elif rope.rope_type == "linear":
        inv = (inv / np.float32(rope.factor)).astype(np.float32)
    elif rope.rope_type == "llama3":
        factor = rope.factor
        lo, hi = rope.low_freq_factor, rope.high_freq_factor
        old = rope.original_max_position_embeddings
        lo_wl, hi_wl = old / lo, old / hi
        wavelen = (2 * math.pi / inv).astype(np.float32)
        inv_l = np.where(wavelen > lo_wl, inv / np.float32(factor), inv).astype(np.float32)
        smooth = ((old / wavelen - lo) / (hi - lo)).astype(np.float32)
        smoothed = ((1 - smooth) * inv_l / np.float32(factor) + smooth * inv_l).astype(np.float32)
        medium = ~(wavelen < hi_wl) & ~(wavelen > lo_wl)
        inv = np.where(medium, smoothed, inv_l).astype(np.float32)
    elif rope.rope_type == "yarn":
        factor = rope.factor
        omp = rope.original_max_position_embeddings
        if factor is None:
            raise ValueError("yarn rope needs 'factor'")

        def get_mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        af = rope.attention_factor
        if af is None:
            if rope.mscale and rope.mscale_all_dim:
                af = float(get_mscale(factor, rope.mscale) / get_mscale(factor, rope.mscale_all_dim))
            else:
                af = get_mscale(factor)
        beta_fast = rope.beta_fast or 32
        beta_slow = rope.beta_slow or 1

        def corr_dim(rot: float) -> float:
            return (dim * math.log(omp / (rot * 2 * math.pi))) / (2 * math.log(rope.theta))

        low, high = corr_dim(beta_fast), corr_dim(beta_slow)
        if rope.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
        pos_freqs = (base**exps).astype(np.float32)
        inv_ext = (np.float32(1.0) / pos_freqs).astype(np.float32)
        inv_int = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)
        ext_factor = (1 - ramp).astype(np.float32)
        inv = (inv_int * (1 - ext_factor) + inv_ext * ext_factor).astype(np.float32)
        scaling = float(af)
    else:
        raise ValueError(f"unsupported rope_type {rope.rope_type!r}")
    return inv, scaling


def rope_cos_sin(positions: Array, inv_freq: Array, scaling: float) -> tuple[Array, Array]:
    """cos, sin [B, T, rot_dim] float32 of angles positions * inv_freq (duplicated halves), times scaling."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * scaling, jnp.sin(emb) * scaling


def apply_rope(x: Array, cos: Array, sin: Array, *, f32: bool = False) -> Array:
    """Rotate-half RoPE on x [B, T, N, hd]: x_r = x * cos + rotate_half(x) * sin on the first rot_dim features.

    rotate_half([a, b]) = [-b, a]. The remaining hd - rot_dim features pass through (partial rotary).
    ``f32=False`` casts cos/sin to x.dtype first (llama, gemma); ``f32=True`` multiplies in float32 (olmo).
    """
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    if not f32:
        c, s = c.astype(x.dtype), s.astype(x.dtype)
    half = rot // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out = (x_rot * c + rotated * s).astype(x.dtype)
    if x_pass.shape[-1]:
        out = jnp.concatenate([out, x_pass], axis=-1)
    return out


# ---------------------------------------------------------------------------------------------- masks
def attention_mask(
    q_index: Array,
    kv_index: Array,
    kv_valid: Array,
    *,
    q_positions: Array | None = None,
    kv_positions: Array | None = None,
    q_segments: Array | None = None,
    kv_segments: Array | None = None,
    window: int | None = None,
) -> Array:
    """Boolean mask [B, 1, Tq, Tk]: key k visible to query q iff

    kv_index[k] <= q_index[q] (causal, on sequence indices as transformers) and kv_valid[b, k] (padding)
    and segment[q] == segment[k] (packed rows) and, with a sliding window W, q_pos - k_pos < W;
    plus k == q itself, so that padding queries (meaningless outputs) never have an empty row.

    The window is measured in positions (equal to index distance inside one unpadded sequence, as
    transformers measures it; also right when a cached prefix is followed by a left-padded suffix).
    q_index [Tq], kv_index [Tk]: int; kv_valid [B, Tk] bool; positions / segments [B, T*].
    """
    m = kv_index[None, None, :] <= q_index[None, :, None]
    m = m & kv_valid[:, None, :]
    if q_segments is not None and kv_segments is not None:
        m = m & (q_segments[:, :, None] == kv_segments[:, None, :])
    if window is not None:
        qp = q_positions if q_positions is not None else jnp.broadcast_to(q_index, kv_valid.shape[:1] + q_index.shape)
        kp = kv_positions if kv_positions is not None else jnp.broadcast_to(kv_index, kv_valid.shape)
        m = m & ((qp[:, :, None] - kp[:, None, :]) < window)
    # A padding query sees no valid key; let it see itself so that no row is fully masked (kernels may
    # return NaN there, and NaN values would leak through 0-probability terms). Valid queries are unchanged.
    m = m | (kv_index[None, None, :] == q_index[None, :, None])
    return m[:, None, :, :]


# ---------------------------------------------------------------------------------------------- attention
def attention(
    q: Array, k: Array, v: Array, mask: Array, *, scale: float, softcap: float | None = None
) -> Array:
    """softmax(scale * q k^T [soft-capped] + mask) v with grouped-query heads.

    q [B, T, N, hd], k/v [B, S, K, hd] (N a multiple of K), mask [B, 1, T, S] bool -> [B, T, N, hd].
    Without a soft-cap: ``jax.nn.dot_product_attention`` (cuDNN where available, XLA otherwise). With one
    (gemma): logits s = cap * tanh(scale q.k / cap), softmax in float32, as transformers' eager attention.
    """
    if softcap is None:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
    b, t, n, hd = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, hd)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k) * jnp.asarray(scale, q.dtype)
    logits = (jnp.tanh(logits / softcap) * softcap).astype(jnp.float32)
    big_neg = jnp.finfo(jnp.float32).min
    logits = jnp.where(mask[:, :, None, :, :], logits, big_neg)
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, n, hd)


# ---------------------------------------------------------------------------------------------- mlp
def activation(x: Array, kind: str) -> Array:
    """silu(x) = x sigmoid(x); gelu_tanh(x) = x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    if kind == "silu":
        return jax.nn.silu(x)
    if kind == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    raise ValueError(f"unknown activation {kind!r}")


def linear(x: Array, weight: Array, bias: Array | None = None) -> Array:
    """y = x W^T + b with W in Hugging Face layout [out, in]."""
    y = jnp.einsum("...i,oi->...o", x, weight)
    if bias is not None:
        y = y + bias
    return y


def gated_mlp(x: Array, gate_w: Array, up_w: Array, down_w: Array, kind: str, biases=(None, None, None)) -> Array:
    """down(act(gate(x)) * up(x)): SwiGLU (silu) or GeGLU (tanh GELU)."""
    h = activation(linear(x, gate_w, biases[0]), kind) * linear(x, up_w, biases[1])
    return linear(h, down_w, biases[2])
