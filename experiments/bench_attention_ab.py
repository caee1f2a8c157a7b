"""Blocked attention of an earlier revision against the working tree's, in one process, calls alternating.

Loads ``pa_jax/models/layers.py`` as it was at --base (``git show``) beside the working tree's module and
times ``blocked_attention`` of each on the same inputs (float32, SmolLM2's 9 query / 3 KV heads of 64):
T keys, the last T - P of them queries (P > 0: a chunk at the end of a cached buffer, as the scoring
engine runs long rows). Checks both give the same output (atol 1e-5), then alternates old / new --rounds
times and prints the median times and the ratio old / new with its range.

    python experiments/bench_attention_ab.py --base c9beeee --tokens 5120 --offset 0 --rounds 7
    python experiments/bench_attention_ab.py --base c9beeee --tokens 5120 --offset 4608 --rounds 15
"""
from __future__ import annotations

import argparse
import importlib.util
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="git revision whose layers.py is the 'old' side")
    ap.add_argument("--tokens", type=int, default=5120, help="keys T")
    ap.add_argument("--offset", type=int, default=0, help="cached keys P before the T - P queries")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    if not 0 <= args.offset < args.tokens:
        ap.error(f"--offset must be in [0, --tokens), got {args.offset} with --tokens {args.tokens}")

    import jax
    import jax.numpy as jnp
    import numpy as np

    import pa_jax.models.layers as new

    try:
        src = subprocess.run(["git", "show", f"{args.base}:pa_jax/models/layers.py"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as e:
        sys.exit(f"--base {args.base}: git show failed: {e.stderr.strip()}")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("layers_base", f.name)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    pathlib.Path(f.name).unlink()

    t, p, n, k, hd = args.tokens, args.offset, 9, 3, 64
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, t - p, n, hd)), jnp.float32)
    kk, vv = (jnp.asarray(rng.standard_normal((1, t, k, hd)), jnp.float32) for _ in range(2))
    pos = jnp.arange(t)[None]
    fns = {}
    for name, mod in (("old", old), ("new", new)):
        ms = mod.MaskSpec(p, jnp.ones((1, t), bool), pos[:, p:], pos)
        fns[name] = jax.jit(lambda q, k, v, mod=mod, ms=ms: mod.blocked_attention(q, k, v, ms, scale=hd ** -0.5))
        fns[name](q, kk, vv).block_until_ready()  # compile
    np.testing.assert_allclose(np.asarray(fns["old"](q, kk, vv)), np.asarray(fns["new"](q, kk, vv)), atol=1e-5)
    times = {"old": [], "new": []}
    for _ in range(args.rounds):
        for name in ("old", "new"):
            t0 = time.perf_counter()
            fns[name](q, kk, vv).block_until_ready()
            times[name].append(time.perf_counter() - t0)
    r = sorted(a / b for a, b in zip(times["old"], times["new"]))
    from pa_jax.models.dtype import cpu_record

    print(f"{cpu_record()['model_name']}; T={t} P={p}: old ({args.base}) {np.median(times['old']) * 1e3:.0f} ms, "
          f"new {np.median(times['new']) * 1e3:.0f} ms; old/new median {np.median(r):.3f} range [{r[0]:.3f}, {r[-1]:.3f}]")


if __name__ == "__main__":
    main()
