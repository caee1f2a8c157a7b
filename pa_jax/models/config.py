"""Hugging Face ``config.json`` -> one frozen :class:`ModelConfig` for the pa-jax decoder.

Every supported family is described by the same dataclass; the differences between families are flags
(bias switches, q/k norm kind, norm placement, norm weight offset, activation, embedding scale, soft-caps)
and per-layer lists (``layer_types``: ``"full_attention"`` / ``"sliding_attention"``; one
:class:`RopeConfig` per layer type).

Both config.json layouts are accepted: the transformers >= 5 layout (``rope_parameters``, possibly nested per
layer type) and the older one (``rope_theta`` + ``rope_scaling``, ``rope_local_base_freq``,
``sliding_window_pattern``, ``use_sliding_window`` / ``max_window_layers``), normalized exactly as
transformers 5.23's config classes normalize them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

SUPPORTED_MODEL_TYPES: tuple[str, ...] = (
    "llama", "qwen2", "qwen3", "olmo2", "olmo3", "gemma2", "gemma3_text", "gemma4_text", "qwen3_5_text"
)
"""Model types this module understands (issue 7 appends more)."""

# Multimodal wrappers whose text tower we load (config.json nests it under ``text_config``).
WRAPPER_MODEL_TYPES: dict[str, str] = {"gemma3": "gemma3_text", "gemma4": "gemma4_text", "qwen3_5": "qwen3_5_text"}

ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3", "yarn", "proportional")

# transformers' ``default_theta`` per family (used when config.json names no rope_theta).
_DEFAULT_THETA: dict[str, float] = {"olmo3": 500_000.0}


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
        from pa_jax.models.gemma4 import kv_sharing_sources

        return kv_sharing_sources(self.layer_types, self.num_kv_shared_layers)

    @property
    def deltanet_dims(self):
        """:class:`pa_jax.models.deltanet.DeltaNetDims` of the linear-attention layers (qwen3_5)."""
        from pa_jax.models.deltanet import DeltaNetDims

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
    """transformers' per-family default ``layer_types`` and the effective sliding window."""
    window = hf.get("sliding_window")
    if mt in ("qwen2", "qwen3"):
        window = window if hf.get("use_sliding_window", False) else None
    if mt in ("llama", "olmo2"):
        window = None
    lt = hf.get("layer_types")
    if lt is None:
        if mt == "olmo3":
            lt = ["sliding_attention" if (i + 1) % 4 != 0 else "full_attention" for i in range(n)]
        elif mt == "gemma2":
            lt = ["sliding_attention" if bool((i + 1) % 2) else "full_attention" for i in range(n)]
        elif mt == "gemma3_text":
            pattern = hf.get("sliding_window_pattern", 6)
            lt = ["sliding_attention" if bool((i + 1) % pattern) else "full_attention" for i in range(n)]
        elif mt in ("qwen2", "qwen3"):
            mwl = hf.get("max_window_layers", 28)
            lt = ["sliding_attention" if window is not None and i >= mwl else "full_attention" for i in range(n)]
        elif mt == "gemma4_text":
            lt = ["sliding_attention" if bool((i + 1) % 6) else "full_attention" for i in range(n)]
        elif mt == "qwen3_5_text":
            interval = hf.get("full_attention_interval", 4)
            lt = ["linear_attention" if bool((i + 1) % interval) else "full_attention" for i in range(n)]
        else:
            lt = ["full_attention"] * n
    if mt == "gemma4_text" and lt:
        lt = list(lt[:-1]) + ["full_attention"]  # transformers forces the last Gemma-4 layer to full attention
    lt = tuple(lt)
    if len(lt) != n:
        raise ValueError(f"config.json: layer_types has {len(lt)} entries, num_hidden_layers={n}")
    allowed = ("full_attention", "linear_attention") if mt == "qwen3_5_text" else ("full_attention", "sliding_attention")
    for t in lt:
        if t not in allowed:
            raise ValueError(f"config.json: layer_types entry {t!r} is not supported for model_type={mt!r}")
    if "sliding_attention" in lt:
        if window is None or int(window) <= 0:
            raise ValueError("config.json: layer_types has sliding_attention layers but sliding_window is not set")
        window = int(window)
    return lt, window


def _rope_table(hf: dict[str, Any], mt: str, layer_types: tuple[str, ...]) -> tuple[tuple[str, RopeConfig], ...]:
    """Normalize rope_parameters / rope_theta / rope_scaling into one RopeConfig per layer type."""
    max_pos = int(hf.get("max_position_embeddings", 2048) or 2048)
    types = sorted(set(layer_types))
    rp = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    top_theta = hf.get("rope_theta")
    partial = hf.get("partial_rotary_factor")
    per_type: dict[str, dict[str, Any]] = {}
    if mt in ("olmo3", "gemma3_text"):
        # Per-layer-type rope: rope_scaling (old layout) goes to full-attention layers only.
        default_local = 10_000.0 if mt == "gemma3_text" else _DEFAULT_THETA["olmo3"]
        default_global = 1_000_000.0 if mt == "gemma3_text" else _DEFAULT_THETA["olmo3"]
        nested = isinstance(rp, dict) and any(k in ("full_attention", "sliding_attention") for k in rp)
        if nested:
            per_type = {k: dict(v) for k, v in rp.items() if k in ("full_attention", "sliding_attention") and v}
        elif isinstance(rp, dict) and rp:
            per_type = {"full_attention": dict(rp)}
        if scaling:
            per_type.setdefault("full_attention", {}).update(scaling)
        per_type.setdefault("full_attention", {"rope_type": "default"})
        per_type.setdefault("sliding_attention", {"rope_type": "default"})
        per_type["full_attention"].setdefault("rope_theta", top_theta if top_theta is not None else default_global)
        # olmo3: transformers 5.23 pops a top-level rope_theta for the full-attention layers, so the sliding
        # layers of an old-layout config.json get default_theta (500k); we reproduce that.
        local_theta = hf.get("rope_local_base_freq") if mt == "gemma3_text" else None
        per_type["sliding_attention"].setdefault("rope_theta", local_theta if local_theta is not None else default_local)
        for d in per_type.values():  # yarn reads `truncate` from the top-level (here nested) dict: always True
            d.pop("truncate", None)
    else:
        flat = dict(scaling or rp or {})
        nested_keys = [k for k in flat if k in ("full_attention", "sliding_attention")]
        theta = top_theta if top_theta is not None else _DEFAULT_THETA.get(mt, 10_000.0)
        if nested_keys:
            per_type = {k: dict(flat[k]) for k in nested_keys}
        else:
            per_type = {t: dict(flat) for t in types}
        for d in per_type.values():
            d.setdefault("rope_theta", theta)
    if mt == "gemma4_text" and not rp:  # Gemma4TextConfig's default rope_parameters
        per_type = {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
        }
    if mt == "qwen3_5_text" and partial is None:
        partial = 0.25  # Qwen3_5TextConfig's default partial_rotary_factor
    if partial is not None:
        for d in per_type.values():
            d.setdefault("partial_rotary_factor", partial)
    out = []
    for t in types:
        if t not in per_type:
            raise ValueError(f"config.json: rope_parameters has no entry for layer type {t!r}")
        out.append((t, _rope_from_dict(per_type[t], theta=10_000.0, max_pos=max_pos, where=f"rope_parameters[{t}]")))
    return tuple(out)


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
    layer_types, window = _layer_types(hf, mt, n_layers)
    rope = _rope_table(hf, mt, layer_types)
    act = hf.get("hidden_activation") if mt in ("gemma2", "gemma3_text", "gemma4_text") else hf.get("hidden_act", "silu")
    act = act or ("gelu_pytorch_tanh" if mt in ("gemma2", "gemma3_text", "gemma4_text") else "silu")
    act_map = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
    if act not in act_map:
        raise ValueError(f"config.json: activation {act!r} is not supported (supported: {sorted(act_map)})")
    attention_bias = bool(hf.get("attention_bias", False))
    flags: dict[str, Any] = dict(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=bool(hf.get("mlp_bias", False)))
    if mt == "qwen2":
        flags.update(qkv_bias=True, o_bias=False, mlp_bias=False)
    elif mt == "qwen3":
        flags.update(qk_norm="head", mlp_bias=False)
    elif mt in ("olmo2", "olmo3"):
        flags.update(qk_norm="proj", norm_placement="post", norm_weight_f32=True, rope_f32=True, mlp_bias=False)
    elif mt == "gemma3_text":
        flags.update(
            qk_norm="head",
            norm_placement="sandwich",
            norm_offset=True,
            norm_weight_f32=True,
            embed_scale=True,
            mlp_bias=False,
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
            # transformers 5.23's Gemma3Attention stores attn_logit_softcapping but never applies it (only
            # gemma2 passes it to the attention kernel): follow the oracle.
            attn_logit_softcap=None,
            final_logit_softcap=hf.get("final_logit_softcapping"),
        )
    elif mt == "gemma2":
        flags.update(
            norm_placement="sandwich",
            norm_offset=True,
            norm_weight_f32=True,
            embed_scale=True,
            mlp_bias=False,
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
            attn_logit_softcap=hf.get("attn_logit_softcapping", 50.0),
            final_logit_softcap=hf.get("final_logit_softcapping", 30.0),
        )
    elif mt == "gemma4_text":
        flags.update(_gemma4_flags(hf, layer_types))
    elif mt == "qwen3_5_text":
        flags.update(_qwen3_5_flags(hf))
    tie_default = mt in ("gemma2", "gemma3_text", "gemma4_text")
    tie = source.get("tie_word_embeddings", hf.get("tie_word_embeddings", tie_default))
    if tie is None:
        tie = tie_default
    for cap in ("attn_logit_softcap", "final_logit_softcap"):
        if flags.get(cap) is not None:
            flags[cap] = float(flags[cap])
    eps_default = 1e-6 if mt in ("gemma2", "gemma3_text", "llama", "qwen2", "qwen3", "gemma4_text", "qwen3_5_text") else 1e-5
    cfg = ModelConfig(
        model_type=mt,
        vocab_size=_req(hf, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_req(hf, "intermediate_size"),
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=int(kv),
        head_dim=int(head_dim),
        rms_norm_eps=float(hf.get("rms_norm_eps", eps_default)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048) or 2048),
        layer_types=layer_types,
        rope=rope,
        sliding_window=window,
        tie_word_embeddings=bool(tie),
        activation=act_map[act],
        pad_token_id=hf.get("pad_token_id"),
        hf_config_json=json.dumps(source, sort_keys=True),
        **flags,
    )
    for _, r in cfg.rope:
        rot = int(cfg.head_dim * r.partial_rotary_factor)
        if rot % 2 or rot <= 0 or not math.isfinite(r.theta):
            raise ValueError(f"config.json: rotary dimension {rot} (head_dim * partial_rotary_factor) must be even")
    return cfg


def _gemma4_flags(hf: dict[str, Any], layer_types: tuple[str, ...]) -> dict[str, Any]:
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


def _qwen3_5_flags(hf: dict[str, Any]) -> dict[str, Any]:
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


def key_prefix(config: ModelConfig) -> str:
    """Checkpoint key prefix of the text tower: 'model.' or 'model.language_model.' for wrappers."""
    return "model.language_model." if config.hf_config.get("model_type") in WRAPPER_MODEL_TYPES else "model."
