"""``--dtype auto``: the parameter / activation dtype that scores fastest on this platform (a measured rule).

Both choices accumulate matmuls and head statistics in float32; bfloat16 stores parameters and
activations in bfloat16 (per-token log-probs move by up to a few tenths of a nat, see bench_scoring.py's
``bf16_vs_f32``). Which one is *faster* depends on the CPU's XLA:CPU kernels, not on one cpuinfo flag.
"""
from __future__ import annotations

import pathlib
from typing import Mapping

DTYPES = ("bfloat16", "float32")
DTYPE_CHOICES = ("auto",) + DTYPES


def parse_cpuinfo(text: str) -> dict:
    """The first processor block of a /proc/cpuinfo text -> {"vendor", "model_name", "flags" (frozenset),
    "cores" (number of "processor" entries)}. Missing fields are "" / empty (e.g. non-x86 kernels)."""
    vendor, model, flags, cores = "", "", frozenset(), 0
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "processor":
            cores += 1
        elif key == "vendor_id" and not vendor:
            vendor = value
        elif key == "model name" and not model:
            model = value
        elif key in ("flags", "features") and not flags:  # "features" on arm64
            flags = frozenset(value.split())
    return {"vendor": vendor, "model_name": model, "flags": flags, "cores": cores}


def read_cpu_info(path: str | pathlib.Path = "/proc/cpuinfo") -> dict:
    """:func:`parse_cpuinfo` of ``path``; an unreadable file (non-Linux) gives the empty record."""
    try:
        text = pathlib.Path(path).read_text(errors="replace")
    except OSError:
        text = ""
    return parse_cpuinfo(text)


def auto_dtype(platform: str, cpu_info: Mapping) -> tuple[str, str]:
    """(dtype, reason) for ``--dtype auto``.

    Rule, from scoring the 10-trajectory airline workload (SmolLM2-135M pair, bench_scoring.py):

    * GPU / TPU (``platform`` "gpu", "cuda", "rocm", "tpu"): bfloat16 (the matrix units' native input type).
    * CPU, vendor AuthenticAMD with ``avx512_bf16`` (Zen 4): bfloat16. AMD EPYC (family 25, 2-core KVM guest):
      bf16 288 tokens/s vs f32 191.
    * CPU, AuthenticAMD without ``avx512_bf16`` (an EPYC guest that shows AVX2 and FMA, no AVX-512 flag):
      float32. Scoring one SmolLM2-135M row there (2,048 tokens): f32 317 tokens/s vs bf16 174 (no native
      bf16 dot: XLA converts); on short rows (bench_forward.py B=2 T=256) bf16 had led 198 vs 152, but the
      scorer's long rows are what a run spends its time on.
    * CPU, vendor GenuineIntel with ``amx_bf16``: bfloat16 (AMX tiles take bf16 natively; not yet measured
      here, the one untested branch of the rule).
    * CPU, GenuineIntel otherwise: float32. Intel Xeon, 2 cores, with avx512_bf16 but no AMX: bf16 155
      tokens/s vs f32 262. Note avx512_bf16 alone does not decide it: Zen 4 has it too and is fastest in bf16.
    * anything else (arm64, unknown vendor): float32, the exact choice where nothing was measured.
    """
    plat = platform.lower()
    if plat in ("gpu", "cuda", "rocm", "tpu"):
        return "bfloat16", f"{plat}: bfloat16 (native matrix-unit input)"
    if plat != "cpu":
        raise ValueError(f"auto_dtype: unknown platform {platform!r} (expected cpu, gpu, cuda, rocm or tpu)")
    vendor = str(cpu_info.get("vendor", ""))
    flags = cpu_info.get("flags", frozenset())
    if vendor == "AuthenticAMD":
        if "avx512_bf16" in flags:
            return "bfloat16", "cpu AuthenticAMD with avx512_bf16: bfloat16 (Zen 4 measured bf16 288 vs f32 191 tokens/s)"
        return "float32", ("cpu AuthenticAMD without avx512_bf16: float32 (EPYC AVX2 guest measured f32 317 vs "
                           "bf16 174 tokens/s on 2,048-token rows)")
    if vendor == "GenuineIntel":
        if "amx_bf16" in flags:
            return "bfloat16", "cpu GenuineIntel with amx_bf16: bfloat16 (AMX; not measured here)"
        return "float32", "cpu GenuineIntel without amx_bf16: float32 (Xeon avx512_bf16 measured bf16 155 vs f32 262)"
    return "float32", f"cpu vendor {vendor or 'unknown'!r}: float32 (no measurement)"


def resolve_dtype(dtype: str, platform: str | None = None, cpu_info: Mapping | None = None) -> tuple[str, str]:
    """(dtype, reason): ``dtype`` itself unless it is "auto", else :func:`auto_dtype` of the default JAX
    backend and /proc/cpuinfo."""
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {dtype!r}")
    if dtype != "auto":
        return dtype, "given"
    if platform is None:
        import jax

        platform = jax.default_backend()
    return auto_dtype(platform, read_cpu_info() if cpu_info is None else cpu_info)


def cpu_record(cpu_info: Mapping | None = None) -> dict:
    """What a results file records about the CPU: model, vendor, core count (os.cpu_count and cpuinfo),
    and the flags that decide matmul speed (avx512f, avx512_bf16, avx512_fp16, avx512_vnni, amx_*)."""
    import os

    info = read_cpu_info() if cpu_info is None else cpu_info
    flags = info.get("flags", frozenset())
    keep = sorted(f for f in flags if f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni",
                                            "avx_vnni") or f.startswith("amx"))
    return {"model_name": info.get("model_name", ""), "vendor": info.get("vendor", ""),
            "cores_cpuinfo": info.get("cores", 0), "os_cpu_count": os.cpu_count(), "flags": keep}
