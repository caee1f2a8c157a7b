"""One Flax NNX decoder for every supported family (flags in :class:`ModelConfig`, not a copy per family).

Parameters are stored in Hugging Face layout and naming (``weight`` [out, in], ``bias`` [out]) so that a
checkpoint tensor and the parameter it fills have the same shape and a device's slice of one is the same
slice of the other (the sharded loader reads each device's slice straight from the file).

Forward contract::

    hidden = model(input_ids [B, T], attention_mask [B, T] | None, *, positions=None, segment_ids=None)
    hidden, cache = model(..., return_kv=True)            # cache: KVCache of this call's tokens
    hidden = model(suffix_ids, suffix_mask, kv_prefix=cache)   # reuse a shared prefix's keys/values
    hidden, buffer = model(chunk_ids, chunk_mask, cache=buffer, cache_index=i)   # fill a KV buffer in place
    trunk = model(ids, mask, layer_range=(0, k))                       # embed + layers[:k], residual stream
    hidden = model(ids, mask, layer_range=(k, L), hidden_states=trunk)  # layers[k:] + final norm

With ``layer_range`` every KV cache argument / result holds the range's layers only (concatenating the
trunk's and the branch's layers gives the full model's cache), so two models whose first k layers and
embeddings are identical (:func:`pa_jax.models.shared.shared_prefix_layers`) run the trunk once and fork.

``hidden`` is the final-norm hidden state [B, T, D]; logits = hidden @ model.unembedding().T (then the
final soft-cap) are built by the fused head, never here.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pa_jax.models import deltanet as DN
from pa_jax.models import gemma4 as G4
from pa_jax.models import layers as L
from pa_jax.models.config import ModelConfig, RopeConfig

Array = jax.Array


class KVCache(NamedTuple):
    """Per-layer keys/values of a (shared) prefix, as a forward with ``return_kv=True`` returns them.

    keys[i], values[i]: [Bp, P, K, head_dim] for layer i (keys after q/k norm and RoPE);
    positions: [Bp, P] int32 RoPE positions; valid: [Bp, P] bool (False = padding).
    Bp is 1 (broadcast over any suffix batch) or the suffix batch size.
    """

    keys: tuple[Array, ...]
    values: tuple[Array, ...]
    positions: Array
    valid: Array

    @staticmethod
    def empty(layer_shapes: "KVCache", batch: int, length: int) -> "KVCache":
        """An all-invalid buffer of ``length`` entries shaped like ``layer_shapes`` (e.g. ``jax.eval_shape`` of a
        ``return_kv`` forward), to be filled chunk by chunk with ``model(..., cache=, cache_index=)``."""
        z = lambda a: jnp.zeros((batch, length) + tuple(a.shape[2:]), a.dtype)  # noqa: E731
        return KVCache(tuple(map(z, layer_shapes.keys)), tuple(map(z, layer_shapes.values)),
                       jnp.zeros((batch, length), jnp.int32), jnp.zeros((batch, length), bool))

    def broadcast_to(self, batch: int) -> "KVCache":
        """The same prefix repeated for ``batch`` rows (a [1, P] prefix -> [batch, P])."""
        bc = lambda a: jnp.broadcast_to(a, (batch,) + a.shape[1:])  # noqa: E731
        return KVCache(tuple(map(bc, self.keys)), tuple(map(bc, self.values)), bc(self.positions), bc(self.valid))


def _dtype(dtype) -> jnp.dtype:
    return jnp.dtype(dtype)


@functools.lru_cache(maxsize=64)
def _rope_tables(rope: RopeConfig, head_dim: int) -> tuple[np.ndarray, float]:
    return L.rope_inv_freq(rope, head_dim)


ATTENTION_IMPLS = ("auto", "dense", "blocked", "cudnn")


def _cuda_backend() -> bool:
    if jax.default_backend() != "gpu":
        return False
    return "cuda" in str(getattr(jax.devices()[0].client, "platform_version", "")).lower()


def resolve_attention_impl(impl: str) -> str:
    """"dense": one masked softmax over [B, heads, T, P + T] by XLA (``jax.nn.dot_product_attention``,
    which materializes the scores). "cudnn": the same call with ``implementation="cudnn"``, cuDNN's fused
    flash kernel with the mask passed as an additive bias [B, 1, T, P + T] (NVIDIA GPUs; layers it cannot
    take, a soft-cap, float32, a head dim over 128 or not a multiple of 8, use "dense", see
    :func:`pa_jax.models.layers.attention`). "blocked": :func:`pa_jax.models.layers.blocked_attention`,
    flash-style with causal block skipping, for backends without a fused kernel. "auto": blocked on CPU,
    cudnn on CUDA GPUs, dense elsewhere (TPU, ROCm). Compare them with
    ``experiments/bench_forward.py --batch 1 --seq 4096 --impls dense blocked`` (CPU) or
    ``experiments/bench_gpu.py`` (GPU)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl == "auto":
        if jax.default_backend() == "cpu":
            return "blocked"
        return "cudnn" if _cuda_backend() else "dense"
    if impl == "cudnn" and not _cuda_backend():
        raise ValueError(f"attention_impl 'cudnn' needs an NVIDIA GPU backend; this one is {jax.default_backend()!r}")
    return impl


# ---------------------------------------------------------------------------------------------- modules
class Linear(nnx.Module):
    """y = x W^T + b, W [out, in] (Hugging Face layout); with a LoRA adapter attached unmerged
    (:func:`pa_jax.models.lora.attach_adapter`: ``lora_a`` [r, in], ``lora_b`` [out, r], ``lora_scale`` s),
    y = x W^T + s (x A^T) B^T + b (:func:`pa_jax.models.layers.linear_lora`)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype, rngs: nnx.Rngs, std: float):
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (out_features, in_features), dtype) * std)
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None
        self.lora_a = nnx.data(None)
        self.lora_b = nnx.data(None)
        self.lora_scale = None

    def __call__(self, x: Array) -> Array:
        bias = None if self.bias is None else self.bias[...]
        if self.lora_a is None:
            return L.linear(x, self.weight[...], bias)
        return L.linear_lora(x, self.weight[...], self.lora_a[...], self.lora_b[...], self.lora_scale, bias)


class Embedding(nnx.Module):
    """Token embedding table [V, D]."""

    def __init__(self, vocab: int, dim: int, *, dtype, rngs: nnx.Rngs, std: float):
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (vocab, dim), dtype) * std)

    def __call__(self, ids: Array) -> Array:
        # mode="clip": ids at padding positions may hold anything (out-of-range ids must not give NaN rows)
        return jnp.take(self.weight[...], ids, axis=0, mode="clip")


class RMSNorm(nnx.Module):
    """RMSNorm with the family's variant (see :func:`pa_jax.models.layers.rms_norm`)."""

    def __init__(self, dim: int, config: ModelConfig, *, dtype):
        init = jnp.zeros if config.norm_offset else jnp.ones
        self.weight = nnx.Param(init((dim,), dtype))
        self.eps = config.rms_norm_eps
        self.offset = config.norm_offset
        self.weight_f32 = config.norm_weight_f32

    def __call__(self, x: Array) -> Array:
        return L.rms_norm(x, self.weight[...], self.eps, offset=self.offset, weight_f32=self.weight_f32)


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs, std: float, intermediate: int | None = None):
        d, f, b = config.hidden_size, intermediate or config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(d, f, bias=b, dtype=dtype, rngs=rngs, std=std)
        self.up_proj = Linear(d, f, bias=b, dtype=dtype, rngs=rngs, std=std)
        self.down_proj = Linear(f, d, bias=b, dtype=dtype, rngs=rngs, std=std)
        self.activation = config.activation

    def __call__(self, x: Array) -> Array:
        return self.down_proj(L.activation(self.gate_proj(x), self.activation) * self.up_proj(x))


class LayerContext(NamedTuple):
    """What a layer needs besides its input: RoPE tables and mask of its layer type, an optional prefix."""

    cos: Array
    sin: Array
    mask: Array | L.MaskSpec  # dense [B, 1, T, P + T] bool, or the spec for blocked attention
    prefix_k: Array | None
    prefix_v: Array | None
    per_layer_input: Array | None = None  # gemma4 PLE slice of this layer [B, T, P]
    shared_kv: tuple[Array, Array] | None = None  # gemma4 KV sharing: (k, v) of the producer layer
    valid: Array | None = None  # [B, T] bool, for the recurrent (linear-attention) layers
    cache_k: Array | None = None  # in-place buffer mode: this layer's [B, S, K, hd] key / value buffers,
    cache_v: Array | None = None  # the chunk's keys / values are written at cache_index before attending
    cache_index: Array | None = None
    attention_impl: str = "dense"  # "dense" / "cudnn" (with a dense mask) or "blocked" (with a MaskSpec)


class Attention(nnx.Module):
    """Multi-head / grouped-query self-attention with the family's q/k norm, biases, RoPE and soft-cap."""

    def __init__(self, config: ModelConfig, layer_idx: int, *, dtype, rngs: nnx.Rngs, std: float):
        c = config
        self.config = c
        self.layer_type = c.layer_types[layer_idx]
        d, n = c.hidden_size, c.num_heads
        k, hd = c.kv_heads_for(self.layer_type), c.head_dim_for(self.layer_type)
        self.head_dim, self.num_kv_heads = hd, k
        # gemma4: KV-shared layers reuse a producer's K/V (no k/v weights); K=V full layers have no v_proj.
        self.kv_shared = c.kv_sources[layer_idx] is not None
        self.k_eq_v = c.attention_k_eq_v and self.layer_type == "full_attention"
        q_out = n * hd * (2 if c.attn_output_gate else 1)  # qwen3_5: (query, gate) interleaved per head
        self.q_proj = Linear(d, q_out, bias=c.qkv_bias, dtype=dtype, rngs=rngs, std=std)
        self.k_proj = None if self.kv_shared else Linear(d, k * hd, bias=c.qkv_bias, dtype=dtype, rngs=rngs, std=std)
        self.v_proj = (
            None if self.kv_shared or self.k_eq_v
            else Linear(d, k * hd, bias=c.qkv_bias, dtype=dtype, rngs=rngs, std=std)
        )
        self.o_proj = Linear(n * hd, d, bias=c.o_bias, dtype=dtype, rngs=rngs, std=std)
        if c.qk_norm == "head":
            self.q_norm = RMSNorm(hd, c, dtype=dtype)
            self.k_norm = None if self.kv_shared else RMSNorm(hd, c, dtype=dtype)
        elif c.qk_norm == "proj":
            self.q_norm = RMSNorm(n * hd, c, dtype=dtype)
            self.k_norm = RMSNorm(k * hd, c, dtype=dtype)
        elif c.qk_norm == "none":
            self.q_norm = None
            self.k_norm = None
        else:
            raise ValueError(f"unknown qk_norm {c.qk_norm!r}")

    def __call__(self, x: Array, ctx: LayerContext) -> tuple[Array, tuple[Array, Array]]:
        c = self.config
        b, t, _ = x.shape
        hd, kh = self.head_dim, self.num_kv_heads
        q, gate = self.q_proj(x), None
        if c.attn_output_gate:  # qwen3_5: per head [query | gate]
            q, gate = jnp.split(q.reshape(b, t, c.num_heads, 2 * hd), 2, axis=-1)
            q, gate = q.reshape(b, t, c.num_heads * hd), gate.reshape(b, t, c.num_heads * hd)
        if self.kv_shared:
            k, v = ctx.shared_kv  # already normed and rotated by the producer layer
        else:
            k = self.k_proj(x)
            v = k if self.v_proj is None else self.v_proj(x)  # gemma4 K=V: values are the raw key projection
        if c.qk_norm == "proj":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(b, t, c.num_heads, hd)
        if not self.kv_shared:
            k = k.reshape(b, t, kh, hd)
            v = v.reshape(b, t, kh, hd)
        if c.qk_norm == "head":
            q = self.q_norm(q)
            if not self.kv_shared:
                k = self.k_norm(k)
        if c.v_norm and not self.kv_shared:
            v = G4.rms_norm_plain(v, None, c.rms_norm_eps)
        q = L.apply_rope(q, ctx.cos, ctx.sin, f32=c.rope_f32)
        if not self.kv_shared:
            k = L.apply_rope(k, ctx.cos, ctx.sin, f32=c.rope_f32)
        if ctx.cache_k is not None and not self.kv_shared:  # write this chunk into the buffer, attend over it
            k = jax.lax.dynamic_update_slice_in_dim(ctx.cache_k, k.astype(ctx.cache_k.dtype), ctx.cache_index, 1)
            v = jax.lax.dynamic_update_slice_in_dim(ctx.cache_v, v.astype(ctx.cache_v.dtype), ctx.cache_index, 1)
        new_kv = (k, v)
        if ctx.prefix_k is not None:
            k = jnp.concatenate([ctx.prefix_k.astype(k.dtype), k], axis=1)
            v = jnp.concatenate([ctx.prefix_v.astype(v.dtype), v], axis=1)
        if isinstance(ctx.mask, L.MaskSpec):
            out = L.blocked_attention(q, k, v, ctx.mask, scale=c.attention_scale, softcap=c.attn_logit_softcap)
        else:
            out = L.attention(q, k, v, ctx.mask, scale=c.attention_scale, softcap=c.attn_logit_softcap,
                              implementation="cudnn" if ctx.attention_impl == "cudnn" else None)
        out = out.reshape(b, t, c.num_heads * hd)
        if gate is not None:
            out = out * jax.nn.sigmoid(gate)
        return self.o_proj(out), new_kv


class DecoderLayer(nnx.Module):
    """One block. norm_placement: pre (llama/qwen), post (olmo), sandwich (gemma)."""

    def __init__(self, config: ModelConfig, layer_idx: int, *, dtype, rngs: nnx.Rngs, std: float):
        c = config
        self.placement = c.norm_placement
        d = c.hidden_size
        if c.layer_types[layer_idx] == "linear_attention":  # qwen3_5 Gated DeltaNet token mixer
            self.self_attn = None
            self.linear_attn = DN.GatedDeltaNet(d, c.deltanet_dims, c.rms_norm_eps, dtype=dtype, rngs=rngs, std=std)
        else:
            self.self_attn = Attention(c, layer_idx, dtype=dtype, rngs=rngs, std=std)
            self.linear_attn = None
        wide = c.double_wide_mlp and c.kv_sources[layer_idx] is not None  # gemma4: KV-shared layers' MLP x2
        self.mlp = MLP(c, dtype=dtype, rngs=rngs, std=std, intermediate=2 * c.intermediate_size if wide else None)
        if c.per_layer_input_dim:  # gemma4 per-layer-embedding branch after the MLP
            p = c.per_layer_input_dim
            self.per_layer_input_gate = Linear(d, p, bias=False, dtype=dtype, rngs=rngs, std=std)
            self.per_layer_projection = Linear(p, d, bias=False, dtype=dtype, rngs=rngs, std=std)
            self.post_per_layer_input_norm = RMSNorm(d, c, dtype=dtype)
        else:
            self.per_layer_input_gate = self.per_layer_projection = self.post_per_layer_input_norm = None
        self.activation = c.activation
        self.eps = c.rms_norm_eps
        self.layer_scalar = nnx.Param(jnp.ones((1,), dtype)) if c.layer_scalar else None  # gemma4
        self.input_layernorm = RMSNorm(d, c, dtype=dtype) if c.norm_placement in ("pre", "sandwich") else None
        self.post_attention_layernorm = RMSNorm(d, c, dtype=dtype)
        if c.norm_placement == "sandwich":
            self.pre_feedforward_layernorm = RMSNorm(d, c, dtype=dtype)
        else:
            self.pre_feedforward_layernorm = None
        if c.norm_placement in ("post", "sandwich"):
            self.post_feedforward_layernorm = RMSNorm(d, c, dtype=dtype)
        else:
            self.post_feedforward_layernorm = None

    def _mix(self, x: Array, ctx: LayerContext) -> tuple[Array, tuple[Array | None, Array | None]]:
        """Token mixer: self-attention, or (qwen3_5 linear_attention layers) the Gated DeltaNet."""
        if self.linear_attn is not None:
            return self.linear_attn(x, ctx.valid), (None, None)
        return self.self_attn(x, ctx)

    def __call__(self, x: Array, ctx: LayerContext) -> tuple[Array, tuple[Array, Array]]:
        if self.placement == "pre":
            # llama: post_attention_layernorm is the norm *before* the MLP.
            h, kv = self._mix(self.input_layernorm(x), ctx)
            x = x + h
            x = x + self.mlp(self.post_attention_layernorm(x))
        elif self.placement == "post":
            h, kv = self.self_attn(x, ctx)
            x = x + self.post_attention_layernorm(h)
            x = x + self.post_feedforward_layernorm(self.mlp(x))
        else:  # sandwich
            h, kv = self._mix(self.input_layernorm(x), ctx)
            x = x + self.post_attention_layernorm(h)
            x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        if self.per_layer_input_gate is not None:
            act = functools.partial(L.activation, kind=self.activation)
            x = G4.per_layer_residual(
                x, ctx.per_layer_input, self.per_layer_input_gate.weight[...], self.per_layer_projection.weight[...],
                self.post_per_layer_input_norm.weight[...], act=act, eps=self.eps,
            )
        if self.layer_scalar is not None:
            x = x * self.layer_scalar[...]
        return x, kv


def segment_positions(segment_ids: Array) -> Array:
    """Positions restarting at 0 at each change of segment id along a row: pos_t = t - start(segment of t)."""
    b, t = segment_ids.shape
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    new = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start = jax.lax.cummax(jnp.where(new, idx, 0), axis=1)
    return idx - start


class Decoder(nnx.Module):
    """The decoder-only LM body: embeddings -> layers -> final norm (+ lm_head weight when untied).

    ``Decoder(config, rngs=nnx.Rngs(0), dtype="float32")`` builds a randomly initialized model (normal with
    the config's initializer_range; norms at identity) trainable with nnx/optax; :func:`pa_jax.models.load`
    builds one whose every parameter comes from a checkpoint.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype="float32"):
        self.config = config
        dt = _dtype(dtype)
        self.dtype = dt.name
        self.attention_impl = "auto"  # see resolve_attention_impl; set to "dense" / "blocked" to force one
        std = float(config.hf_config.get("initializer_range", 0.02) or 0.02)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=dt, rngs=rngs, std=std)
        self.layers = nnx.List(
            [DecoderLayer(config, i, dtype=dt, rngs=rngs, std=std) for i in range(config.num_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config, dtype=dt)
        if config.per_layer_input_dim:  # gemma4 per-layer embeddings (see pa_jax.models.gemma4)
            lp = config.num_layers * config.per_layer_input_dim
            self.embed_tokens_per_layer = Embedding(
                config.vocab_size_per_layer_input or config.vocab_size, lp, dtype=dt, rngs=rngs, std=std
            )
            self.per_layer_model_projection = Linear(config.hidden_size, lp, bias=False, dtype=dt, rngs=rngs, std=std)
            self.per_layer_projection_norm = RMSNorm(config.per_layer_input_dim, config, dtype=dt)
        else:
            self.embed_tokens_per_layer = self.per_layer_model_projection = self.per_layer_projection_norm = None
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dt, rngs=rngs, std=std)

    def unembedding(self) -> Array:
        """[V, D]: lm_head.weight, or the embedding table when tied (HF lm_head layout)."""
        return self.embed_tokens.weight[...] if self.lm_head is None else self.lm_head.weight[...]

    def embed(self, input_ids: Array) -> Array:
        """Token embeddings; gemma multiplies by sqrt(D) cast to the parameter dtype (as transformers)."""
        x = self.embed_tokens(input_ids)
        if self.config.embed_scale:
            x = x * jnp.asarray(np.float32(self.config.hidden_size**0.5), dtype=x.dtype)
        return x

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        *,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        kv_prefix: KVCache | None = None,
        return_kv: bool = False,
        attention_impl: str | None = None,
        cache: KVCache | None = None,
        cache_index: Array | int | None = None,
        layer_range: tuple[int, int] | None = None,
        hidden_states: Array | None = None,
    ):
        """Final-norm hidden states [B, T, D] (and the KVCache of these tokens when ``return_kv``).

        attention_mask: 1 = token, 0 = padding (left or right). positions default to cumsum(mask) - 1
        (plus the prefix's valid length with ``kv_prefix``), or restart per segment with ``segment_ids``
        (packed rows: tokens attend only within their segment). ``kv_prefix``: a KVCache of a prefix computed
        earlier (batch 1 is broadcast); the suffix attends to all valid prefix tokens, then causally to itself.
        attention_impl: overrides ``self.attention_impl`` for this call (see :func:`resolve_attention_impl`).

        ``cache`` / ``cache_index`` (in-place buffer mode, for long rows processed chunk by chunk): ``cache`` is a
        KVCache buffer of S entries (``KVCache.empty``) whose entries before ``cache_index`` hold earlier tokens
        (invalid gaps allowed) and whose entries from ``cache_index`` on are unused (invalid). This call's
        tokens are written at ``cache_index`` (a traced scalar: one compiled program serves every chunk) and
        attend to every valid earlier entry and causally to themselves; returns (hidden, updated cache).

        ``layer_range=(start, stop)`` runs layers [start, stop) only: start == 0 embeds ``input_ids``, start > 0
        continues from ``hidden_states`` [B, T, D] (the residual stream after layer start - 1, as a call with
        ``stop == start`` returned it); stop < num_layers returns the residual stream after layer stop - 1 (no final
        norm). ``input_ids`` / ``attention_mask`` / ``positions`` / ``segment_ids`` are the same as for the whole
        forward (they set positions and masks). ``kv_prefix`` / ``cache`` / the returned cache hold the range's
        layers only. Composing (0, k) then (k, L) equals the whole forward (same operations in the same order).
        """
        c = self.config
        input_ids = jnp.asarray(input_ids)
        b, t = input_ids.shape
        start, stop = (0, c.num_layers) if layer_range is None else (int(layer_range[0]), int(layer_range[1]))
        if not 0 <= start < stop <= c.num_layers:
            raise ValueError(f"layer_range {layer_range} must satisfy 0 <= start < stop <= {c.num_layers} (num_layers)")
        if (start > 0) != (hidden_states is not None):
            raise ValueError(f"layer_range starting at {start}: hidden_states (the residual stream after layer "
                             f"{start - 1}) must be given exactly when start > 0")
        n_range = stop - start
        for i in range(start, stop):
            if c.kv_sources[i] is not None and c.kv_sources[i] < start:
                raise ValueError(f"layer {i} shares the keys/values of layer {c.kv_sources[i]}, outside layer_range "
                                 f"({start}, {stop})")
        valid = jnp.ones((b, t), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        if c.has_linear_attention:  # qwen3_5: recurrent layers carry a state, not per-token keys/values
            DN.check_no_segments(segment_ids)
            if kv_prefix is not None or return_kv:
                raise ValueError("kv_prefix / return_kv are not supported for models with linear_attention layers")
        if cache is not None:
            if kv_prefix is not None or segment_ids is not None or return_kv:
                raise ValueError("cache= (buffer mode) cannot be combined with kv_prefix, segment_ids or return_kv")
            if cache_index is None:
                raise ValueError("cache= needs cache_index (where this call's tokens go in the buffer)")
            if len(cache.keys) != n_range:
                raise ValueError(f"cache has {len(cache.keys)} layers, expected {n_range} (layers {start}..{stop - 1})")
            if cache.valid.shape[0] != b:
                raise ValueError(f"cache batch {cache.valid.shape[0]} != input batch {b}")
            cache_index = jnp.asarray(cache_index, jnp.int32)
            p = cache_index
            offset = jnp.sum(cache.valid, axis=1, dtype=jnp.int32)[:, None]  # entries at/after cache_index: unused
        elif kv_prefix is not None:
            if segment_ids is not None:
                raise ValueError("segment_ids cannot be combined with kv_prefix")
            if len(kv_prefix.keys) != n_range:
                raise ValueError(f"kv_prefix has {len(kv_prefix.keys)} layers, expected {n_range} "
                                 f"(layers {start}..{stop - 1})")
            if kv_prefix.valid.shape[0] not in (1, b):
                raise ValueError(f"kv_prefix batch {kv_prefix.valid.shape[0]} must be 1 or {b}")
            kv_prefix = kv_prefix.broadcast_to(b)
            p = kv_prefix.valid.shape[1]
            prefix_valid = kv_prefix.valid.astype(bool)
            prefix_pos = kv_prefix.positions.astype(jnp.int32)
            offset = jnp.sum(prefix_valid, axis=1, dtype=jnp.int32)[:, None]
        else:
            p = 0
            prefix_valid = jnp.zeros((b, 0), bool)
            prefix_pos = jnp.zeros((b, 0), jnp.int32)
            offset = jnp.zeros((b, 1), jnp.int32)
        if positions is None:
            if segment_ids is not None:
                positions = segment_positions(jnp.asarray(segment_ids))
            else:
                positions = jnp.maximum(jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0) + offset
        positions = jnp.asarray(positions, jnp.int32)
        seg = None if segment_ids is None else jnp.asarray(segment_ids)

        if cache is not None:  # write this call's tokens into the buffer; keys are the whole buffer
            cache = cache._replace(
                positions=jax.lax.dynamic_update_slice_in_dim(cache.positions, positions, cache_index, 1),
                valid=jax.lax.dynamic_update_slice_in_dim(cache.valid, valid, cache_index, 1))
            kv_valid, kv_pos = cache.valid, cache.positions
        else:
            kv_valid = jnp.concatenate([prefix_valid, valid], axis=1)
            kv_pos = jnp.concatenate([prefix_pos, positions], axis=1)
        impl = resolve_attention_impl(attention_impl or self.attention_impl)
        masks, tables = {}, {}
        for lt in sorted(set(c.layer_types)):
            spec = L.MaskSpec(p, kv_valid, positions, kv_pos, seg, seg, c.window_for(lt))
            masks[lt] = spec if impl == "blocked" else spec.dense()
            inv, scaling = _rope_tables(c.rope_for(lt), c.head_dim_for(lt))
            tables[lt] = L.rope_cos_sin(positions, jnp.asarray(inv), scaling)

        x = self.embed(input_ids) if start == 0 else None
        per_layer = None
        if self.embed_tokens_per_layer is not None:
            per_layer = G4.per_layer_inputs(
                input_ids, self.embed(input_ids) if x is None else x, self.embed_tokens_per_layer.weight[...], self.per_layer_model_projection.weight[...],
                self.per_layer_projection_norm.weight[...], num_layers=c.num_layers,
                per_layer_dim=c.per_layer_input_dim, eps=c.rms_norm_eps,
            )
        sources = c.kv_sources
        produced: dict[int, tuple[Array, Array]] = {}
        keys, values = [], []
        if x is None:
            x = jnp.asarray(hidden_states)
            if x.shape != (b, t, c.hidden_size):
                raise ValueError(f"hidden_states shape {x.shape}, expected {(b, t, c.hidden_size)}")
        for i in range(start, stop):
            layer, j = self.layers[i], i - start  # j: index in the range's caches
            lt = c.layer_types[i]
            cos, sin = tables[lt]
            ctx = LayerContext(
                cos, sin, masks[lt],
                None if kv_prefix is None else kv_prefix.keys[j],
                None if kv_prefix is None else kv_prefix.values[j],
                per_layer_input=None if per_layer is None else per_layer[:, :, i],
                shared_kv=None if sources[i] is None else produced[sources[i]],
                valid=valid,
                cache_k=None if cache is None else cache.keys[j],
                cache_v=None if cache is None else cache.values[j],
                cache_index=cache_index,
                attention_impl=impl,
            )
            x, (k, v) = layer(x, ctx)
            if i in sources:
                produced[i] = (k, v)
            if return_kv or cache is not None:
                keys.append(k)
                values.append(v)
        if stop == c.num_layers:
            x = self.norm(x)
        if cache is not None:
            return x, cache._replace(keys=tuple(keys), values=tuple(values))
        if return_kv:
            return x, KVCache(tuple(keys), tuple(values), positions, valid)
        return x


def concat_kv(prefix: KVCache, suffix: KVCache) -> KVCache:
    """The cache of prefix followed by suffix (e.g. to extend a shared prefix by a second shared part)."""
    b = max(prefix.valid.shape[0], suffix.valid.shape[0])
    pre, suf = prefix.broadcast_to(b), suffix.broadcast_to(b)
    cat = lambda a, s: jnp.concatenate([a, s], axis=1)  # noqa: E731
    return KVCache(
        tuple(map(cat, pre.keys, suf.keys)),
        tuple(map(cat, pre.values, suf.values)),
        cat(pre.positions, suf.positions),
        cat(pre.valid, suf.valid),
    )
