"""Pure functions of the decoder: RMSNorm variants, RoPE variants, masks, attention, gated MLPs.

Each function states the equation it implements and follows transformers 5.23's numerics (which
operations run in float32, where casts happen) so that float32 forwards agree to ~1e-6.
"""

from __future__ import annotations

import math
from typing import NamedTuple

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
def proportional_inv_freq(theta: float, head_dim: int, partial_rotary_factor: float,
                          factor: float = 1.0) -> np.ndarray:
    """transformers' ``_compute_proportional_rope_parameters``: [head_dim // 2] float32 inverse frequencies.

    inv_i = theta^(-2i / head_dim) / factor for i < int(p * head_dim // 2), and 0 for the remaining pairs.
    """
    rope_angles = int(partial_rotary_factor * head_dim // 2)
    exps = np.arange(0, 2 * rope_angles, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = (np.float32(1.0) / (np.float32(theta) ** exps)).astype(np.float32)
    nope = head_dim // 2 - rope_angles
    if nope > 0:
        inv = np.concatenate([inv, np.zeros(nope, np.float32)])
    return (inv / np.float32(factor)).astype(np.float32)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies [rot_dim / 2] (float32) and the cos/sin scaling factor of a RoPE variant.

    default: inv_i = theta^(-2i/d); linear: inv_i / factor; llama3: wavelength-dependent interpolation
    between inv_i and inv_i / factor; yarn: ramp between extrapolated and interpolated frequencies with
    attention factor 0.1 ln(factor) + 1 (or mscale ratio). d = int(head_dim * partial_rotary_factor).
    """
    if rope.rope_type == "proportional":  # gemma4: [head_dim / 2] entries, the non-rotated pairs 0
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


class MaskSpec(NamedTuple):
    """The ingredients of the attention mask, without the [B, Tq, Tk] array (see :func:`attention_mask`).

    Queries are sequence indices ``q_offset + arange(Tq)`` (a cached prefix of ``q_offset`` tokens comes
    first), keys are ``arange(Tk)``. kv_valid [B, Tk] bool; q_positions [B, Tq] / kv_positions [B, Tk] int
    (RoPE positions, used by the sliding window); q_segments / kv_segments [B, T*] or None (packed rows);
    window: sliding window in positions or None.
    """

    q_offset: int
    kv_valid: Array
    q_positions: Array
    kv_positions: Array
    q_segments: Array | None = None
    kv_segments: Array | None = None
    window: int | None = None

    def dense(self) -> Array:
        """The boolean mask [B, 1, Tq, Tk] of :func:`attention_mask`."""
        tq, tk = self.q_positions.shape[1], self.kv_valid.shape[1]
        return attention_mask(
            self.q_offset + jnp.arange(tq, dtype=jnp.int32), jnp.arange(tk, dtype=jnp.int32), self.kv_valid,
            q_positions=self.q_positions, kv_positions=self.kv_positions, q_segments=self.q_segments,
            kv_segments=self.kv_segments, window=self.window,
        )


# ---------------------------------------------------------------------------------------------- attention
def cudnn_attention_applies(q: Array, softcap: float | None) -> bool:
    """Whether cuDNN's fused attention takes this layer: no soft-cap, bf16/fp16, head dim <= 128 and a
    multiple of 8 (the limits of ``jax.nn.dot_product_attention(implementation="cudnn")`` on pre-Hopper
    GPUs; Hopper allows 256, kept at 128 to be safe everywhere)."""
    hd = q.shape[-1]
    return softcap is None and q.dtype in (jnp.bfloat16, jnp.float16) and hd <= 128 and hd % 8 == 0


def attention(
    q: Array, k: Array, v: Array, mask: Array, *, scale: float, softcap: float | None = None,
    implementation: str | None = None,
) -> Array:
    """softmax(scale * q k^T [soft-capped] + mask) v with grouped-query heads.

    q [B, T, N, hd], k/v [B, S, K, hd] (N a multiple of K), mask [B, 1, T, S] bool -> [B, T, N, hd].
    Without a soft-cap: ``jax.nn.dot_product_attention``, by XLA (``implementation=None``) or, with
    ``implementation="cudnn"`` where :func:`cudnn_attention_applies`, by cuDNN's fused kernel (the boolean
    mask becomes an additive bias; other layers fall back to XLA). With a soft-cap (gemma):
    logits s = cap * tanh(scale q.k / cap), softmax in float32, as transformers' eager attention.
    """
    if implementation not in (None, "cudnn"):
        raise ValueError(f"implementation must be None or 'cudnn', got {implementation!r}")
    if softcap is None:
        if implementation == "cudnn" and cudnn_attention_applies(q, softcap):
            return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask, scale=scale,
                                                implementation="cudnn")
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


def blocked_attention(
    q: Array, k: Array, v: Array, spec: MaskSpec, *, scale: float, softcap: float | None = None,
    block_q: int = 256, block_k: int = 512,
) -> Array:
    """The same softmax(scale * q k^T [soft-capped] + mask) v as :func:`attention`, computed block by block.

    Flash-attention style, for backends without a fused kernel (XLA:CPU): queries in blocks of ``block_q``
    (``lax.scan``), and for each, only the key blocks it needs: none after the block holding its last
    *valid* query (causally invisible, or needed only by padding queries), so the work is about half that of
    a dense causal attention, and no array larger than [B, heads, block_q, block_k] exists. Scores and the
    softmax are float32; probabilities are cast to v's dtype for the weighted sum, which accumulates in
    float32.

    The softmax is stabilized by each query's score against itself, s_ii (the mask always lets a query see
    itself), instead of a running maximum:

        out_i = sum_j e^(s_ij - s_ii) v_j / sum_j e^(s_ij - s_ii)

    which is the softmax exactly (any constant c_i per row cancels) and needs no max reduction and no
    rescaling of the accumulators between key blocks (the running maximum of flash attention); the loop
    over a query block's key blocks has a data-dependent trip count, without a per-block ``lax.cond``. The
    sums stay >= 1 (the term j = i), so nothing that matters underflows; should some score exceed the
    stabilizer by so much that a row's sums overflow float32 (a gap of about 88 - ln S nats; not met in
    practice), that query block is recomputed with the row's stabilizer raised by 64, up to 15 times
    (a gap of ~1,000 nats; beyond it the row's output is not finite, never silently wrong). The
    gradient is that of the running-maximum form (:func:`blocked_attention_online`, which a dynamic trip
    count would not allow to differentiate).

    Outputs at invalid query positions (query i is invalid when key ``q_offset + i`` is) are zero.
    q [B, T, N, hd], k/v [B, S, K, hd] (N a multiple of K) -> [B, T, N, hd].
    """
    _check_blocked(q, k, spec)
    arrays = (jnp.asarray(spec.q_offset, jnp.int32),) + tuple(spec[1:6])
    kw = dict(scale=scale, softcap=softcap, block_q=block_q, block_k=block_k)

    def spec_of(a):
        return MaskSpec(*a, spec.window)

    @jax.custom_vjp
    def f(q, k, v, a):
        s = spec_of(a)
        out = _blocked_self_stabilized(q, k, v, s, **kw)
        return jnp.where(_query_valid(s, q.shape[1])[:, :, None, None], out, jnp.zeros((), out.dtype))

    def fwd(q, k, v, a):
        return f(q, k, v, a), (q, k, v, a)

    def bwd(res, g):
        q, k, v, a = res
        s = spec_of(a)
        _, vjp = jax.vjp(lambda q, k, v: blocked_attention_online(q, k, v, s, **kw), q, k, v)
        g = jnp.where(_query_valid(s, q.shape[1])[:, :, None, None], g, jnp.zeros((), g.dtype))
        return (*vjp(g), jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), a))

    f.defvjp(fwd, bwd)
    return f(q, k, v, arrays)


def _check_blocked(q: Array, k: Array, spec: MaskSpec) -> None:
    t, s = q.shape[1], k.shape[1]
    if s != spec.kv_valid.shape[1] or t != spec.q_positions.shape[1]:
        raise ValueError(f"mask spec is for {spec.q_positions.shape[1]} queries / {spec.kv_valid.shape[1]} keys, "
                         f"got q {q.shape} k {k.shape}")
    if isinstance(spec.q_offset, (int, np.integer)) and spec.q_offset + t > s:
        raise ValueError(f"queries are keys q_offset + i: q_offset {spec.q_offset} + {t} queries > {s} keys")


def _query_valid(spec: MaskSpec, t: int) -> Array:
    """[B, T] bool: query i is valid iff key q_offset + i is."""
    return jax.lax.dynamic_slice_in_dim(spec.kv_valid.astype(bool), spec.q_offset, t, axis=1)


class _Blocks(NamedTuple):
    """Queries and keys of :func:`blocked_attention` cut into blocks (see :func:`_blocks`)."""

    bq: int
    bk: int
    nk: int
    qb: Array  # [nq, B, K, G, bq, hd]
    k: Array  # [B, K, nk * bk, hd] (transposed once, so that a visited block is a contiguous slice)
    v: Array
    kv_valid: Array  # [B, nk * bk]
    kv_bias: Array  # [B, nk * bk] float32: 0 at valid keys, -inf at padding
    kv_pos: Array
    kv_seg: Array | None
    q_start: Array  # [nq]: index of each block's first query
    q_pos: Array  # [nq, B, bq]
    q_seg: Array | None
    q_valid: Array  # [nq, B, bq]
    n_blocks: Array  # [nq]: key blocks needed, up to the one holding the block's last valid query


def _pad_to(x: Array | None, length: int, axis: int = 1, value=0) -> Array | None:
    if x is None or x.shape[axis] == length:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _blocks(q: Array, k: Array, v: Array, spec: MaskSpec, block_q: int, block_k: int) -> _Blocks:
    b, t, n, hd = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    bq, bk = min(block_q, t), min(block_k, s)
    nq, nk = -(-t // bq), -(-s // bk)
    tp, sp = nq * bq, nk * bk

    def q_blocks(x):  # [B, T] -> [nq, B, bq]
        return _pad_to(x, tp).reshape(b, nq, bq).transpose(1, 0, 2)

    q_start = spec.q_offset + jnp.arange(nq, dtype=jnp.int32) * bq
    q_valid = q_blocks(_query_valid(spec, t))
    # key blocks a query block needs: up to the one holding its last *valid* query; none for padding only
    q_index = q_start[:, None] + jnp.arange(bq, dtype=jnp.int32)[None]  # [nq, bq]
    last = jnp.max(jnp.where(q_valid, q_index[:, None], -1), axis=(1, 2))
    kv_valid = _pad_to(spec.kv_valid.astype(bool), sp, value=False)
    return _Blocks(
        bq, bk, nk,
        qb=_pad_to(q, tp).reshape(b, nq, bq, kh, g, hd).transpose(1, 0, 3, 4, 2, 5),
        k=_pad_to(k, sp).transpose(0, 2, 1, 3), v=_pad_to(v, sp).transpose(0, 2, 1, 3),
        kv_valid=kv_valid,
        kv_bias=jnp.where(kv_valid, 0.0, -jnp.inf).astype(jnp.float32),
        kv_pos=_pad_to(spec.kv_positions.astype(jnp.int32), sp),
        kv_seg=_pad_to(spec.kv_segments, sp, value=-1),
        q_start=q_start,
        q_pos=q_blocks(spec.q_positions.astype(jnp.int32)),
        q_seg=None if spec.q_segments is None else q_blocks(spec.q_segments),
        q_valid=q_valid,
        n_blocks=jnp.where(last >= 0, jnp.minimum(last // bk + 1, nk), 0),
    )


def _block_scores(qblk: Array, kk: Array, scale: float, softcap: float | None) -> Array:
    """[B, K, G, bq, bk] float32 scores scale * q.k (soft-capped) of a query block and a key block."""
    x = jnp.einsum("bkgqd,bksd->bkgqs", qblk, kk, preferred_element_type=jnp.float32) * jnp.asarray(scale, jnp.float32)
    return x if softcap is None else jnp.tanh(x / softcap) * softcap


def _key_block(blk: _Blocks, j: Array) -> tuple[Array, Array]:
    """Keys and values of key block j as [B, K, bk, hd]."""
    ks = j * blk.bk
    kk = jax.lax.dynamic_slice_in_dim(blk.k, ks, blk.bk, axis=2)
    vv = jax.lax.dynamic_slice_in_dim(blk.v, ks, blk.bk, axis=2)
    return kk, vv


def _block_visible(blk: _Blocks, j: Array, qi: Array, qp: Array, qsg: Array | None, window: int | None) -> Array:
    """[B, bq, bk] bool: the mask of :func:`attention_mask` between query indices ``qi`` and key block j."""
    ks = j * blk.bk
    ki = ks + jnp.arange(blk.bk, dtype=jnp.int32)
    vis = (ki[None, None, :] <= qi[None, :, None]) & jax.lax.dynamic_slice_in_dim(blk.kv_valid, ks, blk.bk, 1)[:, None, :]
    if qsg is not None:
        vis = vis & (qsg[:, :, None] == jax.lax.dynamic_slice_in_dim(blk.kv_seg, ks, blk.bk, 1)[:, None, :])
    if window is not None:
        kp = jax.lax.dynamic_slice_in_dim(blk.kv_pos, ks, blk.bk, 1)
        vis = vis & ((qp[:, :, None] - kp[:, None, :]) < window)
    return vis | (ki[None, None, :] == qi[None, :, None])  # as attention_mask: no empty row


def _unblock(out: Array, t: int) -> Array:
    """[nq, B, K, G, bq, hd] -> [B, T, N, hd]."""
    nq, b, kh, g, bq, hd = out.shape
    return out.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * bq, kh * g, hd)[:, :t]


def _blocked_self_stabilized(q, k, v, spec: MaskSpec, *, scale, softcap, block_q, block_k):
    """The forward of :func:`blocked_attention` (outputs at invalid queries unspecified)."""
    b, t, n, hd = q.shape
    kh = k.shape[2]
    g = n // kh
    blk = _blocks(q, k, v, spec, block_q, block_k)
    nq = blk.qb.shape[0]
    # the stabilizer: each query's score against itself, [nq, B, K, G, bq]
    kself = jax.lax.dynamic_slice_in_dim(k, spec.q_offset, t, axis=1)
    m = jnp.einsum("btkgd,btkd->bkgt", q.reshape(b, t, kh, g, hd), kself,
                   preferred_element_type=jnp.float32) * jnp.asarray(scale, jnp.float32)
    if softcap is not None:
        m = jnp.tanh(m / softcap) * softcap
    m = _pad_to(m, nq * blk.bq, axis=3).reshape(b, kh, g, nq, blk.bq).transpose(3, 0, 1, 2, 4)
    zeros = (jnp.zeros((b, kh, g, blk.bq, hd), jnp.float32), jnp.zeros((b, kh, g, blk.bq), jnp.float32))

    def per_query_block(_, xs):
        qblk, qs, qp, qsg, qv, nkb, mq = xs
        qi = qs + jnp.arange(blk.bq, dtype=jnp.int32)

        def attempt(state):  # all key blocks with stabilizer mq; raise it where a valid row overflowed
            it, mq, *_ = state

            def accumulate(carry, x, vv):
                o, l = carry
                p = jnp.exp(x - mq[..., None])
                o = o + jnp.einsum("bkgqs,bksd->bkgqd", p.astype(vv.dtype), vv, preferred_element_type=jnp.float32)
                return o, l + p.sum(-1)

            def update_full(j, carry):  # a block every query of the block sees causally: only padding to mask
                kk, vv = _key_block(blk, j)
                bias = jax.lax.dynamic_slice_in_dim(blk.kv_bias, j * blk.bk, blk.bk, axis=1)
                return accumulate(carry, _block_scores(qblk, kk, scale, softcap) + bias[:, None, None, None, :], vv)

            def update(j, carry):
                kk, vv = _key_block(blk, j)
                x = _block_scores(qblk, kk, scale, softcap)
                x = jnp.where(_block_visible(blk, j, qi, qp, qsg, spec.window)[:, None, None], x, -jnp.inf)
                return accumulate(carry, x, vv)

            # without segments or a window, the key blocks wholly before the block's first query need no
            # causal mask (most of them): the full mask only on the blocks the diagonal crosses
            n_full = jnp.minimum((qs + 1) // blk.bk, nkb) if qsg is None and spec.window is None else 0
            o, l = jax.lax.fori_loop(0, n_full, update_full, zeros)
            o, l = jax.lax.fori_loop(n_full, nkb, update, (o, l))
            bad = ~(jnp.isfinite(l) & jnp.isfinite(o).all(-1)) & qv[:, None, None, :]
            return it + 1, jnp.where(bad, mq + _RESTABILIZE, mq), o, l, bad.any()

        *_, o, l, _ = jax.lax.while_loop(lambda s: s[4] & (s[0] < _MAX_ATTEMPTS), attempt, (0, mq, *zeros, True))
        return None, (o / jnp.where(l > 0, l, 1.0)[..., None]).astype(q.dtype)

    xs = (blk.qb, blk.q_start, blk.q_pos, blk.q_seg, blk.q_valid, blk.n_blocks, m)
    _, out = jax.lax.scan(per_query_block, None, xs)
    return _unblock(out, t)


_RESTABILIZE = 64.0  # nats added to a row's stabilizer when its sums overflow (blocked_attention)
_MAX_ATTEMPTS = 16


def blocked_attention_online(q, k, v, spec: MaskSpec, *, scale, softcap=None, block_q=256, block_k=512):
    """:func:`blocked_attention` with the running-maximum (online) softmax of flash attention:

        m' = max(m, max_s x_s),   l' = l e^(m - m') + sum_s e^(x_s - m'),   o' = o e^(m - m') + sum_s e^(x_s - m') v_s,

    output o / l. Never overflows, whatever the scores; a static trip count over the key blocks with a
    ``lax.cond`` per block (not a dynamic one) keeps it reverse-differentiable, so it supplies
    :func:`blocked_attention`'s gradient. Outputs at invalid queries are unspecified.
    """
    _check_blocked(q, k, spec)
    b, t, n, hd = q.shape
    kh = k.shape[2]
    g = n // kh
    blk = _blocks(q, k, v, spec, block_q, block_k)

    def per_query_block(_, xs):
        qblk, qs, qp, qsg, nkb = xs
        qi = qs + jnp.arange(blk.bq, dtype=jnp.int32)

        def update(j, carry):
            o, m, l = carry
            kk, vv = _key_block(blk, j)
            x = _block_scores(qblk, kk, scale, softcap)
            x = jnp.where(_block_visible(blk, j, qi, qp, qsg, spec.window)[:, None, None], x, -jnp.inf)
            m_new = jnp.maximum(m, x.max(-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(x - m_safe[..., None])
            corr = jnp.exp(m - m_safe)
            l = l * corr + p.sum(-1)
            o = o * corr[..., None] + jnp.einsum("bkgqs,bksd->bkgqd", p.astype(vv.dtype), vv,
                                                 preferred_element_type=jnp.float32)
            return o, m_new, l

        init = (jnp.zeros((b, kh, g, blk.bq, hd), jnp.float32), jnp.full((b, kh, g, blk.bq), -jnp.inf, jnp.float32),
                jnp.zeros((b, kh, g, blk.bq), jnp.float32))
        body = lambda j, carry: jax.lax.cond(j < nkb, update, lambda _, c: c, j, carry)  # noqa: E731
        o, _, l = jax.lax.fori_loop(0, blk.nk, body, init)
        return None, (o / jnp.where(l > 0, l, 1.0)[..., None]).astype(q.dtype)

    xs = (blk.qb, blk.q_start, blk.q_pos, blk.q_seg, blk.n_blocks)
    _, out = jax.lax.scan(per_query_block, None, xs)
    return _unblock(out, t)


# ---------------------------------------------------------------------------------------------- mlp
def activation(x: Array, kind: str) -> Array:
    """silu(x) = x sigmoid(x); gelu_tanh(x) = x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    if kind == "silu":
        return jax.nn.silu(x)
    if kind == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    raise ValueError(f"unknown activation {kind!r}")


def einsum_acc32(spec: str, a: Array, b: Array) -> Array:
    """``jnp.einsum(spec, a, b)`` accumulated in float32 and returned in a's dtype.

    For float32 this is the plain einsum. For bfloat16 it is what torch does (f32 accumulation, one
    rounding of the result) and on XLA:CPU it is also the fast path: with a float32 result type the dot
    runs on the avx512_bf16 / AMX kernels (~2x float32 on this CPU), while a bfloat16 result type falls
    back to a generic loop no faster than float32 (measured in experiments/bench_forward.py)."""
    return jnp.einsum(spec, a, b.astype(a.dtype), preferred_element_type=jnp.float32).astype(a.dtype)


def linear(x: Array, weight: Array, bias: Array | None = None) -> Array:
    """y = x W^T + b with W in Hugging Face layout [out, in] (float32 accumulation, see einsum_acc32)."""
    y = einsum_acc32("...i,oi->...o", x, weight)
    if bias is not None:
        y = y + bias
    return y


def linear_lora(x: Array, weight: Array, a: Array, b: Array, scaling: float, bias: Array | None = None) -> Array:
    """y = x W^T + s (x A^T) B^T + b: a LoRA adapter applied without merging it into W.

    W [out, in], A [r, in], B [out, r], s = lora_alpha / r. Equal to :func:`linear` with W' = W + s B A up to
    rounding; it never forms W' (memory: W is shared with the base model, A and B are small) and costs
    2 r (in + out) FLOPs per token over the base product's 2 in out. Products accumulate in float32, the
    result is rounded once to x's dtype."""
    f32 = jnp.float32
    y = jnp.einsum("...i,oi->...o", x, weight.astype(x.dtype), preferred_element_type=f32)
    h = jnp.einsum("...i,ri->...r", x, a.astype(x.dtype), preferred_element_type=f32)
    y = y + scaling * jnp.einsum("...r,or->...o", h, b.astype(f32), preferred_element_type=f32)
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype)


def gated_mlp(x: Array, gate_w: Array, up_w: Array, down_w: Array, kind: str, biases=(None, None, None)) -> Array:
    """down(act(gate(x)) * up(x)): SwiGLU (silu) or GeGLU (tanh GELU)."""
    h = activation(linear(x, gate_w, biases[0]), kind) * linear(x, up_w, biases[1])
    return linear(h, down_w, biases[2])
