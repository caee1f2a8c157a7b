"""Token-by-token sampling with a KV-cache buffer (``Decoder(..., cache=, cache_index=)``).

``sample(model, prompts, key, max_new_tokens=, stop_id=)``: the prompts (right-padded ``[B, P]`` ids + mask)
run once into a buffer of ``P + max_new_tokens`` entries; then one token per call (a traced ``cache_index``:
one compiled program for every step) at temperature 1 from ``softmax(h W^T)``; a row stops after emitting
``stop_id``. Returns the generated ids ``[B, max_new_tokens]`` (``-1`` after the stop), their log-probs under
the model (0 after the stop) and whether each row stopped.

``merge_lora(model, lora, spec)`` returns a full decoder with ``W + (alpha/r) B A`` merged (for sampling the
policy).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pa_jax.models.decoder import Decoder, KVCache


def merge_lora(model: Decoder, lora: dict | None, spec) -> Decoder:
    """A copy of ``model`` with every adapter of ``lora`` (keys ``model.layers.i.<parent>.<target>``) merged."""
    if not lora:
        return model
    gd, st = nnx.split(model)
    pure = nnx.to_pure_dict(st)
    for k, ab in lora.items():
        parts = k.split(".")
        if len(parts) != 5 or parts[0] != "model" or parts[1] != "layers":
            raise ValueError(f"LoRA key {k!r} is not of the form model.layers.<i>.<parent>.<target>")
        _, _, i, parent, target = parts
        w = pure["layers"][int(i)][parent][target]["weight"]
        delta = spec.scaling * (jnp.asarray(ab["B"], jnp.float32) @ jnp.asarray(ab["A"], jnp.float32))
        if delta.shape != w.shape:
            raise ValueError(f"LoRA {k!r}: B A has shape {delta.shape}, the base weight {w.shape}")
        pure["layers"][int(i)][parent][target]["weight"] = (w.astype(jnp.float32) + delta).astype(w.dtype)
    nnx.replace_by_pure_dict(st, pure)
    return nnx.merge(gd, st)


@functools.partial(jax.jit, static_argnums=(0,))
def _prefill(gd, st, ids, mask, cache):
    model = nnx.merge(gd, st)
    h, cache = model(ids, mask, cache=cache, cache_index=0)
    last = jnp.sum(mask, axis=1) - 1
    h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
    return h_last @ model.unembedding().T.astype(h_last.dtype), cache


@functools.partial(jax.jit, static_argnums=(0,))
def _decode(gd, st, tok, cache, index):
    model = nnx.merge(gd, st)
    h, cache = model(tok[:, None], jnp.ones_like(tok[:, None]), cache=cache, cache_index=index)
    return h[:, 0] @ model.unembedding().T.astype(h.dtype), cache


def sample(model: Decoder, prompt_ids: np.ndarray, prompt_mask: np.ndarray, key: jax.Array, *,
           max_new_tokens: int, stop_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    c = model.config
    if c.final_logit_softcap or c.has_linear_attention:
        raise ValueError("sample supports decoders without a final soft-cap or linear attention")
    ids = np.asarray(prompt_ids, np.int32)
    mask = np.asarray(prompt_mask, np.int32)
    B, P = ids.shape
    gd, st = nnx.split(model)
    shapes = jax.eval_shape(lambda s, i, m: nnx.merge(gd, s)(i, m, return_kv=True)[1], st,
                            jax.ShapeDtypeStruct((B, 1), jnp.int32), jax.ShapeDtypeStruct((B, 1), jnp.int32))
    cache = KVCache.empty(shapes, B, P + max_new_tokens)
    logits, cache = _prefill(gd, st, jnp.asarray(np.where(mask > 0, ids, 0)), jnp.asarray(mask), cache)
    out = np.full((B, max_new_tokens), -1, np.int64)
    lps = np.zeros((B, max_new_tokens))
    done = np.zeros(B, bool)
    for i in range(max_new_tokens):
        key, sub = jax.random.split(key)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        tok = jax.random.categorical(sub, logp, axis=-1)
        tok_np = np.asarray(tok)
        lp_np = np.asarray(jnp.take_along_axis(logp, tok[:, None], axis=1)[:, 0])
        live = ~done
        out[live, i] = tok_np[live]
        lps[live, i] = lp_np[live]
        done |= live & (tok_np == stop_id)
        if done.all() or i == max_new_tokens - 1:
            break
        logits, cache = _decode(gd, st, tok.astype(jnp.int32), cache, jnp.asarray(P + i, jnp.int32))
    return out, lps, done
