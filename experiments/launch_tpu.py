"""Score a (policy, reference) pair on a TPU pod slice or a multi-GPU / multi-host machine.

Run the *same* command on every host (one process per host); on TPU ``jax.distributed.initialize()``
needs no arguments (the TPU runtime tells each process its peers). Every process builds the same
('data', 'model') mesh over all global devices, loads both checkpoints sharded (each device reads only
its own slice of each tensor), feeds the same global batch (batch over 'data') and computes the
per-token log-ratio log pi_theta - log pi_ref through the fused head. Process 0 writes the result.

    # TPU pod slice (e.g. v5p-16: 2 hosts x 4 chips), from your workstation:
    gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command \\
      "cd pa-jax && python experiments/launch_tpu.py --policy /gcs-fuse/policy --reference /gcs-fuse/ref \\
         --model-parallel 4 --out /tmp/scores.npz"

    # several GPU hosts (one process per host, all local GPUs each):
    python experiments/launch_tpu.py --coordinator HOST0:1234 --num-processes 2 --process-id $RANK ...

    # one host, simulated devices (a dry run of the same code path on CPU):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/launch_tpu.py \\
      --policy pa_jax/assets/toy_pair/policy --reference pa_jax/assets/toy_pair/reference --no-distributed
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import numpy as np

from pa_jax.io import atomic_write_bytes


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policy", required=True, help="HF directory or .gguf of pi_theta")
    ap.add_argument("--reference", required=True, help="HF directory or .gguf of pi_ref")
    ap.add_argument("--texts", type=pathlib.Path, default=None, help="one text per line (default: a demo batch)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the policy's)")
    ap.add_argument("--seq", type=int, default=512, help="pad/truncate every row to this many tokens")
    ap.add_argument("--model-parallel", type=int, default=1, help="size of the 'model' (tensor-parallel) axis")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--coordinator", default=None, help="HOST:PORT (GPU/CPU clusters; TPUs find it themselves)")
    ap.add_argument("--num-processes", type=int, default=None)
    ap.add_argument("--process-id", type=int, default=None)
    ap.add_argument("--no-distributed", action="store_true", help="single process (no jax.distributed)")
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("scores.npz"))
    return ap.parse_args(argv)


def init_distributed(args) -> None:
    """``jax.distributed.initialize()``: no arguments on TPU pods; coordinator/ids elsewhere."""
    if args.no_distributed:
        return
    if args.coordinator is None:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(
            coordinator_address=args.coordinator, num_processes=args.num_processes, process_id=args.process_id
        )


def tokenize(args, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded [B, seq] ids and mask (identical on every process: same files, same tokenizer)."""
    from transformers import AutoTokenizer

    src = args.tokenizer or args.policy
    if str(src).endswith(".gguf"):
        from pa_jax.models.gguf import load_gguf_tokenizer

        tok = load_gguf_tokenizer(src)
    else:
        tok = AutoTokenizer.from_pretrained(src, local_files_only=True)  # a local path: never the hub
    ids = np.zeros((len(texts), args.seq), np.int32)
    mask = np.zeros_like(ids)
    for i, t in enumerate(texts):
        row = tok(t)["input_ids"][: args.seq]
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def main(argv=None) -> int:
    args = parse_args(argv)
    init_distributed(args)

    import pa_jax.models as M
    from jax.experimental import multihost_utils
    from pa_jax.models import sharding as S

    mesh = S.make_mesh(model=args.model_parallel)  # data = device_count // model_parallel
    sc = S.ShardingConfig(mesh)
    if jax.process_index() == 0:
        print(f"{jax.process_count()} processes, {jax.device_count()} devices, mesh {dict(mesh.shape)}", flush=True)

    texts = (args.texts.read_text().splitlines() if args.texts else
             ["The agent opened the drawer and found the key.", "The agent found the key drawer opened the."])
    data = mesh.shape[S.DATA]
    texts += [texts[-1]] * (-len(texts) % data)  # the batch must split evenly over 'data'
    ids, mask = tokenize(args, texts)

    pcfg, policy = M.load(args.policy, dtype=args.dtype, mesh=sc)
    rcfg, reference = M.load(args.reference, dtype=args.dtype, mesh=sc)
    with jax.set_mesh(mesh):
        x, m = S.shard_batch(ids, sc), S.shard_batch(mask, sc)
        lp_pi = M.token_logprobs(pcfg, policy, x, m)
        lp_ref = M.token_logprobs(rcfg, reference, x, m)
        ratio = args.beta * (lp_pi - lp_ref)  # per-token progress advantage A_t
        ratio = np.asarray(multihost_utils.process_allgather(ratio, tiled=True))
        lp_pi = np.asarray(multihost_utils.process_allgather(lp_pi, tiled=True))
    valid = (mask[:, 1:] * mask[:, :-1]).astype(bool)
    if jax.process_index() == 0:
        atomic_write_bytes(args.out, lambda f: np.savez(f, advantage=np.where(valid, ratio, 0.0),
                                                        policy_logprob=np.where(valid, lp_pi, 0.0), mask=valid))
        per_row = np.where(valid, ratio, 0.0).sum(1) / np.maximum(valid.sum(1), 1)
        for t, s in zip(texts, per_row):
            print(f"{s:+.4f}  {t[:70]}")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
