"""The attention implementations' selection, and cuDNN's fused attention against XLA's (NVIDIA GPUs only).

On CPU (CI here) the selection rules are checked; the numerical comparison runs where a CUDA backend is
present (``pytest tests/test_attention_cudnn.py`` on a GPU machine) and is skipped elsewhere.
"""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pa_jax.models import layers as L
from pa_jax.models.decoder import _cuda_backend, resolve_attention_impl

CUDA = _cuda_backend()


def test_selection_rules():
    backend = jax.default_backend()
    expected = "blocked" if backend == "cpu" else ("cudnn" if CUDA else "dense")
    assert resolve_attention_impl("auto") == expected
    assert resolve_attention_impl("dense") == "dense"
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        resolve_attention_impl("flash")
    if not CUDA:
        with pytest.raises(ValueError, match="needs an NVIDIA GPU backend"):
            resolve_attention_impl("cudnn")
    q = jnp.zeros((1, 4, 2, 64), jnp.bfloat16)
    assert L.cudnn_attention_applies(q, None)
    assert not L.cudnn_attention_applies(q, 50.0)  # soft-capped layers stay on XLA
    assert not L.cudnn_attention_applies(q.astype(jnp.float32), None)
    assert not L.cudnn_attention_applies(jnp.zeros((1, 4, 2, 60), jnp.bfloat16), None)
    with pytest.raises(ValueError, match="implementation must be"):
        L.attention(q, q, q, jnp.ones((1, 1, 4, 4), bool), scale=0.125, implementation="flash")


def prefix_padded_inputs(seed=0, b=3, p=40, t=72, n=8, kh=2, hd=64, dtype=jnp.bfloat16):
    """q for t suffix tokens after a p-token prefix, keys over p + t; the rows have padding at the end
    (and row 1 an invalid stretch inside its prefix): the mask the engine builds for prefix + chunk."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, n, hd)), dtype)
    k = jnp.asarray(rng.standard_normal((b, p + t, kh, hd)), dtype)
    v = jnp.asarray(rng.standard_normal((b, p + t, kh, hd)), dtype)
    valid = np.ones((b, p + t), bool)
    valid[1, 5:12] = False
    valid[2, p + t - 17:] = False
    pos = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    spec = L.MaskSpec(p, jnp.asarray(valid), jnp.asarray(pos[:, p:]), jnp.asarray(pos))
    q_valid = valid[:, p:]
    return q, k, v, spec.dense(), q_valid


@pytest.mark.skipif(not CUDA, reason="cuDNN attention needs an NVIDIA GPU backend")
@pytest.mark.parametrize("hd", [64, 128])
def test_cudnn_equals_xla_with_prefix_and_padding(hd):
    q, k, v, mask, q_valid = prefix_padded_inputs(hd=hd)
    f = jax.jit(lambda q, k, v, m, impl: L.attention(q, k, v, m, scale=hd ** -0.5, implementation=impl),
                static_argnums=4)
    ref = np.asarray(f(q, k, v, mask, None), np.float32)
    got = np.asarray(f(q, k, v, mask, "cudnn"), np.float32)
    hlo = f.lower(q, k, v, mask, "cudnn").compile().as_text()
    assert "cudnn" in hlo.lower() or "fmha" in hlo.lower(), "the cuDNN kernel was not used"
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[q_valid], ref[q_valid], atol=2e-2, rtol=2e-2)
