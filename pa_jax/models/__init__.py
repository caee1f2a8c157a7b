"""Flax NNX decoders for Hugging Face / GGUF checkpoints (hidden states only; logits live in pa_jax.head).

Public API::

    config, model = pa_jax.models.load(path, dtype="bfloat16", mesh=None)
    hidden = model(input_ids, attention_mask)                  # [B, T, D] after the final norm
    logp = pa_jax.models.token_logprobs(config, model, input_ids, attention_mask)   # [B, T-1]
    model = pa_jax.models.Decoder(config, rngs=nnx.Rngs(0), dtype="float32")       # random init
    pa_jax.models.save_pretrained(config, model, path)         # transformers-loadable directory
    config, model = pa_jax.models.load(adapter_dir, base=base_path)  # PEFT LoRA adapter merged into a base
    merged_state = pa_jax.models.apply_lora(state, lora_params, scaling)  # pure / jittable (pa_jax.models.lora)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pa_jax.head import head_statistics
from pa_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig, RopeConfig
from pa_jax.models.decoder import Decoder, KVCache, concat_kv
from pa_jax.models.load import load_checkpoint, load_from_tensors, open_safetensors_dir, save_pretrained
from pa_jax.models.lora import (
    Adapter,
    LoraSpec,
    apply_lora,
    init_lora,
    load,
    load_with_adapter,
    lora_scaling,
    read_peft_adapter,
    write_peft_adapter,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "Adapter",
    "LoraSpec",
    "apply_lora",
    "init_lora",
    "load_with_adapter",
    "lora_scaling",
    "read_peft_adapter",
    "write_peft_adapter",
    "Decoder",
    "KVCache",
    "ModelConfig",
    "RopeConfig",
    "concat_kv",
    "forward",
    "load",
    "load_checkpoint",
    "load_from_tensors",
    "open_safetensors_dir",
    "save_pretrained",
    "token_logprobs",
]


# The jitted entry points below take the model as (graphdef [static], state) through a plain ``jax.jit``
# and return only their result. ``nnx.jit`` (flax 0.12, graph-updates mode) would also return every
# parameter as an extra output (to propagate in-place mutations, which an inference forward never makes),
# i.e. a device copy of every parameter per call.
@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(input_ids, attention_mask)


def forward(model: Decoder, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Jitted ``model(input_ids, attention_mask)`` -> final hidden states [B, T, D] (the model is not mutated)."""
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, input_ids, attention_mask)


@functools.partial(jax.jit, static_argnums=(0, 4))  # graphdef, softcap
def _token_logprobs_pure(graphdef, state, input_ids, attention_mask, softcap, kv_prefix=None):
    model = nnx.merge(graphdef, state)
    hidden = model(input_ids, attention_mask) if kv_prefix is None else model(
        input_ids, attention_mask, kv_prefix=kv_prefix
    )
    stats = head_statistics(hidden[:, :-1], model.unembedding(), input_ids[:, 1:], softcap=softcap, top_k=0)
    return stats.target_logprob


def _token_logprobs(model: Decoder, input_ids: jax.Array, attention_mask: jax.Array, softcap, kv_prefix=None):
    graphdef, state = nnx.split(model)
    return _token_logprobs_pure(graphdef, state, input_ids, attention_mask, softcap, kv_prefix)


def _check_batch(input_ids, attention_mask, vocab_size: int | None = None):
    ids = np.asarray(input_ids) if not isinstance(input_ids, jax.Array) else input_ids
    if ids.ndim != 2:
        raise ValueError(f"input_ids must have shape [B, T], got {tuple(ids.shape)}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integers, got dtype {ids.dtype}")
    if attention_mask is None:
        mask = np.ones(ids.shape, np.int32)
    else:
        mask = np.asarray(attention_mask) if not isinstance(attention_mask, jax.Array) else attention_mask
        if tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}")
    return ids, mask


def token_logprobs(
    config: ModelConfig, model: Decoder, input_ids, attention_mask=None, *, kv_prefix: KVCache | None = None
) -> jax.Array:
    """log p(x_{t+1} | x_{<=t}) for t = 0..T-2: [B, T-1] float32, through the fused head.

    Logits = softcap(hidden @ unembedding^T) with config.final_logit_softcap; never a [B, T, V] array.
    Entries whose target (or context) is padding hold meaningless values: mask them with
    attention_mask[:, 1:]. Padding positions of input_ids may hold any id (they are replaced by 0).
    kv_prefix: a shared prefix's KVCache (``model(prefix_ids, return_kv=True)[1]``); the rows of input_ids
    then continue that prefix (the first suffix token itself is not scored).
    """
    ids, mask = _check_batch(input_ids, attention_mask)
    if ids.shape[1] < 2:
        raise ValueError(f"input_ids needs at least 2 tokens per row, got T={ids.shape[1]}")
    ids = jnp.where(jnp.asarray(mask).astype(bool), jnp.asarray(ids), 0).astype(jnp.int32)
    if isinstance(input_ids, np.ndarray) and ((input_ids < 0) | (input_ids >= config.vocab_size))[np.asarray(mask).astype(bool)].any():
        raise ValueError(f"input_ids hold ids outside [0, {config.vocab_size}) at unmasked positions")
    return _token_logprobs(model, ids, jnp.asarray(mask, jnp.int32), config.final_logit_softcap, kv_prefix)
