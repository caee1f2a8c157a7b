"""Gemma 4 (text tower) and Qwen 3.5 against transformers' own PyTorch classes (the oracle), plus the
sharded forward and the memory of the paper's real pairs computed from their published config.json.

Ground truth: transformers 5.23 (``Gemma4ForConditionalGeneration``, ``Qwen3_5ForConditionalGeneration``,
``Gemma4ForCausalLM``, ``Qwen3_5ForCausalLM``), eager attention, float32.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

import pa_jax.models as M  # noqa: E402
from pa_jax.models import memory  # noqa: E402
from helpers import hf_logits  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "configs"
VOCAB = 256
T = 72  # > one 64-token DeltaNet chunk, not a multiple of it


# ---------------------------------------------------------------------------------------------- tiny models
def gemma4_text_config(variant: str) -> dict:
    """Every Gemma-4 text feature on; a producer layer of each type precedes the KV-shared block.

    layers: S S F S F | S S F  (last 3 KV-shared: 5,6 reuse layer 3, 7 reuses layer 4).
    ``variant="e4b"`` is E4B's feature set; ``"all"`` adds K=V global attention with its own KV-head count
    and the double-wide MLP of KV-shared layers (other Gemma-4 sizes).
    """
    cfg = dict(
        vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, hidden_size=64, intermediate_size=96,
        num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
        sliding_window=6, hidden_size_per_layer_input=8, num_kv_shared_layers=3, final_logit_softcapping=5.0,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                     "full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                            "rope_theta": 1000000.0}},
        pad_token_id=0,
    )
    if variant == "all":
        cfg.update(attention_k_eq_v=True, num_global_key_value_heads=1, use_double_wide_mlp=True)
    return cfg


def qwen35_text_config() -> dict:
    return dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=8, linear_value_head_dim=12, linear_conv_kernel_dim=4,
        layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention",
                     "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                         "mrope_section": [1, 1, 0], "mrope_interleaved": True},
        pad_token_id=0, tie_word_embeddings=False,
    )


def _randomize(model, seed: int) -> None:
    """Non-trivial weights everywhere (norm gains, layer scalars, gates) so every feature matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vision" in name or "visual" in name or "audio" in name:
                continue
            if name.endswith("A_log"):
                p.copy_(torch.empty_like(p).uniform_(-1.0, 1.0, generator=g))
            elif "post_" in name and "gemma" in type(model).__name__.lower():
                # Gemma's post-sublayer norms set the size of each residual update: moderate gains keep the
                # 8-layer toy net well conditioned (transformers' own float32 error vs float64 stays ~1e-5)
                p.copy_(0.4 + 0.1 * torch.randn(p.shape, generator=g))
            elif ("q_norm" in name or "k_norm" in name) and "gemma" in type(model).__name__.lower():
                # attention scale is 1 with unit-RMS q and k: gains ~0.5 keep the logits O(head_dim / 4)
                p.copy_(0.5 + 0.1 * torch.randn(p.shape, generator=g))
            elif "norm" in name or name.endswith("dt_bias"):
                base = 0.0 if "qwen" in type(model).__name__.lower() and not name.endswith("linear_attn.norm.weight") \
                    else 1.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(torch.empty_like(b).uniform_(0.5, 1.5, generator=g))


def build(family: str, kind: str, tmp: pathlib.Path, seed: int = 0):
    """Build a tiny random transformers model, save_pretrained it to ``tmp``, return (model, dir)."""
    torch.manual_seed(seed)
    if family.startswith("gemma4"):
        variant = family.split("-")[1]
        text = gemma4_text_config(variant)
        if kind == "wrapper":
            cfg = transformers.Gemma4Config(text_config=text, vision_config=None, audio_config=None)
            model = transformers.Gemma4ForConditionalGeneration(cfg)
        else:
            model = transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(**text))
    else:
        text = qwen35_text_config()
        if kind == "wrapper":
            cfg = transformers.Qwen3_5Config(
                text_config=text,
                vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=64,
                                   patch_size=2, temporal_patch_size=1, spatial_merge_size=1),
                tie_word_embeddings=False)
            model = transformers.Qwen3_5ForConditionalGeneration(cfg)
        else:
            model = transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(**text))
    model.config._attn_implementation = "eager"
    for sub in ("text_config",):
        if hasattr(model.config, sub):
            getattr(model.config, sub)._attn_implementation = "eager"
    _randomize(model, seed)
    model.eval()
    model.save_pretrained(tmp)
    return model, tmp


_BUILT: dict = {}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(family, kind) -> (transformers model, saved directory), each built once per module."""

    def get(family: str, kind: str):
        if (family, kind) not in _BUILT:
            _BUILT[family, kind] = build(family, kind, tmp_path_factory.mktemp(f"{family}-{kind}"))
        return _BUILT[family, kind]

    return get


def padded_batch(seed: int = 0):
    """3 rows: full, left-padded (9 pads), right-padded (11 pads)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(3, T)).astype(np.int64)
    mask = np.ones((3, T), np.int64)
    mask[1, :9] = 0
    mask[2, T - 11:] = 0
    ids[mask == 0] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, positions


def jax_logits(config, model, ids, mask) -> np.ndarray:
    hidden = M.forward(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    logits = jnp.einsum("btd,vd->btv", hidden.astype(jnp.float32), model.unembedding().astype(jnp.float32))
    if config.final_logit_softcap is not None:
        cap = config.final_logit_softcap
        logits = cap * jnp.tanh(logits / cap)
    return np.asarray(logits)


CASES = [("gemma4-e4b", "wrapper"), ("gemma4-all", "causal"), ("qwen35", "wrapper"), ("qwen35", "causal")]


@pytest.mark.parametrize("family,kind", CASES)
def test_float32_parity(family, kind, ckpt):
    hf, d = ckpt(family, kind)
    ids, mask, pos = padded_batch()
    ref = hf_logits(hf, ids, mask, pos)
    config, model = M.load(d, dtype="float32")
    got = jax_logits(config, model, ids, mask)
    valid = mask.astype(bool)
    diff = np.abs(got - ref)[valid].max()
    print(f"{family}/{kind}: max |logits diff| f32 = {diff:.2e} (max |logit| {np.abs(ref[valid]).max():.2f})")
    assert diff <= 1e-4


# bf16 tolerance, stated relative to transformers' own bf16 error: pa-jax's bf16 forward must be about as
# accurate as transformers' bf16 forward (both measured against transformers float32), and the two bf16
# forwards must agree to within that same error scale. (Toy nets with random gains are far less well
# conditioned than trained ones, so absolute bf16 gaps of a few tenths of a logit are expected here.)
BF16_REL = 2.0


@pytest.mark.parametrize("family", ["gemma4-e4b", "qwen35"])
def test_bfloat16_close_to_transformers_bf16(family, ckpt):
    hf, d = ckpt(family, "wrapper")
    ids, mask, pos = padded_batch()
    ref32 = hf_logits(hf, ids, mask, pos)
    ref16 = hf_logits(copy.deepcopy(hf).to(torch.bfloat16), ids, mask, pos)
    config, model = M.load(d, dtype="bfloat16")
    got = jax_logits(config, model, ids, mask)
    valid = mask.astype(bool)
    d16 = np.abs(got - ref16)[valid].max()
    d32 = np.abs(got - ref32)[valid].max()
    hf_gap = np.abs(ref16 - ref32)[valid].max()
    m32, hf_m = np.abs(got - ref32)[valid].mean(), np.abs(ref16 - ref32)[valid].mean()
    print(f"{family}: bf16 max|pa-jax - hf bf16| = {d16:.3f}, max|pa-jax bf16 - hf f32| = {d32:.3f} "
          f"(mean {m32:.4f}), max|hf bf16 - hf f32| = {hf_gap:.3f} (mean {hf_m:.4f})")
    assert d32 <= BF16_REL * hf_gap
    assert m32 <= BF16_REL * hf_m
    assert d16 <= BF16_REL * hf_gap


@pytest.mark.parametrize("family", ["gemma4-e4b", "qwen35"])
def test_save_pretrained_round_trip(family, ckpt, tmp_path):
    """pa-jax's save_pretrained writes a text tower transformers loads to the very same logits."""
    hf, d = ckpt(family, "wrapper")
    config, model = M.load(d, dtype="float32")
    M.save_pretrained(config, model, tmp_path / "out")
    cls = type(hf)
    again = cls.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ids, mask, pos = padded_batch()
    valid = mask.astype(bool)
    assert np.abs(hf_logits(again, ids, mask, pos) - hf_logits(hf, ids, mask, pos))[valid].max() == 0.0


def test_packed_rows_refused_for_qwen35(ckpt):
    _, d = ckpt("qwen35", "causal")
    _, model = M.load(d, dtype="float32")
    ids = np.ones((1, 8), np.int32)
    with pytest.raises(ValueError, match="segment_ids"):
        model(ids, None, segment_ids=np.array([[0, 0, 0, 1, 1, 1, 1, 1]]))


def test_missing_tensor_named(ckpt, tmp_path):
    """A checkpoint lacking a Gemma-4 per-layer tensor is an error naming it (never a random weight)."""
    from safetensors.numpy import load_file, save_file

    _, src = ckpt("gemma4-e4b", "wrapper")
    d = tmp_path / "ckpt"
    shutil.copytree(src, d)
    f = d / "model.safetensors"
    tensors = load_file(f)
    key = "model.language_model.layers.2.per_layer_projection.weight"
    assert key in tensors
    del tensors[key]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="per_layer_projection"):
        M.load(d, dtype="float32")


# ---------------------------------------------------------------------------------------------- sharded
SHARDED_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, jax, jax.numpy as jnp
    import pa_jax.models as M
    from pa_jax.models import sharding as S
    assert jax.device_count() == 8, jax.device_count()
    tmp = sys.argv[1]
    ids = np.load(tmp + "/ids.npy"); mask = np.load(tmp + "/mask.npy")
    mesh = S.make_mesh(data=2, model=4)
    sc = S.ShardingConfig(mesh)
    for i, d in enumerate(sys.argv[2:]):
        cfg, model = M.load(d, dtype="float32", mesh=mesh)
        with jax.set_mesh(mesh):  # the public entry point (Gated DeltaNet's chunk solve has no LAPACK call)
            hid = M.forward(model, S.shard_batch(ids, sc, np.int32), S.shard_batch(mask, sc, np.int32))
        np.save(f"{tmp}/sharded{i}.npy", np.asarray(jax.device_get(hid)))
    print("SHARDED_OK")
    """
)


@pytest.mark.slow
def test_sharded_equals_unsharded(ckpt, tmp_path):
    """Parameters FSDP x tensor-parallel over a (data=2, model=4) mesh of 8 simulated CPU devices."""
    ids, mask, _ = padded_batch()
    ids = np.concatenate([ids, ids[::-1]]).astype(np.int32)  # batch 6: split over data=2
    mask = np.concatenate([mask, mask[::-1]]).astype(np.int32)
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "mask.npy", mask)
    dirs, refs = [], []
    for fam in ("gemma4-e4b", "qwen35"):
        _, d = ckpt(fam, "wrapper")
        dirs.append(str(d))
        _, model = M.load(d, dtype="float32")
        refs.append(np.asarray(M.forward(model, jnp.asarray(ids), jnp.asarray(mask))))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(tmp_path), *dirs], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0 and "SHARDED_OK" in proc.stdout, proc.stderr[-4000:]
    valid = mask.astype(bool)
    diffs = [float(np.abs(np.load(tmp_path / f"sharded{i}.npy") - r)[valid].max()) for i, r in enumerate(refs)]
    scale = [float(np.abs(r)[valid].max()) for r in refs]
    print("sharded (2x4 mesh) vs unsharded max |hidden diff| (gemma4, qwen3_5):", diffs, "max |hidden|:", scale)
    # Sharding changes float32 summation order only; these toy nets (random norm gains, 8 layers) amplify that
    # to ~1e-5 relative, so the bound is the f32 parity bound (1e-4), i.e. sharded == unsharded to f32 noise.
    assert max(diffs) <= 1e-4


# ---------------------------------------------------------------------------------------------- memory
def _hf_text_param_count(family_cfg: dict) -> int:
    """Independent count: instantiate transformers' text-only CausalLM on the meta device."""
    text = family_cfg["text_config"]
    with torch.device("meta"):
        if family_cfg["model_type"] == "gemma4":
            model = transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(**text))
        else:
            text = dict(text)
            text["tie_word_embeddings"] = family_cfg.get("tie_word_embeddings", False)
            model = transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(**text))
    seen, n = set(), 0
    for p in model.parameters():  # unique tensors (tied lm_head counted once)
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    n += sum(b.numel() for name, b in model.named_buffers() if name.endswith("layer_scalar"))
    return n


@pytest.mark.parametrize("name", ["gemma4_e4b", "qwen3_5_9b"])
def test_real_config_memory(name):
    hf = json.loads((FIXTURES / f"{name}.json").read_text())
    config = M.ModelConfig.from_hf_dict(hf)
    table = memory.parameter_memory(config, dtype="bfloat16")
    print(name, json.dumps(table, indent=1))
    assert table["params"] == _hf_text_param_count(hf)
    assert table["bytes"] == 2 * table["params"]
    assert table["params"] == sum(table["groups"].values())
