"""Fused head statistics (pa_jax.head) vs a full log_softmax + top_k over the vocabulary.

Same inputs, same run: both compute per token the target log-prob, log-sum-exp, entropy, top-k
and vocabulary-mean log-prob; the baseline materialises the [T, V] float32 logits/log-probs the
way the authors' released code does (``torch.log_softmax`` over the full vocabulary, then gather
and ``topk``). Reports tokens/s, the compiled temporary memory (XLA ``memory_analysis``; on GPU
also the allocator's peak), and the ratios fused / baseline.

    python experiments/bench_head.py                         # T=4096, V=151936, D=256, float32
    python experiments/bench_head.py --tokens 2048 --dtype bfloat16 --out results/bench_head.json
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from pa_jax.head import DEFAULT_TOKEN_BLOCK, DEFAULT_VOCAB_CHUNK, head_statistics
from pa_jax.io import atomic_write_json


def full_vocab_stats(hidden, unembedding, targets, top_k: int):
    """The baseline: full [T, V] logits and log_softmax, then gather / top_k / reductions."""
    logits = jnp.einsum("btd,vd->btv", hidden, unembedding, preferred_element_type=jnp.float32,
                        precision=jax.lax.Precision.HIGHEST)
    lp = jax.nn.log_softmax(logits, axis=-1)
    target = jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]
    lse = jax.nn.logsumexp(logits, axis=-1)
    entropy = -jnp.sum(jnp.exp(lp) * lp, axis=-1)
    topv, topi = jax.lax.top_k(lp, top_k)
    return target, lse, entropy, topv, topi, jnp.mean(lp, axis=-1)


def fused_stats(hidden, unembedding, targets, top_k: int, vocab_chunk: int, token_block: int):
    s = head_statistics(hidden, unembedding, targets, top_k=top_k, vocab_chunk=vocab_chunk, token_block=token_block)
    return s.target_logprob, s.logsumexp, s.entropy, s.topk_logprobs, s.topk_ids, s.mean_logprob


def measure(fn, args, repeats: int) -> dict:
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    out = jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    peak = None
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        peak = int(stats["peak_bytes_in_use"])
    return dict(
        seconds_median=float(np.median(times)),
        seconds_min=float(np.min(times)),
        temp_bytes=int(mem.temp_size_in_bytes),
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        allocator_peak_bytes=peak,
        outputs=out,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--vocab-chunk", type=int, default=DEFAULT_VOCAB_CHUNK)
    ap.add_argument("--token-block", type=int, default=DEFAULT_TOKEN_BLOCK)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-baseline", action="store_true", help="only the fused head (when [T, V] does not fit)")
    ap.add_argument("--out", type=pathlib.Path, default=None, help="write the numbers as JSON (atomically)")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    dt = jnp.dtype(args.dtype)
    hidden = jnp.asarray(rng.normal(size=(1, args.tokens, args.dim)), dt)
    unemb = jnp.asarray(rng.normal(size=(args.vocab, args.dim)) / np.sqrt(args.dim) * 3, dt)
    targets = jnp.asarray(rng.integers(0, args.vocab, size=(1, args.tokens)), jnp.int32)
    inputs = (hidden, unemb, targets)
    print(f"device={jax.devices()[0].device_kind} T={args.tokens} V={args.vocab} D={args.dim} dtype={args.dtype} "
          f"k={args.top_k} vocab_chunk={args.vocab_chunk} token_block={args.token_block}")

    fused = measure(lambda h, w, y: fused_stats(h, w, y, args.top_k, args.vocab_chunk, args.token_block),
                    inputs, args.repeats)
    result = dict(config=vars(args) | {"out": str(args.out) if args.out else None,
                                       "device": jax.devices()[0].device_kind,
                                       "tv_float32_bytes": args.tokens * args.vocab * 4})
    rows = [("fused", fused)]
    if not args.skip_baseline:
        base = measure(lambda h, w, y: full_vocab_stats(h, w, y, args.top_k), inputs, args.repeats)
        rows.append(("full_log_softmax", base))
        diffs = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                 for a, b in zip(fused["outputs"], base["outputs"]) if a.dtype != jnp.int32]
        ids_equal = bool(jnp.all(fused["outputs"][4] == base["outputs"][4]))
        result["max_abs_diff"] = max(diffs)
        result["topk_ids_equal"] = ids_equal
    for name, r in rows:
        tps = args.tokens / r["seconds_median"]
        result[name] = {k: v for k, v in r.items() if k != "outputs"} | {"tokens_per_s": tps}
        print(f"{name:>17s}: {tps:12,.0f} tokens/s  ({r['seconds_median'] * 1e3:9.1f} ms median of {args.repeats})"
              f"  temp memory {r['temp_bytes'] / 2**20:9.1f} MiB"
              + (f"  allocator peak {r['allocator_peak_bytes'] / 2**20:.1f} MiB" if r["allocator_peak_bytes"] else ""))
    if not args.skip_baseline:
        f, b = result["fused"], result["full_log_softmax"]
        result["speed_ratio_fused_over_full"] = f["tokens_per_s"] / b["tokens_per_s"]
        result["temp_memory_ratio_full_over_fused"] = b["temp_bytes"] / max(f["temp_bytes"], 1)
        print(f"speed ratio (fused / full): {result['speed_ratio_fused_over_full']:.2f}x   "
              f"temp-memory ratio (full / fused): {result['temp_memory_ratio_full_over_fused']:.1f}x   "
              f"max |diff| {result['max_abs_diff']:.2e}, top-k ids equal: {result['topk_ids_equal']}")
    if args.out:
        atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
