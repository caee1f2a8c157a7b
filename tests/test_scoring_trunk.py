"""The scoring engine with a shared trunk (policy and reference identical below layer k): statistics equal to
the two-forward path (float32, 1e-6) on tiny random transformers Llama pairs whose top layer differs, in every
engine path (packed whole rows, chunked long rows, a shared prefix), the k = 0 fallback, the cache, and k read
off a LoRA adapter (CLI)."""
import copy
import json

import numpy as np
import pytest
import torch

from pa_jax.data import render
from pa_jax.scoring import Engine, ScoringOptions, score_rendered
from helpers import CORPUS, tau_sim, tiny_hf_llama, tiny_tokenizer
from test_scoring import _trajs

L = 4
FIELDS = ("policy_logprob", "policy_entropy", "policy_mean_logprob", "policy_topk", "reference_logprob",
          "reference_entropy", "kl")
CFG = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=L, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=0,
           eos_token_id=1, pad_token_id=2)


def _perturbed(model, layers, seed, head=True):
    """A copy of a transformers llama with every tensor of ``layers`` (and the LM head) moved by 0.5 std noise."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        params = [p for i in layers for p in out.model.layers[i].parameters()]
        params += [out.lm_head.weight] if head else []
        for p in params:
            p.add_(0.5 * p.std().clamp_min(0.05) * torch.randn(p.shape, generator=g))
    return out


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tok):
    from pa_jax.models import load

    d = tmp_path_factory.mktemp("trunk")
    ref = tiny_hf_llama(seed=0, perturb_norms=True, **CFG)
    hf = {"reference": ref, "policy": _perturbed(ref, [L - 1], 1), "layer0": _perturbed(ref, [0], 2, head=False)}
    for name, m in hf.items():
        m.save_pretrained(d / name)
        tok.save_pretrained(d / name)
    return {"dir": d, "torch": hf, **{name: load(d / name, dtype="float32") for name in hf}}


MODES = {  # rendered trajectories, options, and what the plan must then look like
    "packed": (False, dict(attention_chunk=512, pack_length=512, share_prefix=False)),
    "chunked": (False, dict(attention_chunk=64, pack=False, share_prefix=False)),
    "prefix": (True, dict(attention_chunk=64, min_prefix=16)),
    "mixed": ("mixed", dict(attention_chunk=64, min_prefix=16)),  # prefixed chunked rows and whole ones
}


def _opts(mode, **kw):
    return ScoringOptions(top_k=5, max_batch_tokens=256, bucket_lengths=(64, 128, 256, 512), head_positions=40,
                          **MODES[mode][1], **kw)


def _assert_close(a, b, atol):
    for x, y in zip(a.stats, b.stats):
        np.testing.assert_array_equal(x.step_ids, y.step_ids)
        for f in FIELDS:
            np.testing.assert_allclose(getattr(x, f), getattr(y, f), atol=atol, rtol=0, err_msg=f"{x.id} {f}")


def _torch_logprobs(model, r):
    """log pi(token q | < q) of the scored targets of one rendered trajectory (PyTorch, float64 softmax)."""
    with torch.no_grad():
        logits = model(torch.tensor(r.input_ids[None], dtype=torch.long)).logits[0].double()
    lp = torch.log_softmax(logits, -1).numpy()
    q = np.flatnonzero(r.step_ids >= 0)
    q = q[q >= 1]
    return lp[q - 1, r.input_ids[q]]


@pytest.mark.parametrize("mode", list(MODES))
def test_trunk_equals_two_forwards(models, tok, mode):
    shared_system, _ = MODES[mode]
    rendered = [render(t, tok) for t in _trajs(5, shared_system)]
    on = score_rendered(rendered, models["policy"], models["reference"], options=_opts(mode), pad_id=2)
    off = score_rendered(rendered, models["policy"], models["reference"], options=_opts(mode, shared_trunk=False),
                         pad_id=2)
    assert on.shared_trunk["layers"] == L - 1 and on.shared_trunk["reason"] == f"layer {L - 1} differs"
    assert on.shared_trunk["source"].startswith("parameters")
    assert off.shared_trunk["layers"] == 0 and "turned off" in off.shared_trunk["reason"]
    plan = on.plan
    assert len(plan.batches) > 1
    if mode == "packed":
        assert plan.prefix_length == 0 and not any(b.chunked for b in plan.batches)
        assert any(len(row) > 1 for b in plan.batches for row in b.rows)
    elif mode == "chunked":  # long rows in 64-token chunks and short whole rows in one run
        assert plan.prefix_length == 0 and any(b.chunked and b.length > 64 for b in plan.batches)
        assert any(not b.chunked for b in plan.batches)
    elif mode == "mixed":
        assert plan.prefix_length >= 16 and plan.prefix_members == (1, 2, 4)
        assert {b.prefixed for b in plan.batches} == {True, False}
    else:
        assert plan.prefix_length >= 16 and all(b.chunked for b in plan.batches)
    _assert_close(on, off, 1e-6)
    # both equal the PyTorch models (so the equality above is not two paths wrong alike) ...
    for r, s in zip(rendered, on.stats):
        np.testing.assert_allclose(s.policy_logprob, _torch_logprobs(models["torch"]["policy"], r), atol=2e-4)
        np.testing.assert_allclose(s.reference_logprob, _torch_logprobs(models["torch"]["reference"], r), atol=2e-4)
    # ... which really differ (the top layer and head)
    assert max(np.abs(s.policy_logprob - s.reference_logprob).max() for s in on.stats) > 1e-2


def test_trunk_threads_and_cache(models, tok, tmp_path):
    """One thread or two give the same bits with the trunk; a cache written with the trunk serves a run
    without it (the choice is not in the cache key)."""
    rendered = [render(t, tok) for t in _trajs(5, True)]
    a = score_rendered(rendered, models["policy"], models["reference"], options=_opts("prefix"), pad_id=2,
                       cache_dir=tmp_path)
    b = score_rendered(rendered, models["policy"], models["reference"],
                       options=_opts("prefix", concurrent_models=False), pad_id=2)
    _assert_close(a, b, 0.0)
    c = score_rendered(rendered, models["policy"], models["reference"], options=_opts("prefix", shared_trunk=False),
                       pad_id=2, cache_dir=tmp_path)
    assert c.cache_dir == a.cache_dir and c.batches_computed == 0 and c.batches_from_cache == len(a.plan.batches)
    assert c.shared_trunk["layers"] == 0 and "cache" in c.shared_trunk["reason"]
    _assert_close(a, c, 0.0)


class _NoTrunkEngine(Engine):
    def _refuse(self, *a, **k):
        raise AssertionError("the trunk path ran")

    trunk_chunked_hidden_at = trunk_prefix_buffers = trunk_full_rows_at = _refuse


@pytest.mark.parametrize("mode", ["packed", "prefix"])
def test_nothing_shared_takes_the_two_forward_path(models, tok, mode):
    """Layer 0 differs (embeddings equal): k = 0 and the engine runs the old two-forward path, bit for bit."""
    rendered = [render(t, tok) for t in _trajs(4, MODES[mode][0])]
    with _NoTrunkEngine() as eng:
        a = score_rendered(rendered, models["layer0"], models["reference"], options=_opts(mode), pad_id=2, engine=eng)
        b = score_rendered(rendered, models["layer0"], models["reference"], options=_opts(mode, shared_trunk=False),
                           pad_id=2, engine=eng)
        assert a.shared_trunk == {"layers": 0, "reason": "layer 0 differs", "source": "parameters (tensor digests)",
                                  "detect_seconds": a.shared_trunk["detect_seconds"]}
        _assert_close(a, b, 0.0)
        # a policy alone has no trunk either
        c = score_rendered(rendered, models["policy"], None, options=_opts(mode), pad_id=2, engine=eng)
        assert c.shared_trunk["layers"] == 0 and c.shared_trunk["reason"] == "no reference model"


def test_identical_pair_capped_and_bad_given_trunk(models, tok):
    from pa_jax.models.shared import SharedTrunk

    rendered = [render(t, tok) for t in _trajs(3, False)]
    same = score_rendered(rendered, models["reference"], models["reference"], options=_opts("packed"), pad_id=2)
    assert same.shared_trunk["layers"] == L - 1 and "capped" in same.shared_trunk["reason"]
    for s in same.stats:
        np.testing.assert_allclose(s.policy_logprob, s.reference_logprob, atol=0, rtol=0)
        np.testing.assert_allclose(s.kl, 0.0, atol=1e-6)
    with pytest.raises(ValueError, match="shared trunk of 9 layers"):
        score_rendered(rendered, models["policy"], models["reference"], options=_opts("packed"), pad_id=2,
                       trunk=SharedTrunk(9, "wrong"))


def test_adapter_trunk_rule():
    from pa_jax.models.shared import adapter_trunk

    assert adapter_trunk(["layers.3.self_attn.q_proj.weight", "layers.2.mlp.up_proj.weight"], 4) == (
        2, "adapter changes layer 2 first")
    assert adapter_trunk(["lm_head.weight"], 4) == (4, "adapter touches no layer")
    assert adapter_trunk(["layers.3.mlp.up_proj.weight", "embed_tokens.weight"], 4).layers == 0


def test_cli_adapter_policy_reads_k_from_the_adapter(models, tmp_path, monkeypatch):
    """`pa-jax uq --policy ADAPTER --reference BASE` with a LoRA on the top layer: k = L - 1 read off the
    adapter (no digest is computed), recorded in the results, and scores equal to --no-shared-trunk."""
    import jax

    from pa_jax.cli import main
    from pa_jax.models import shared
    from pa_jax.models.lora import init_lora, write_peft_adapter

    base = models["dir"] / "reference"
    cfg = models["reference"][0]
    lora = init_lora(cfg, ("q_proj", "up_proj"), 2, jax.random.PRNGKey(0), layers=[L - 1])
    rng = np.random.default_rng(0)
    lora = {p: {"A": ab["A"], "B": 0.3 * rng.standard_normal(ab["B"].shape).astype(np.float32)}
            for p, ab in lora.items()}
    adapter = write_peft_adapter(tmp_path / "adapter", lora, cfg, lora_alpha=4, base_model_name_or_path=str(base))
    assert shared.trunk_from_adapter(adapter, cfg) == (L - 1, f"adapter changes layer {L - 1} first")
    data = tmp_path / "sims.json"
    data.write_text(json.dumps({"simulations": [tau_sim(i, f"t{i // 2}", float(i % 2)) for i in range(4)]}))

    def digests_refused(*a, **k):
        raise AssertionError("tensor digests computed although the adapter gives k")

    monkeypatch.setattr(shared, "shared_trunk", digests_refused)
    out = {}
    for flag in ([], ["--no-shared-trunk"]):
        path = tmp_path / f"score{len(flag)}.json"
        assert main(["uq", "--policy", str(adapter), "--reference", str(base), "--data", str(data), "--dtype",
                     "float32", "--bootstrap", "10", "--out", str(path), "--no-progress"] + flag) == 0
        out[len(flag)] = json.loads(path.read_text())
    on, off = out[0]["timing"], out[1]["timing"]
    assert on["shared_trunk_layers"] == L - 1 and on["shared_trunk"]["source"].startswith("given")
    assert on["shared_trunk"]["reason"] == f"adapter changes layer {L - 1} first"
    assert off["shared_trunk_layers"] == 0 and "turned off" in off["shared_trunk"]["reason"]
    a, b = out[0]["scores"], out[1]["scores"]
    assert a.keys() == b.keys() and a["ids"] == b["ids"] and a["labels"] == b["labels"]
    assert np.abs(np.asarray(a["progress_advantage/mean/mean"])).max() > 1e-3  # the adapter changed the policy
    for key in set(a) - {"ids", "labels"}:
        np.testing.assert_allclose(np.asarray(a[key], float), np.asarray(b[key], float), atol=1e-6, rtol=0,
                                   err_msg=key)
