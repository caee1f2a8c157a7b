"""Parameter count and weight memory of a model as pa-jax lays it out, without materializing weights.

``parameter_memory(config)`` builds the :class:`~pa_jax.models.decoder.Decoder` abstractly
(``nnx.eval_shape``: shapes only, no allocation) and sums its parameters by group. It counts exactly what
pa-jax holds: the text tower only (vision / audio towers and Qwen's MTP head are not loaded), a tied
unembedding once, Gemma 4's KV-shared layers without K/V projections.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from pa_jax.models.config import ModelConfig
from pa_jax.models.decoder import Decoder

GROUPS = (
    ("embed_tokens_per_layer", "per_layer_embedding_table"),
    ("embed_tokens", "embedding"),
    ("lm_head", "lm_head"),
    ("layers", "layers"),
)


def _group(path: str) -> str:
    for prefix, name in GROUPS:
        if path == prefix or path.startswith(prefix + "."):
            return name
    return "other"


def parameter_memory(config: ModelConfig, *, dtype: str = "bfloat16") -> dict[str, Any]:
    """{"params": N, "bytes": N * itemsize, "gib": bytes / 2^30, "groups": {group: N}} for ``config``.

    Groups: embedding (token table, also the unembedding when tied), per_layer_embedding_table
    (Gemma 4 PLE), lm_head (untied), layers, other (final norm, PLE projection/norm).
    """
    abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0), dtype=dtype))
    groups: dict[str, int] = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        name = ".".join(str(p) for p in path)
        shape = var.shape if hasattr(var, "shape") else var.value.shape
        groups[_group(name)] = groups.get(_group(name), 0) + int(np.prod(shape, dtype=np.int64))
    n = sum(groups.values())
    itemsize = np.dtype(dtype).itemsize if dtype != "bfloat16" else 2
    return {"params": n, "bytes": n * itemsize, "gib": n * itemsize / 2**30, "groups": groups}


def pair_memory(policy: ModelConfig, reference: ModelConfig, *, dtype: str = "bfloat16") -> dict[str, Any]:
    """Both models of a (policy, reference) pair, as scored together: their parameter memories and the sum."""
    a = parameter_memory(policy, dtype=dtype)
    b = parameter_memory(reference, dtype=dtype)
    return {"policy": a, "reference": b, "params": a["params"] + b["params"], "bytes": a["bytes"] + b["bytes"],
            "gib": (a["bytes"] + b["bytes"]) / 2**30}
