"""Checkpoint key <-> parameter path tables, one regex table per family, usable both ways.

A parameter path is the dotted NNX state path of :class:`pa_jax.models.decoder.Decoder`
(e.g. ``layers.3.self_attn.q_proj.weight``). Checkpoint keys are the Hugging Face names
(``model.layers.3.self_attn.q_proj.weight``). Tensors have identical shapes on both sides (the decoder keeps
Hugging Face layout), so the mapping is a pure renaming.

Multimodal wrappers prefix the text tower (``model.language_model.`` in transformers >= 5,
``language_model.model.`` in older checkpoints); their other towers are listed in ``IGNORED`` and skipped.
"""

from __future__ import annotations

import re
from typing import Iterable

from pa_jax.models.config import ModelConfig, key_prefix

_L = r"layers\.(\d+)\."

# (checkpoint key regex relative to the text-tower prefix, parameter path template)
_BASE: list[tuple[str, str]] = [
    (r"embed_tokens\.weight", "embed_tokens.weight"),
    (r"norm\.weight", "norm.weight"),
    (_L + r"self_attn\.(q|k|v|o)_proj\.(weight|bias)", r"layers.\1.self_attn.\2_proj.\3"),
    (_L + r"mlp\.(gate|up|down)_proj\.(weight|bias)", r"layers.\1.mlp.\2_proj.\3"),
]
_QK_NORM = [(_L + r"self_attn\.(q|k)_norm\.weight", r"layers.\1.self_attn.\2_norm.weight")]
_PRE_NORMS = [(_L + r"(input_layernorm|post_attention_layernorm)\.weight", r"layers.\1.\2.weight")]
_POST_NORMS = [(_L + r"(post_attention_layernorm|post_feedforward_layernorm)\.weight", r"layers.\1.\2.weight")]
_SANDWICH_NORMS = [
    (
        _L + r"(input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|post_feedforward_layernorm)\.weight",
        r"layers.\1.\2.weight",
    )
]

FAMILY_TABLES: dict[str, list[tuple[str, str]]] = {
    "llama": _BASE + _PRE_NORMS,
    "qwen2": _BASE + _PRE_NORMS,
    "qwen3": _BASE + _QK_NORM + _PRE_NORMS,
    "olmo2": _BASE + _QK_NORM + _POST_NORMS,
    "olmo3": _BASE + _QK_NORM + _POST_NORMS,
    "gemma2": _BASE + _SANDWICH_NORMS,
    "gemma3_text": _BASE + _QK_NORM + _SANDWICH_NORMS,
}
"""Per family: (key regex under the text prefix, path template). lm_head is handled separately."""
# issue 7: Gemma 4 (per-layer embeddings, layer_scalar) and Qwen 3.5 (Gated DeltaNet ``linear_attn``)
_GEMMA4_EXTRA = [
    (r"embed_tokens_per_layer\.weight", "embed_tokens_per_layer.weight"),
    (r"per_layer_model_projection\.weight", "per_layer_model_projection.weight"),
    (r"per_layer_projection_norm\.weight", "per_layer_projection_norm.weight"),
    (_L + r"(per_layer_input_gate|per_layer_projection|post_per_layer_input_norm)\.weight", r"layers.\1.\2.weight"),
    (_L + r"layer_scalar", r"layers.\1.layer_scalar"),
]
_LINEAR_ATTN = [
    (_L + r"linear_attn\.(in_proj_qkv|in_proj_z|in_proj_b|in_proj_a|out_proj|conv1d|norm)\.weight",
     r"layers.\1.linear_attn.\2.weight"),
    (_L + r"linear_attn\.(A_log|dt_bias)", r"layers.\1.linear_attn.\2"),
]
FAMILY_TABLES["gemma4_text"] = _BASE + _QK_NORM + _SANDWICH_NORMS + _GEMMA4_EXTRA
FAMILY_TABLES["qwen3_5_text"] = _BASE + _QK_NORM + _PRE_NORMS + _LINEAR_ATTN

IGNORED: list[str] = [
    r"(.*\.)?rotary_emb\.(inv_freq|original_inv_freq|.*_inv_freq)",
    r"(model\.)?(vision_tower|vision_model|visual|multi_modal_projector|audio_tower|embed_vision|embed_audio)\..*",
    r"mtp\..*",
]
"""Checkpoint keys that are known and deliberately unused (RoPE buffers, non-text towers)."""

TEXT_PREFIXES: tuple[str, ...] = ("model.language_model.", "language_model.model.", "model.")
LM_HEAD_KEYS: tuple[str, ...] = ("lm_head.weight", "language_model.lm_head.weight")


def _table(config: ModelConfig) -> list[tuple[re.Pattern, str]]:
    try:
        table = FAMILY_TABLES[config.model_type]
    except KeyError:
        raise ValueError(f"no key table for model_type={config.model_type!r}") from None
    return [(re.compile(k), p) for k, p in table]


def is_ignored(key: str) -> bool:
    """True for checkpoint keys that are known and deliberately unused."""
    return any(re.fullmatch(p, key) for p in IGNORED)


def hf_key_to_path(config: ModelConfig, key: str) -> str | None:
    """Parameter path of a checkpoint key, or None if the family's table has no rule for it.

    A returned path may still be absent from the model (e.g. a bias the config switches off): the loader
    reports that as an unexpected tensor.
    """
    if key in LM_HEAD_KEYS:
        return "lm_head.weight"
    for prefix in TEXT_PREFIXES:
        if key.startswith(prefix):
            rest = key[len(prefix):]
            for pat, tpl in _table(config):
                if pat.fullmatch(rest):
                    return pat.sub(tpl, rest)
            return None
    return None


def path_to_hf_key(config: ModelConfig, path: str) -> str:
    """Checkpoint key of a parameter path (the inverse of :func:`hf_key_to_path`) in transformers' layout."""
    if path == "lm_head.weight":
        return "lm_head.weight"
    key = key_prefix(config) + path
    if hf_key_to_path(config, key) != path:
        raise ValueError(f"parameter {path!r} has no checkpoint key in the {config.model_type} table")
    return key


def path_str(path: Iterable) -> str:
    """Dotted string of an NNX state path tuple (('layers', 0, 'mlp', ...) -> 'layers.0.mlp...')."""
    return ".".join(str(p) for p in path)
