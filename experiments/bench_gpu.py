"""GPU scoring bench (issue 21, part 4): a 1B-scale random policy/reference pair, 8k-token rows, pa-jax's
scoring engine vs a careful transformers + PyTorch SDPA scorer, on the same GPU in the same script.

The pair: two randomly initialized Llama-3.2-1B-shaped models (16 layers, D=2048, 32/8 heads, V=128,256,
tied embeddings; seeds 0 and 1), made by transformers and saved as safetensors; both sides load the same
files in bfloat16. The workload: ``--rows`` trajectories of ``--length`` tokens that share a
``--prefix``-token system prompt (as N rollouts of one task do); every second block of 256 tokens after
the prefix is an agent action whose tokens are scored (half of the suffix). Each side computes, for both
models, the log-prob of every scored token and the top-20 log-prob mean at it (pa-jax also the KL and
entropy statistics of its fused head).

* pa-jax: ``pa_jax.scoring.score_rendered`` (prefix computed once per model, rows in chunks writing K/V,
  fused head at the scored positions only), in ``--variants`` (attention implementation: "cudnn", the
  default on CUDA GPUs, or XLA's "dense"; attention chunk and other ScoringOptions).
* PyTorch "careful": ``model.model`` (SDPA) runs the prefix once per model; its KV cache is repeated over a
  batch of ``--torch-batch`` rows; the LM head only at the scored positions, float32 log_softmax + top-k.

Per side: the first call (compilation, warm-up) is excluded; the median of ``--repeats`` timed calls is
reported as tokens/s (tokens of all rows, counted once per pair), TFLOP/s and MFU = model FLOPs / time /
peak, with the FLOPs counted for the work that is needed (per model: the prefix once, each row's suffix
with attention to prefix + causal suffix, and the head at the scored positions), the peak being the
datasheet's dense bf16 989 TFLOP/s (and, for reference, the 790 measured on one such machine here).
Each side runs in its own subprocess so that peak device memory is its own.

    python experiments/bench_gpu.py --out docs/results/bench/gpu_h200.json     # on a GPU machine
    python experiments/bench_gpu.py --tiny                                     # CPU smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_DATASHEET = {"h200": 989.0, "h100": 989.0, "a100": 312.0}
PEAK_MEASURED_H200 = 790.0  # .library/device/KINDS.md: 8192^3 bf16 matmul through PyTorch on one H200 here

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                max_position_embeddings=16384, tie_word_embeddings=True, rope_theta=500000.0)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=2048,
            tie_word_embeddings=True, rope_theta=10000.0)


def workload(rows: int, length: int, prefix: int, vocab: int, block: int = 256):
    """Rendered rows sharing ``prefix`` tokens; after it, every second ``block`` of tokens is a scored action."""
    import numpy as np

    from pa_jax.data.render import Rendered, Truncation

    rng = np.random.default_rng(0)
    head = rng.integers(3, vocab, prefix).astype(np.int32)
    out = []
    for r in range(rows):
        ids = np.concatenate([head, rng.integers(3, vocab, length - prefix).astype(np.int32)])
        steps = np.full(length, -1, np.int32)
        k = 0
        for s in range(prefix + block, length, 2 * block):
            steps[s:s + block] = k
            k += 1
        out.append(Rendered(f"row{r}", ids, steps, k, Truncation(length, length, 0, 0, 0)))
    return out


def scored_positions(rendered) -> int:
    return int(sum((r.step_ids[1:] >= 0).sum() for r in rendered))


def model_flops(cfg: dict, rendered, prefix: int) -> float:
    """FLOPs of the needed work for ONE model: 2 * matmul params * tokens (prefix once, every suffix), attention
    4 * L * H * d * (causal pairs + suffix x prefix pairs), and the head 2 * D * V at each scored position."""
    L, D, H, KV, d = (cfg[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                        "num_key_value_heads", "head_dim"))
    per_tok = L * (D * (H + 2 * KV) * d + H * d * D + 3 * D * cfg["intermediate_size"])
    tokens = prefix + sum(len(r) - prefix for r in rendered)
    pairs = prefix * prefix / 2 + sum((len(r) - prefix) ** 2 / 2 + (len(r) - prefix) * prefix for r in rendered)
    return 2.0 * per_tok * tokens + 4.0 * L * H * d * pairs + 2.0 * D * cfg["vocab_size"] * scored_positions(rendered)


def make_pair(cfg: dict, out: pathlib.Path) -> list[str]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    paths = []
    for seed in (0, 1):
        p = out / f"model{seed}"
        if not (p / "config.json").exists():
            torch.manual_seed(seed)
            with torch.device(dev):
                m = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.bfloat16)
            m.save_pretrained(p)
            del m
        paths.append(str(p))
    return paths


# ---------------------------------------------------------------------------------------------- workers
def jax_worker(a: dict) -> dict:
    import jax
    import numpy as np

    from pa_jax.models import load
    from pa_jax.scoring import ScoringOptions, score_rendered

    rendered = workload(a["rows"], a["length"], a["prefix"], a["cfg"]["vocab_size"])
    pol, ref = load(a["paths"][0], dtype="bfloat16"), load(a["paths"][1], dtype="bfloat16")
    o = dict(a.get("options", {}))
    impl = o.pop("attention_impl", None)
    if impl:  # the decoder's attention implementation (pa_jax.models.decoder.resolve_attention_impl)
        for _, m in (pol, ref):
            m.attention_impl = impl
    opts = ScoringOptions(**o)
    t0 = time.perf_counter()
    res = score_rendered(rendered, pol, ref, options=opts)
    first = time.perf_counter() - t0
    secs = []
    for _ in range(a["repeats"]):
        t0 = time.perf_counter()
        res = score_rendered(rendered, pol, ref, options=opts)
        secs.append(time.perf_counter() - t0)
    profile = None
    if a.get("profile"):  # one more call under jax.profiler: where the device time goes
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            with jax.profiler.trace(d, create_perfetto_trace=True):
                score_rendered(rendered, pol, ref, options=opts)
            profile = summarize_trace(next(pathlib.Path(d).rglob("perfetto_trace.json.gz")),
                                      time.perf_counter() - t0)
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    return {"side": "pa-jax", "options": a.get("options", {}), "first_call_s": first, "seconds": secs,
            "profile": profile,
            "peak_device_gib": stats.get("peak_bytes_in_use", float("nan")) / 2**30, "device": dev.device_kind,
            "jax": jax.__version__, "batches": len(res.plan.batches), "prefix_tokens": res.plan.prefix_length,
            "policy_logprob_head": [float(x) for x in np.concatenate([s.policy_logprob for s in res.stats])[:4096]],
            "max_abs_log_ratio": float(max(np.nanmax(np.abs(s.policy_logprob - s.reference_logprob))
                                           for s in res.stats))}


def summarize_trace(path: pathlib.Path, wall_s: float, top: int = 30) -> dict:
    """Device kernels of a perfetto trace by total duration (summed over streams), the device's busy time
    (the union of kernel intervals) against the call's wall time, and the host's top events."""
    import collections
    import gzip

    ev = json.load(gzip.open(path))
    ev = ev["traceEvents"] if isinstance(ev, dict) else ev
    names = {e["pid"]: e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = {pid for pid, n in names.items() if "/device:" in n}
    kernels, host = collections.Counter(), collections.Counter()
    counts = collections.Counter()
    intervals = []
    for e in ev:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        if e["pid"] in device:
            kernels[e["name"]] += e["dur"]
            counts[e["name"]] += 1
            intervals.append((e["ts"], e["ts"] + e["dur"]))
        else:
            host[e["name"]] += e["dur"]
    busy, end = 0.0, -1e30
    for s, t in sorted(intervals):
        if t > end:
            busy += t - max(s, end)
            end = t
    return {"wall_s": wall_s, "device_busy_s": busy / 1e6, "device_processes": sorted(names[p] for p in device),
            "kernels_ms": [[n[:160], round(d / 1e3, 2), counts[n]] for n, d in kernels.most_common(top)],
            "host_ms": [[n[:160], round(d / 1e3, 2)] for n, d in host.most_common(top)]}


def torch_worker(a: dict) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rendered = workload(a["rows"], a["length"], a["prefix"], a["cfg"]["vocab_size"])
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                   local_files_only=True).to(dev).eval() for p in a["paths"]]
    P, B = a["prefix"], a["torch_batch"]

    def score(model):
        body, head = model.get_decoder(), model.get_output_embeddings()
        out = []
        with torch.no_grad():
            ids0 = torch.as_tensor(rendered[0].input_ids[None, :P].astype(np.int64), device=dev)
            pre = body(input_ids=ids0, use_cache=True).past_key_values
            for i in range(0, len(rendered), B):
                grp = rendered[i:i + B]
                import copy
                cache = copy.deepcopy(pre)
                if len(grp) > 1:
                    cache.batch_repeat_interleave(len(grp))
                ids = torch.as_tensor(np.stack([r.input_ids[P:] for r in grp]).astype(np.int64), device=dev)
                h = body(input_ids=ids, past_key_values=cache, use_cache=True).last_hidden_state
                for j, r in enumerate(grp):
                    q = np.flatnonzero(r.step_ids[1:] >= 0)
                    rows = torch.as_tensor(q - P, device=dev)
                    lp = torch.log_softmax(head(h[j, rows]).float(), dim=-1)
                    tgt = torch.as_tensor(r.input_ids[q + 1].astype(np.int64), device=dev)
                    out.append((lp.gather(1, tgt[:, None])[:, 0], lp.topk(20, dim=-1).values.mean(-1)))
                del h, cache
        return out

    def both():
        res = [score(m) for m in models]
        if dev == "cuda":
            torch.cuda.synchronize()
        return res

    t0 = time.perf_counter()
    res = both()
    first = time.perf_counter() - t0
    secs = []
    for _ in range(a["repeats"]):
        t0 = time.perf_counter()
        res = both()
        secs.append(time.perf_counter() - t0)
    pol = torch.cat([x[0] for x in res[0]]).float().cpu().numpy()
    return {"side": "torch-careful", "torch_batch": B, "first_call_s": first, "seconds": secs,
            "peak_device_gib": (torch.cuda.max_memory_allocated() / 2**30) if dev == "cuda" else float("nan"),
            "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
            "attn_implementation": models[0].config._attn_implementation,
            "policy_logprob_head": [float(x) for x in pol[:4096]]}


def run_worker(kind: str, a: dict, timeout: int) -> dict:
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
    try:
        p = subprocess.run([sys.executable, __file__, "--worker", kind, json.dumps(a)], capture_output=True,
                           text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"side": kind, "error": f"timed out after {timeout} s"}
    if p.returncode != 0:
        return {"side": kind, "error": p.stderr[-3000:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--torch-batch", type=int, default=4)
    ap.add_argument("--variants", default='[{"attention_impl": "cudnn", "attention_chunk": 512}, '
                    '{"attention_impl": "cudnn", "attention_chunk": 2048}, {"attention_impl": "dense", "attention_chunk": 512}]',
                    help="JSON list of pa-jax option sets (ScoringOptions fields, plus attention_impl)")
    ap.add_argument("--timeout", type=int, default=240, help="per worker")
    ap.add_argument("--profile", action="store_true",
                    help="profile one more call of the first pa-jax variant (device kernels by time, busy fraction)")
    ap.add_argument("--tiny", action="store_true", help="tiny config, short rows (CPU smoke test)")
    ap.add_argument("--models", default="/tmp/pa_jax_bench_gpu", help="where the random pair is written")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, a = args.worker[0], json.loads(args.worker[1])
        print(json.dumps((jax_worker if kind == "jax" else torch_worker)(a)))
        return
    cfg = TINY if args.tiny else LLAMA_1B
    if args.tiny:
        args.rows, args.length, args.prefix = min(args.rows, 4), min(args.length, 1024), min(args.prefix, 128)
    t0 = time.time()
    paths = make_pair(cfg, pathlib.Path(args.models) / ("tiny" if args.tiny else "llama1b"))
    print(f"pair written in {time.time() - t0:.0f} s", flush=True)
    rendered = workload(args.rows, args.length, args.prefix, cfg["vocab_size"])
    flops = 2 * model_flops(cfg, rendered, args.prefix)
    tokens = sum(len(r) for r in rendered)
    base = dict(cfg=cfg, paths=paths, rows=args.rows, length=args.length, prefix=args.prefix, repeats=args.repeats,
                torch_batch=args.torch_batch)
    results = []
    for i, variant in enumerate(json.loads(args.variants)):
        results.append(run_worker("jax", dict(base, options=variant, profile=args.profile and i == 0), args.timeout))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "policy_logprob_head"}), flush=True)
    results.append(run_worker("torch", base, args.timeout))
    print(json.dumps({k: v for k, v in results[-1].items() if k != "policy_logprob_head"}), flush=True)
    dev = next((r.get("device") for r in results if "device" in r), "?")
    peak = next((v for k, v in PEAK_DATASHEET.items() if k in str(dev).lower()), None)
    torch_row = results[-1]
    for r in results:
        if "seconds" not in r:
            continue
        s = sorted(r["seconds"])[len(r["seconds"]) // 2]
        r.update(median_s=s, tokens_per_s=tokens / s, tflops_per_s=flops / s / 1e12)
        if peak:
            r.update(mfu_datasheet=flops / s / (peak * 1e12), mfu_measured_peak=flops / s / (PEAK_MEASURED_H200 * 1e12))
    for r in results:
        if "median_s" in r and "median_s" in torch_row and r is not torch_row:
            r["speedup_vs_torch_careful"] = torch_row["median_s"] / r["median_s"]
            import numpy as np

            a_, b_ = np.asarray(r["policy_logprob_head"]), np.asarray(torch_row["policy_logprob_head"])
            n = min(len(a_), len(b_))
            r["max_abs_diff_vs_torch_first_4096"] = float(np.max(np.abs(a_[:n] - b_[:n]))) if n else None
    for r in results:
        r.pop("policy_logprob_head", None)
    summary = {"workload": {"rows": args.rows, "length": args.length, "shared_prefix": args.prefix,
                            "tokens": tokens, "scored_positions": scored_positions(rendered),
                            "model_flops_pair": flops, "config": cfg},
               "peak_tflops_datasheet": peak, "peak_tflops_measured_here": PEAK_MEASURED_H200, "results": results,
               "command": "python experiments/bench_gpu.py " + " ".join(sys.argv[1:])}
    print(json.dumps(summary, indent=1))
    if args.out:
        from pa_jax.io import atomic_write_json

        atomic_write_json(args.out, summary)


if __name__ == "__main__":
    main()
