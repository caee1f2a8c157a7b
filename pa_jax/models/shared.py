"""Detect the leading layers two decoders share, so that the trunk runs once for both.

RL post-training with LoRA or partial fine-tuning often leaves the policy's embeddings and lower layers
bit-identical to the reference's. Then for both models

    h_k = layers[k-1](... layers[0](embed(x)))        (the same array for policy and reference)

and each model continues from h_k with its own layers [k, L), final norm and head
(``Decoder.__call__(..., layer_range=(k, L), hidden_states=h_k)``): the pair costs (L + 2 (L - k)) / 2L of two
separate forwards (k = 3L/4: 5/8).
"""
from __future__ import annotations

import dataclasses
import hashlib
import weakref
from typing import Mapping, NamedTuple

import numpy as np


class SharedTrunk(NamedTuple):
    """``layers``: k, the number of leading layers (with the embeddings) identical in both models; 0 when the
    embeddings or the first layer differ. ``reason``: why the trunk stops where it does."""

    layers: int
    reason: str


_DIGESTS: dict[int, tuple[weakref.ref, str]] = {}  # id(jax array) -> (weak reference, digest)


def tensor_digest(a) -> str:
    """BLAKE2b-128 of a tensor's dtype, shape and bytes (C order): equal digests <=> bit-identical tensors
    (up to hash collisions). A jax.Array's digest is remembered while the array lives (jax arrays are
    immutable; hashing a 1B model's embeddings takes about a second, and a scorer called again on the same
    pair would pay it on every call)."""
    import jax

    cacheable = isinstance(a, jax.Array)
    if cacheable:
        hit = _DIGESTS.get(id(a))
        if hit is not None and hit[0]() is a:
            return hit[1]
    arr = np.ascontiguousarray(np.asarray(a))
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(arr.view(np.uint8).reshape(-1).data if arr.size else b"")
    digest = h.hexdigest()
    if cacheable:
        key = id(a)
        try:
            _DIGESTS[key] = (weakref.ref(a, lambda _, k=key: _DIGESTS.pop(k, None)), digest)
        except TypeError:  # not weakly referenceable: not remembered
            pass
    return digest


SAMPLE_ELEMENTS = 4096


def tensor_sample(a, n: int | None = None) -> bytes:
    """Dtype, shape and ``n`` evenly strided elements of a tensor (taken where it lives: only the sample is
    copied to the host): different samples => different tensors, a cheap test before :func:`tensor_digest`."""
    n = SAMPLE_ELEMENTS if n is None else n
    flat = a.reshape(-1)
    step = max(1, flat.shape[0] // n)
    return f"{a.dtype}{tuple(a.shape)}".encode() + np.asarray(flat[::step][:n]).tobytes()


def param_digests(model) -> dict[str, str]:
    """{"embed_tokens.weight": digest, "layers.0.self_attn.q_proj.weight": digest, ...} of a Decoder's parameters
    (dotted nnx paths), or of a mapping {name: tensor} already in that naming."""
    if isinstance(model, Mapping):
        return {str(k): tensor_digest(v) for k, v in model.items()}
    from flax import nnx

    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        out[".".join(str(p) for p in path)] = tensor_digest(var[...] if hasattr(var, "__getitem__") else var.value)
    return out


def _group(name: str) -> str:
    """"layers.3.mlp.up_proj.weight" -> "layers.3"; "embed_tokens.weight" -> "embed"; norm/lm_head -> "top"."""
    parts = name.split(".")
    if parts[0] == "layers":
        return f"layers.{parts[1]}"
    if parts[0] in ("embed_tokens", "embed_tokens_per_layer", "per_layer_model_projection",
                    "per_layer_projection_norm"):
        return "embed"
    return "top"


def shared_prefix_layers(digests_a: Mapping[str, str], digests_b: Mapping[str, str], num_layers: int,
                         config_a=None, config_b=None) -> SharedTrunk:
    """k = the largest k such that the embeddings (all embedding-side tensors) and layers 0..k-1 have identical
    parameter digests (:func:`param_digests`) in both models; every tensor of a group must match by name and
    digest. With configs given, they must agree on everything but the source config.json text
    (``hf_config_json``: names, paths), else k = 0 (the same weights under another RoPE or norm eps compute
    something else)."""
    if config_a is not None and config_b is not None:
        strip = lambda c: dataclasses.replace(c, hf_config_json="{}")  # noqa: E731
        if strip(config_a) != strip(config_b):
            return SharedTrunk(0, "configs differ")
    groups_a: dict[str, dict[str, str]] = {}
    groups_b: dict[str, dict[str, str]] = {}
    for d, g in ((digests_a, groups_a), (digests_b, groups_b)):
        for name, dig in d.items():
            g.setdefault(_group(name), {})[name] = dig
    if not groups_a.get("embed") or groups_a.get("embed") != groups_b.get("embed"):
        return SharedTrunk(0, "embeddings differ")
    k, reason = num_layers, "all layers identical"
    for i in range(num_layers):
        key = f"layers.{i}"
        if not groups_a.get(key) or groups_a.get(key) != groups_b.get(key):
            k, reason = i, f"layer {i} differs"
            break
    return _cut_at_kv_sharing(k, reason, config_a)


def _cut_at_kv_sharing(k: int, reason: str, config) -> SharedTrunk:
    """Lower k until no layer at or above k reads the keys/values of a layer below k (gemma4's KV sharing: the
    branch must produce what its own layers read)."""
    sources = getattr(config, "kv_sources", None)
    while sources is not None and k > 0 and any(s is not None and s < k <= i for i, s in enumerate(sources)):
        k, reason = k - 1, reason + "; cut below a KV-sharing layer's producer"
    return SharedTrunk(k, reason)


def adapter_trunk(adapted_paths, num_layers: int, config=None) -> SharedTrunk:
    """The trunk of a policy = base + LoRA adapter against a reference = the same base (same files, same dtype):
    the adapter changes exactly the weights ``adapted_paths`` (pa-jax parameter paths, e.g.
    ``"layers.27.self_attn.q_proj.weight"``; also any full base weight the adapter carries), every other tensor
    is the base's as loaded, so k = the first layer the adapter touches (num_layers if it touches only the
    head), 0 if it touches an embedding-side tensor. No tensor is read or hashed."""
    k, reason = num_layers, "adapter touches no layer"
    for path in adapted_paths:
        g = _group(str(path))
        if g == "embed":
            return SharedTrunk(0, f"adapter changes {path}")
        if g.startswith("layers.") and int(g.split(".")[1]) < k:
            k = int(g.split(".")[1])
            reason = f"adapter changes layer {k} first"
    return _cut_at_kv_sharing(k, reason, config)


def trunk_from_adapter(adapter_dir, config) -> SharedTrunk:
    """:func:`adapter_trunk` of a PEFT adapter directory read against a base of ``config``
    (``pa_jax.models.lora.read_peft_adapter``: the weights it merges, as the loader merges them)."""
    from pa_jax.models.lora import read_peft_adapter

    ad = read_peft_adapter(adapter_dir, config)
    return adapter_trunk(list(ad.params) + list(ad.base_weights), config.num_layers, config)


def _params_by_group(model) -> dict[str, dict[str, object]]:
    """{group: {dotted path: parameter array}} of a Decoder (groups as :func:`_group`), nothing read yet."""
    from flax import nnx

    out: dict[str, dict[str, object]] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = ".".join(str(p) for p in path)
        out.setdefault(_group(name), {})[name] = var
    return out


def shared_trunk(model_a, model_b) -> SharedTrunk:
    """:func:`shared_prefix_layers` of two Decoders (digests of their parameters as loaded, configs compared),
    hashing group by group in forward order (embeddings, layer 0, 1, ...) and stopping at the first group that
    differs: two unrelated models cost one hash of their embeddings, a fine-tune of the top layers the layers
    up to the first one it changed."""
    ca, cb = model_a.config, model_b.config
    strip = lambda c: dataclasses.replace(c, hf_config_json="{}")  # noqa: E731
    if strip(ca) != strip(cb):
        return SharedTrunk(0, "configs differ")
    ga, gb = _params_by_group(model_a), _params_by_group(model_b)

    def same(group: str) -> bool:
        a, b = ga.get(group, {}), gb.get(group, {})
        if not a or a.keys() != b.keys():
            return False
        value = lambda v: v[...] if hasattr(v, "__getitem__") else v.value  # noqa: E731
        pairs = [(value(a[n]), value(b[n])) for n in a]
        if any(x is not y and tensor_sample(x) != tensor_sample(y) for x, y in pairs):
            return False  # differing samples: no need to hash the whole tensors
        return all(x is y or tensor_digest(x) == tensor_digest(y) for x, y in pairs)

    if not same("embed"):
        return SharedTrunk(0, "embeddings differ")
    k, reason = ca.num_layers, "all layers identical"
    for i in range(ca.num_layers):
        if not same(f"layers.{i}"):
            k, reason = i, f"layer {i} differs"
            break
    return _cut_at_kv_sharing(k, reason, ca)
