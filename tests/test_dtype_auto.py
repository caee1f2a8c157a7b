"""--dtype auto: the measured per-platform rule (pa_jax.models.dtype) on fake /proc/cpuinfo texts."""
import argparse

import pytest

from pa_jax.models.dtype import auto_dtype, cpu_record, parse_cpuinfo, resolve_dtype

ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 avx512_vnni

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 avx512_vnni
"""
XEON_BF16 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 avx512_vnni
"""
EPYC_AVX2 = ZEN4.replace(" avx512f avx512_bf16 avx512_vnni", "")
XEON_AMX = XEON_BF16.replace("avx512_vnni", "avx512_vnni amx_bf16 amx_tile amx_int8")
ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 bf16
CPU implementer\t: 0x41
"""


def test_parse_cpuinfo_fields():
    info = parse_cpuinfo(ZEN4)
    assert info["vendor"] == "AuthenticAMD"
    assert info["model_name"] == "AMD EPYC 9R14 96-Core Processor"
    assert {"avx512f", "avx512_bf16"} <= info["flags"] and "amx_bf16" not in info["flags"]
    assert info["cores"] == 2
    arm = parse_cpuinfo(ARM)
    assert arm["vendor"] == "" and "bf16" in arm["flags"] and arm["cores"] == 1
    assert parse_cpuinfo("") == {"vendor": "", "model_name": "", "flags": frozenset(), "cores": 0}


@pytest.mark.parametrize("text,expected", [
    (ZEN4, "bfloat16"),             # measured: bf16 288 vs f32 191 tokens/s
    (EPYC_AVX2, "float32"),         # measured: f32 317 vs bf16 174 tokens/s on 2,048-token rows
    (XEON_BF16, "float32"),         # measured: bf16 155 vs f32 262 tokens/s, despite avx512_bf16
    (XEON_AMX, "bfloat16"),         # AMX bf16 tiles
    (ARM, "float32"),               # unmeasured: the exact choice
    ("", "float32"),
])
def test_auto_dtype_cpu(text, expected):
    dtype, reason = auto_dtype("cpu", parse_cpuinfo(text))
    assert dtype == expected and reason


def test_avx512_bf16_alone_does_not_decide():
    # the same flag set under two vendors gives opposite choices (the Intel regression of issue 21)
    amd = parse_cpuinfo(ZEN4)
    intel = {**amd, "vendor": "GenuineIntel"}
    assert auto_dtype("cpu", amd)[0] == "bfloat16" and auto_dtype("cpu", intel)[0] == "float32"


@pytest.mark.parametrize("plat", ["gpu", "cuda", "tpu", "rocm"])
def test_auto_dtype_accelerators(plat):
    assert auto_dtype(plat, parse_cpuinfo(XEON_BF16))[0] == "bfloat16"


def test_resolve_dtype_and_errors():
    assert resolve_dtype("float32") == ("float32", "given")
    assert resolve_dtype("auto", "cpu", parse_cpuinfo(XEON_BF16))[0] == "float32"
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("float16")
    with pytest.raises(ValueError, match="unknown platform 'metal'"):
        auto_dtype("metal", {})


def test_cpu_record_keeps_deciding_flags():
    rec = cpu_record(parse_cpuinfo(XEON_AMX))
    assert rec["vendor"] == "GenuineIntel" and rec["cores_cpuinfo"] == 1
    assert {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"} <= set(rec["flags"]) and "fpu" not in rec["flags"]


def test_cli_default_is_auto():
    from pa_jax.commands._common import add_common_arguments

    p = argparse.ArgumentParser()
    add_common_arguments(p)
    args = p.parse_args(["--policy", "x", "--data", "y"])
    assert args.dtype == "auto"
    assert p.parse_args(["--policy", "x", "--data", "y", "--dtype", "float32"]).dtype == "float32"


def test_cli_resolves_auto_once_and_records_rule():
    from pa_jax.commands._common import resolve_dtype_arg
    from pa_jax.models.dtype import DTYPES

    args = argparse.Namespace(dtype="auto")
    resolve_dtype_arg(args)
    assert args.dtype in DTYPES and args.dtype_requested == "auto" and args.dtype_rule
    given = argparse.Namespace(dtype="float32")
    resolve_dtype_arg(given)
    assert vars(given) == {"dtype": "float32"}
