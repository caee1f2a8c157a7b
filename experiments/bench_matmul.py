"""Matmul rate (GFLOP/s) of XLA:CPU (jax) vs PyTorch (oneDNN / MKL) at SmolLM2-135M's shapes, float32 and
bfloat16: the measurement that says whether a library's kernels, not pa-jax's algorithm, limit scoring speed
on a CPU (issue 21: on an Intel Xeon with avx512_bf16, pa-jax bf16 was slower than f32; on AMD the opposite).

Shapes (D=576, FFN 1536, 9 query heads / 3 KV heads x 64, vocab 49152; M tokens, default 512):
  q_proj / o_proj  [M, 576] x [576, 576]^T      k_proj / v_proj [M, 576] x [192, 576]^T
  gate / up        [M, 576] x [1536, 576]^T     down            [M, 1536] x [576, 1536]^T
  lm_head          [M, 576] x [49152, 576]^T    attention QK^T  [9, M, 64] x [9, M, 64]^T (batched)
Plus the whole causal attention of one layer at --attn-len tokens (``attention``: q [1, T, 9, 64], k/v
[1, T, 3, 64]): pa-jax's :func:`pa_jax.models.layers.blocked_attention` (the CPU default) vs PyTorch's
``scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` (its fused flash kernel on CPU); FLOPs
counted as 2 * 2 * heads * hd * T^2 / 2 (QK^T and PV over the causal half).
FLOPs = 2 * M * N * K (times the batch). jax bfloat16 runs as pa-jax does (pa_jax.models.layers.einsum_acc32:
bf16 inputs, float32 accumulation via preferred_element_type, result cast back to bf16); torch bfloat16 is
``a @ b.T`` on bf16 tensors (oneDNN accumulates in f32). Each timing is the median of --reps calls after
warm-up, jax compiled (jit) and blocked until ready; both libraries use every core (torch.set_num_threads).

    .venv/bin/python experiments/bench_matmul.py [--m 512] [--reps 20] [--rounds 3] [--attn-len 4096] [--out results.json]

Prints one line per (shape, dtype): GFLOP/s of each (median over --rounds alternating timings) and the
ratio jax / torch with its range over the rounds; the JSON records the CPU
(model, flags) and versions. On a shared machine run it on a quiet one; ratios of interleaved runs are steadier
than absolute rates.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

D, F, H, KV, HD, V = 576, 1536, 9, 3, 64, 49152


def shapes(m: int) -> dict[str, tuple[int, int, int, int]]:
    """name -> (batch, M, N, K) of C[b] = A[b] (M x K) @ B[b]^T (N x K)."""
    return {"q_proj/o_proj": (1, m, D, D), "k_proj/v_proj": (1, m, KV * HD, D), "gate/up": (1, m, F, D),
            "down": (1, m, D, F), "lm_head": (1, m, V, D), "attn_qk": (H, m, m, HD)}


def _median_time(fn, reps: int) -> float:
    fn()
    fn()  # warm-up (compilation, caches)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def bench_jax(b: int, m: int, n: int, k: int, dtype: str, reps: int) -> float:
    import jax
    import jax.numpy as jnp
    import numpy as np

    dt = jnp.dtype(dtype)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((b, m, k)), dt)
    w = jnp.asarray(rng.standard_normal((b, n, k)), dt)
    f = jax.jit(lambda x, w: jnp.einsum("bmk,bnk->bmn", x, w, preferred_element_type=jnp.float32).astype(dt))
    return _median_time(lambda: f(x, w).block_until_ready(), reps)


def bench_torch(b: int, m: int, n: int, k: int, dtype: str, reps: int) -> float:
    import torch

    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((b, m, k), generator=g).to(dt)
    w = torch.randn((b, n, k), generator=g).to(dt)
    with torch.no_grad():
        return _median_time(lambda: torch.matmul(x, w.transpose(1, 2)), reps)


def bench_jax_attention(t: int, dtype: str, reps: int) -> float:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pa_jax.models.layers import MaskSpec, blocked_attention

    dt = jnp.dtype(dtype)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, t, H, HD)), dt)
    k, v = (jnp.asarray(rng.standard_normal((1, t, KV, HD)), dt) for _ in range(2))
    pos = jnp.arange(t)[None]
    spec = MaskSpec(0, jnp.ones((1, t), bool), pos, pos)
    f = jax.jit(lambda q, k, v: blocked_attention(q, k, v, spec, scale=HD ** -0.5))
    return _median_time(lambda: f(q, k, v).block_until_ready(), reps)


def bench_torch_attention(t: int, dtype: str, reps: int) -> float:
    import torch

    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    q = torch.randn((1, H, t, HD), generator=g).to(dt)
    k, v = (torch.randn((1, KV, t, HD), generator=g).to(dt) for _ in range(2))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        return _median_time(lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True), reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=512, help="tokens per matmul (rows of the activations)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--only", nargs="*", default=None, help="shape names to run (default all)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating jax / torch timings per row (median, range)")
    ap.add_argument("--attn-len", type=int, default=4096, help="tokens of the attention row (0: skip it)")
    ap.add_argument("--out", default=None, help="results JSON (written atomically)")
    args = ap.parse_args()
    import importlib.metadata

    import numpy as np
    import torch

    from pa_jax.models.dtype import cpu_record

    torch.set_num_threads(os.cpu_count() or 1)
    cases = []  # (name, extra record, flops, jax timer, torch timer) per dtype
    for name, (b, m, n, k) in shapes(args.m).items():
        if not args.only or name in args.only:
            for dt in args.dtypes:
                cases.append((name, dt, {"bmnk": [b, m, n, k]}, 2.0 * b * m * n * k,
                              lambda dt=dt, b=b, m=m, n=n, k=k: bench_jax(b, m, n, k, dt, args.reps),
                              lambda dt=dt, b=b, m=m, n=n, k=k: bench_torch(b, m, n, k, dt, args.reps)))
    if args.attn_len and (not args.only or "attention" in args.only):
        t, reps = args.attn_len, max(3, args.reps // 4)
        for dt in args.dtypes:
            cases.append(("attention", dt, {"t": t}, 2.0 * 2.0 * H * HD * t * t / 2,
                          lambda dt=dt: bench_jax_attention(t, dt, reps), lambda dt=dt: bench_torch_attention(t, dt, reps)))
    rows = []
    for name, dt, extra, flops, fj, ft in cases:
        tjs, tts = [], []
        for _ in range(args.rounds):  # alternate the two libraries, so a slow spell of the machine hits both
            tjs.append(fj())
            tts.append(ft())
        ratios = sorted(tt / tj for tj, tt in zip(tjs, tts))
        tj, tt = float(np.median(tjs)), float(np.median(tts))
        row = {"shape": name, **extra, "dtype": dt, "jax_gflops": flops / tj / 1e9, "torch_gflops": flops / tt / 1e9,
               "jax_over_torch": float(np.median(ratios)), "jax_over_torch_range": [ratios[0], ratios[-1]],
               "jax_ms": tj * 1e3, "torch_ms": tt * 1e3}
        rows.append(row)
        print(f"{name:14s} {dt:9s} jax {row['jax_gflops']:8.1f} GFLOP/s  torch {row['torch_gflops']:8.1f} GFLOP/s"
              f"  jax/torch {row['jax_over_torch']:.2f} [{ratios[0]:.2f}, {ratios[-1]:.2f}]"
              f"  ({tj * 1e3:.1f} vs {tt * 1e3:.1f} ms)", flush=True)
    versions = {}
    for p in ("jax", "jaxlib", "torch"):
        try:
            versions[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            versions[p] = None
    res = {"cpu": cpu_record(), "versions": versions, "torch_threads": torch.get_num_threads(),
           "xla_flags": os.environ.get("XLA_FLAGS"), "m": args.m, "attn_len": args.attn_len, "reps": args.reps,
           "rounds": args.rounds, "rows": rows}
    if args.out:
        from pa_jax.io import atomic_write_json

        atomic_write_json(args.out, res)


if __name__ == "__main__":
    main()
