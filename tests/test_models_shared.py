"""Shared trunk of two decoders: detection from parameter digests, and layer_range forwards (embed + layers[:k]
once, then each model's layers[k:] + final norm) equal to two separate whole forwards (float32, 1e-6)."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pa_jax.models import Decoder, KVCache, ModelConfig
from pa_jax.models.shared import param_digests, shared_prefix_layers, shared_trunk, tensor_digest

L, K = 4, 3  # top quarter (layer 3) differs


def llama_config(**kw) -> ModelConfig:
    hf = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 97, "hidden_size": 32,
          "intermediate_size": 64, "num_hidden_layers": L, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
          "tie_word_embeddings": False, "initializer_range": 0.2, **kw}
    return ModelConfig.from_hf_dict(hf)


def perturb(p, seed):
    p[...] = p[...] + 0.1 * jnp.asarray(np.random.default_rng(seed).standard_normal(p[...].shape), p[...].dtype)


@pytest.fixture(scope="module")
def pair():
    cfg = llama_config()
    a = Decoder(cfg, rngs=nnx.Rngs(0), dtype="float32")
    b = Decoder(cfg, rngs=nnx.Rngs(0), dtype="float32")  # same init, then its top quarter and head fine-tuned
    for i in range(K, L):
        perturb(b.layers[i].mlp.up_proj.weight, i)
        perturb(b.layers[i].self_attn.q_proj.weight, 100 + i)
    perturb(b.lm_head.weight, 7)
    return cfg, a, b


def batch(seed=0, b=2, t=24):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 97, (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    if b > 1:
        mask[1, :5] = 0  # left padding in row 1
    return jnp.asarray(ids), jnp.asarray(mask)


def test_tensor_digest():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert tensor_digest(x) == tensor_digest(x.copy())
    assert tensor_digest(x) != tensor_digest(x.reshape(4, 3))  # shape is part of it
    assert tensor_digest(x) != tensor_digest(x.astype(np.float64))
    y = x.copy()
    y[2, 3] = np.nextafter(y[2, 3], np.float32(100))  # one ulp
    assert tensor_digest(x) != tensor_digest(y)


def test_detects_top_quarter(pair):
    cfg, a, b = pair
    assert shared_trunk(a, b).layers == K
    assert shared_trunk(a, a).layers == L
    # embeddings differ -> no trunk, even with identical layers
    c = Decoder(cfg, rngs=nnx.Rngs(0), dtype="float32")
    perturb(c.embed_tokens.weight, 3)
    assert shared_trunk(a, c) == (0, "embeddings differ")
    # a tensor of layer 0 differs
    d = Decoder(cfg, rngs=nnx.Rngs(0), dtype="float32")
    perturb(d.layers[0].post_attention_layernorm.weight, 4)
    assert shared_trunk(a, d).layers == 0
    # same weights, another RoPE base: not shared
    e_cfg = llama_config(rope_theta=500000.0)
    assert shared_prefix_layers(param_digests(a), param_digests(a), L, cfg, e_cfg).layers == 0
    # the same config up to the source config.json text is still shared
    renamed = dataclasses.replace(cfg, hf_config_json=cfg.hf_config_json.replace("LlamaForCausalLM", "X"))
    assert shared_prefix_layers(param_digests(a), param_digests(b), L, cfg, renamed).layers == K


def test_digest_mapping_form():
    w = {"embed_tokens.weight": np.ones((4, 2)), "layers.0.mlp.w": np.zeros(3), "layers.1.mlp.w": np.zeros(3),
         "norm.weight": np.ones(2)}
    w2 = {**w, "layers.1.mlp.w": np.ones(3), "norm.weight": np.zeros(2)}
    assert shared_prefix_layers(param_digests(w), param_digests(w2), 2).layers == 1
    missing = {k: v for k, v in w.items() if k != "layers.0.mlp.w"}
    assert shared_prefix_layers(param_digests(w), param_digests(missing), 2).layers == 0


@pytest.mark.parametrize("impl", ["blocked", "dense"])
def test_fork_equals_two_forwards(pair, impl):
    _, a, b = pair
    ids, mask = batch()
    whole_a = np.asarray(a(ids, mask, attention_impl=impl))
    whole_b = np.asarray(b(ids, mask, attention_impl=impl))
    trunk = a(ids, mask, attention_impl=impl, layer_range=(0, K))  # run once, from either model
    fa = np.asarray(a(ids, mask, attention_impl=impl, layer_range=(K, L), hidden_states=trunk))
    fb = np.asarray(b(ids, mask, attention_impl=impl, layer_range=(K, L), hidden_states=trunk))
    m = np.asarray(mask, bool)
    np.testing.assert_allclose(fa[m], whole_a[m], atol=1e-6, rtol=0)
    np.testing.assert_allclose(fb[m], whole_b[m], atol=1e-6, rtol=0)
    assert np.abs(fa[m] - fb[m]).max() > 1e-3  # the top quarter really differs
    # three pieces compose too
    mid = a(ids, mask, attention_impl=impl, layer_range=(1, 2), hidden_states=a(ids, mask, attention_impl=impl, layer_range=(0, 1)))
    f3 = np.asarray(a(ids, mask, attention_impl=impl, layer_range=(2, L), hidden_states=mid))
    np.testing.assert_allclose(f3[m], whole_a[m], atol=1e-6, rtol=0)


def test_fork_with_prefix_cache(pair):
    """Shared-prefix mode: the trunk's and each branch's caches are the range's layers; with a forked prefix the
    suffix's hidden states equal the whole forward with the whole prefix cache."""
    _, a, b = pair
    ids, mask = batch(1, b=1, t=30)
    pre, suf = ids[:, :12], ids[:, 12:]
    for m in (a, b):
        _, full_cache = m(pre, return_kv=True)
        want = np.asarray(m(suf, kv_prefix=full_cache))
        trunk, trunk_cache = a(pre, return_kv=True, layer_range=(0, K))
        _, branch_cache = m(pre, return_kv=True, layer_range=(K, L), hidden_states=trunk)
        assert len(trunk_cache.keys) == K and len(branch_cache.keys) == L - K
        joined = KVCache(trunk_cache.keys + branch_cache.keys, trunk_cache.values + branch_cache.values,
                         trunk_cache.positions, trunk_cache.valid)
        for x, y in zip(joined.keys, full_cache.keys):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)
        h = a(suf, kv_prefix=trunk_cache, layer_range=(0, K))
        got = np.asarray(m(suf, kv_prefix=branch_cache, layer_range=(K, L), hidden_states=h))
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_layer_range_errors(pair):
    _, a, _ = pair
    ids, mask = batch()
    with pytest.raises(ValueError, match="hidden_states"):
        a(ids, mask, layer_range=(2, L))
    with pytest.raises(ValueError, match="hidden_states"):
        a(ids, mask, layer_range=(0, 2), hidden_states=jnp.zeros((2, 24, 32)))
    with pytest.raises(ValueError, match="0 <= start < stop"):
        a(ids, mask, layer_range=(3, 3), hidden_states=jnp.zeros((2, 24, 32)))
    with pytest.raises(ValueError, match=r"hidden_states shape \(2, 24, 31\)"):
        a(ids, mask, layer_range=(2, L), hidden_states=jnp.zeros((2, 24, 31)))
    _, cache = a(ids, mask, return_kv=True)
    with pytest.raises(ValueError, match="kv_prefix has 4 layers, expected 1"):
        a(ids, mask, kv_prefix=cache, layer_range=(K, L), hidden_states=jnp.zeros((2, 24, 32)))


def test_detection_stops_at_the_first_difference(pair, monkeypatch):
    """shared_trunk hashes in forward order and stops where the models part: unrelated embeddings cost the
    embedding tensors only; the top-quarter pair hashes nothing above layer K."""
    from pa_jax.models import shared

    cfg, a, b = pair
    hashed = []
    real = shared.tensor_digest
    monkeypatch.setattr(shared, "tensor_digest", lambda x: hashed.append(np.shape(x)) or real(x))
    c = Decoder(cfg, rngs=nnx.Rngs(1), dtype="float32")  # another init: embeddings differ
    assert shared.shared_trunk(a, c) == (0, "embeddings differ")
    assert hashed == []  # their strided samples differ: nothing hashed
    # a difference the sample does not see (one element off the stride) is found by the full digests
    monkeypatch.setattr(shared, "SAMPLE_ELEMENTS", 16)
    d = Decoder(cfg, rngs=nnx.Rngs(0), dtype="float32")
    nnx.update(d, nnx.state(a))
    w = np.asarray(a.embed_tokens.weight[...]).copy()
    w.reshape(-1)[1] += 1.0
    d.embed_tokens.weight[...] = jnp.asarray(w)
    assert shared.tensor_sample(d.embed_tokens.weight[...]) == shared.tensor_sample(a.embed_tokens.weight[...])
    assert shared.shared_trunk(a, d) == (0, "embeddings differ")
    assert hashed[-2:] == [tuple(a.embed_tokens.weight[...].shape)] * 2
    hashed.clear()
    assert shared.shared_trunk(a, b) == (K, f"layer {K} differs")
    per_layer = len(nnx.to_flat_state(nnx.state(a.layers[0], nnx.Param)))
    assert len(hashed) <= 2 * (1 + K * per_layer + per_layer)  # embeddings, layers < K, at most all of layer K


def test_digests_are_remembered_per_array():
    """A jax array's digest is computed once while it lives (a scorer called again on the same pair does not
    hash the weights again); numpy arrays (mutable) are hashed every time."""
    import gc

    from pa_jax.models import shared

    x = jnp.arange(12.0).reshape(3, 4)
    d = shared.tensor_digest(x)
    assert shared._DIGESTS[id(x)][1] == d
    assert shared.tensor_digest(x) == d == shared.tensor_digest(np.asarray(x))
    key = id(x)
    del x
    gc.collect()
    assert key not in shared._DIGESTS
    y = np.zeros(3)
    shared.tensor_digest(y)
    assert id(y) not in shared._DIGESTS
