"""Peak memory of a lazy disk merge (pa_jax.merging.merge_checkpoints) against one model's size.

Makes two random float32 checkpoints of the same layout (HF safetensors directories, ``--model-mb`` each)
in a temp directory, then merges them with each method in a fresh subprocess and reads that process's peak
resident set size (``ru_maxrss``). A baseline subprocess imports the same modules and merges a tiny pair
(JAX runtime, compiled kernels), so ``peak - baseline`` is what the merge itself held. The claim checked:

    peak - baseline  <=  one model's size + the largest tensor   (ratio printed; < 1 means it holds)

(an eager merge holds both sources and the output: ~3 models). Results go to
``docs/results/bench/bench_merge_memory.json`` (atomic write) with the CPU model (lscpu).

    python experiments/bench_merge_memory.py [--model-mb 300] [--methods linear,ties,dare_ties,emr]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def layout(model_mb: float) -> dict[str, tuple[int, ...]]:
    """A llama-like tensor layout of about ``model_mb`` MB in float32: an embedding and an unembedding
    (the largest tensors), then blocks of q/k/v/o + gate/up/down + two norms of width d."""
    d, vocab = 1024, 16384  # embedding 64 MiB
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, d), "lm_head.weight": (vocab, d),
                                          "model.norm.weight": (d,)}
    per_layer = (4 * d * d + 3 * d * (2 * d) + 2 * d) * 4
    budget = model_mb * 2**20 - 2 * vocab * d * 4
    for i in range(max(1, int(budget // per_layer))):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{n}.weight"] = (d, d)
        shapes[p + "mlp.gate_proj.weight"] = (2 * d, d)
        shapes[p + "mlp.up_proj.weight"] = (2 * d, d)
        shapes[p + "mlp.down_proj.weight"] = (d, 2 * d)
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
    return shapes


def make_checkpoint(path: pathlib.Path, shapes: dict, seed: int, base: pathlib.Path | None = None) -> None:
    """A random float32 checkpoint (config.json + model.safetensors), streamed tensor by tensor: N(0, 0.02^2)
    entries, or ``base``'s tensors plus N(0, 0.002^2) noise (a fine-tuned sibling)."""
    from pa_jax.io import atomic_write_json
    from pa_jax.models.load import write_safetensors_streaming
    from pa_jax.models.load import open_safetensors_dir

    rng = np.random.default_rng(seed)
    src = open_safetensors_dir(base) if base is not None else None

    def produce(name):
        noise = rng.standard_normal(shapes[name], dtype=np.float32)
        return noise * np.float32(0.02) if src is None else src[name].read() + noise * np.float32(0.002)

    path.mkdir(parents=True, exist_ok=True)
    write_safetensors_streaming(path / "model.safetensors", {k: (s, np.float32) for k, s in shapes.items()}, produce)
    atomic_write_json(path / "config.json", {"model_type": "llama", "architectures": ["LlamaForCausalLM"]})


CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
import pa_jax.merging as M
ref, pol, out, method, extra = sys.argv[1:6]
kw = {{}} if method == "linear" else {{"extra_policies": [extra]}} if extra != "-" else {{}}
t = time.perf_counter()
M.merge_checkpoints(ref, pol, out, 0.5, method, **kw)
wall = time.perf_counter() - t
print(json.dumps({{"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "wall_s": wall}}))
"""


def run_child(ref, pol, out, method, extra="-") -> dict:
    code = CHILD.format(root=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code, str(ref), str(pol), str(out), method, str(extra)],
                       capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if r.returncode != 0:
        raise RuntimeError(f"merge subprocess failed ({method}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_size(model_mb: float, methods: list[str]) -> dict:
    """Make the checkpoints of one size in a temp dir and measure every method's merge."""
    shapes = layout(model_mb)
    model_bytes = sum(int(np.prod(s)) * 4 for s in shapes.values())
    largest = max(int(np.prod(s)) * 4 for s in shapes.values())
    res = {"model_mb_asked": model_mb, "model_bytes": model_bytes, "largest_tensor_bytes": largest,
           "n_tensors": len(shapes), "methods": {}}
    with tempfile.TemporaryDirectory(prefix="bench_merge_") as tmp:
        tmp = pathlib.Path(tmp)
        t = time.perf_counter()
        make_checkpoint(tmp / "ref", shapes, 0)
        make_checkpoint(tmp / "pol", shapes, 1, base=tmp / "ref")
        make_checkpoint(tmp / "ex", shapes, 2, base=tmp / "ref")
        res["make_s"] = time.perf_counter() - t
        tiny = {"model.embed_tokens.weight": (64, 32), "model.norm.weight": (32,)}
        make_checkpoint(tmp / "tref", tiny, 0)
        make_checkpoint(tmp / "tpol", tiny, 1, base=tmp / "tref")
        make_checkpoint(tmp / "tex", tiny, 2, base=tmp / "tref")
        for method in methods:
            extra = "-" if method == "linear" else None
            base = run_child(tmp / "tref", tmp / "tpol", tmp / "tout", method, extra or tmp / "tex")
            run = run_child(tmp / "ref", tmp / "pol", tmp / "out", method, extra or tmp / "ex")
            inc = (run["maxrss_kib"] - base["maxrss_kib"]) * 1024
            members = 1 if method == "linear" else 2
            res["methods"][method] = {
                "members": members,
                "baseline_maxrss_bytes": base["maxrss_kib"] * 1024,
                "merge_maxrss_bytes": run["maxrss_kib"] * 1024,
                "merge_increment_bytes": inc,
                "ratio_increment_to_model_plus_largest": inc / (model_bytes + largest),
                "ratio_increment_to_model": inc / model_bytes,
                "wall_s": run["wall_s"],
            }
            print(f"{method:12s} members={members} peak {run['maxrss_kib'] / 2**10:8.1f} MiB, baseline "
                  f"{base['maxrss_kib'] / 2**10:7.1f} MiB, increment {inc / 2**20:7.1f} MiB = "
                  f"{inc / (model_bytes + largest):.3f} x (model {model_bytes / 2**20:.0f} MiB + largest tensor "
                  f"{largest / 2**20:.0f} MiB); {run['wall_s']:.1f} s", flush=True)
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-mb", default="300,1200",
                    help="comma list of checkpoint sizes in MB, one run each (default 300,1200: the same largest "
                         "tensor, 4x the model)")
    ap.add_argument("--methods", default="linear,ties,dare_ties,emr")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "bench" / "bench_merge_memory.json"))
    args = ap.parse_args(argv)
    try:
        sizes = [float(x) for x in args.model_mb.split(",")]
    except ValueError:
        raise SystemExit(f"--model-mb: expected a comma list of numbers, got {args.model_mb!r}") from None
    if not sizes or any(x <= 0 for x in sizes):
        raise SystemExit("--model-mb must be positive")
    methods = [m for m in args.methods.split(",") if m]
    from pa_jax.io import atomic_write_json
    from pa_jax.merging import MERGE_METHODS

    bad = [m for m in methods if m not in MERGE_METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; expected a subset of {MERGE_METHODS}")
    res = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(), "dtype": "float32",
           "alpha": 0.5, "runs": []}
    for size in sizes:
        res["runs"].append(run_size(size, methods))
    atomic_write_json(args.out, res)
    print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
