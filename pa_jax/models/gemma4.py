"""Gemma 4 (text tower) pieces that no other family has, as pure functions.

Follows transformers 5.23 ``models/gemma4/modeling_gemma4.py`` (``Gemma4TextModel``):

* **Proportional RoPE** (global layers): inv_freq has head_dim / 2 entries; the first
  ``int(p * head_dim // 2)`` are theta^(-2i / head_dim) (note: exponent over the *whole* head_dim),
  the rest 0 (those feature pairs are not rotated); rotate-half runs over the whole head_dim.
* **KV sharing**: the last ``num_kv_shared_layers`` layers compute no K/V; each reuses the
  (normed, rotated) K/V of the last earlier non-shared layer of the same layer type.
* **Per-layer embeddings (PLE)**: a ``[vocab_per_layer, L * P]`` table looked up by token id
  (scaled by sqrt(P)), plus a projection of the main embeddings (scaled by D^-1/2, RMS-normed per
  layer slice), summed and scaled by 2^-1/2; layer l gets slice l [B, T, P] and adds, after its MLP,
  ``norm(W_proj (act(W_gate h) * ple_l))`` to the residual stream.

The per-layer table is the largest tensor of E4B (262144 x 10752 = 2.82e9 parameters, 5.6 GB in
bf16) and is only ever gathered from: pa-jax shards it along the vocabulary axis over the mesh (see
``sharding``), so each device holds 1/n of it and the lookup is a sharded gather (each device
gathers the rows it owns, the partial results are summed), never a whole copy per device.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pa_jax.models import layers as L
from pa_jax.models.families import kv_sharing_sources  # noqa: F401  (re-export: gemma4's KV sharing)
from pa_jax.models.layers import proportional_inv_freq  # noqa: F401  (re-export: gemma4's RoPE variant)

Array = jax.Array


def rms_norm_plain(x: Array, weight: Array | None, eps: float) -> Array:
    """``Gemma4RMSNorm``: y = (x / sqrt(mean(x^2) + eps)) [* w] in float32, cast back to x.dtype.

    Plain w (not 1 + w); ``weight=None`` is the scale-free norm (the V norm).
    """
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    return y.astype(x.dtype)


def _scale(x: Array, s: float) -> Array:
    """x * s computed in float32 (or wider) and rounded to x.dtype (torch: tensor * python float)."""
    ct = jnp.promote_types(x.dtype, jnp.float32)
    return (x.astype(ct) * jnp.asarray(s, ct)).astype(x.dtype)


def embed_scale(hidden: int, dtype) -> Array:
    """sqrt(hidden) cast to the parameter dtype, as ``Gemma4TextScaledWordEmbedding`` multiplies it."""
    return jnp.asarray(np.float32(hidden) ** np.float32(0.5), jnp.float32).astype(dtype)


def per_layer_inputs(
    input_ids: Array,
    inputs_embeds: Array,
    table: Array,
    model_projection: Array,
    projection_norm: Array,
    *,
    num_layers: int,
    per_layer_dim: int,
    eps: float,
) -> Array:
    """Per-layer inputs [B, T, L, P] of Gemma 4 (``get_per_layer_inputs`` + ``project_per_layer_inputs``).

    tok  = table[ids] * cast(sqrt(P))                                  reshaped to [B, T, L, P]
    ctx  = RMSNorm_w((inputs_embeds W_m^T) * D^-1/2)                    reshaped to [B, T, L, P]
    out  = (ctx + tok) * 2^-1/2
    table [V_pl, L * P]; model_projection [L * P, D]; projection_norm [P]; inputs_embeds already scaled.
    """
    b, t = input_ids.shape
    dtype = inputs_embeds.dtype
    tok = jnp.take(table, input_ids, axis=0).astype(dtype) * embed_scale(per_layer_dim, dtype)
    tok = tok.reshape(b, t, num_layers, per_layer_dim)
    ctx = L.einsum_acc32("btd,od->bto", inputs_embeds, model_projection)
    ctx = _scale(ctx, float(inputs_embeds.shape[-1]) ** -0.5).reshape(b, t, num_layers, per_layer_dim)
    ctx = rms_norm_plain(ctx, projection_norm, eps)
    return _scale(ctx + tok, 2.0 ** -0.5)


def per_layer_residual(
    hidden: Array,
    per_layer_input: Array,
    gate: Array,
    projection: Array,
    post_norm: Array,
    *,
    act,
    eps: float,
) -> Array:
    """h + RMSNorm_w(W_proj (act(W_gate h) * ple_l)) (the PLE branch after a Gemma 4 layer's MLP).

    hidden [B, T, D]; per_layer_input [B, T, P]; gate [P, D]; projection [D, P]; post_norm [D].
    """
    x = act(L.einsum_acc32("btd,pd->btp", hidden, gate))
    x = x * per_layer_input.astype(hidden.dtype)
    x = L.einsum_acc32("btp,dp->btd", x, projection)
    return hidden + rms_norm_plain(x, post_norm, eps)
