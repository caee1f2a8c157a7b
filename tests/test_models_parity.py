"""Parity of pa-jax's Flax decoder with transformers' own PyTorch models (the oracle).

Ground truth: transformers 5.23.0 (PyTorch 2.13 CPU), ``attn_implementation="eager"``, float32.

For every supported model type (plus gemma2, whose attention soft-cap transformers applies) a tiny random model is built with transformers' config and model classes
(every feature switched on: sliding windows shorter than the sequence, soft-caps, biases, tied and untied
embeddings, each RoPE variant), saved with ``save_pretrained``, loaded with ``pa_jax.models.load`` and run
on a padded batch (one full row, one right-padded, one left-padded). Logits are computed here from the
hidden states (``hidden @ unembedding.T`` then the final soft-cap) and compared at the non-padded positions:
max |diff| <= 1e-4 in float32.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from pa_jax import models  # noqa: E402
from helpers import hf_logits  # noqa: E402

GROUND_TRUTH = "transformers 5.23.0"
TOL_F32 = 1e-4
V, D, F, H, KV, HD = 128, 32, 64, 4, 2, 8
B, T = 3, 12
WINDOW = 4

COMMON = dict(
    vocab_size=V,
    hidden_size=D,
    intermediate_size=F,
    num_attention_heads=H,
    num_key_value_heads=KV,
    head_dim=HD,
    initializer_range=0.2,
    max_position_embeddings=64,
    pad_token_id=0,
)

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "rope_theta": 10_000.0}
CASES: dict[str, tuple[str, dict]] = {
    "llama-default-tied": ("llama", dict(num_hidden_layers=2, tie_word_embeddings=True)),
    "llama-linear-bias": (
        "llama",
        dict(num_hidden_layers=2, attention_bias=True, mlp_bias=True,
             rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
    ),
    "llama-llama3": (
        "llama",
        dict(num_hidden_layers=2, rope_parameters={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16, "rope_theta": 10_000.0}),
    ),
    "llama-yarn": ("llama", dict(num_hidden_layers=2, rope_parameters=dict(YARN))),
    "qwen2-sliding": (
        "qwen2",
        dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    ),
    "qwen3-sliding-bias": (
        "qwen3",
        dict(num_hidden_layers=3, attention_bias=True, use_sliding_window=True, sliding_window=WINDOW,
             max_window_layers=1, tie_word_embeddings=True),
    ),
    "olmo2": ("olmo2", dict(num_hidden_layers=2, rope_parameters={"rope_type": "default", "rope_theta": 1000.0})),
    "olmo3-sliding-yarn": (
        "olmo3",
        dict(num_hidden_layers=4, sliding_window=WINDOW, rope_scaling=dict(YARN)),
    ),
    "gemma3-softcaps-tied": (
        "gemma3_text",
        dict(num_hidden_layers=6, sliding_window=WINDOW, query_pre_attn_scalar=12, attn_logit_softcapping=3.0,
             final_logit_softcapping=5.0, rope_parameters={
                 "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100_000.0},
                 "sliding_attention": {"rope_type": "default", "rope_theta": 1_000.0}}),
    ),
    "gemma2-softcaps": (
        "gemma2",
        dict(num_hidden_layers=3, sliding_window=WINDOW, query_pre_attn_scalar=6, attn_logit_softcapping=2.0,
             final_logit_softcapping=4.0, rope_parameters={"rope_type": "default", "rope_theta": 1000.0}),
    ),
    "gemma3-untied": (
        "gemma3_text",
        dict(num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
             sliding_window=WINDOW, tie_word_embeddings=False, hidden_activation="gelu_pytorch_tanh"),
    ),
}


def hf_model(model_type: str, extra: dict, seed: int = 0):
    """A random transformers CausalLM with norms and biases perturbed away from their init."""
    cfg = transformers.AutoConfig.for_model(model_type, **{**COMMON, **extra})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def padded_batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, V, size=(B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, 8:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    ids = np.where(mask == 1, ids, 0)
    return ids, mask


def pa_logits(config, model, ids, mask, **kw) -> np.ndarray:
    hidden = nnx.jit(lambda m, i, a: m(i, a, **kw))(model, jnp.asarray(ids), jnp.asarray(mask))
    logits = np.asarray(hidden.astype(jnp.float32) @ model.unembedding().astype(jnp.float32).T)
    if config.final_logit_softcap is not None:
        cap = config.final_logit_softcap
        logits = cap * np.tanh(logits / cap)
    return logits


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """case -> (hf model, pa config, pa model f32), built once per case."""
    cache = {}

    def get(case: str):
        if case not in cache:
            model_type, extra = CASES[case]
            hf = hf_model(model_type, extra)
            path = tmp_path_factory.mktemp(case)
            hf.save_pretrained(path)
            cfg, model = models.load(path, dtype="float32")
            cache[case] = (hf, cfg, model, path)
        return cache[case]

    return get


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_f32(case, converted):
    hf, cfg, model, _ = converted(case)
    assert cfg.model_type == CASES[case][0]
    ids, mask = padded_batch()
    ref = hf_logits(hf, ids, mask)
    got = pa_logits(cfg, model, ids, mask)
    valid = mask.astype(bool)
    diff = np.abs(got - ref)[valid].max()
    assert np.abs(ref).max() > 0.5, "logits too small for a meaningful comparison"
    print(f"{case}: max|logits diff| = {diff:.2e} (max|logit| {np.abs(ref).max():.2f}, {GROUND_TRUTH})")
    assert diff <= TOL_F32, f"{case}: max |logits diff| {diff:.3e} > {TOL_F32}"


def test_feature_flags_really_on(converted):
    """The tiny configs exercise what they claim (windows shorter than T, per-type RoPE, caps, ties)."""
    _, g, _, _ = converted("gemma3-softcaps-tied")
    assert g.layer_types.count("sliding_attention") == 5 and g.layer_types[5] == "full_attention"
    # transformers 5.23's Gemma3Attention never applies attn_logit_softcapping (gemma2 does): neither do we.
    assert g.sliding_window < T and g.attn_logit_softcap is None and g.final_logit_softcap == 5.0
    _, g2, _, _ = converted("gemma2-softcaps")
    assert g2.attn_logit_softcap == 2.0 and g2.final_logit_softcap == 4.0
    assert g2.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert g.tie_word_embeddings and g.rope_for("full_attention").rope_type == "linear"
    assert g.rope_for("sliding_attention").theta == 1_000.0
    _, o, _, _ = converted("olmo3-sliding-yarn")
    assert o.layer_types == ("sliding_attention",) * 3 + ("full_attention",)
    assert o.rope_for("full_attention").rope_type == "yarn"
    assert o.rope_for("sliding_attention").rope_type == "default"
    _, q, _, _ = converted("qwen2-sliding")
    assert q.layer_types == ("full_attention", "sliding_attention", "sliding_attention") and q.qkv_bias


def test_left_right_padding_and_packing_agree(converted):
    """The same sequences give the same hidden states unpadded, left-padded, right-padded and packed."""
    _, cfg, model, _ = converted("gemma3-untied")
    rng = np.random.default_rng(1)
    a, b = rng.integers(1, V, size=7), rng.integers(1, V, size=5)
    run = nnx.jit(lambda m, i, msk, s: m(i, msk, segment_ids=s))
    ids = np.zeros((4, T), np.int64)
    mask = np.zeros((4, T), np.int64)
    ids[0, :7], mask[0, :7] = a, 1  # a, right padded
    ids[1, T - 7:], mask[1, T - 7:] = a, 1  # a, left padded
    ids[2, :5], mask[2, :5] = b, 1  # b, right padded
    ids[3] = np.concatenate([a, b])  # packed row [a | b]: segments 1 and 2, positions restarting
    mask[3] = 1
    ids[0, 7:], ids[1, : T - 7] = 10**6, -3  # padding may hold anything, even out-of-range ids
    seg = np.ones((4, T), np.int64)  # one segment per row except the packed one
    seg[3, 7:] = 2
    h = np.asarray(run(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(seg)))
    ha = np.asarray(nnx.jit(lambda m, i: m(i))(model, jnp.asarray(a[None])))[0]
    np.testing.assert_allclose(h[0, :7], ha, atol=1e-5)
    np.testing.assert_allclose(h[1, T - 7:], ha, atol=1e-5)
    np.testing.assert_allclose(h[3, :7], ha, atol=1e-5)
    np.testing.assert_allclose(h[3, 7:], h[2, :5], atol=1e-5)


@pytest.mark.parametrize("case", ["olmo3-sliding-yarn", "gemma3-untied"])
def test_kv_prefix_equals_full_forward(case, converted):
    """prefix (computed once, batch 1) + suffixes (batch 3, left/right padded) == full forward, 1e-5 f32."""
    _, cfg, model, _ = converted(case)
    rng = np.random.default_rng(2)
    P_, S_ = 6, 8
    prefix = rng.integers(1, V, size=(1, P_))
    suffix = rng.integers(1, V, size=(3, S_))
    smask = np.ones((3, S_), np.int64)
    smask[1, 5:] = 0  # right padded suffix
    smask[2, :3] = 0  # left padded suffix
    _, cache = nnx.jit(lambda m, i: m(i, return_kv=True))(model, jnp.asarray(prefix))
    hs = np.asarray(
        nnx.jit(lambda m, i, a, c: m(i, a, kv_prefix=c))(model, jnp.asarray(suffix), jnp.asarray(smask), cache)
    )
    # oracle: the full sequences prefix + valid suffix tokens, right padded, in one ordinary forward
    full = np.zeros((3, P_ + S_), np.int64)
    fmask = np.zeros((3, P_ + S_), np.int64)
    for r in range(3):
        toks = np.concatenate([prefix[0], suffix[r][smask[r].astype(bool)]])
        full[r, : len(toks)], fmask[r, : len(toks)] = toks, 1
    hfull = np.asarray(nnx.jit(lambda m, i, a: m(i, a))(model, jnp.asarray(full), jnp.asarray(fmask)))
    for r in range(3):
        n = int(smask[r].sum())
        np.testing.assert_allclose(hs[r][smask[r].astype(bool)], hfull[r, P_: P_ + n], atol=1e-5, rtol=0)
    if case == "olmo3-sliding-yarn":  # token_logprobs continues the prefix the same way
        lp = np.asarray(models.token_logprobs(cfg, model, suffix, smask, kv_prefix=cache))
        lp_full = np.asarray(models.token_logprobs(cfg, model, full, fmask))
        for r in range(3):
            n = int(smask[r].sum())
            ok = (smask[r, :-1] * smask[r, 1:]).astype(bool)
            np.testing.assert_allclose(lp[r][ok], lp_full[r, P_: P_ + n - 1], atol=1e-5)


@pytest.mark.parametrize("case", ["gemma2-softcaps", "olmo3-sliding-yarn", "qwen3-sliding-bias"])
def test_dense_and_blocked_attention_agree(case, converted):
    """The two attention implementations give the same hidden states on a padded batch (f32)."""
    _, cfg, model, _ = converted(case)
    ids, mask = padded_batch()
    run = nnx.jit(lambda m, i, a, impl: m(i, a, attention_impl=impl), static_argnums=3)
    hd = np.asarray(run(model, jnp.asarray(ids), jnp.asarray(mask), "dense"))
    hb = np.asarray(run(model, jnp.asarray(ids), jnp.asarray(mask), "blocked"))
    valid = mask.astype(bool)
    np.testing.assert_allclose(hb[valid], hd[valid], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="attention_impl"):
        model(jnp.asarray(ids), attention_impl="flash")


@pytest.mark.parametrize("impl", ["blocked", "dense"])
@pytest.mark.parametrize("case", ["gemma2-softcaps", "olmo3-sliding-yarn"])
def test_kv_buffer_chunks_equal_full_forward(case, impl, converted):
    """Rows run chunk by chunk into an in-place KV buffer (with an invalid gap after the first chunk and a
    right-padded row) give the hidden states of one ordinary forward (sliding windows and soft-caps on)."""
    from pa_jax.models.decoder import KVCache

    _, cfg, model, _ = converted(case)
    rng = np.random.default_rng(3)
    C, n_chunks, gap = 5, 3, 2
    ids = rng.integers(1, V, size=(2, C * n_chunks))
    mask = np.ones_like(ids)
    mask[1, 11:] = 0
    shapes = jax.eval_shape(lambda: model(jnp.zeros((1, 1), jnp.int32), return_kv=True)[1])
    buf = KVCache.empty(shapes, 2, C * n_chunks + gap + 3)
    step = nnx.jit(lambda m, i, a, c, at: m(i, a, cache=c, cache_index=at, attention_impl=impl))
    hs = []
    for j in range(n_chunks):
        at = j * C + (gap if j else 0)
        h, buf = step(model, jnp.asarray(ids[:, j * C:(j + 1) * C]), jnp.asarray(mask[:, j * C:(j + 1) * C]), buf,
                      jnp.int32(at))
        hs.append(np.asarray(h))
    h = np.concatenate(hs, axis=1)
    full = np.asarray(nnx.jit(lambda m, i, a: m(i, a, attention_impl="dense"))(model, jnp.asarray(ids), jnp.asarray(mask)))
    valid = mask.astype(bool)
    np.testing.assert_allclose(h[valid], full[valid], atol=1e-5, rtol=0)
    assert int(np.asarray(buf.valid).sum()) == int(mask.sum())
    x, a = jnp.asarray(ids[:, :C]), jnp.asarray(mask[:, :C])
    with pytest.raises(ValueError, match="cache_index"):
        model(x, a, cache=buf)
    with pytest.raises(ValueError, match="cannot be combined"):
        model(x, a, cache=buf, cache_index=0, return_kv=True)
    with pytest.raises(ValueError, match="cache batch 2 != input batch 1"):
        model(x[:1], a[:1], cache=buf, cache_index=0)


def test_token_logprobs_matches_transformers(converted):
    hf, cfg, model, _ = converted("gemma3-softcaps-tied")
    ids, mask = padded_batch(4)
    ref = torch.log_softmax(torch.tensor(hf_logits(hf, ids, mask)), dim=-1).numpy()
    ref_t = np.take_along_axis(ref[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
    junk = np.where(mask == 1, ids, 99_999)  # padding may hold anything
    got = np.asarray(models.token_logprobs(cfg, model, junk, mask))
    assert got.shape == (B, T - 1)
    both = (mask[:, :-1] * mask[:, 1:]).astype(bool)
    assert np.abs(got - ref_t)[both].max() <= TOL_F32


def test_bf16_close_to_f32(converted):
    """bfloat16 parameters and activations: logits within 0.1 of transformers' float32 (tiny model)."""
    hf, cfg, _, path = converted("llama-llama3")
    _, model16 = models.load(path, dtype="bfloat16")
    assert model16.embed_tokens.weight[...].dtype == jnp.bfloat16
    ids, mask = padded_batch()
    ref = hf_logits(hf, ids, mask)
    got = pa_logits(cfg, model16, ids, mask)
    diff = np.abs(got - ref)[mask.astype(bool)].max()
    assert diff < 0.1 * max(1.0, np.abs(ref).max()), diff


@pytest.mark.parametrize("case", ["qwen3-sliding-bias", "olmo3-sliding-yarn", "gemma3-untied"])
def test_save_pretrained_roundtrip_transformers(case, converted, tmp_path):
    """pa-jax -> save_pretrained -> transformers loads it and agrees with the original model."""
    hf, cfg, model, _ = converted(case)
    models.save_pretrained(cfg, model, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids, mask = padded_batch(5)
    np.testing.assert_allclose(hf_logits(back, ids, mask), hf_logits(hf, ids, mask), atol=1e-6)
    cfg2, model2 = models.load(tmp_path, dtype="float32")
    assert cfg2.layer_types == cfg.layer_types and cfg2.rope == cfg.rope
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(model2))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_random_decoder_trains_and_saves(tmp_path, converted):
    """Decoder(config, rngs) random init: gradients flow (SGD steps lower the loss); saved, it loads in
    transformers and matches our forward."""
    _, cfg, _, _ = converted("llama-linear-bias")
    model = models.Decoder(cfg, rngs=nnx.Rngs(3), dtype="float32")
    ids, mask = padded_batch(6)
    ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(p):
        m = nnx.merge(graphdef, p, rest)
        logits = m(ids_j, mask_j)[:, :-1] @ m.unembedding().T
        tgt = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), ids_j[:, 1:, None], -1)[..., 0]
        w = (mask_j[:, :-1] * mask_j[:, 1:]).astype(jnp.float32)
        return -(tgt * w).sum() / w.sum()

    @jax.jit
    def step(p):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        return loss, jax.tree.map(lambda a, g: a - 0.5 * g, p, grads)

    losses = []
    for _ in range(4):
        loss, params = step(params)
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses
    nnx.update(model, params)
    models.save_pretrained(cfg, model, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    np.testing.assert_allclose(pa_logits(cfg, model, ids, mask)[mask.astype(bool)],
                               hf_logits(back, ids, mask)[mask.astype(bool)], atol=TOL_F32)
