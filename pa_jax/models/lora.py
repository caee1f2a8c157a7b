"""LoRA adapters in the PEFT format: read, apply (pure, jittable, differentiable), merge at load, write.

A LoRA adapter changes a linear weight W [out, in] (pa-jax keeps Hugging Face layout, see
:mod:`pa_jax.models.params`) to

    W' = W + s * B @ A,   A [r, in], B [out, r],   s = lora_alpha / r   (or lora_alpha / sqrt(r) with rsLoRA)

so y = x W'^T = x W^T + s * (x A^T) B^T, exactly PEFT's ``LoraLayer`` (merged or not).

**lora_params** (the pytree every function here takes and returns)::

    {"layers.3.self_attn.q_proj.weight": {"A": Array[r, in], "B": Array[out, r]}, ...}

a flat dict keyed by the pa-jax parameter path of the adapted weight (the dotted NNX state path of
:class:`pa_jax.models.decoder.Decoder`); values are dicts with exactly the keys ``"A"`` and ``"B"``. It is a plain
JAX pytree: ``jax.grad`` / optax work on it directly. **scaling** is one float for every module or a dict
path -> float (what :func:`read_peft_adapter` returns, since PEFT's ``rank_pattern`` / ``alpha_pattern`` can give
modules different ranks and alphas).

PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``): tensor keys are
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` where ``<module>`` is the transformers module
name (``model.layers.3.self_attn.q_proj``); ``<module>.weight`` is then the checkpoint key that the family
tables of :mod:`pa_jax.models.params` map to a parameter path.

Supported: ``r``, ``lora_alpha``, ``use_rslora``, ``target_modules`` (list or regex, ``"all-linear"``),
``exclude_modules``, ``layers_to_transform`` / ``layers_pattern``, ``rank_pattern``, ``alpha_pattern``,
``fan_in_fan_out`` (ignored for linear layers with a warning, as PEFT itself does), ``bias`` (accepted; a
bias tensor in the file is refused), any linear module of the families (attention, MLP, Gated DeltaNet
projections, Gemma 4 per-layer projections, an untied ``lm_head``; the full ``<module>.base_layer.weight`` copy that PEFT
saves next to a targeted ``lm_head`` replaces the base weight before the merge). Refused with a ValueError naming the field:
``modules_to_save`` (full copies of modules), DoRA (``use_dora``), ``lora_bias``, ``layer_replication``,
``trainable_token_indices``, ``target_parameters``, embedding LoRA, LoRA on a tied ``lm_head``, any other
``peft_type`` than LORA, and ``.bin`` (pickle) adapters.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pa_jax.models import params as P
from pa_jax.io import atomic_write_json
from pa_jax.models.config import ModelConfig
from pa_jax.models.load import load_checkpoint, open_safetensors_file, write_safetensors

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

LINEAR_MODULES = frozenset({
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head",
    "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj",  # qwen3.5 Gated DeltaNet
    "per_layer_input_gate", "per_layer_projection", "per_layer_model_projection",  # gemma4
})
"""Last module-name components whose ``.weight`` is a [out, in] matrix applied as x @ W^T (LoRA-able)."""

_REFUSED_FIELDS = {
    "modules_to_save": "full copies of modules (modules_to_save) are not supported",
    "use_dora": "DoRA adapters are not supported",
    "lora_bias": "LoRA with a bias on lora_B (lora_bias) is not supported",
    "layer_replication": "layer_replication is not supported",
    "trainable_token_indices": "trainable_token_indices is not supported",
    "target_parameters": "target_parameters (LoRA on nn.Parameter) is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "use_qalora": "QA-LoRA is not supported",
}


# ---------------------------------------------------------------------------------------------- pure math
def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """s = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (PEFT's ``LoraLayer.update_layer``)."""
    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got {r}")
    return float(lora_alpha) / (math.sqrt(r) if use_rslora else r)


def lora_delta(a: jax.Array, b: jax.Array, scaling) -> jax.Array:
    """s * B @ A in float32: [out, r] @ [r, in] -> [out, in] (full-precision matmul on every backend)."""
    return jnp.asarray(scaling, jnp.float32) * jnp.matmul(
        b.astype(jnp.float32), a.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )


def merge_weight(w: jax.Array, a: jax.Array, b: jax.Array, scaling) -> jax.Array:
    """W' = W + s * B @ A, summed in float32 and cast back to W's dtype (W [out, in], A [r, in], B [out, r])."""
    return (w.astype(jnp.float32) + lora_delta(a, b, scaling)).astype(w.dtype)


def _scale_of(scaling, path: str):
    if isinstance(scaling, Mapping):
        try:
            return scaling[path]
        except KeyError:
            raise ValueError(f"scaling has no entry for adapted parameter {path!r}") from None
    return scaling


def apply_lora(state: nnx.State, lora_params: Mapping[str, Mapping[str, jax.Array]], scaling) -> nnx.State:
    """A new model state whose adapted weights are W' = W + s * B @ A (pure; jit / grad friendly).

    state: ``nnx.split(model)[1]`` of a :class:`~pa_jax.models.decoder.Decoder`. lora_params: see the module
    docstring ({path: {"A", "B"}}). scaling: a float (traced or static) or a dict path -> float. Gradients flow
    to A and B (and to W). Typical use inside a jitted loss::

        graphdef, state = nnx.split(model)
        def loss(lora_params, state, batch):
            merged = apply_lora(state, lora_params, scaling)
            hidden = nnx.merge(graphdef, merged)(batch.ids, batch.mask)
            ...

    Shapes are checked at trace time (ValueError naming the path).
    """
    flat = nnx.to_flat_state(state)
    seen = set()
    out = []
    for path, var in flat:
        name = P.path_str(path)
        lp = lora_params.get(name)
        if lp is not None:
            w = var.get_value()
            a, b = lp["A"], lp["B"]
            _check_pair_shapes(name, tuple(w.shape), tuple(a.shape), tuple(b.shape))
            var = var.replace(merge_weight(w, a, b, _scale_of(scaling, name)))
            seen.add(name)
        out.append((path, var))
    unknown = sorted(set(lora_params) - seen)
    if unknown:
        raise ValueError(f"lora_params name parameters the model does not have: {unknown[:8]}")
    return nnx.from_flat_state(out)


def _check_pair_shapes(name: str, w: tuple, a: tuple, b: tuple, rank: int | None = None) -> None:
    if len(w) != 2 or len(a) != 2 or len(b) != 2:
        raise ValueError(f"{name}: LoRA needs 2-D W, A, B; got W {w}, A {a}, B {b}")
    if a[0] != b[1]:
        raise ValueError(f"{name}: A {a} and B {b} disagree on the rank (A[0]={a[0]}, B[1]={b[1]})")
    if rank is not None and a[0] != rank:
        raise ValueError(f"{name}: rank {a[0]} (A {a}, B {b}) but the adapter config says r={rank}")
    if a[1] != w[1] or b[0] != w[0]:
        raise ValueError(
            f"{name}: base weight is [out, in] = {list(w)} but the adapter has A {a} (expected [r, {w[1]}]) "
            f"and B {b} (expected [{w[0]}, r]): the base has another shape than the adapter's base"
        )


# ---------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class LoraSpec:
    """The fields of a PEFT ``adapter_config.json`` that decide which weights change and by how much."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    base_model_name_or_path: str | None = None

    def module_rank_alpha(self, module: str) -> tuple[int, float]:
        """(r, alpha) of a transformers module name, with PEFT's pattern rule (``(.*\\.)?(pattern)$``)."""
        r_key = _pattern_key(self.rank_pattern, module)
        a_key = _pattern_key(self.alpha_pattern, module)
        return int(self.rank_pattern.get(r_key, self.r)), float(self.alpha_pattern.get(a_key, self.lora_alpha))

    def module_scaling(self, module: str) -> float:
        r, alpha = self.module_rank_alpha(module)
        return lora_scaling(r, alpha, self.use_rslora)


def _pattern_key(patterns: Mapping[str, Any], key: str) -> str:
    """PEFT's ``get_pattern_key``: the first pattern p with re.match(rf"(.*\\.)?({p})$", key), else key."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", key):
            return p
    return key


def _tuple_or_str(v, name: str, file) -> tuple[str, ...] | str | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, (list, tuple, set)) and all(isinstance(x, str) for x in v):
        return tuple(sorted(v))
    raise ValueError(f"{file}: {name} must be a string or a list of strings, got {v!r}")


def parse_adapter_config(cfg: Mapping[str, Any], file: str | os.PathLike = CONFIG_NAME) -> LoraSpec:
    """LoraSpec of an adapter_config.json dict; ValueError naming the field for anything unsupported."""
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise ValueError(f"{file}: peft_type={cfg.get('peft_type')!r}, only LORA adapters are supported")
    for k, why in _REFUSED_FIELDS.items():
        if cfg.get(k):
            raise ValueError(f"{file}: {k}={cfg[k]!r}: {why}")
    if cfg.get("fan_in_fan_out"):
        warnings.warn(f"{file}: fan_in_fan_out=True is ignored for linear layers (as PEFT does)", stacklevel=3)
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"{file}: r must be a positive integer, got {r!r}")
    alpha = cfg.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise ValueError(f"{file}: lora_alpha must be a number, got {alpha!r}")
    bias = cfg.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"{file}: bias={bias!r}, expected 'none', 'all' or 'lora_only'")
    ltt = cfg.get("layers_to_transform")
    if isinstance(ltt, int) and not isinstance(ltt, bool):
        ltt = (ltt,)
    elif ltt is not None:
        if not isinstance(ltt, (list, tuple)) or not all(isinstance(i, int) for i in ltt):
            raise ValueError(f"{file}: layers_to_transform must be an int or a list of ints, got {ltt!r}")
        ltt = tuple(ltt) or None
    lp = cfg.get("layers_pattern")
    lp = (lp,) if isinstance(lp, str) and lp else (tuple(lp) if lp else None)
    for name in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(name) or {}, dict):
            raise ValueError(f"{file}: {name} must be a dict, got {cfg.get(name)!r}")
    if cfg.get("use_rslora") and (cfg.get("rank_pattern") or cfg.get("alpha_pattern")):
        # PEFT 0.21 refuses this combination too (the scaling of a pattern-matched module is ambiguous)
        raise ValueError(f"{file}: use_rslora together with rank_pattern/alpha_pattern is not supported")
    return LoraSpec(
        r=r, lora_alpha=float(alpha), use_rslora=bool(cfg.get("use_rslora", False)),
        target_modules=_tuple_or_str(cfg.get("target_modules"), "target_modules", file),
        exclude_modules=_tuple_or_str(cfg.get("exclude_modules"), "exclude_modules", file),
        layers_to_transform=ltt, layers_pattern=lp,
        rank_pattern=dict(cfg.get("rank_pattern") or {}), alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
        base_model_name_or_path=cfg.get("base_model_name_or_path"),
    )


def _targets_module(spec: LoraSpec, module: str, linear_leaves: set[str]) -> bool:
    """PEFT's ``check_target_module_exists`` for one transformers module name (the subset pa-jax supports)."""
    ex = spec.exclude_modules
    if ex:
        if isinstance(ex, str):
            if re.fullmatch(ex, module):
                return False
        elif module in ex or any(module.endswith("." + e) for e in ex):
            return False
    tm = spec.target_modules
    if tm is None:
        return False
    if isinstance(tm, str):
        if tm == "all-linear":
            return module.rsplit(".", 1)[-1] in linear_leaves and module.rsplit(".", 1)[-1] != "lm_head"
        return re.fullmatch(tm, module) is not None
    if module in tm:
        return True
    found = any(module.endswith("." + t) for t in tm)
    if found and spec.layers_to_transform is not None:
        if spec.layers_pattern:
            m = None
            for pat in spec.layers_pattern:
                m = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", module)
                if m is not None:
                    break
        else:
            m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
        found = m is not None and int(m.group("idx")) in spec.layers_to_transform
    return found


# ---------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter resolved against a base config: ``params`` and ``scaling`` as :func:`apply_lora` takes
    them (NumPy float arrays, keys = pa-jax parameter paths), ``modules`` path -> transformers module name."""

    spec: LoraSpec
    params: dict[str, dict[str, np.ndarray]]
    scaling: dict[str, float]
    modules: dict[str, str]
    path: pathlib.Path | None = None
    base_weights: dict[str, Any] = field(default_factory=dict)
    """path -> full base weight stored in the adapter (PEFT saves ``<module>.base_layer.weight`` of a targeted
    ``lm_head``: "save_embedding_layers"); it replaces the base's weight before the merge."""


def _linear_modules(config: ModelConfig, param_shapes: Mapping[str, tuple]) -> dict[str, str]:
    """transformers module name -> pa-jax path of every LoRA-able linear weight of a model."""
    out = {}
    for path, shape in param_shapes.items():
        if not path.endswith(".weight") or len(shape) != 2:
            continue
        if path.rsplit(".", 2)[-2] not in LINEAR_MODULES:
            continue
        out[P.path_to_hf_key(config, path)[: -len(".weight")]] = path
    return out


def param_shapes(config: ModelConfig) -> dict[str, tuple]:
    """Parameter path -> shape of the decoder of ``config`` (abstract: nothing is allocated)."""
    from pa_jax.models.decoder import Decoder

    abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0), dtype="float32"))
    return {P.path_str(p): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(nnx.state(abstract))}


def resolve_adapter(config: ModelConfig, spec: LoraSpec, tensors: Mapping[str, Any], *,
                    shapes: Mapping[str, tuple] | None = None, source: str = WEIGHTS_NAME) -> Adapter:
    """Map PEFT tensors (key -> array-like) onto a base of ``config``; ValueError naming the key on any mismatch.

    Checks: every key is a ``lora_A`` / ``lora_B`` weight of a linear module that exists in the base; A and B
    come in pairs; their rank equals the config's (``r`` / ``rank_pattern``); their other dimensions equal the
    base weight's; every module the config targets in the base has its tensors; every name listed in
    ``target_modules`` matches some linear module of the base.
    """
    shapes = dict(shapes) if shapes is not None else param_shapes(config)
    linear = _linear_modules(config, shapes)
    leaves = {m.rsplit(".", 1)[-1] for m in linear}
    by_path = {p: mod for mod, p in linear.items()}
    parts: dict[str, dict[str, Any]] = {}
    base_keys: dict[str, str] = {}
    file_module: dict[str, str] = {}
    for key in tensors:
        m = re.fullmatch(r"(.+)\.(?:lora_([AB])|(base_layer))\.weight", key)
        if m is None or not key.startswith(PEFT_PREFIX):
            hint = ""
            if key.endswith("bias"):
                hint = " (bias tensors: bias='all'/'lora_only' adapters are not supported)"
            elif "lora_embedding" in key:
                hint = " (embedding LoRA is not supported)"
            elif "modules_to_save" in key:
                hint = " (modules_to_save is not supported)"
            elif "lora_magnitude_vector" in key:
                hint = " (DoRA is not supported)"
            raise ValueError(f"{source}: unsupported tensor {key!r}: expected "
                             f"'{PEFT_PREFIX}<module>.lora_A.weight' / '.lora_B.weight'{hint}")
        module = m.group(1)[len(PEFT_PREFIX):]
        path = P.hf_key_to_path(config, module + ".weight")
        if module.rsplit(".", 1)[-1] == "lm_head" and config.tie_word_embeddings:
            raise ValueError(f"{source}: tensor {key!r}: LoRA on lm_head of a base with tied embeddings "
                             f"is not supported")
        if path is None or path not in shapes or path not in by_path:
            what = "is not a linear module of" if path in shapes else "does not exist in"
            raise ValueError(f"{source}: tensor {key!r}: module {module!r} {what} the base "
                             f"({config.model_type}, {config.num_layers} layers)")
        canon = by_path[path]  # the module's name under this base's text prefix (older wrappers use another)
        file_module[canon] = module
        if m.group(3):
            base_keys[canon] = key
        else:
            parts.setdefault(canon, {})[m.group(2)] = key
    for module, ab in parts.items():
        for x in "AB":
            if x not in ab:
                raise ValueError(f"{source}: missing key {PEFT_PREFIX}{file_module[module]}.lora_{x}.weight "
                                 f"(its lora_{'B' if x == 'A' else 'A'} is present)")
    # what the config targets must be exactly what the file holds
    if isinstance(spec.target_modules, tuple):
        for t in spec.target_modules:
            if not any(mod == t or mod.endswith("." + t) for mod in linear):
                raise ValueError(f"adapter config: target module {t!r} does not exist in the base "
                                 f"({config.model_type}; its linear modules: {sorted(leaves)})")
    targeted = [mod for mod in linear if _targets_module(spec, mod, leaves)]
    if spec.target_modules is not None and not targeted:
        raise ValueError(f"adapter config: target_modules={spec.target_modules!r} matches no linear module "
                         f"of the base ({config.model_type}; its linear modules: {sorted(leaves)})")
    missing = [f"{PEFT_PREFIX}{mod}.lora_A.weight" for mod in targeted if mod not in parts]
    if missing:
        raise ValueError(f"{source}: missing key {missing[0]} (the config targets module {missing[0][len(PEFT_PREFIX):-14]!r}"
                         f"; {len(missing)} targeted module(s) without tensors)")
    base_weights = {}
    for module, key in base_keys.items():
        path = linear[module]
        if module not in parts:
            raise ValueError(f"{source}: tensor {key!r}: a base weight for a module without LoRA tensors")
        if tuple(np.shape(tensors[key])) != tuple(shapes[path]):
            raise ValueError(f"{source}: tensor {key!r} has shape {tuple(np.shape(tensors[key]))}, the base's "
                             f"{path} has {tuple(shapes[path])}: the base has another shape than the adapter's base")
        base_weights[path] = tensors[key]
    params, scaling, modules = {}, {}, {}
    for module, ab in sorted(parts.items()):
        path = linear[module]
        a, b = tensors[ab["A"]], tensors[ab["B"]]
        r, _ = spec.module_rank_alpha(module)
        try:
            _check_pair_shapes(path, shapes[path], tuple(np.shape(a)), tuple(np.shape(b)), rank=r)
        except ValueError as e:
            raise ValueError(f"{source}: tensors {ab['A']!r} / {ab['B']!r}: {e}") from None
        params[path] = {"A": a, "B": b}
        scaling[path] = spec.module_scaling(module)
        modules[path] = module
    if not params:
        raise ValueError(f"{source}: no LoRA tensors")
    return Adapter(spec, params, scaling, modules, base_weights=base_weights)


def read_adapter_config(adapter_dir: str | os.PathLike) -> LoraSpec:
    """LoraSpec of ``adapter_dir/adapter_config.json`` (ValueError naming the file otherwise)."""
    d = pathlib.Path(adapter_dir)
    f = d / CONFIG_NAME
    if not f.is_file():
        raise ValueError(f"{d}: not a PEFT adapter directory (no {CONFIG_NAME})")
    try:
        cfg = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f}: not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{f}: expected a JSON object")
    return parse_adapter_config(cfg, f)


def read_peft_adapter(adapter_dir: str | os.PathLike, config: ModelConfig, *, dtype=np.float32,
                      shapes: Mapping[str, tuple] | None = None) -> Adapter:
    """Read and validate a PEFT LoRA adapter directory against a base of ``config`` (see :func:`resolve_adapter`).

    The arrays come back as NumPy ``dtype`` (float32 by default: the merge is done in float32).
    """
    d = pathlib.Path(adapter_dir)
    spec = read_adapter_config(d)
    wf = d / WEIGHTS_NAME
    if not wf.is_file():
        if (d / "adapter_model.bin").is_file():
            raise ValueError(f"{d}: adapter_model.bin (a pickle) is not supported; save with safetensors "
                             f"(PEFT's default, safe_serialization=True)")
        raise ValueError(f"{d}: no {WEIGHTS_NAME}")
    lazy = open_safetensors_file(wf)
    ad = resolve_adapter(config, spec, {k: _Shaped(t) for k, t in lazy.items()}, shapes=shapes, source=str(wf))
    params = {p: {x: np.asarray(v[x].read()).astype(dtype) for x in "AB"} for p, v in ad.params.items()}
    return Adapter(spec, params, ad.scaling, ad.modules, d, {p: t.read() for p, t in ad.base_weights.items()})


class _Shaped:
    """A lazy tensor whose ``np.shape`` works (for the checks before anything is read)."""

    def __init__(self, t):
        self.t, self.shape = t, tuple(t.shape)

    def read(self):
        return self.t.read()


# ---------------------------------------------------------------------------------------------- merging / loading
@functools.partial(jax.jit, donate_argnums=0)
def _merge_one(w, a, b, s):
    return merge_weight(w, a, b, s)


def merge_adapter(model, adapter: Adapter, *, donate: bool = False):
    """Merge an adapter into a model in place: W <- W + s * B @ A per adapted weight (float32 sum).

    One weight at a time (peak memory: the model + one weight); with ``donate`` the old weight's buffer is
    reused (only safe when nothing else holds the model's arrays, as right after loading). The model's
    sharding of each weight is kept.
    """
    _, state = nnx.split(model)
    flat = {P.path_str(p): v for p, v in nnx.to_flat_state(state)}
    for path, ab in adapter.params.items():
        var = flat[path]
        w = var.get_value()
        if path in adapter.base_weights:  # a full copy of the base weight saved with the adapter
            w = jax.device_put(np.asarray(adapter.base_weights[path]).astype(w.dtype), w.sharding)
        a, b = jnp.asarray(ab["A"]), jnp.asarray(ab["B"])
        s = jnp.float32(adapter.scaling[path])
        sharding = getattr(w, "sharding", None)
        new = _merge_one(w, a, b, s) if donate else merge_weight(w, a, b, s)
        if sharding is not None and new.sharding != sharding:
            new = jax.device_put(new, sharding)
        var.set_value(new)
    return model


DELTA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
"""Modules whose forward is :class:`~pa_jax.models.decoder.Linear`'s own call, so that an adapter can run on them
unmerged (``lora_mode="delta"``); the others (``lm_head``, Gated DeltaNet and Gemma 4 per-layer projections, whose
weights the decoder reads directly) are merged even then."""

LORA_MODES = ("merge", "delta")


def share_weights(model):
    """A second Decoder holding the very same parameter arrays as ``model`` (nothing copied: JAX arrays are
    immutable) in its own Variables, so that setting a weight of one (a merge, an attached adapter) leaves the
    other as it is. How a policy given as base + adapter shares every tensor the adapter does not change with a
    reference that is that base."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, state, copy=True)


def _module_at(model, path: str):
    """The module holding parameter ``path`` ("layers.3.self_attn.q_proj.weight" -> model.layers[3].self_attn.q_proj)."""
    m = model
    for part in path.split(".")[:-1]:
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


def attach_adapter(model, adapter: Adapter, *, lora_mode: str = "delta"):
    """Apply an adapter to ``model`` in place: with ``lora_mode="delta"`` the factors go onto each adapted
    :class:`~pa_jax.models.decoder.Linear` of :data:`DELTA_MODULES` unmerged (``lora_a`` = A, ``lora_b`` = B,
    float32, replicated on the weight's mesh; ``lora_scale`` = s), so the forward computes
    x W^T + s (x A^T) B^T and no W' is formed; the other adapted weights (see :data:`DELTA_MODULES`) are merged
    (W + s B A, a new array). ``lora_mode="merge"`` merges every one. The weights of ``model`` are never
    modified in place, so a model made by :func:`share_weights` leaves its source untouched. Returns
    ``{"delta": [paths], "merged": [paths]}``."""
    if lora_mode not in LORA_MODES:
        raise ValueError(f"lora_mode must be one of {LORA_MODES}, got {lora_mode!r}")
    from jax.sharding import NamedSharding, PartitionSpec

    done: dict[str, list[str]] = {"delta": [], "merged": []}
    merge_part = {}
    for path, ab in adapter.params.items():
        leaf = path.rsplit(".", 2)[-2]
        if lora_mode == "delta" and leaf in DELTA_MODULES and path not in adapter.base_weights:
            lin = _module_at(model, path)
            w = lin.weight[...]
            a, b = (np.asarray(ab[x], np.float32) for x in "AB")
            _check_pair_shapes(path, tuple(w.shape), a.shape, b.shape)
            sh = getattr(w, "sharding", None)
            put = (lambda v: jax.device_put(v, NamedSharding(sh.mesh, PartitionSpec()))) \
                if isinstance(sh, NamedSharding) else jnp.asarray
            lin.lora_a, lin.lora_b = nnx.Param(put(a)), nnx.Param(put(b))
            lin.lora_scale = float(adapter.scaling[path])
            done["delta"].append(path)
        else:
            merge_part[path] = ab
            done["merged"].append(path)
    if merge_part:
        merge_adapter(model, Adapter(adapter.spec, merge_part, adapter.scaling, adapter.modules, adapter.path,
                                     adapter.base_weights))
    return done


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory holding a PEFT ``adapter_config.json``."""
    p = pathlib.Path(path)
    return p.is_dir() and (p / CONFIG_NAME).is_file()


def resolve_base(adapter_dir: str | os.PathLike, base: str | os.PathLike | None = None) -> pathlib.Path:
    """The base checkpoint of an adapter: ``base`` if given, else the config's ``base_model_name_or_path`` when
    it is an existing local path (as given, or relative to the adapter directory). Never the hub."""
    d = pathlib.Path(adapter_dir)
    if base is not None:
        b = pathlib.Path(base)
        if not b.exists():
            raise ValueError(f"base checkpoint {b} of adapter {d}: no such file or directory")
        return b
    name = read_adapter_config(d).base_model_name_or_path
    if name:
        for cand in (pathlib.Path(name), d / name):
            if cand.exists():
                return cand
    raise ValueError(
        f"{d}: a LoRA adapter needs its base: pass it explicitly (--policy-base BASE, or base=...); the adapter's "
        f"base_model_name_or_path={name!r} is not an existing local path (nothing is downloaded)"
    )


def load_with_adapter(adapter_dir: str | os.PathLike, base: str | os.PathLike | None = None, *,
                      dtype="bfloat16", mesh=None, sharding_fn=None, lora_mode: str = "merge", base_model=None):
    """(config, model) of a base checkpoint (HF directory or .gguf) with a PEFT LoRA adapter applied.

    The base is loaded as :func:`pa_jax.models.load` does (dtype, mesh / sharding_fn), the adapter is checked
    against it (:func:`read_peft_adapter`: ValueError naming the key) and applied by :func:`attach_adapter`:
    ``lora_mode="merge"`` merges it weight by weight (W + s * B @ A in float32, cast to ``dtype``),
    ``"delta"`` keeps it unmerged on the attention / MLP projections. ``base`` defaults to the adapter's local
    ``base_model_name_or_path`` (:func:`resolve_base`). ``base_model``: ``(config, model)`` of that base already
    loaded (e.g. the reference of a pair): nothing is read again, and the returned model holds the same arrays
    for every tensor the adapter leaves as it is (:func:`share_weights`): only merged weights are new.
    """
    if lora_mode not in LORA_MODES:
        raise ValueError(f"lora_mode must be one of {LORA_MODES}, got {lora_mode!r}")
    if base_model is None:
        base_path = resolve_base(adapter_dir, base)
        if is_adapter_dir(base_path):
            raise ValueError(f"base {base_path} is itself an adapter directory (stacked adapters are not supported)")
        config, model = load_checkpoint(base_path, dtype=dtype, mesh=mesh, sharding_fn=sharding_fn)
        fresh = True
    else:
        config, model = base_model[0], share_weights(base_model[1])
        fresh = False
    shapes = {P.path_str(p): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(nnx.state(model))}
    adapter = read_peft_adapter(adapter_dir, config, shapes=shapes)
    if lora_mode == "merge":  # freshly loaded weights are held by nothing else: their buffers can be reused
        merge_adapter(model, adapter, donate=fresh)
    else:
        attach_adapter(model, adapter, lora_mode=lora_mode)
    return config, model


# ---------------------------------------------------------------------------------------------- creating / writing
def init_lora(config: ModelConfig, target_modules, r: int, key: jax.Array, *, layers=None,
              dtype=jnp.float32) -> dict[str, dict[str, jax.Array]]:
    """Fresh lora_params as PEFT initializes them: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform, a=sqrt(5)),
    B = 0 (so the adapted model starts equal to the base).

    target_modules: leaf names (e.g. ``("q_proj", "v_proj")``) or ``"all-linear"``; layers: layer indices to
    adapt (None = all). Returns ``{path: {"A": [r, in], "B": [out, r]}}``.
    """
    spec = LoraSpec(r=r, lora_alpha=r, target_modules=target_modules if isinstance(target_modules, str)
                    else tuple(target_modules), layers_to_transform=None if layers is None else tuple(layers))
    shapes = param_shapes(config)
    linear = _linear_modules(config, shapes)
    leaves = {m.rsplit(".", 1)[-1] for m in linear}
    if isinstance(spec.target_modules, tuple):
        bad = [t for t in spec.target_modules if t not in leaves]
        if bad:
            raise ValueError(f"target modules {bad} do not exist in {config.model_type} (have {sorted(leaves)})")
    out = {}
    paths = sorted(p for m, p in linear.items() if _targets_module(spec, m, leaves))
    if not paths:
        raise ValueError(f"target_modules={target_modules!r}, layers={layers!r} select no linear module")
    for i, path in enumerate(paths):
        o, n = shapes[path]
        bound = 1.0 / math.sqrt(n)
        a = jax.random.uniform(jax.random.fold_in(key, i), (r, n), jnp.float32, -bound, bound).astype(dtype)
        out[path] = {"A": a, "B": jnp.zeros((o, r), dtype)}
    return out


def _targets_for(config: ModelConfig, modules: Mapping[str, str]) -> dict[str, Any]:
    """target_modules (+ layers_to_transform) selecting exactly ``modules`` (path -> module) in the base."""
    shapes = param_shapes(config)
    linear = _linear_modules(config, shapes)
    leaves = {m.rsplit(".", 1)[-1] for m in linear}
    chosen = set(modules.values())
    names = tuple(sorted({m.rsplit(".", 1)[-1] for m in chosen}))
    for ltt in (None, tuple(sorted({int(x) for m in chosen for x in re.findall(r"\.layers\.(\d+)\.", m)})) or None):
        spec = LoraSpec(r=1, lora_alpha=1, target_modules=names, layers_to_transform=ltt)
        if {m for m in linear if _targets_module(spec, m, leaves)} == chosen:
            return {"target_modules": list(names), "layers_to_transform": list(ltt) if ltt else None}
    regex = "|".join(re.escape(m) for m in sorted(chosen))
    return {"target_modules": f"({regex})", "layers_to_transform": None}


def write_peft_adapter(adapter_dir: str | os.PathLike, lora_params: Mapping[str, Mapping[str, Any]],
                       config: ModelConfig, *, lora_alpha: float, use_rslora: bool = False,
                       base_model_name_or_path: str | None = None, dtype=np.float32,
                       extra_config: Mapping[str, Any] | None = None) -> pathlib.Path:
    """Write lora_params as a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``,
    both atomically) that ``peft.PeftModel.from_pretrained(base, adapter_dir)`` loads.

    The rank r is A.shape[0] (modules of another rank go to ``rank_pattern``); the scaling PEFT will use is
    lora_alpha / r (lora_alpha / sqrt(r) with ``use_rslora``). target_modules / layers_to_transform are chosen
    to select exactly the adapted modules. ``extra_config``: further LoraConfig fields to write (only
    LoraConfig fields: this is PEFT's config file).
    """
    shapes = param_shapes(config)
    linear = {p: m for m, p in _linear_modules(config, shapes).items()}
    arrays, modules, ranks = {}, {}, {}
    for path, ab in lora_params.items():
        if path not in linear:
            raise ValueError(f"lora_params key {path!r} is not a linear weight of {config.model_type}")
        if set(ab) != {"A", "B"}:
            raise ValueError(f"lora_params[{path!r}] must have exactly the keys 'A' and 'B', got {sorted(ab)}")
        a, b = (np.asarray(jax.device_get(ab[x])).astype(dtype) for x in "AB")
        _check_pair_shapes(path, shapes[path], a.shape, b.shape)
        module = linear[path]
        arrays[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a
        arrays[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b
        modules[path], ranks[module] = module, int(a.shape[0])
    if not arrays:
        raise ValueError("lora_params is empty")
    r = max(set(ranks.values()), key=lambda x: (list(ranks.values()).count(x), x))
    rank_pattern = {re.escape(m): k for m, k in sorted(ranks.items()) if k != r}
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": lora_alpha, "use_rslora": bool(use_rslora), "lora_dropout": 0.0,
        "fan_in_fan_out": False, "bias": "none", "modules_to_save": None, "init_lora_weights": True,
        "inference_mode": True, "rank_pattern": rank_pattern, "alpha_pattern": {}, "use_dora": False,
        "layers_pattern": None, **_targets_for(config, modules), **(extra_config or {}),
    }
    d = pathlib.Path(adapter_dir)
    d.mkdir(parents=True, exist_ok=True)
    write_safetensors(d / WEIGHTS_NAME, arrays)
    atomic_write_json(d / CONFIG_NAME, cfg)
    return d


def load(path: str | os.PathLike, *, dtype="bfloat16", mesh=None, sharding_fn=None,
         base: str | os.PathLike | None = None, lora_mode: str = "merge", base_model=None):
    """(config, model) of any local checkpoint: a Hugging Face directory or .gguf file
    (:func:`pa_jax.models.load.load_checkpoint`), or a PEFT LoRA adapter directory applied to ``base``
    (:func:`load_with_adapter`: merged, or unmerged with ``lora_mode="delta"``; ``base`` defaults to the
    adapter's local base_model_name_or_path; ``base_model`` an already loaded base to share arrays with). This is
    ``pa_jax.models.load``."""
    p = pathlib.Path(path)
    if is_adapter_dir(p):
        return load_with_adapter(p, base, dtype=dtype, mesh=mesh, sharding_fn=sharding_fn, lora_mode=lora_mode,
                                 base_model=base_model)
    if base_model is not None:
        raise ValueError(f"base_model given but {p} is not a PEFT adapter directory (no adapter_config.json)")
    if base is not None:
        raise ValueError(f"base={base} given but {p} is not a PEFT adapter directory (no adapter_config.json)")
    return load_checkpoint(p, dtype=dtype, mesh=mesh, sharding_fn=sharding_fn)
