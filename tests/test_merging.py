"""pa_jax.merging against independent NumPy implementations written here (float64 where the code is
float32), hand-checked TIES/EMR examples, DARE's sampling distribution, the disk merge, a mesh, LoRA."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import zlib

import jax
import ml_dtypes
import numpy as np
import pytest
from scipy import stats

import pa_jax.merging as M

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------- NumPy oracles
def np_trim(tau, density):
    """Keep the k = max(1, floor(density n)) largest |tau| (ties at the k-th kept)."""
    flat = np.abs(tau).ravel()
    n = flat.size
    k = max(1, int(density * n))
    if k >= n:
        return tau
    thr = np.sort(flat)[::-1][k - 1]
    return np.where(np.abs(tau) >= thr, tau, 0.0)


def np_dare_mask(seed, name, member, shape, density):
    """The documented key derivation: fold_in(fold_in(key(seed), crc32(name)), member); keep u < density."""
    k = jax.random.fold_in(jax.random.key(seed), np.uint32(zlib.crc32(name.encode())))
    k = jax.random.fold_in(k, np.uint32(member))
    return np.asarray(jax.random.uniform(k, shape, np.float32)) < density


def np_elect_disjoint(deltas, normalize):
    d = np.stack(deltas)
    s = np.where(d.sum(0) >= 0, 1.0, -1.0)
    out = np.zeros(d.shape[1:])
    cnt = np.zeros(d.shape[1:])
    for di in d:  # explicit loop over members
        agree = (di != 0) & (np.sign(di) == s)
        out += np.where(agree, di, 0.0)
        cnt += agree
    return out / np.maximum(cnt, 1) if normalize else out


def np_members(ref, pol, extras, anchor):
    if anchor is None:
        return ref, [pol] + extras, 0
    return anchor, [pol, ref] + extras, 1


def np_merge(method, ref, pol, alpha, extras=(), anchor=None, density=0.2, seed=0, emr_norm="tensor_mean"):
    """Oracle over flat dicts of float arrays: float64 arithmetic, result cast to the base dtype."""
    base, members, target = np_members(ref, pol, list(extras), anchor)
    out = {}
    if method == "linear":
        return {k: ((1 - alpha) * base[k].astype(np.float64) + alpha * pol[k].astype(np.float64)).astype(base[k].dtype)
                for k in base}
    taus = {}
    if method == "emr":
        num = den = 0.0
        eff = {}
        for k in sorted(base):
            t = np.stack([m[k].astype(np.float64) - base[k].astype(np.float64) for m in members])
            s = np.where(t.sum(0) > 0, 1.0, -1.0)
            uni = np.zeros(t.shape[1:])
            for ti in t:
                uni = np.maximum(uni, np.where(ti * s > 0, np.abs(ti), 0.0))
            uni = uni * s
            eff[k] = np.where(t[target] * s > 0, uni, 0.0)
            if emr_norm == "tensor_mean":
                num += np.abs(t[target]).mean()
                den += np.abs(eff[k]).mean()
            else:
                num += np.abs(t[target]).sum()
                den += np.abs(eff[k]).sum()
        lam = num / den
        taus = {k: lam * v for k, v in eff.items()}
    else:
        for k in base:
            deltas = []
            for i, m in enumerate(members):
                t = m[k].astype(np.float64) - base[k].astype(np.float64)
                if method == "ties":
                    t = np_trim(t, density)
                else:
                    t = np.where(np_dare_mask(seed, k, i, t.shape, density), t, 0.0) / density
                deltas.append(t)
            if method == "ties":
                taus[k] = np_elect_disjoint(deltas, normalize=True)
            elif method == "dare_ties":
                taus[k] = np_elect_disjoint(deltas, normalize=False)
            else:
                taus[k] = np.sum(deltas, axis=0)
    for k in base:
        out[k] = (base[k].astype(np.float64) + alpha * taus[k]).astype(base[k].dtype)
    return out


def rand_tree(rng, shapes, scale=1.0, like=None):
    if like is None:
        return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    return {k: (v + scale * rng.normal(size=v.shape)).astype(v.dtype) for k, v in like.items()}


SHAPES = {"embed.weight": (11, 6), "layers.0.q.weight": (6, 6), "layers.0.norm.weight": (6,), "lm_head.weight": (11, 6)}


@pytest.fixture()
def trees():
    rng = np.random.default_rng(1)
    ref = rand_tree(rng, SHAPES)
    pol = rand_tree(rng, SHAPES, 0.3, ref)
    ex1 = rand_tree(rng, SHAPES, 0.3, ref)
    ex2 = rand_tree(rng, SHAPES, 0.3, ref)
    anchor = rand_tree(rng, SHAPES, 0.3, ref)
    return ref, pol, [ex1, ex2], anchor


def assert_tree_close(got, want, atol=2e-6, rtol=1e-5):
    assert set(got) == set(want)
    for k in want:
        assert isinstance(got[k], np.ndarray), k
        assert got[k].dtype == want[k].dtype, k
        np.testing.assert_allclose(got[k].astype(np.float64), want[k].astype(np.float64), atol=atol, rtol=rtol, err_msg=k)


# ------------------------------------------------------------------------------------ equations
@pytest.mark.parametrize(
    "method, n_extra, use_anchor",
    [(m, n, a) for m in M.MERGE_METHODS for n in (0, 2) for a in (False, True) if not (m == "linear" and n)],
)
def test_merge_equals_numpy_oracle(trees, method, n_extra, use_anchor):
    """linear takes no extra policies (an error, tested below)."""
    ref, pol, extras, anchor = trees
    extras = extras[:n_extra]
    anc = anchor if use_anchor else None
    kw = {} if method == "linear" else {"extra_policies": extras}
    delta = M.merged_delta(ref, pol, method, anchor=anc, **kw)
    for alpha in (0.3, 0.8, -0.5):
        want = np_merge(method, ref, pol, alpha, extras, anc)
        assert_tree_close(delta.at(alpha), want)
        if alpha == 0.3:
            assert_tree_close(M.merge(ref, pol, alpha, method, anchor=anc, **kw), want)


@pytest.mark.parametrize("emr_norm", M.EMR_NORMS)
def test_emr_norms(trees, emr_norm):
    ref, pol, extras, _ = trees
    got = M.merge_emr(ref, pol, 0.7, extra_policies=extras, emr_norm=emr_norm)
    assert_tree_close(got, np_merge("emr", ref, pol, 0.7, extras, emr_norm=emr_norm))


def test_named_wrappers_and_knobs(trees):
    ref, pol, extras, anchor = trees
    assert_tree_close(M.merge_ties(ref, pol, 0.6, extra_policies=extras, density=0.5),
                      np_merge("ties", ref, pol, 0.6, extras, density=0.5))
    assert_tree_close(M.merge_dare_linear(ref, pol, 0.6, extra_policies=extras, density=0.4, seed=7),
                      np_merge("dare_linear", ref, pol, 0.6, extras, density=0.4, seed=7))
    assert_tree_close(M.merge_dare_ties(ref, pol, 0.6, extra_policies=extras, anchor=anchor, seed=3),
                      np_merge("dare_ties", ref, pol, 0.6, extras, anchor, seed=3))
    assert_tree_close(M.merge_linear(ref, pol, 0.25, anchor=anchor), np_merge("linear", ref, pol, 0.25, anchor=anchor))
    # density 1: nothing trimmed or dropped; with one member every method is linear's tau
    for method in ("ties", "dare_linear", "dare_ties"):
        assert_tree_close(M.merge(ref, pol, 0.4, method, density=1.0), np_merge("linear", ref, pol, 0.4), atol=1e-6)
    # DARE without rescale
    got = M.merge(ref, pol, 1.0, "dare_linear", density=0.5, rescale=False)
    for k in ref:
        keep = np_dare_mask(0, k, 0, ref[k].shape, 0.5)
        want = ref[k].astype(np.float64) + np.where(keep, pol[k].astype(np.float64) - ref[k], 0.0)
        np.testing.assert_allclose(got[k], want, atol=1e-6)


def test_ties_hand_example():
    """tau1 = [3, -1, 2, 0.5], tau2 = [-4, -2.5, 1, -0.2], density 0.5 (k = 2 per member):
    trimmed [3, 0, 2, 0], [-4, -2.5, 0, 0]; summed mass [-1, -2.5, 2, 0] -> signs [-, -, +, +];
    disjoint mean [-4, -2.5, 2, 0] (coordinate 0: the policy's +3 loses the election)."""
    base = {"w": np.zeros(4, np.float32)}
    p1 = {"w": np.array([3, -1, 2, 0.5], np.float32)}
    p2 = {"w": np.array([-4, -2.5, 1, -0.2], np.float32)}
    got = M.merge_ties(base, p1, 1.0, extra_policies=[p2], density=0.5)
    np.testing.assert_array_equal(got["w"], np.array([-4, -2.5, 2, 0], np.float32))
    # no trimming: sums [-1, -3.5, 3, 0.3] -> [-4, (-1 - 2.5) / 2, (2 + 1) / 2, 0.5]
    got = M.merge_ties(base, p1, 1.0, extra_policies=[p2], density=1.0)
    np.testing.assert_allclose(got["w"], [-4, -1.75, 1.5, 0.5])
    # dare_ties at density 1 sums the agreeing entries instead of averaging them
    got = M.merge_dare_ties(base, p1, 1.0, extra_policies=[p2], density=1.0)
    np.testing.assert_allclose(got["w"], [-4, -3.5, 3, 0.5])
    # one member: the election is trivial (trim then add)
    got = M.merge_ties(base, p1, 1.0, density=0.5)
    np.testing.assert_array_equal(got["w"], np.array([3, 0, 2, 0], np.float32))


def test_emr_hand_example():
    """tau1 (target) = [3, -1, 2, 0.5], tau2 = [-4, -2.5, 1, -0.2]: sum [-1, -3.5, 3, 0.3] -> s = [-, -, +, +];
    tau_uni = [-4, -2.5, 2, 0.5]; mask of tau1 agreeing with s = [0, 1, 1, 1] -> [0, -2.5, 2, 0.5];
    lambda = mean|tau1| / mean|masked| = 1.625 / 1.25 = 1.3 -> tau = [0, -3.25, 2.6, 0.65]."""
    base = {"w": np.zeros(4, np.float32)}
    p1 = {"w": np.array([3, -1, 2, 0.5], np.float32)}
    p2 = {"w": np.array([-4, -2.5, 1, -0.2], np.float32)}
    d = M.merged_delta(base, p1, "emr", extra_policies=[p2])
    assert d.info["emr_lambda"] == pytest.approx(1.3)
    np.testing.assert_allclose(d.at(1.0)["w"], [0, -3.25, 2.6, 0.65], rtol=1e-6)
    np.testing.assert_allclose(d.at(0.5)["w"], [0, -1.625, 1.3, 0.325], rtol=1e-6)
    # one member: EMR reproduces the policy (lambda = 1), i.e. linear
    single = M.merged_delta(base, p1, "emr")
    assert single.info["emr_lambda"] == 1.0
    np.testing.assert_array_equal(single.at(1.0)["w"], p1["w"])


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_linear_endpoints_bit_for_bit(trees, dtype):
    ref, pol, _, anchor = trees
    ref = {k: v.astype(dtype) for k, v in ref.items()}
    pol = {k: v.astype(dtype) for k, v in pol.items()}
    ref["count"] = np.arange(5, dtype=np.int32)  # non-float tensors are the base's
    pol["count"] = np.arange(5, dtype=np.int32) + 9
    d = M.merged_delta(ref, pol, "linear")
    for k in ref:
        assert d.at(0.0)[k].dtype == ref[k].dtype
        np.testing.assert_array_equal(d.at(0.0)[k].view(np.uint8), ref[k].view(np.uint8), err_msg=k)
        want = ref[k] if k == "count" else pol[k]
        np.testing.assert_array_equal(d.at(1.0)[k].view(np.uint8), want.view(np.uint8), err_msg=k)
    # alpha 0 is the base for every method
    for method in M.MERGE_METHODS[1:]:
        got = M.merge(ref, pol, 0.0, method)
        for k in ref:
            np.testing.assert_array_equal(got[k].view(np.uint8), ref[k].view(np.uint8), err_msg=f"{method} {k}")


def test_jax_in_jax_out_nested_pytree(trees):
    ref, pol, extras, _ = trees
    nest = lambda t: {"a": {"b": jax.numpy.asarray(t["embed.weight"])}, "c": [jax.numpy.asarray(t["lm_head.weight"])]}  # noqa: E731
    got = M.merge(nest(ref), nest(pol), 0.5, "ties", extra_policies=[nest(e) for e in extras])
    assert isinstance(got["a"]["b"], jax.Array)
    flat = {"a.b": ref["embed.weight"], "c.0": ref["lm_head.weight"]}
    rename = lambda t: {"a.b": t["embed.weight"], "c.0": t["lm_head.weight"]}  # noqa: E731
    want = np_merge("ties", flat, rename(pol), 0.5, [rename(e) for e in extras])
    np.testing.assert_allclose(np.asarray(got["a"]["b"]), want["a.b"], atol=2e-6)
    np.testing.assert_allclose(np.asarray(got["c"][0]), want["c.0"], atol=2e-6)


# ------------------------------------------------------------------------------------------ DARE
def test_dare_same_seed_same_mask_order_independent(trees):
    ref, pol, extras, _ = trees
    a = M.merge(ref, pol, 1.0, "dare_linear", seed=5)
    b = M.merge(ref, pol, 1.0, "dare_linear", seed=5)
    c = M.merge(ref, pol, 1.0, "dare_linear", seed=6)
    for k in ref:
        np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(a[k], c[k]) for k in ref)
    # a tensor's mask depends on its name and the seed only: a sub-dict in another order merges alike
    sub = ["lm_head.weight", "layers.0.q.weight"]
    got = M.merge({k: ref[k] for k in sub}, {k: pol[k] for k in sub}, 1.0, "dare_linear", seed=5)
    for k in sub:
        np.testing.assert_array_equal(got[k], a[k])
    # members of one tensor get independent masks
    zero = {k: np.zeros_like(v) for k, v in ref.items()}
    ones = {k: np.ones_like(v) for k, v in ref.items()}
    d = M.merged_delta(zero, ones, "dare_linear", extra_policies=[ones], density=0.5, rescale=False)
    t = d.tau["embed.weight"]
    assert set(np.unique(np.asarray(t)).tolist()) == {0.0, 1.0, 2.0}


def test_dare_unbiased_over_seeds():
    """E[tau'] = tau: over S seeds, coordinate j's kept count K_j = S * mean_j * density / tau_j is
    Binomial(S, density); the standardized squared deviations summed over coordinates follow chi2(n)."""
    rng = np.random.default_rng(0)
    ref = {"w": rng.normal(size=(8, 16)).astype(np.float32)}
    pol = {"w": (ref["w"] + rng.normal(size=(8, 16))).astype(np.float32)}
    tau = pol["w"].astype(np.float64) - ref["w"].astype(np.float64)
    density, S = 0.3, 300
    acc = np.zeros_like(tau)
    for seed in range(S):
        acc += np.asarray(M.merged_delta(ref, pol, "dare_linear", density=density, seed=seed).tau["w"], np.float64)
    mean = acc / S
    counts = mean * density * S / tau
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-2)  # kept counts are integers
    var = tau**2 * (1 - density) / (density * S)  # Var of the mean of Bernoulli(d)/d * tau
    chi2 = float((((mean - tau) ** 2) / var).sum())
    n = tau.size
    assert stats.chi2.sf(chi2, n) > 1e-4 and stats.chi2.cdf(chi2, n) > 1e-4, chi2
    # each coordinate's count within the two-sided 1e-6/n binomial quantiles
    lo, hi = stats.binom.ppf(1e-6 / n, S, density), stats.binom.isf(1e-6 / n, S, density)
    assert np.all((np.round(counts) >= lo) & (np.round(counts) <= hi))


# ------------------------------------------------------------------------------------------- LoRA
def test_lora_linear_needs_no_dense_tau_and_matches(trees):
    ref, _, _, _ = trees
    rng = np.random.default_rng(3)
    A, B = rng.normal(size=(2, 6)).astype(np.float32), rng.normal(size=(11, 2)).astype(np.float32)
    lora = M.LoraDelta({"embed": (A, B, 0.5), "layers.0.q.weight": (rng.normal(size=(3, 6)), rng.normal(size=(6, 3)), 2.0)})
    d = M.merged_delta(ref, lora, "linear")
    scaled = d.lora.scaled(0.4)
    assert scaled.modules["embed"][2] == pytest.approx(0.2) and scaled.modules["layers.0.q.weight"][2] == pytest.approx(0.8)
    got = d.at(0.4)
    want_e = ref["embed.weight"].astype(np.float64) + 0.4 * 0.5 * B.astype(np.float64) @ A
    np.testing.assert_allclose(got["embed.weight"], want_e, atol=1e-5)
    np.testing.assert_array_equal(got["lm_head.weight"], ref["lm_head.weight"])
    applied = M.apply_lora(ref, scaled)
    for k in ref:
        np.testing.assert_allclose(applied[k], got[k], atol=1e-6)


def test_lora_ties_equals_dense(trees):
    ref, _, _, _ = trees
    rng = np.random.default_rng(4)
    mods = [
        {"embed": (rng.normal(size=(2, 6)), rng.normal(size=(11, 2)), 0.5)},
        {"embed": (rng.normal(size=(2, 6)), rng.normal(size=(11, 2)), 1.0),
         "layers.0.q.weight": (rng.normal(size=(2, 6)), rng.normal(size=(6, 2)), 1.0)},
    ]
    loras = [M.LoraDelta(m) for m in mods]
    dense = []
    for m in mods:
        t = dict(ref)
        for name, (a, b, s) in m.items():
            w = name + ".weight" if name + ".weight" in ref else name
            t[w] = (ref[w].astype(np.float64) + s * b @ a).astype(np.float32)
        dense.append(t)
    for method in ("ties", "emr"):
        got = M.merge(ref, loras[0], 0.9, method, extra_policies=[loras[1]])
        want = np_merge(method, ref, dense[0], 0.9, [dense[1]])
        assert_tree_close(got, want, atol=1e-5)


# ------------------------------------------------------------------------------------------ errors
def test_errors(trees):
    ref, pol, extras, _ = trees
    for bad in (float("nan"), float("inf"), 10.5, -11, "x", None):
        with pytest.raises(ValueError, match="alpha"):
            M.merge(ref, pol, bad)
    M.merge(ref, pol, 10.0)  # the bound itself is accepted
    with pytest.raises(ValueError, match="unknown merge method 'slerp'"):
        M.merge(ref, pol, 0.5, "slerp")
    with pytest.raises(ValueError, match="density=0"):
        M.merge(ref, pol, 0.5, "ties", density=0)
    with pytest.raises(ValueError, match="emr_norm"):
        M.merge(ref, pol, 0.5, "emr", emr_norm="max")
    with pytest.raises(ValueError, match="extra_policies: linear"):
        M.merge(ref, pol, 0.5, "linear", extra_policies=extras)
    with pytest.raises(TypeError, match="merged_delta: unknown option.* densty .*density, seed, rescale, emr_norm"):
        M.merge(ref, pol, 0.5, "ties", densty=0.5)
    wrong = dict(pol, **{"layers.0.q.weight": np.zeros((6, 7), np.float32)})
    with pytest.raises(ValueError, match=r"policy has differently shaped tensors: layers\.0\.q\.weight \(policy \(6, 7\), base \(6, 6\)\)"):
        M.merge(ref, wrong, 0.5)
    missing = {k: v for k, v in pol.items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match=r"extra_policies\[1\] does not match .*missing tensors lm_head\.weight"):
        M.merge(ref, pol, 0.5, "ties", extra_policies=[extras[0], missing])
    lora = M.LoraDelta({"embed": (np.ones((1, 6)), np.ones((11, 1)), 1.0)})
    with pytest.raises(ValueError, match=r"cannot mix LoRA and dense policies: policy LoRA, extra_policies\[0\] dense"):
        M.merge(ref, lora, 0.5, "ties", extra_policies=[pol])
    with pytest.raises(ValueError, match=r"cannot mix LoRA and dense policies: extra_policies\[0\] LoRA, policy dense"):
        M.merge(ref, pol, 0.5, "ties", extra_policies=[lora])
    with pytest.raises(ValueError, match="LoRA module 'nope'"):
        M.merge(ref, M.LoraDelta({"nope": (np.ones((1, 6)), np.ones((6, 1)), 1.0)}), 0.5)
    with pytest.raises(ValueError, match=r"LoRA module 'embed': delta shape \(6, 6\)"):
        M.merge(ref, M.LoraDelta({"embed": (np.ones((1, 6)), np.ones((6, 1)), 1.0)}), 0.5)


@pytest.mark.parametrize(
    "spec, want",
    [("linear:0,0.5,1", ("linear", [0.0, 0.5, 1.0])), ("dare_ties:0.25", ("dare_ties", [0.25]))],
)
def test_parse_merge_spec(spec, want):
    assert M.parse_merge_spec(spec) == want


@pytest.mark.parametrize(
    "spec, match",
    [("linear", "expected METHOD:alpha"), ("foo:0.5", "unknown merge method 'foo'"), ("ties:0.5,", "empty alpha"),
     ("ties:0.5,nan", "alpha='nan'"), ("emr:11", r"alpha='11': expected a finite number with \|alpha\| <= 10"), ("linear:0.5,0.5", "repeated alpha")],
)
def test_parse_merge_spec_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        M.parse_merge_spec(spec)


# ------------------------------------------------------------------------------------------- disk
TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 40,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "hidden_act": "silu",
}


def _save_tiny(path, seed, dtype="float32", hf=TINY):
    from flax import nnx

    from pa_jax.models import Decoder, ModelConfig, save_pretrained

    cfg = ModelConfig.from_hf_dict(hf)
    model = Decoder(cfg, rngs=nnx.Rngs(seed), dtype=dtype)
    # random init leaves norms at 1: perturb every tensor so norms merge non-trivially too
    _, state = nnx.split(model)
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(state):
        v = np.asarray(var.get_value(), np.float32)
        var.set_value(jax.numpy.asarray(v + 0.05 * rng.normal(size=v.shape), dtype))
    save_pretrained(cfg, model, path)
    (pathlib.Path(path) / "tokenizer_config.json").write_text("{}")
    return cfg


@pytest.fixture(scope="module")
def disk_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_disk")
    for i, name in enumerate(["ref", "pol", "ex", "anc"]):
        _save_tiny(root / name, seed=i)
    return root


def _read_dir(path):
    from pa_jax.models.load import open_safetensors_dir

    return {k: t.read() for k, t in open_safetensors_dir(path).items()}


@pytest.mark.parametrize(
    "method, kw",
    [("linear", {}), ("ties", {"extra": True}), ("dare_ties", {"extra": True, "seed": 3}), ("emr", {"anchor": True})],
)
def test_disk_merge_equals_in_memory(disk_pair, tmp_path, method, kw):
    root = disk_pair
    extra = [root / "ex"] if kw.get("extra") else []
    anchor = root / "anc" if kw.get("anchor") else None
    opts = {"seed": kw["seed"]} if "seed" in kw else {}
    if method != "linear":
        opts["extra_policies"] = extra
    info = M.merge_checkpoints(root / "ref", root / "pol", tmp_path / "out", 0.6, method, anchor=anchor, **opts)
    mem_opts = dict(opts)
    if extra:
        mem_opts["extra_policies"] = [_read_dir(e) for e in extra]
    want = M.merge(_read_dir(root / "ref"), _read_dir(root / "pol"), 0.6, method,
                   anchor=None if anchor is None else _read_dir(anchor), **mem_opts)
    got = _read_dir(tmp_path / "out")
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["hidden_size"] == 32
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    from pa_jax.models.load import read_safetensors_header

    header, _ = read_safetensors_header(tmp_path / "out" / "model.safetensors")
    assert json.loads(header["__metadata__"]["pa_jax_merge"])["method"] == method
    assert info["alpha"] == 0.6
    if method == "linear":  # the merged directory loads as a model
        from pa_jax.models import load

        load(tmp_path / "out", dtype="float32")


def test_disk_merge_bf16_endpoints(tmp_path):
    _save_tiny(tmp_path / "r", 0, "bfloat16")
    _save_tiny(tmp_path / "p", 1, "bfloat16")
    ref, pol = _read_dir(tmp_path / "r"), _read_dir(tmp_path / "p")
    for alpha, want in ((0.0, ref), (1.0, pol)):
        M.merge_checkpoints(tmp_path / "r", tmp_path / "p", tmp_path / f"o{alpha}", alpha)
        got = _read_dir(tmp_path / f"o{alpha}")
        for k in want:
            assert got[k].dtype == ml_dtypes.bfloat16
            np.testing.assert_array_equal(got[k].view(np.uint16), want[k].view(np.uint16), err_msg=k)


def test_disk_merge_errors(disk_pair, tmp_path):
    root = disk_pair
    _save_tiny(tmp_path / "wide", 0, hf={**TINY, "intermediate_size": 96})
    with pytest.raises(ValueError, match="different architecture .*'intermediate_size' is 96"):
        M.merge_checkpoints(root / "ref", tmp_path / "wide", tmp_path / "o", 0.5)
    # same config fields, one tensor reshaped on disk
    import shutil

    from pa_jax.models.load import write_safetensors

    shutil.copytree(root / "pol", tmp_path / "bad")
    t = _read_dir(root / "pol")
    t["model.norm.weight"] = np.ones(33, np.float32)
    write_safetensors(tmp_path / "bad" / "model.safetensors", t)
    with pytest.raises(ValueError, match=r"differently shaped tensors: model\.norm\.weight .*\(33,\)"):
        M.merge_checkpoints(root / "ref", tmp_path / "bad", tmp_path / "o", 0.5)
    with pytest.raises(ValueError, match="alpha"):
        M.merge_checkpoints(root / "ref", root / "pol", tmp_path / "o", float("nan"))
    with pytest.raises(ValueError, match="unknown merge method"):
        M.merge_checkpoints(root / "ref", root / "pol", tmp_path / "o", 0.5, "avg")
    with pytest.raises(ValueError, match="must differ from every source"):
        M.merge_checkpoints(root / "ref", root / "pol", root / "pol", 0.5)
    with pytest.raises(ValueError, match="not a directory"):
        M.merge_checkpoints(root / "ref", root / "nope", tmp_path / "o", 0.5)
    with pytest.raises(TypeError, match="merge_checkpoints: unknown option.* alpha_2"):
        M.merge_checkpoints(root / "ref", root / "pol", tmp_path / "o", 0.5, "ties", alpha_2=0.1)
    assert not (tmp_path / "o" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------- mesh
def test_sharding_kept_one_device(trees):
    ref, pol, extras, _ = trees
    dev = jax.devices()[0]
    put = lambda t: {k: jax.device_put(v, dev) for k, v in t.items()}  # noqa: E731
    got = M.merge(put(ref), put(pol), 0.5, "dare_ties", extra_policies=[put(e) for e in extras])
    for k, v in got.items():
        assert isinstance(v, jax.Array) and v.sharding.device_set == {dev}
    assert_tree_close({k: np.asarray(v) for k, v in got.items()}, np_merge("dare_ties", ref, pol, 0.5, extras))


_MESH_SCRIPT = r"""
import json, sys
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import pa_jax.merging as M
assert jax.device_count() == 2, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("x",))
rng = np.random.default_rng(0)
shapes = {"a": (8, 6), "c": (4, 10)}
specs = {"a": P("x", None), "c": P(None, "x")}
ref = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
pol = {k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in ref.items()}
ex = {k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in ref.items()}
shard = lambda t: {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in t.items()}
out = {}
for method in ("linear", "ties", "dare_ties", "emr"):
    kw = {} if method == "linear" else {"extra_policies": [shard(ex)]}
    got = M.merge(shard(ref), shard(pol), 0.7, method, **kw)
    host = M.merge(ref, pol, 0.7, method, **({} if method == "linear" else {"extra_policies": [ex]}))
    out[method] = {
        "same_sharding": all(got[k].sharding.is_equivalent_to(NamedSharding(mesh, specs[k]), len(shapes[k])) for k in got),
        "max_diff": max(float(np.max(np.abs(np.asarray(got[k]) - host[k]))) for k in got),
    }
print(json.dumps(out))
"""


def test_mesh_two_simulated_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for method, v in res.items():
        assert v["same_sharding"], (method, v)
        assert v["max_diff"] < 1e-6, (method, v)
