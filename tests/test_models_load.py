"""Loading checkpoints: errors that name the tensor/field, sharded directories, lazy slice reads, the
sharding hook, config normalization (checked against transformers 5.23's own config classes)."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pa_jax import models
import importlib

L = importlib.import_module("pa_jax.models.load")  # the module (pa_jax.models.load is also the function)
from pa_jax.models.config import ModelConfig

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


def _write_dir(path: pathlib.Path, hf: dict, tensors: dict) -> pathlib.Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf))
    L.write_safetensors(path / "model.safetensors", tensors)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config, random Decoder f32, its HF tensors as NumPy, a saved directory)."""
    cfg = ModelConfig.from_hf_dict(TINY_LLAMA)
    model = models.Decoder(cfg, rngs=nnx.Rngs(0), dtype="float32")
    path = tmp_path_factory.mktemp("tiny")
    models.save_pretrained(cfg, model, path)
    tensors = {k: np.asarray(v) for k, v in L.model_tensors(cfg, model).items()}
    return cfg, model, tensors, path


def _hidden(model) -> np.ndarray:
    ids = jnp.asarray(np.arange(10).reshape(2, 5) % 64)
    return np.asarray(nnx.jit(lambda m, i: m(i))(model, ids))


def test_saved_keys_are_hf_names(tiny):
    cfg, _, tensors, path = tiny
    header, _ = L.read_safetensors_header(path / "model.safetensors")
    assert "model.layers.1.self_attn.k_proj.weight" in header and "lm_head.weight" in header
    assert header["model.layers.1.self_attn.k_proj.weight"]["shape"] == [2 * 4, 16]
    assert set(header) - {"__metadata__"} == set(tensors)


def test_missing_tensor_named(tiny, tmp_path):
    cfg, _, tensors, _ = tiny
    t = dict(tensors)
    del t["model.layers.1.mlp.up_proj.weight"]
    d = _write_dir(tmp_path / "m", cfg.hf_config, t)
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        models.load(d, dtype="float32")


def test_untied_missing_lm_head_named(tiny, tmp_path):
    cfg, _, tensors, _ = tiny
    t = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    d = _write_dir(tmp_path / "m", cfg.hf_config, t)
    with pytest.raises(ValueError, match=r"missing tensors: lm_head\.weight"):
        models.load(d, dtype="float32")


@pytest.mark.parametrize(
    "key", ["model.layers.0.self_attn.q_proj.bias", "model.layers.0.mlp.extra.weight", "score.weight"]
)
def test_unexpected_tensor_named(tiny, tmp_path, key):
    cfg, _, tensors, _ = tiny
    d = _write_dir(tmp_path / "m", cfg.hf_config, {**tensors, key: np.zeros((8,), np.float32)})
    with pytest.raises(ValueError, match="unexpected tensors.*" + key.replace(".", r"\.")):
        models.load(d, dtype="float32")


def test_wrong_shape_named(tiny, tmp_path):
    cfg, _, tensors, _ = tiny
    d = _write_dir(tmp_path / "m", cfg.hf_config, {**tensors, "model.norm.weight": np.ones((17,), np.float32)})
    with pytest.raises(ValueError, match=r"wrongly shaped tensors: model\.norm\.weight \(checkpoint \(17,\), expected \(16,\)\)"):
        models.load(d, dtype="float32")


def test_ignored_tensors_and_tied_copy_are_skipped(tiny, tmp_path):
    cfg, model, tensors, _ = tiny
    extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones((2,), np.float32)}
    d = _write_dir(tmp_path / "m", cfg.hf_config, {**tensors, **extra})
    _, m2 = models.load(d, dtype="float32")
    np.testing.assert_array_equal(_hidden(m2), _hidden(model))
    # tied config with a redundant lm_head copy: loads, unembedding is the embedding
    tied = {**cfg.hf_config, "tie_word_embeddings": True}
    d2 = _write_dir(tmp_path / "tied", tied, tensors)
    c3, m3 = models.load(d2, dtype="float32")
    assert c3.tie_word_embeddings and m3.lm_head is None
    np.testing.assert_array_equal(np.asarray(m3.unembedding()), tensors["model.embed_tokens.weight"])


@pytest.mark.parametrize(
    "change, pattern",
    [
        ({"model_type": "bert"}, r"model_type='bert' is not supported; supported model types: llama, qwen2"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "not a causal language model"),
        ({"hidden_size": None}, "missing required field 'hidden_size'"),
        ({"num_key_value_heads": 3}, "num_key_value_heads=3"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, r"rope_type='dynamic' is not supported"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor is required"),
    ],
)
def test_bad_config_named(tiny, tmp_path, change, pattern):
    cfg, _, tensors, _ = tiny
    hf = {**cfg.hf_config, **change}
    d = _write_dir(tmp_path / "m", hf, tensors)
    with pytest.raises(ValueError, match=pattern):
        models.load(d, dtype="float32")


def test_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="neither a directory nor a .gguf"):
        models.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        models.load(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(TINY_LLAMA))
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        models.load(tmp_path / "empty")


def test_sharded_index_directory(tiny, tmp_path):
    """model.safetensors.index.json with two shards loads identically; a dangling shard is an error."""
    cfg, model, tensors, _ = tiny
    d = tmp_path / "sharded"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg.hf_config))
    keys = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for f, ks in parts.items():
        L.write_safetensors(d / f, {k: tensors[k] for k in ks})
        weight_map.update({k: f for k in ks})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _, m2 = models.load(d, dtype="float32")
    np.testing.assert_array_equal(_hidden(m2), _hidden(model))
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors"):
        models.load(d, dtype="float32")


def test_lazy_slices_match_safetensors_reference(tmp_path):
    """Our header parser + memmap slices equal safetensors' own torch loader (bf16 and f32)."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    ref = {"a": torch.randn(6, 5, generator=g).bfloat16(), "b": torch.randn(4, 3, 2, generator=g), "c": torch.randn(3, generator=g).half()}
    save_file(ref, tmp_path / "x.safetensors")
    got = L.open_safetensors_file(tmp_path / "x.safetensors")
    back = load_file(tmp_path / "x.safetensors")
    for k, t in back.items():
        full = t.float().numpy()
        assert got[k].shape == tuple(t.shape)
        np.testing.assert_array_equal(got[k].read().astype(np.float32), full)
    idx = (slice(2, 5), slice(1, 4))
    np.testing.assert_array_equal(got["a"].read(idx).astype(np.float32), back["a"].float().numpy()[idx])
    # and our writer's bf16 output is read back by safetensors itself
    L.write_safetensors(tmp_path / "y.safetensors", {"a": got["a"].read()})
    np.testing.assert_array_equal(load_file(tmp_path / "y.safetensors")["a"].float().numpy(), back["a"].float().numpy())


def test_sharding_hook_reads_slices(tiny):
    """sharding_fn is asked once per parameter; each device's slice is read via tensor.read(index)."""
    cfg, model, tensors, path = tiny
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    asked = []

    def sharding_fn(name, shape):
        asked.append(name)
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    _, m2 = models.load(path, dtype="bfloat16", sharding_fn=sharding_fn)
    from pa_jax.models.params import hf_key_to_path

    assert sorted(asked) == sorted(hf_key_to_path(cfg, k) for k in tensors)
    w = m2.layers[0].self_attn.q_proj.weight[...]
    assert w.dtype == jnp.bfloat16 and w.sharding.mesh.shape == mesh.shape
    np.testing.assert_array_equal(np.asarray(w.astype(jnp.float32)),
                                  tensors["model.layers.0.self_attn.q_proj.weight"].astype(jnp.bfloat16).astype(np.float32))
    # the default hook for mesh= comes from pa_jax.models.sharding
    _, m3 = models.load(path, dtype="float32", mesh=mesh)
    np.testing.assert_array_equal(_hidden(m3), _hidden(model))


def test_from_tensor_mapping_with_shape_method(tiny):
    """A lazy mapping exposing shape(key) (the GGUF reader's interface) is read one key at a time."""
    cfg, model, tensors, _ = tiny
    reads = []

    class Lazy(dict):
        def shape(self, key):
            return np.shape(dict.__getitem__(self, key))

        def __getitem__(self, key):
            reads.append(key)
            return dict.__getitem__(self, key)

    m2 = models.load_from_tensors(cfg, Lazy(tensors), dtype="float32")
    assert sorted(reads) == sorted(tensors)
    np.testing.assert_array_equal(_hidden(m2), _hidden(model))


# ------------------------------------------------------------------ config normalization vs transformers
def _hf_normalized(hf: dict):
    transformers = pytest.importorskip("transformers")
    d = dict(hf)
    return transformers.AutoConfig.for_model(d.pop("model_type"), **d)


@pytest.mark.parametrize(
    "hf",
    [
        {**TINY_LLAMA, "rope_theta": 5e5, "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32}},
        {**TINY_LLAMA, "model_type": "qwen2", "use_sliding_window": False, "sliding_window": 8, "max_window_layers": 1},
        {**TINY_LLAMA, "model_type": "qwen3", "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1,
         "head_dim": 8},
        {**TINY_LLAMA, "model_type": "olmo3", "num_hidden_layers": 4, "sliding_window": 8,
         "rope_scaling": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16}},
        {**TINY_LLAMA, "model_type": "gemma3_text", "num_hidden_layers": 7, "head_dim": 4, "sliding_window": 8,
         "rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0}},
        {**TINY_LLAMA, "model_type": "gemma3_text", "num_hidden_layers": 4, "head_dim": 4, "sliding_window": 8,
         "sliding_window_pattern": 2},
    ],
    ids=["llama-old-llama3", "qwen2-no-window", "qwen3-window", "olmo3-yarn", "gemma3-old-rope", "gemma3-pattern"],
)
def test_config_matches_transformers_normalization(hf):
    ours = ModelConfig.from_hf_dict(hf)
    theirs = _hf_normalized(hf)
    assert list(ours.layer_types) == list(getattr(theirs, "layer_types", None) or ["full_attention"] * ours.num_layers)
    if "sliding_attention" in ours.layer_types:
        assert ours.sliding_window == theirs.sliding_window
    rp = theirs.rope_parameters
    for lt in set(ours.layer_types):
        their = rp[lt] if lt in rp else rp
        mine = ours.rope_for(lt)
        assert mine.rope_type == their["rope_type"]
        assert mine.theta == their["rope_theta"]
        if "factor" in their:
            assert mine.factor == their["factor"]


def test_inv_freq_matches_transformers():
    """Every RoPE variant's inverse frequencies and attention scaling equal transformers' init functions."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from pa_jax.models.layers import rope_inv_freq

    variants = [
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64},
        {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 128},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16.0,
         "mscale": 1.0, "mscale_all_dim": 0.5},
    ]
    for v in variants:
        hf = {**TINY_LLAMA, "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4,
              "rope_theta": 50000.0, "rope_scaling": dict(v)}
        their_cfg = _hf_normalized(hf)
        inv_ref, scale_ref = ROPE_INIT_FUNCTIONS[v["rope_type"]](their_cfg, None)
        inv, scale = rope_inv_freq(ModelConfig.from_hf_dict(hf).rope_for("full_attention"), 32)
        np.testing.assert_allclose(inv, inv_ref.numpy(), rtol=1e-6)
        assert scale == pytest.approx(scale_ref, rel=1e-6)


def test_multimodal_wrapper_text_tower(tmp_path):
    """A Gemma3ForConditionalGeneration-style directory: text tower under model.language_model., the vision
    tower and projector explicitly ignored, same hidden states as the bare text model."""
    text = {**TINY_LLAMA, "model_type": "gemma3_text", "head_dim": 4, "sliding_window": 4,
            "num_hidden_layers": 2, "architectures": ["Gemma3ForCausalLM"]}
    cfg = ModelConfig.from_hf_dict(text)
    model = models.Decoder(cfg, rngs=nnx.Rngs(1), dtype="float32")
    tensors = {k: np.asarray(v) for k, v in L.model_tensors(cfg, model).items()}
    wrapped = {k.replace("model.", "model.language_model.", 1): v for k, v in tensors.items()}
    wrapped["model.vision_tower.vision_model.embeddings.patch_embedding.weight"] = np.zeros((2, 3), np.float32)
    wrapped["model.multi_modal_projector.mm_input_projection_weight"] = np.zeros((3, 2), np.float32)
    hf = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
          "text_config": {k: v for k, v in text.items() if k != "architectures"}, "vision_config": {}}
    d = _write_dir(tmp_path / "mm", hf, wrapped)
    c2, m2 = models.load(d, dtype="float32")
    assert c2.model_type == "gemma3_text"
    np.testing.assert_array_equal(_hidden(m2), _hidden(model))


def test_partial_rotary_matches_numpy():
    """apply_rope with partial_rotary_factor rotates only the first rot_dim features (NumPy loop oracle)."""
    from pa_jax.models.config import RopeConfig
    from pa_jax.models.layers import apply_rope, rope_cos_sin, rope_inv_freq

    hd, factor, theta = 16, 0.25, 100.0
    inv, scale = rope_inv_freq(RopeConfig(theta=theta, partial_rotary_factor=factor), hd)
    rot = int(hd * factor)
    assert inv.shape == (rot // 2,)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 2, hd)).astype(np.float32)
    pos = np.array([[0, 5, 11]])
    cos, sin = rope_cos_sin(jnp.asarray(pos), jnp.asarray(inv), scale)
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    want = x.copy()
    for t in range(3):
        for i in range(rot // 2):
            ang = pos[0, t] * theta ** (-2 * i / rot)
            a, b = x[0, t, :, i], x[0, t, :, i + rot // 2]
            want[0, t, :, i] = a * np.cos(ang) - b * np.sin(ang)
            want[0, t, :, i + rot // 2] = b * np.cos(ang) + a * np.sin(ang)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(got[..., rot:], x[..., rot:])
