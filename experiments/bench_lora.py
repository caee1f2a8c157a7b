"""LoRA adapter on SmolLM2-135M-Instruct (GGUF base): merged at load time vs applied unmerged, and a pair whose
reference is the adapter's base.

One model:
  merged: ``pa_jax.models.load(adapter_dir, base=gguf)`` -- the base is loaded, the adapter checked and merged
      weight by weight (W + s * B @ A, float32 sum); the forward is the plain model's.
  delta:  the base loaded, the adapter attached unmerged (``lora.attach_adapter(..., lora_mode="delta")``): the
      attention / MLP projections compute x W^T + s (x A^T) B^T; no W' exists.
A pair (the reference = the adapter's base, then the policy; the forward timed is the policy's):
  pair_separate:     the policy loaded on its own (the base read a second time) and merged;
  pair_shared_merge: the policy over the reference's arrays (``base_model=``), adapted weights merged (new arrays);
  pair_shared_delta: the policy over the reference's arrays, the adapter unmerged (only A and B are new).
The CLI does the shared forms when ``--policy ADAPTER`` has ``--reference`` as its base (``--lora-mode``).

Each (adapter, mode) runs in its own subprocess so that its peak resident memory (ru_maxrss) is its own.
Printed and written (--out, atomic JSON): base load seconds, adapter seconds (read + check, and the merge
for ``merged``), forward seconds per batch (compiled, median of --reps), first-call seconds (compile + run),
peak RSS, adapter parameters; the delta worker also times the merged and the delta forward alternately in
one process (the ratio is robust to a shared machine's load, the separate-process times are not). Adapters (random, nonzero B):
``all``: r=16 on every linear module of the 30 layers (a typical TRL/PEFT recipe); ``top4``: r=8 on
q/k/v/o of the top 4 layers (a cheap RL adapter).

    .venv/bin/python experiments/bench_lora.py [--batch 4] [--length 128] [--dtype float32] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


def make_adapter(kind: str, out: pathlib.Path) -> None:
    import jax
    import numpy as np

    from bench_scoring import smollm2_gguf
    from pa_jax.models import ModelConfig, gguf, lora

    hf, _ = gguf.load_gguf(smollm2_gguf())
    cfg = ModelConfig.from_hf_dict(hf)
    if kind == "all":
        lp = lora.init_lora(cfg, "all-linear", 16, jax.random.key(0))
    else:
        lp = lora.init_lora(cfg, ["q_proj", "k_proj", "v_proj", "o_proj"], 8, jax.random.key(0),
                            layers=range(cfg.num_layers - 4, cfg.num_layers))
    rng = np.random.default_rng(0)
    lp = {p: {"A": np.asarray(v["A"]), "B": rng.normal(0, 0.01, v["B"].shape).astype(np.float32)} for p, v in lp.items()}
    lora.write_peft_adapter(out, lp, cfg, lora_alpha=16, base_model_name_or_path=str(smollm2_gguf()))


PAIR_MODES = ("pair_separate", "pair_shared_merge", "pair_shared_delta")


def worker(mode: str, adapter: str, batch: int, length: int, dtype: str, reps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from bench_scoring import smollm2_gguf
    from pa_jax import models
    from pa_jax.models import lora

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    cfg, model = models.load(smollm2_gguf(), dtype=dtype)
    jax.block_until_ready(nnx.state(model))
    base_load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_lora = None
    if mode == "pair_separate":  # the reference above, and the policy loaded on its own (base read again), merged
        _, model = models.load(adapter, base=smollm2_gguf(), dtype=dtype)
    elif mode in ("pair_shared_merge", "pair_shared_delta"):  # the policy over the reference's own arrays
        _, model = models.load(adapter, dtype=dtype, base_model=(cfg, model),
                               lora_mode="merge" if mode == "pair_shared_merge" else "delta")
    elif mode != "base":  # read + check the adapter; merged: W + s*B@A per weight; delta: attached unmerged
        ad = lora.read_peft_adapter(adapter, cfg)
        n_lora = sum(int(np.prod(v.shape)) for d in ad.params.values() for v in d.values())
        if mode == "merged":
            lora.merge_adapter(model, ad, donate=True)
        else:
            lora.attach_adapter(model, ad, lora_mode="delta")
    graphdef, state = nnx.split(model)
    jax.block_until_ready(state)
    adapter_s = time.perf_counter() - t0

    @jax.jit
    def fwd(state, ids, mask):  # the (policy) model's final hidden states of every position
        return nnx.merge(graphdef, state)(ids, mask).astype(jnp.float32).sum()

    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, length)), jnp.int32)
    mask = jnp.ones_like(ids)
    t0 = time.perf_counter()
    jax.block_until_ready(fwd(state, ids, mask))
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fwd(state, ids, mask))
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # before the merged copy below
    speed = {}
    if mode == "delta":  # forward speed, same process, alternating: a merged copy vs the unmerged delta
        _, mm = models.load(adapter, base=smollm2_gguf(), dtype=dtype)
        gm, sm = nnx.split(mm)
        fm = jax.jit(lambda st, ids, mask: nnx.merge(gm, st)(ids, mask).astype(jnp.float32).sum())
        jax.block_until_ready(fm(sm, ids, mask))
        tm, td = [], []
        for _ in range(reps):
            for arr, f, st in ((tm, fm, sm), (td, fwd, state)):
                t0 = time.perf_counter()
                jax.block_until_ready(f(st, ids, mask))
                arr.append(time.perf_counter() - t0)
        speed = {"alternating_forward_s_merged": statistics.median(tm), "alternating_forward_s_delta": statistics.median(td),
                 "delta_over_merged": statistics.median(td) / statistics.median(tm)}
    return {"mode": mode, "base_load_s": base_load_s, "adapter_s": adapter_s, **speed, "first_forward_s": first_s, "forward_s_median": statistics.median(times),
            "forward_s_all": times, "peak_rss_gib": peak,
            "rss_before_load_gib": rss0 / 2**20, "lora_params": n_lora}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--adapters", nargs="+", default=["all", "top4"], choices=["all", "top4"])
    ap.add_argument("--modes", nargs="+", default=None, choices=["base", "merged", "delta", *PAIR_MODES],
                    help="modes to run (default: all of them for 'all', all but base for 'top4')")
    ap.add_argument("--out", default=None)
    ap.add_argument("--_worker", nargs=2, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._worker:
        print(json.dumps(worker(a._worker[0], a._worker[1], a.batch, a.length, a.dtype, a.reps)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in a.adapters:
            ad = pathlib.Path(tmp) / kind
            make_adapter(kind, ad)
            size = sum(f.stat().st_size for f in ad.iterdir())
            default = ("base", "merged", "delta", *PAIR_MODES) if kind == "all" else ("merged", "delta", *PAIR_MODES)
            for mode in a.modes or default:
                cmd = [sys.executable, __file__, "--_worker", mode, str(ad), "--batch", str(a.batch), "--length",
                       str(a.length), "--dtype", a.dtype, "--reps", str(a.reps)]
                res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
                res.update(adapter=kind if mode != "base" else None, adapter_bytes=size if mode != "base" else None)
                rows.append(res)
                msg = (f"{res['adapter'] or '-':5s} {mode:17s} base load {res['base_load_s']:6.2f} s  adapter "
                       f"{res['adapter_s']:5.2f} s  first fwd {res['first_forward_s']:6.2f} s  fwd {res['forward_s_median']:.3f} s  "
                       f"peak RSS {res['peak_rss_gib']:.2f} GiB")
                if "delta_over_merged" in res:
                    msg += f"  alternating fwd delta/merged {res['delta_over_merged']:.2f}"
                print(msg, flush=True)
    from pa_jax.models.dtype import cpu_record

    out = {"cpu": cpu_record(), "batch": a.batch, "length": a.length, "dtype": a.dtype, "reps": a.reps, "rows": rows,
           "load_average": os.getloadavg(), "cpus": os.cpu_count()}
    if a.out:
        from pa_jax.io import atomic_write_json

        atomic_write_json(a.out, out)


if __name__ == "__main__":
    main()
