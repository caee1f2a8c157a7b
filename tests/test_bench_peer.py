"""The careful PyTorch peer of experiments/bench_scoring.py (shared-prefix KV cache reuse, LM head only at the
scored positions) computes the same log-probs and top-k means as the authors-style full-logits scorer."""
import importlib.util
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_scoring", ROOT / "experiments" / "bench_scoring.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(vocab, prefix_len, lengths, seed=0):
    from pa_jax.data.render import Rendered, Truncation

    rng = np.random.default_rng(seed)
    prefix = rng.integers(0, vocab, prefix_len)
    out = []
    for k, n in enumerate(lengths):
        ids = np.concatenate([prefix, rng.integers(0, vocab, n - prefix_len)]).astype(np.int32)
        steps = np.full(n, -1, np.int32)
        steps[prefix_len + 3: prefix_len + 9] = 0
        steps[n - 5:] = 1
        out.append(Rendered(f"r{k}", ids, steps, 2, Truncation(n, n, 0, 0, 0)))
    return out


def test_shared_prefix_length_rule():
    b = _bench()
    rows = _rows(50, 12, [30, 25])
    # independent: longest common prefix, capped below the first scored hidden index (target index - 1)
    lcp = next(i for i in range(25) if rows[0].input_ids[i] != rows[1].input_ids[i])
    first_q = min(int(np.flatnonzero(r.step_ids[1:] >= 0)[0]) for r in rows)
    assert b.shared_prefix_length(rows) == min(lcp, first_q, 24)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_careful_equals_authors_float32(attn):
    from transformers import LlamaConfig, LlamaForCausalLM

    b = _bench()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      attn_implementation=attn)
    model = LlamaForCausalLM(cfg).eval()
    rows = _rows(97, 16, [40, 33, 48])
    ref = b.authors_torch_scores(model, rows, top_k=5)
    got = b.careful_torch_scores(model, rows, top_k=5)
    for (lp_r, tk_r), (lp_g, tk_g), r in zip(ref, got, rows):
        assert lp_g.shape == (int((r.step_ids[1:] >= 0).sum()),)
        np.testing.assert_allclose(lp_g, lp_r, atol=1e-5)
        np.testing.assert_allclose(tk_g, tk_r, atol=1e-5)
    # the prefix cache is reused, not consumed: scoring again gives the same numbers
    again = b.careful_torch_scores(model, rows, top_k=5)
    for (a, _), (c, _) in zip(got, again):
        np.testing.assert_array_equal(a, c)


def test_flop_accounting_counts_by_brute_force():
    """experiments/flop_accounting.py against plain loops over tokens and query/key pairs."""
    spec = importlib.util.spec_from_file_location("flop_accounting", ROOT / "experiments" / "flop_accounting.py")
    fa = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fa)
    per_pair = fa.LAYERS * 2 * 2 * fa.QDIM  # one query-key pair, QK^T and PV, every layer
    for q0, q1 in ((0, 1), (0, 17), (5, 23)):
        assert fa.attention_flops(q0, q1) == per_pair * sum(t + 1 for t in range(q0, q1))
    lengths, scored, prefix = [40, 31, 55], [3, 0, 9], 12
    fl = fa.workload_flops(lengths, scored, prefix)
    head = 2 * fa.V * fa.D
    authors = sum(fa.linear_flops(1) * t + per_pair * sum(u + 1 for u in range(t)) + head * t for t in lengths)
    careful = fa.linear_flops(1) * prefix + per_pair * sum(u + 1 for u in range(prefix))
    careful += sum(fa.linear_flops(1) * (t - prefix) + per_pair * sum(u + 1 for u in range(prefix, t)) + head * s
                   for t, s in zip(lengths, scored))
    assert np.isclose(fl["authors"], authors) and np.isclose(fl["careful"], careful)
    # no prefix and the head everywhere: the two scorers do the same work
    same = fa.workload_flops(lengths, lengths, 0)
    assert np.isclose(same["authors"], same["careful"])
