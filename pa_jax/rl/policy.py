"""A LoRA policy over a frozen decoder, split at a layer so that RL only runs (and differentiates) the top.

Layers ``0 .. split-1`` carry no adapter: their outputs on every history of an enumerable task are computed
once (:func:`bottom_hiddens`) and reused for every policy evaluation and gradient; layers ``split ..`` carry
LoRA deltas on their linear maps, ``W' = W + (alpha / r) B A`` (PEFT's convention: ``A`` ``[r, in]``, ``B``
``[out, r]``, ``B = 0`` at init so the policy starts as the reference), merged inside the jitted forward.

A command's log-probability at a history is the token sum ``log pi(c|h) = sum_k log pi(c_k | h, c_<k)`` over
its tokens including the end-of-message token (prefix reuse: the history runs once, its keys/values are
shared by its commands). This module supports plain full-attention decoders (llama/qwen-style; no gemma4
per-layer inputs, no KV sharing, no linear attention) and says so otherwise.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pa_jax.models import layers as L
from pa_jax.models.decoder import Decoder, LayerContext, _rope_tables

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def check_supported(model: Decoder) -> None:
    c = model.config
    if c.has_linear_attention or c.per_layer_input_dim or any(s is not None for s in c.kv_sources):
        raise ValueError(f"pa_jax.rl supports plain full-attention decoders, got model_type {c.model_type!r}")


# ---------------------------------------------------------------------------------------------- LoRA
@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Adapters on ``targets`` of layers ``split .. num_layers-1``, rank ``rank``, scaling ``alpha / rank``."""
    split: int
    num_layers: int
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def modules(self) -> list[tuple[int, str]]:
        return [(i, t) for i in range(self.split, self.num_layers) for t in self.targets]


def module_key(layer: int, target: str) -> str:
    return f"model.layers.{layer}.{_PARENT[target]}.{target}"


def init_lora(spec: LoraSpec, model: Decoder, seed: int) -> dict[str, dict[str, jax.Array]]:
    """PEFT's default init: ``A ~ U(-1/sqrt(in), 1/sqrt(in))`` (kaiming-uniform with a = sqrt 5), ``B = 0``;
    float32 whatever the model's dtype."""
    key = jax.random.PRNGKey(seed)
    out = {}
    for i, t in spec.modules():
        w = getattr(getattr(model.layers[i], _PARENT[t]), t).weight[...]
        key, sub = jax.random.split(key)
        bound = 1.0 / np.sqrt(w.shape[1])
        out[module_key(i, t)] = {"A": jax.random.uniform(sub, (spec.rank, w.shape[1]), jnp.float32, -bound, bound),
                                 "B": jnp.zeros((w.shape[0], spec.rank), jnp.float32)}
    return out


def merged_layers(model: Decoder, spec: LoraSpec, lora: dict | None) -> list:
    """Top layers ``split..`` with ``W + scaling * B A`` (a functional copy through nnx.split/merge)."""
    out = []
    for i in range(spec.split, spec.num_layers):
        gd, st = nnx.split(model.layers[i])
        if lora:
            pure = nnx.to_pure_dict(st)
            for t in spec.targets:
                k = module_key(i, t)
                if k in lora:
                    w = pure[_PARENT[t]][t]["weight"]
                    delta = spec.scaling * (lora[k]["B"] @ lora[k]["A"])
                    pure[_PARENT[t]][t]["weight"] = (w.astype(jnp.float32) + delta).astype(w.dtype)
            nnx.replace_by_pure_dict(st, pure)
        out.append(nnx.merge(gd, st))
    return out


# ---------------------------------------------------------------------------------------------- layers
def _contexts(model: Decoder, valid: jax.Array, prefix_valid: jax.Array, prefix_pos: jax.Array):
    """Per layer type: (mask [B,1,T,P+T], cos, sin); positions continue the prefix (right-padded rows)."""
    c = model.config
    p = prefix_valid.shape[1]
    offset = jnp.sum(prefix_valid, axis=1, dtype=jnp.int32)[:, None]
    positions = jnp.maximum(jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0) + offset
    kv_valid = jnp.concatenate([prefix_valid, valid], axis=1)
    kv_pos = jnp.concatenate([prefix_pos, positions], axis=1)
    out = {}
    for lt in sorted(set(c.layer_types)):
        mask = L.MaskSpec(p, kv_valid, positions, kv_pos, None, None, c.window_for(lt)).dense()
        inv, scaling = _rope_tables(c.rope_for(lt), c.head_dim_for(lt))
        cos, sin = L.rope_cos_sin(positions, jnp.asarray(inv), scaling)
        out[lt] = (mask, cos, sin)
    return out, positions


def run_layers(model: Decoder, layer_ids: Sequence[int], layers: Sequence, x: jax.Array, valid: jax.Array,
               prefix: tuple | None = None):
    """``x`` through ``layers`` (modules of ``layer_ids``). ``prefix``: ``(keys, values, positions, valid)``
    of a right-padded prefix for these layers. Returns ``(x, keys, values, positions)``."""
    b = x.shape[0]
    if prefix is None:
        pk = pv = [None] * len(layers)
        pvalid, ppos = jnp.zeros((b, 0), bool), jnp.zeros((b, 0), jnp.int32)
    else:
        pk, pv, ppos, pvalid = prefix
    ctxs, positions = _contexts(model, valid, pvalid, ppos)
    keys, values = [], []
    for j, (i, layer) in enumerate(zip(layer_ids, layers)):
        mask, cos, sin = ctxs[model.config.layer_types[i]]
        x, (k, v) = layer(x, LayerContext(cos, sin, mask, pk[j], pv[j], valid=valid))
        keys.append(k)
        values.append(v)
    return x, keys, values, positions


# ---------------------------------------------------------------------------------------------- rows
@dataclasses.dataclass(frozen=True)
class CommandRows:
    """Histories and commands as arrays. ``prefix_ids`` ``[N, P]`` right-padded: each history's ids but
    its last token; ``suffix_ids`` ``[A, K]``: the history's last token is prepended per node at run time
    (``last_ids`` ``[N]``), then the command ids (incl. end-of-message) right-padded; ``cmd_mask`` ``[A, K]``
    marks the command tokens (targets)."""
    prefix_ids: np.ndarray
    prefix_mask: np.ndarray
    last_ids: np.ndarray
    cmd_ids: np.ndarray
    cmd_mask: np.ndarray
    common: int = 0  # the first ``common`` prefix tokens are the same in every history (valid everywhere)

    @property
    def num_nodes(self) -> int:
        return self.prefix_ids.shape[0]

    @property
    def num_actions(self) -> int:
        return self.cmd_ids.shape[0]

    def suffix(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[len(nodes) * A, K + 1]`` ids and mask: last history token + command (node-major)."""
        A, K = self.cmd_ids.shape
        ids = np.zeros((len(nodes), A, K + 1), np.int32)
        ids[:, :, 0] = self.last_ids[nodes][:, None]
        ids[:, :, 1:] = self.cmd_ids[None]
        mask = np.ones((len(nodes), A, K + 1), np.int32)
        mask[:, :, 1:] = self.cmd_mask[None]
        return ids.reshape(-1, K + 1), mask.reshape(-1, K + 1)


def command_rows(prefixes: Sequence[Sequence[int]], commands: Sequence[Sequence[int]]) -> CommandRows:
    if any(len(p) < 2 for p in prefixes):
        raise ValueError("every history needs at least 2 tokens")
    P = max(len(p) for p in prefixes) - 1
    K = max(len(c) for c in commands)
    pid = np.zeros((len(prefixes), P), np.int32)
    pm = np.zeros((len(prefixes), P), np.int32)
    for i, p in enumerate(prefixes):
        pid[i, : len(p) - 1] = p[:-1]
        pm[i, : len(p) - 1] = 1
    cid = np.zeros((len(commands), K), np.int32)
    cm = np.zeros((len(commands), K), np.int32)
    for a, c in enumerate(commands):
        cid[a, : len(c)] = c
        cm[a, : len(c)] = 1
    common = 0
    while common < min(len(p) for p in prefixes) - 1 and len({p[common] for p in prefixes}) == 1:
        common += 1
    if common < 1:
        raise ValueError("the histories must share at least their first token (e.g. the chat's first header)")
    return CommandRows(pid, pm, np.array([p[-1] for p in prefixes], np.int32), cid, cm, common)


# ---------------------------------------------------------------------------------------------- split model
class SplitPolicy:
    """The frozen bottom (run once over all histories) + the adapted top of one decoder.

    ``bottom``: per node, the layer-``split`` input of its prefix ``[N, P, D]`` and of its ``A`` suffixes
    ``[N, A, K+1, D]``. ``logprobs(lora, nodes)`` -> ``[len(nodes), A]`` token-sum log-probs (jittable in
    ``lora``; ``nodes`` an int array).
    """

    def __init__(self, model: Decoder, spec: LoraSpec, rows: CommandRows, *, batch: int = 8,
                 compute_dtype: Any = None):
        check_supported(model)
        if not (0 <= spec.split < model.config.num_layers) or spec.num_layers != model.config.num_layers:
            raise ValueError(f"LoraSpec split {spec.split} / num_layers {spec.num_layers} do not fit a "
                             f"{model.config.num_layers}-layer model")
        self.model, self.spec, self.rows = model, spec, rows
        self.graphdef, self.state = nnx.split(model)
        self.bottom_prefix, self.bottom_suffix = self._bottom(batch)

    def _bottom(self, batch: int):
        split = self.spec.split
        gd, st = self.graphdef, self.state
        rows = self.rows

        @jax.jit
        def run(st, pid, pm, sid, sm):
            model = nnx.merge(gd, st)
            ids_p = jnp.where(pm > 0, pid, 0)
            xp = model.embed(ids_p)
            xp, kp, vp, posp = run_layers(model, range(split), model.layers[:split], xp, pm.astype(bool))
            A = sid.shape[0] // pid.shape[0]
            rep = lambda a: jnp.repeat(a, A, axis=0)  # noqa: E731
            pref = ([rep(k) for k in kp], [rep(v) for v in vp], rep(posp), rep(pm.astype(bool)))
            xs = model.embed(jnp.where(sm > 0, sid, 0))
            xs, _, _, _ = run_layers(model, range(split), model.layers[:split], xs, sm.astype(bool), pref)
            return xp, xs

        N = rows.num_nodes
        outs_p, outs_s = [], []
        for s in range(0, N, batch):
            nodes = np.arange(s, min(s + batch, N))
            pad = np.concatenate([nodes, np.full(batch - len(nodes), nodes[-1])])
            sid, sm = rows.suffix(pad)
            xp, xs = run(st, jnp.asarray(rows.prefix_ids[pad]), jnp.asarray(rows.prefix_mask[pad]),
                         jnp.asarray(sid), jnp.asarray(sm))
            outs_p.append(np.asarray(xp)[: len(nodes)])
            outs_s.append(np.asarray(xs).reshape(batch, rows.num_actions, *xs.shape[1:])[: len(nodes)])
        return np.concatenate(outs_p), np.concatenate(outs_s)

    def logprobs_fn(self):
        """A pure ``f(state, lora, xc, xr, rm, xs, sid, sm) -> [B, A]`` (jit it; ``lora`` may be None).

        The histories' common first ``C`` tokens (``xc`` ``[1, C, D]``) run once; each history's rest
        (``xr`` ``[B, P-C, D]``, mask ``rm``) attends to them; each command (``xs`` ``[B, A, K+1, D]``) to both."""
        gd, spec = self.graphdef, self.spec

        def f(state, lora, xc, xr, rm, xs, sid, sm):
            from pa_jax.head import head_statistics

            model = nnx.merge(gd, state)
            top = merged_layers(model, spec, lora)
            ids = range(spec.split, spec.num_layers)
            B, A = xs.shape[0], xs.shape[1]
            cvalid = jnp.ones(xc.shape[:2], bool)
            _, kc, vc, posc = run_layers(model, ids, top, xc, cvalid)
            bc = lambda a, n: jnp.broadcast_to(a, (n,) + a.shape[1:])  # noqa: E731
            pref_c = ([bc(k, B) for k in kc], [bc(v, B) for v in vc], bc(posc, B), bc(cvalid, B))
            rmb = rm.astype(bool)
            _, kr, vr, posr = run_layers(model, ids, top, xr, rmb, pref_c)
            cat = lambda a, b: jnp.concatenate([a, b], axis=1)  # noqa: E731
            rep = lambda a: jnp.repeat(a, A, axis=0)  # noqa: E731
            pref = ([rep(cat(a, b)) for a, b in zip(pref_c[0], kr)], [rep(cat(a, b)) for a, b in zip(pref_c[1], vr)],
                    rep(cat(pref_c[2], posr)), rep(cat(pref_c[3], rmb)))
            x = xs.reshape((B * A,) + xs.shape[2:])
            x, _, _, _ = run_layers(model, ids, top, x, sm.astype(bool), pref)
            h = model.norm(x)
            tgt = jnp.where(sm[:, 1:] > 0, sid[:, 1:], 0)
            lp = head_statistics(h[:, :-1], model.unembedding(), tgt, softcap=model.config.final_logit_softcap,
                                 top_k=0).target_logprob
            return jnp.sum(lp * sm[:, 1:], axis=1).reshape(B, A)

        return f

    def inputs(self, nodes: np.ndarray):
        """The bottom activations and ids of ``nodes`` as device arrays (for ``logprobs_fn``)."""
        nodes = np.asarray(nodes)
        C = self.rows.common
        sid, sm = self.rows.suffix(nodes)
        return (jnp.asarray(self.bottom_prefix[:1, :C]), jnp.asarray(self.bottom_prefix[nodes, C:]),
                jnp.asarray(self.rows.prefix_mask[nodes, C:]),
                jnp.asarray(self.bottom_suffix[nodes]), jnp.asarray(sid), jnp.asarray(sm))

    def all_logprobs(self, lora, *, batch: int = 16) -> np.ndarray:
        """``[N, A]`` float64 command log-probs at every history under ``lora`` (None = the base)."""
        if not hasattr(self, "_jit_lp"):
            self._jit_lp = jax.jit(self.logprobs_fn())
        N = self.rows.num_nodes
        out = []
        for s in range(0, N, batch):
            nodes = np.arange(s, min(s + batch, N))
            pad = np.concatenate([nodes, np.full(batch - len(nodes), nodes[-1])])
            out.append(np.asarray(self._jit_lp(self.state, lora, *self.inputs(pad)))[: len(nodes)])
        return np.concatenate(out).astype(np.float64)


# ---------------------------------------------------------------------------------------------- PEFT format
def save_peft(path: str | os.PathLike, lora: dict, spec: LoraSpec, *, base_model: str = "",
              extra: dict | None = None) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT key names; ``extra`` goes to
    ``training.json`` beside them
    ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` / ``lora_B.weight`` ``[out, r]``, float32)."""
    from safetensors.numpy import save

    from pa_jax.io import atomic_write_bytes, atomic_write_json

    p = pathlib.Path(path)
    p.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, ab in lora.items():
        tensors[f"base_model.model.{k}.lora_A.weight"] = np.ascontiguousarray(np.asarray(ab["A"], np.float32))
        tensors[f"base_model.model.{k}.lora_B.weight"] = np.ascontiguousarray(np.asarray(ab["B"], np.float32))
    atomic_write_bytes(p / "adapter_model.safetensors", save(tensors))
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
           "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": 0.0, "bias": "none",
           "target_modules": list(spec.targets), "layers_to_transform": list(range(spec.split, spec.num_layers)),
           "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
           "inference_mode": True}
    atomic_write_json(p / "adapter_config.json", cfg)
    if extra:  # beside PEFT's file, not in it: PEFT warns about keys that LoraConfig does not know
        atomic_write_json(p / "training.json", extra)


def load_peft_arrays(path: str | os.PathLike) -> tuple[dict, dict]:
    """Read back what :func:`save_peft` wrote: ``(config, {module: {"A", "B"}})`` (NumPy float32)."""
    from safetensors.numpy import load_file

    p = pathlib.Path(path)
    cfg = json.loads((p / "adapter_config.json").read_text())
    raw = load_file(str(p / "adapter_model.safetensors"))
    out: dict[str, dict] = {}
    for k, v in raw.items():
        if not k.startswith("base_model.model.") or not (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight")):
            raise ValueError(f"{p}: unexpected key {k!r} in adapter_model.safetensors")
        mod = k[len("base_model.model."): -len(".lora_A.weight")]
        out.setdefault(mod, {})["A" if ".lora_A." in k else "B"] = v
    return cfg, out
