"""Hugging Face ``config.json`` -> one frozen :class:`ModelConfig` for the pa-jax decoder.

Every supported family is described by the same dataclass; the differences between families are flags
(bias switches, q/k norm kind, norm placement, norm weight offset, activation, embedding scale, soft-caps)
and per-layer lists (``layer_types``: ``"full_attention"`` / ``"sliding_attention"``; one
:class:`RopeConfig` per layer type).

Both config.json layouts are accepted: the transformers >= 5 layout (``rope_parameters``, possibly nested per
layer type) and the older one (``rope_theta`` + ``rope_scaling``, ``rope_local_base_freq``,
``sliding_window_pattern``, ``use_sliding_window`` / ``max_window_layers``), normalized exactly as
transformers 5.23's config classes normalize them.

What each family means by its config.json (default layer types, window, rope, activation, flags) is one
record per ``model_type`` in :mod:`pa_jax.models.families`; this module is the family-independent parsing
and the dataclass. Both are configuration data: they import no decoder, layer or JAX code.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, NamedTuple

from pa_jax.models.families import FAMILIES, WRAPPER_MODEL_TYPES, Family, kv_sharing_sources

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(FAMILIES)
"""Model types this module understands: the keys of :data:`pa_jax.models.families.FAMILIES`."""

ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3", "yarn", "proportional")


class DeltaNetDims(NamedTuple):
    """Static sizes of one Gated DeltaNet layer (from the HF ``linear_*`` config fields; qwen3_5)."""

    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_kernel: int

    @property
    def key_dim(self) -> int:
        return self.num_k_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads * self.head_v_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters of one layer type (transformers' ``rope_parameters`` entry).

    ``partial_rotary_factor`` < 1 rotates only the first ``int(head_dim * factor)`` features.
    """

    rope_type: str = "default"
    theta: float = 10_000.0
    factor: float | None = None
    partial_rotary_factor: float = 1.0
    # llama3
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float | None = None
    beta_slow: float | None = None
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One decoder-only causal LM, as pa-jax builds it (frozen, hashable).

    Family flags:
      * ``qkv_bias`` / ``o_bias`` / ``mlp_bias``: biases of the projections.
      * ``qk_norm``: ``"none"``, ``"head"`` (per-head RMSNorm over head_dim, qwen3/gemma3) or ``"proj"``
        (RMSNorm over the whole q/k projection, olmo2/olmo3).
      * ``norm_placement``: ``"pre"`` (llama), ``"post"`` (olmo: norm after attention/MLP, before the residual
        add) or ``"sandwich"`` (gemma3: pre and post norms around both sub-blocks).
      * ``norm_offset``: RMSNorm scales by ``1 + w`` (gemma) instead of ``w``.
      * ``norm_weight_f32``: the weight multiplies the float32 normalized activations before the cast back
        (olmo, gemma) instead of after it (llama, qwen).
      * ``activation``: ``"silu"`` (SwiGLU) or ``"gelu_tanh"`` (GeGLU with tanh GELU).
      * ``embed_scale``: multiply embeddings by sqrt(hidden_size) cast to the parameter dtype (gemma).
      * ``query_pre_attn_scalar``: attention scale is ``query_pre_attn_scalar ** -0.5`` (else head_dim ** -0.5).
      * ``attn_logit_softcap`` / ``final_logit_softcap``: ``cap * tanh(x / cap)``; None when absent.
      * ``layer_types``: one entry per layer; ``rope`` maps each layer type to its :class:`RopeConfig`.
      Checkpoint keys of the text tower start with :func:`key_prefix` (``"model."``, or
      ``"model.language_model."`` for a multimodal wrapper's config.json).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    layer_types: tuple[str, ...]
    rope: tuple[tuple[str, RopeConfig], ...]
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: str = "none"
    norm_placement: str = "pre"
    norm_offset: bool = False
    norm_weight_f32: bool = False
    rope_f32: bool = False
    activation: str = "silu"
    embed_scale: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    pad_token_id: int | None = None
    hf_config_json: str = "{}"
    # --- issue 7 (gemma4_text, qwen3_5_text); defaults switch everything off ---
    # gemma4: full-attention layers' head_dim / KV heads (None: same as sliding), K=V projection, weightless
    # V norm, KV sharing of the last num_kv_shared_layers, per-layer embeddings of width per_layer_input_dim,
    # per-layer layer_scalar, double-wide MLP on KV-shared layers.
    global_head_dim: int | None = None
    global_num_kv_heads: int | None = None
    attention_k_eq_v: bool = False
    v_norm: bool = False
    num_kv_shared_layers: int = 0
    per_layer_input_dim: int = 0
    vocab_size_per_layer_input: int | None = None
    layer_scalar: bool = False
    double_wide_mlp: bool = False
    # qwen3_5: q_proj yields (query, gate) per head, output * sigmoid(gate); "linear_attention" layers are
    # Gated DeltaNet with these sizes.
    attn_output_gate: bool = False
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0

    # ------------------------------------------------------------------ derived
    def head_dim_for(self, layer_type: str) -> int:
        """head_dim of a layer type (gemma4's full-attention layers have their own)."""
        if layer_type == "full_attention" and self.global_head_dim:
            return self.global_head_dim
        return self.head_dim

    def kv_heads_for(self, layer_type: str) -> int:
        """Number of KV heads of a layer type (gemma4 K=V full-attention layers may have their own)."""
        if layer_type == "full_attention" and self.attention_k_eq_v and self.global_num_kv_heads:
            return self.global_num_kv_heads
        return self.num_kv_heads

    @property
    def kv_sources(self) -> tuple[int | None, ...]:
        """Per layer: index of the earlier layer whose K/V it reuses (gemma4 KV sharing), else None."""
        return kv_sharing_sources(self.layer_types, self.num_kv_shared_layers)

    @property
    def deltanet_dims(self) -> DeltaNetDims:
        """:class:`DeltaNetDims` of the linear-attention layers (qwen3_5)."""
        return DeltaNetDims(self.linear_num_key_heads, self.linear_num_value_heads, self.linear_key_head_dim,
                            self.linear_value_head_dim, self.linear_conv_kernel_dim)

    @property
    def has_linear_attention(self) -> bool:
        return "linear_attention" in self.layer_types

    @property
    def hf_config(self) -> dict[str, Any]:
        """The config.json dict this config was parsed from (what save_pretrained writes back)."""
        return json.loads(self.hf_config_json)

    def rope_for(self, layer_type: str) -> RopeConfig:
        """The RoPE parameters of a layer type."""
        for name, rope in self.rope:
            if name == layer_type:
                return rope
        raise KeyError(f"no rope parameters for layer type {layer_type!r}")

    def window_for(self, layer_type: str) -> int | None:
        """Sliding window (keys with q - k < window are visible) of a layer type; None = full causal."""
        return self.sliding_window if layer_type == "sliding_attention" else None

    @property
    def attention_scale(self) -> float:
        base = self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.head_dim
        return float(base) ** -0.5

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Parse a Hugging Face config.json dict; raise ValueError naming the offending field."""
        return _from_hf_dict(hf)

    @classmethod
    def from_json_file(cls, path: str) -> "ModelConfig":
        with open(path, encoding="utf-8") as f:
            try:
                hf = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON: {e}") from e
        if not isinstance(hf, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return _from_hf_dict(hf)

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json dict for transformers (the source dict with the fields pa-jax may have changed)."""
        hf = self.hf_config
        if not hf:
            raise ValueError("ModelConfig has no source config.json (hf_config_json is empty)")
        return hf


def _req(hf: dict[str, Any], key: str, kind: type = int) -> Any:
    if key not in hf or hf[key] is None:
        raise ValueError(f"config.json: missing required field {key!r} (model_type={hf.get('model_type')!r})")
    value = hf[key]
    if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ValueError(f"config.json: field {key!r} must be a positive integer, got {value!r}")
    return value


def _rope_from_dict(d: dict[str, Any], *, theta: float, max_pos: int, where: str) -> RopeConfig:
    rope_type = d.get("rope_type", d.get("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"config.json: {where}.rope_type={rope_type!r} is not supported (supported: {ROPE_TYPES})")
    th = d.get("rope_theta", theta)
    factor = d.get("factor")
    if rope_type in ("linear", "llama3") and factor is None:
        raise ValueError(f"config.json: {where}.factor is required for rope_type={rope_type!r}")
    if rope_type == "llama3":
        for k in ("low_freq_factor", "high_freq_factor"):
            if d.get(k) is None:
                raise ValueError(f"config.json: {where}.{k} is required for rope_type='llama3'")
    omp = d.get("original_max_position_embeddings")
    if rope_type in ("llama3", "yarn") and omp is None:
        omp = max_pos
    return RopeConfig(
        rope_type=rope_type,
        theta=float(th),
        factor=None if factor is None else float(factor),
        partial_rotary_factor=float(d.get("partial_rotary_factor", 1.0) or 1.0),
        low_freq_factor=d.get("low_freq_factor"),
        high_freq_factor=d.get("high_freq_factor"),
        original_max_position_embeddings=None if omp is None else int(omp),
        beta_fast=d.get("beta_fast"),
        beta_slow=d.get("beta_slow"),
        attention_factor=d.get("attention_factor"),
        mscale=d.get("mscale"),
        mscale_all_dim=d.get("mscale_all_dim"),
        truncate=bool(d.get("truncate", True)),
    )


def _layer_types(hf: dict[str, Any], mt: str, n: int) -> tuple[tuple[str, ...], int | None]:
    """The per-layer attention kinds (config.json's, else the family's default) and the effective window."""
    family = FAMILIES[mt]
    window = family.window(hf)
    lt = hf.get("layer_types")
    if lt is None:
        lt = family.layer_types(hf, n, window)
    if family.last_layer_full and lt:
        lt = list(lt[:-1]) + ["full_attention"]  # transformers forces the last Gemma-4 layer to full attention
    lt = tuple(lt)
    if len(lt) != n:
        raise ValueError(f"config.json: layer_types has {len(lt)} entries, num_hidden_layers={n}")
    for t in lt:
        if t not in family.allowed_layer_types:
            raise ValueError(f"config.json: layer_types entry {t!r} is not supported for model_type={mt!r}")
    if "sliding_attention" in lt:
        if window is None or int(window) <= 0:
            raise ValueError("config.json: layer_types has sliding_attention layers but sliding_window is not set")
        window = int(window)
    return lt, window


def _rope_table(hf: dict[str, Any], family: Family, layer_types: tuple[str, ...]) -> tuple[tuple[str, RopeConfig], ...]:
    """Normalize rope_parameters / rope_theta / rope_scaling into one RopeConfig per layer type."""
    max_pos = int(hf.get("max_position_embeddings", 2048) or 2048)
    per_type = family.rope(hf, layer_types)
    partial = hf.get("partial_rotary_factor")
    if partial is None:
        partial = family.default_partial_rotary
    if partial is not None:
        for d in per_type.values():
            d.setdefault("partial_rotary_factor", partial)
    out = []
    for t in sorted(set(layer_types)):
        if t not in per_type:
            raise ValueError(f"config.json: rope_parameters has no entry for layer type {t!r}")
        out.append((t, _rope_from_dict(per_type[t], theta=10_000.0, max_pos=max_pos, where=f"rope_parameters[{t}]")))
    return tuple(out)


_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def _from_hf_dict(hf: dict[str, Any]) -> ModelConfig:
    source = hf
    mt = hf.get("model_type")
    if mt in WRAPPER_MODEL_TYPES:
        text = hf.get("text_config")
        if not isinstance(text, dict):
            raise ValueError(f"config.json: model_type={mt!r} needs a 'text_config' object")
        hf = dict(text)
        hf.setdefault("model_type", WRAPPER_MODEL_TYPES[mt])
        mt = hf["model_type"]
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"config.json: model_type={mt!r} is not supported; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (and wrappers {', '.join(WRAPPER_MODEL_TYPES)})"
        )
    archs = source.get("architectures") or []
    if archs and not any(a.endswith("ForCausalLM") or a.endswith("ForConditionalGeneration") for a in archs):
        raise ValueError(
            f"config.json: architectures={archs!r} is not a causal language model "
            "(expected a *ForCausalLM or *ForConditionalGeneration class)"
        )
    hidden = _req(hf, "hidden_size")
    heads = _req(hf, "num_attention_heads")
    n_layers = _req(hf, "num_hidden_layers")
    kv = hf.get("num_key_value_heads") or heads
    if heads % kv:
        raise ValueError(f"config.json: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    head_dim = hf.get("head_dim") or hidden // heads
    family = FAMILIES[mt]
    layer_types, window = _layer_types(hf, mt, n_layers)
    rope = _rope_table(hf, family, layer_types)
    act = hf.get(family.activation_field) or family.default_activation
    if act not in _ACTIVATIONS:
        raise ValueError(f"config.json: activation {act!r} is not supported (supported: {sorted(_ACTIVATIONS)})")
    attention_bias = bool(hf.get("attention_bias", False))
    flags: dict[str, Any] = dict(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=bool(hf.get("mlp_bias", False)))
    flags.update(family.flags(hf, layer_types))
    tie = source.get("tie_word_embeddings", hf.get("tie_word_embeddings", family.tie_word_embeddings))
    if tie is None:
        tie = family.tie_word_embeddings
    for cap in ("attn_logit_softcap", "final_logit_softcap"):
        if flags.get(cap) is not None:
            flags[cap] = float(flags[cap])
    cfg = ModelConfig(
        model_type=mt,
        vocab_size=_req(hf, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_req(hf, "intermediate_size"),
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=int(kv),
        head_dim=int(head_dim),
        rms_norm_eps=float(hf.get("rms_norm_eps", family.rms_norm_eps)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048) or 2048),
        layer_types=layer_types,
        rope=rope,
        sliding_window=window,
        tie_word_embeddings=bool(tie),
        activation=_ACTIVATIONS[act],
        pad_token_id=hf.get("pad_token_id"),
        hf_config_json=json.dumps(source, sort_keys=True),
        **flags,
    )
    for _, r in cfg.rope:
        rot = int(cfg.head_dim * r.partial_rotary_factor)
        if rot % 2 or rot <= 0 or not math.isfinite(r.theta):
            raise ValueError(f"config.json: rotary dimension {rot} (head_dim * partial_rotary_factor) must be even")
    return cfg


def key_prefix(config: ModelConfig) -> str:
    """Checkpoint key prefix of the text tower: 'model.' or 'model.language_model.' for wrappers."""
    return "model.language_model." if config.hf_config.get("model_type") in WRAPPER_MODEL_TYPES else "model."
