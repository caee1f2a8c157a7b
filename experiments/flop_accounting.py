"""Model FLOPs of each scorer of ``bench_scoring.py``'s airline workload, and the rate each achieved.

What the speed targets of issue 21 can be held against: a scorer can beat another by doing less work or by
doing it faster. Counted per model (SmolLM2-135M: D 576, FFN 1536, 30 layers, 9 query / 3 KV heads x 64,
vocabulary 49,152), for trajectories of T tokens sharing a prefix of P tokens with S scored positions:

    linear layers   2 * T * 30 * (2*576*576 + 2*576*192 + 3*576*1536)      (q, o, k, v, gate, up, down)
    attention       30 * 2 * 2 * 576 * sum over queries t of (t + 1)         (QK^T and PV, causal)
    head            2 * 49152 * 576 per position it is applied at

* authors-style: every token of every trajectory, the head at every position;
* careful peer and pa-jax: the prefix once (linear + its causal attention), each trajectory's suffix
  (linear, and its queries against prefix + suffix keys), the head only at the S scored positions.

Padding, the mask and the softmax are not counted (they are the scorers' overheads, not model FLOPs).

    python experiments/flop_accounting.py docs/results/bench/bench_scoring_airline10_careful_epyc_avx2_run2.json

prints each scorer's model GFLOP (both models), the seconds and tokens/s of the results file, the achieved
GFLOP/s, and the ratio of FLOPs authors-style / pa-jax: the speedup pa-jax has over the authors-style scorer
at an equal FLOP rate.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

D, F, LAYERS, V, QDIM, KVDIM = 576, 1536, 30, 49152, 9 * 64, 3 * 64


def linear_flops(tokens: int) -> float:
    return 2.0 * tokens * LAYERS * (2 * D * QDIM + 2 * D * KVDIM + 3 * D * F)


def attention_flops(q0: int, q1: int) -> float:
    """Queries q0 .. q1 - 1, each against the causal keys 0 .. t."""
    keys = q1 * (q1 + 1) / 2 - q0 * (q0 + 1) / 2
    return LAYERS * 2.0 * 2.0 * QDIM * keys


def workload_flops(lengths, scored, prefix: int) -> dict[str, float]:
    """Model FLOPs of one model: {"authors": ..., "careful": ...} (the careful peer's count is pa-jax's)."""
    head = 2.0 * V * D
    authors = sum(linear_flops(t) + attention_flops(0, t) + head * t for t in lengths)
    careful = linear_flops(prefix) + attention_flops(0, prefix) + sum(
        linear_flops(t - prefix) + attention_flops(prefix, t) + head * s for t, s in zip(lengths, scored))
    attn = attention_flops(0, prefix) + sum(attention_flops(prefix, t) for t in lengths)
    return {"authors": authors, "careful": careful, "careful_attention_share": attn / careful}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="a bench_scoring.py results JSON (airline workload)")
    args = ap.parse_args()
    res = json.loads(pathlib.Path(args.results).read_text())
    if not (isinstance(res, dict) and isinstance(res.get("config"), dict) and isinstance(res.get("airline"), dict)
            and "shared_prefix_tokens" in res["airline"].get("pa_jax", {})):
        sys.exit(f"{args.results}: not a bench_scoring.py result with an airline workload "
                 f"(expected config, airline and airline.pa_jax.shared_prefix_tokens)")
    cfg, air = res["config"], res["airline"]

    from bench_scoring import airline_rendered, smollm2_gguf
    from pa_jax.data.tokenizers import load_tokenizer
    from pa_jax.scoring import scored_targets

    rendered = airline_rendered(cfg["n_traj"], load_tokenizer(smollm2_gguf()), cfg.get("max_length"))
    prefix = air["pa_jax"]["shared_prefix_tokens"]
    lengths = [len(r) for r in rendered]
    fl = workload_flops(lengths, [len(scored_targets(r)) for r in rendered], prefix)
    tokens = sum(lengths)
    print(f"{len(rendered)} trajectories, {tokens} tokens, prefix {prefix}; attention is "
          f"{fl['careful_attention_share']:.0%} of the careful / pa-jax FLOPs")
    for name, x in air.items():
        if not isinstance(x, dict) or "seconds" not in x:
            continue
        flops = 2 * fl["authors" if name.startswith("authors") else "careful"]  # two models
        print(f"{name:18s} {flops / 1e12:6.1f} TFLOP  {x['seconds']:7.1f} s  {x['tokens_per_s']:6.1f} tokens/s  "
              f"{flops / x['seconds'] / 1e9:6.1f} GFLOP/s")
    print(f"FLOPs authors-style / pa-jax: {fl['authors'] / fl['careful']:.2f} (pa-jax's speedup over the "
          f"authors-style scorer at an equal FLOP rate)")


if __name__ == "__main__":
    main()
