"""What each supported model family means by its config.json: one :class:`Family` record per ``model_type``.

This is configuration data only (plain dicts in, plain dicts / tuples out; no JAX, no other pa-jax module):
:mod:`pa_jax.models.config` reads a config.json through the record of its family, and the decoder reads the
resulting :class:`~pa_jax.models.config.ModelConfig` flags. Every value follows transformers 5.23's config
class of the family (``LlamaConfig``, ``Qwen2Config``, ..., ``Qwen3_5TextConfig``).

A record answers, for one family:
  * ``window(hf)``: the effective sliding window (None when the family or the file switches it off);
  * ``layer_types(hf, n, window)``: the default per-layer attention kinds when config.json lists none;
  * ``last_layer_full``: the last layer is forced to full attention (gemma4);
  * ``allowed_layer_types``: which per-layer kinds the family may have;
  * ``rope(hf, layer_types)``: the raw rope parameter dict per layer type (before defaults of
    ``partial_rotary_factor``; validated and typed by ``config._rope_from_dict``);
  * ``default_partial_rotary``: ``partial_rotary_factor`` when config.json names none (qwen3_5: 0.25);
  * ``activation_field`` / ``default_activation``: where the MLP activation is named, and its default;
  * ``flags(hf, layer_types)``: the decoder flags that differ from the llama defaults;
  * ``tie_word_embeddings`` / ``rms_norm_eps``: the family's defaults.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

HF = dict[str, Any]
_PER_TYPE = ("full_attention", "sliding_attention")


# ------------------------------------------------------------------------------------------ windows
def _window_from_file(hf: HF) -> Any:
    return hf.get("sliding_window")


def _no_window(hf: HF) -> None:
    return None


def _qwen_window(hf: HF) -> Any:
    """qwen2/qwen3: the window applies only with ``use_sliding_window: true``."""
    return hf.get("sliding_window") if hf.get("use_sliding_window", False) else None


# ------------------------------------------------------------------------------------- layer types
def _all_full(hf: HF, n: int, window: Any) -> list[str]:
    return ["full_attention"] * n


def _every(period: int, kind: str = "sliding_attention") -> Callable[[HF, int, Any], list[str]]:
    """Layer i is ``kind`` unless (i + 1) is a multiple of ``period`` (then full attention)."""

    def layer_types(hf: HF, n: int, window: Any) -> list[str]:
        return [kind if bool((i + 1) % period) else "full_attention" for i in range(n)]

    return layer_types


def _gemma3_layer_types(hf: HF, n: int, window: Any) -> list[str]:
    """Every ``sliding_window_pattern``-th layer (default 6) is full attention."""
    return _every(hf.get("sliding_window_pattern", 6))(hf, n, window)


def _qwen_layer_types(hf: HF, n: int, window: Any) -> list[str]:
    """Layers from ``max_window_layers`` (default 28) on slide when a window is in force."""
    mwl = hf.get("max_window_layers", 28)
    return ["sliding_attention" if window is not None and i >= mwl else "full_attention" for i in range(n)]


def _qwen3_5_layer_types(hf: HF, n: int, window: Any) -> list[str]:
    """Every ``full_attention_interval``-th layer (default 4) is full attention, the rest Gated DeltaNet."""
    return _every(hf.get("full_attention_interval", 4), "linear_attention")(hf, n, window)


# -------------------------------------------------------------------------------------------- rope
def _flat_rope(hf: HF, layer_types: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """One rope dict for every layer type (``rope_scaling`` or ``rope_parameters``, possibly nested per type);
    ``rope_theta`` defaults to the top-level one, else 10,000."""
    flat = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    top_theta = hf.get("rope_theta")
    nested_keys = [k for k in flat if k in _PER_TYPE]
    theta = top_theta if top_theta is not None else 10_000.0
    if nested_keys:
        per_type = {k: dict(flat[k]) for k in nested_keys}
    else:
        per_type = {t: dict(flat) for t in sorted(set(layer_types))}
    for d in per_type.values():
        d.setdefault("rope_theta", theta)
    return per_type


def _per_type_rope(default_local: float, default_global: float,
                   local_theta_field: str | None) -> Callable[[HF, tuple[str, ...]], dict[str, dict[str, Any]]]:
    """Families with a rope per layer type (olmo3, gemma3): ``rope_scaling`` (old layout) goes to the
    full-attention layers only; the sliding layers take ``local_theta_field`` or ``default_local``."""

    def rope(hf: HF, layer_types: tuple[str, ...]) -> dict[str, dict[str, Any]]:
        rp = hf.get("rope_parameters")
        scaling = hf.get("rope_scaling")
        top_theta = hf.get("rope_theta")
        per_type: dict[str, dict[str, Any]] = {}
        nested = isinstance(rp, dict) and any(k in _PER_TYPE for k in rp)
        if nested:
            per_type = {k: dict(v) for k, v in rp.items() if k in _PER_TYPE and v}
        elif isinstance(rp, dict) and rp:
            per_type = {"full_attention": dict(rp)}
        if scaling:
            per_type.setdefault("full_attention", {}).update(scaling)
        per_type.setdefault("full_attention", {"rope_type": "default"})
        per_type.setdefault("sliding_attention", {"rope_type": "default"})
        per_type["full_attention"].setdefault("rope_theta", top_theta if top_theta is not None else default_global)
        # olmo3: transformers 5.23 pops a top-level rope_theta for the full-attention layers, so the sliding
        # layers of an old-layout config.json get default_theta (500k); we reproduce that.
        local_theta = hf.get(local_theta_field) if local_theta_field else None
        per_type["sliding_attention"].setdefault("rope_theta", local_theta if local_theta is not None else default_local)
        for d in per_type.values():  # yarn reads `truncate` from the top-level (here nested) dict: always True
            d.pop("truncate", None)
        return per_type

    return rope


def _gemma4_rope(hf: HF, layer_types: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """As the file says; without ``rope_parameters``, Gemma4TextConfig's default: default RoPE on sliding
    layers, proportional RoPE (p = 0.25, theta 1e6) on full layers."""
    per_type = _flat_rope(hf, layer_types)
    if not hf.get("rope_parameters"):
        per_type = {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
        }
    return per_type


# ------------------------------------------------------------------------------------------- flags
def _no_flags(hf: HF, layer_types: tuple[str, ...]) -> dict[str, Any]:
    return {}


def _qwen2_flags(hf: HF, layer_types: tuple[str, ...]) -> dict[str, Any]:
    return dict(qkv_bias=True, o_bias=False, mlp_bias=False)


def _qwen3_flags(hf: HF, layer_types: tuple[str, ...]) -> dict[str, Any]:
    return dict(qk_norm="head", mlp_bias=False)


def _olmo_flags(hf: HF, layer_types: tuple[str, ...]) -> dict[str, Any]:
    return dict(qk_norm="proj", norm_placement="post", norm_weight_f32=True, rope_f32=True, mlp_bias=False)


def _gemma_common(hf: HF) -> dict[str, Any]:
    """Gemma 2 and 3: (1 + w) float32 sandwich norms, embeddings scaled by sqrt(D), attention scale
    ``query_pre_attn_scalar ** -0.5``."""
    return dict(norm_placement="sandwich", norm_offset=True, norm_weight_f32=True, embed_scale=True, mlp_bias=False,
                query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)))


def _gemma2_flags(hf: HF, layer_types: tuple[str, ...]) -> dict[str, Any]:
    return dict(_gemma_common(hf), attn_logit_softcap=hf.get("attn_logit_softcapping", 50.0),
                final_logit_softcap=hf.get("final_logit_softcapping", 30.0))


def _gemma3_flags(hf: HF, layer_types: tuple[str, ...]) -> dict[str, Any]:
    # transformers 5.23's Gemma3Attention stores attn_logit_softcapping but never applies it (only gemma2
    # passes it to the attention kernel): follow the oracle.
    return dict(_gemma_common(hf), qk_norm="head", attn_logit_softcap=None,
                final_logit_softcap=hf.get("final_logit_softcapping"))


def _gemma4_flags(hf: HF, layer_types: tuple[str, ...]) -> dict[str, Any]:
    """Gemma 4 text tower (transformers 5.23 ``Gemma4TextConfig``): plain-w float32 RMSNorms, sandwich
    norms, q/k norm + weightless v norm, attention scale 1, embeddings scaled by sqrt(D), per-layer
    embeddings, KV sharing, proportional RoPE on full layers (head_dim ``global_head_dim``)."""
    if hf.get("enable_moe_block"):
        raise ValueError("config.json: gemma4 enable_moe_block=true (the MoE Gemma 4) is not supported")
    if hf.get("use_bidirectional_attention") == "all":
        raise ValueError("config.json: gemma4 use_bidirectional_attention='all' is not a causal LM; not supported")
    global_hd = hf.get("global_head_dim")
    global_kv = hf.get("num_global_key_value_heads")
    # transformers >= 5.23 writes these as per_layer_config overrides of the full-attention layers.
    for idx, override in (hf.get("per_layer_config") or {}).items():
        i = int(idx)
        if not 0 <= i < len(layer_types) or layer_types[i] != "full_attention":
            raise ValueError(f"config.json: per_layer_config[{idx!r}] overrides a non-full-attention layer")
        for k, v in override.items():
            if k == "head_dim":
                if global_hd not in (None, v) and "global_head_dim" in hf:
                    raise ValueError(f"config.json: per_layer_config[{idx!r}].head_dim={v} != global_head_dim")
                global_hd = v
            elif k == "num_key_value_heads":
                global_kv = v
            else:
                raise ValueError(f"config.json: per_layer_config[{idx!r}].{k} is not supported for gemma4")
    if global_hd is None:
        global_hd = 512  # Gemma4TextConfig's default global_head_dim
    k_eq_v = bool(hf.get("attention_k_eq_v", False))
    return dict(
        qk_norm="head",
        norm_placement="sandwich",
        norm_offset=False,
        norm_weight_f32=True,
        embed_scale=True,
        mlp_bias=False,
        query_pre_attn_scalar=1.0,  # Gemma4TextAttention.scaling = 1.0 (q and k are RMS-normed)
        final_logit_softcap=hf.get("final_logit_softcapping"),
        global_head_dim=int(global_hd),
        global_num_kv_heads=None if (global_kv is None or not k_eq_v) else int(global_kv),
        attention_k_eq_v=k_eq_v,
        v_norm=True,
        num_kv_shared_layers=int(hf.get("num_kv_shared_layers", 0) or 0),
        per_layer_input_dim=int(hf.get("hidden_size_per_layer_input", 256) or 0),
        vocab_size_per_layer_input=int(hf.get("vocab_size_per_layer_input", hf.get("vocab_size"))),
        layer_scalar=True,
        double_wide_mlp=bool(hf.get("use_double_wide_mlp", False)),
    )


def _qwen3_5_flags(hf: HF, layer_types: tuple[str, ...]) -> dict[str, Any]:
    """Qwen 3.5 text tower (``Qwen3_5TextConfig``): (1 + w) RMSNorms, per-head q/k norm, gated attention,
    Gated DeltaNet linear-attention layers."""
    if not hf.get("attn_output_gate", True):
        raise ValueError("config.json: qwen3_5 with attn_output_gate=false is not supported")
    sizes = {}
    defaults = dict(linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                    linear_value_head_dim=128, linear_conv_kernel_dim=4)
    for k, d in defaults.items():
        v = hf.get(k, d)
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"config.json: field {k!r} must be a positive integer, got {v!r}")
        sizes[k] = v
    if sizes["linear_num_value_heads"] % sizes["linear_num_key_heads"]:
        raise ValueError("config.json: linear_num_value_heads must be a multiple of linear_num_key_heads")
    return dict(qk_norm="head", norm_placement="pre", norm_offset=True, mlp_bias=False, attn_output_gate=True,
                **sizes)


# ---------------------------------------------------------------------------------------- the table
@dataclasses.dataclass(frozen=True)
class Family:
    """How one ``model_type`` reads config.json (see the module docstring for each field)."""

    window: Callable[[HF], Any] = _window_from_file
    layer_types: Callable[[HF, int, Any], list[str]] = _all_full
    last_layer_full: bool = False
    allowed_layer_types: tuple[str, ...] = ("full_attention", "sliding_attention")
    rope: Callable[[HF, tuple[str, ...]], dict[str, dict[str, Any]]] = _flat_rope
    default_partial_rotary: float | None = None
    activation_field: str = "hidden_act"
    default_activation: str = "silu"
    flags: Callable[[HF, tuple[str, ...]], dict[str, Any]] = _no_flags
    tie_word_embeddings: bool = False
    rms_norm_eps: float = 1e-6


_GEMMA = dict(activation_field="hidden_activation", default_activation="gelu_pytorch_tanh", tie_word_embeddings=True)
_OLMO3_THETA = 500_000.0  # transformers' Olmo3Config default_theta

FAMILIES: dict[str, Family] = {
    "llama": Family(window=_no_window),
    "qwen2": Family(window=_qwen_window, layer_types=_qwen_layer_types, flags=_qwen2_flags),
    "qwen3": Family(window=_qwen_window, layer_types=_qwen_layer_types, flags=_qwen3_flags),
    "olmo2": Family(window=_no_window, flags=_olmo_flags, rms_norm_eps=1e-5),
    "olmo3": Family(layer_types=_every(4), rope=_per_type_rope(_OLMO3_THETA, _OLMO3_THETA, None),
                    flags=_olmo_flags, rms_norm_eps=1e-5),
    "gemma2": Family(layer_types=_every(2), flags=_gemma2_flags, **_GEMMA),
    "gemma3_text": Family(layer_types=_gemma3_layer_types,
                          rope=_per_type_rope(10_000.0, 1_000_000.0, "rope_local_base_freq"),
                          flags=_gemma3_flags, **_GEMMA),
    "gemma4_text": Family(layer_types=_every(6), last_layer_full=True, rope=_gemma4_rope, flags=_gemma4_flags,
                          **_GEMMA),
    "qwen3_5_text": Family(layer_types=_qwen3_5_layer_types, allowed_layer_types=("full_attention", "linear_attention"),
                           default_partial_rotary=0.25, flags=_qwen3_5_flags),
}
"""The supported families, in the order error messages list them (issue 7 appended the last two)."""

WRAPPER_MODEL_TYPES: dict[str, str] = {"gemma3": "gemma3_text", "gemma4": "gemma4_text", "qwen3_5": "qwen3_5_text"}
"""Multimodal wrappers whose text tower we load (config.json nests it under ``text_config``)."""


# ------------------------------------------------------------------------- family-specific structure
def kv_sharing_sources(layer_types: tuple[str, ...], num_kv_shared_layers: int) -> tuple[int | None, ...]:
    """For each layer, the index of the earlier layer whose K/V it reuses (None: computes its own); gemma4.

    Layers >= L - num_kv_shared_layers are consumers; each reuses the last non-consumer layer of the
    same type (transformers' ``kv_sharing_modes``: "store" producers, "reuse" consumers).
    """
    n = len(layer_types)
    if num_kv_shared_layers <= 0:
        return (None,) * n
    first = n - num_kv_shared_layers
    if first <= 0:
        raise ValueError(f"config.json: num_kv_shared_layers={num_kv_shared_layers} leaves no layer computing K/V "
                         f"(num_hidden_layers={n})")
    last_of_type: dict[str, int] = {}
    for i in range(first):
        last_of_type[layer_types[i]] = i
    out: list[int | None] = [None] * first
    for i in range(first, n):
        if layer_types[i] not in last_of_type:
            raise ValueError(
                f"config.json: KV-shared layer {i} has type {layer_types[i]!r} but no earlier non-shared layer of "
                "that type produces K/V (transformers: 'The set of layer types producing a cache is different "
                "than the set of layer types using them')")
        out.append(last_of_type[layer_types[i]])
    return tuple(out)
