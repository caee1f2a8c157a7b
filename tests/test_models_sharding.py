"""Sharded loading and forward on a ('data', 'model') mesh: 1 device, 8 simulated CPU devices, 2 processes.

The reference is the same checkpoint loaded without a mesh on this process's single CPU device. The
8-device and 2-process runs happen in subprocesses of their own (XLA_FLAGS must be set before JAX
starts; this pytest process has already started it). Hidden states must agree within 1e-5 (float32).
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import pa_jax.models as M  # noqa: E402
from pa_jax.models import sharding as S  # noqa: E402
from helpers import tiny_hf_llama  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-5

WORKER = textwrap.dedent(
    r'''
    import json, os, sys
    import numpy as np
    import jax

    ckpt, data_file, out_file, meshes = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    if len(sys.argv) > 5:  # multi-process: port, process id, number of processes
        port, pid, nproc = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid,
            initialization_timeout=60, heartbeat_timeout_seconds=30, shutdown_timeout_seconds=30,
        )
    from jax.experimental import multihost_utils
    import pa_jax.models as M
    from pa_jax.models import sharding as S
    from pa_jax.models.load import load_from_tensors, open_safetensors_dir

    batch = np.load(data_file)
    ids, mask = batch["ids"], batch["mask"]
    out, info = {}, {"process_count": jax.process_count(), "device_count": jax.device_count(), "reads": {}}
    for data, model_axis in meshes:
        mesh = S.make_mesh(data=data, model=model_axis)
        sc = S.ShardingConfig(mesh)
        name = f"{data}x{model_axis}"
        config, model = M.load(ckpt, dtype="float32", mesh=mesh)
        q = model.layers[0].self_attn.q_proj.weight[...]
        info[name] = {
            "q_spec": str(q.sharding.spec),
            "q_shard": list(q.addressable_shards[0].data.shape),
            "q_devices": len(q.sharding.device_set),
        }
        with jax.set_mesh(mesh):
            x, m = S.shard_batch(ids, sc), S.shard_batch(mask, sc)
            hidden = M.forward(model, x, m)
            info[name]["hidden_spec"] = str(hidden.sharding.spec)
            out[name] = np.asarray(multihost_utils.process_allgather(hidden, tiled=True))

    if meshes:  # which slices each parameter read (each device only its own)
        data, model_axis = meshes[0]
        mesh = S.make_mesh(data=data, model=model_axis)
        tensors = open_safetensors_dir(ckpt)
        reads = {}

        class Recording:
            def __init__(self, key, t):
                self.key, self.t, self.shape, self.dtype = key, t, t.shape, t.dtype
            def read(self, index=None):
                block = self.t.read(index)
                reads.setdefault(self.key, []).append(int(block.size))
                return block

        load_from_tensors(
            config, {k: Recording(k, t) for k, t in tensors.items()}, dtype="float32",
            sharding_fn=S.ShardingConfig(mesh).param_sharding,
        )
        info["reads"] = {k: [max(v), int(np.prod(tensors[k].shape))] for k, v in reads.items()}
    if jax.process_index() == 0:
        np.savez(out_file, **out)
        with open(out_file + ".json", "w") as f:
            json.dump(info, f)
    if len(sys.argv) > 5:
        jax.distributed.shutdown()
    '''
)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> pathlib.Path:
    """A tiny random transformers Llama (untied, GQA) saved with save_pretrained (safetensors)."""
    model = tiny_hf_llama(
        seed=0, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, size=(8, 16)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 11:] = 0
    mask[5, :6] = 0
    f = tmp_path_factory.mktemp("batch") / "batch.npz"
    np.savez(f, ids=ids, mask=mask)
    return ids, mask, f


@pytest.fixture(scope="module")
def reference(tiny_ckpt, batch):
    ids, mask, _ = batch
    _, model = M.load(tiny_ckpt, dtype="float32")
    return np.asarray(M.forward(model, ids, mask))


def _close(got: np.ndarray, want: np.ndarray, mask: np.ndarray) -> float:
    assert got.shape == want.shape
    return float(np.abs(got - want)[mask.astype(bool)].max())


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run_all(cmds: list[list[str]], env: dict[str, str], timeout: float) -> None:
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in cmds]
    deadline = time.monotonic() + timeout
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.communicate()
        pytest.fail(f"sharded worker timed out after {timeout} s")
    for p, out in zip(procs, outs):
        assert p.returncode == 0, f"worker failed (rc={p.returncode}):\n{out[-4000:]}"


# ----------------------------------------------------------------------------------------------- units
def test_partition_spec_rules_and_divisibility():
    mesh = S.make_mesh(data=1, model=1)
    # 1x1 mesh: every axis has size 1 -> nothing to split
    assert S.partition_spec("layers.0.self_attn.q_proj.weight", (64, 64), mesh) == P()
    fake = type("FakeMesh", (), {"shape": {"data": 4, "model": 2}})()
    ps = lambda path, shape: S.partition_spec(path, shape, fake)  # noqa: E731
    assert ps("layers.3.self_attn.q_proj.weight", (64, 32)) == P("model", "data")
    assert ps("layers.3.mlp.down_proj.weight", (32, 128)) == P("data", "model")
    assert ps("layers.3.self_attn.k_proj.bias", (32,)) == P("model")
    assert ps("embed_tokens.weight", (256, 64)) == P("model", "data")
    assert ps("lm_head.weight", (255, 64)) == P(None, "data")  # 255 not divisible by 2 -> replicated dim
    assert ps("layers.0.input_layernorm.weight", (64,)) == P()
    assert ps("norm.weight", (64,)) == P()


def test_make_mesh_validates_arguments():
    n = jax.device_count()
    mesh = S.make_mesh()
    assert mesh.axis_names == ("data", "model") and mesh.shape["data"] == n and mesh.shape["model"] == 1
    with pytest.raises(ValueError, match="model"):
        S.make_mesh(model=n + 1)
    with pytest.raises(ValueError, match="devices"):
        S.make_mesh(data=n + 1, model=1)
    with pytest.raises(ValueError, match="Mesh or ShardingConfig"):
        S.as_sharding_config("not a mesh")


def test_one_device_mesh_matches_unsharded(tiny_ckpt, batch, reference):
    ids, mask, _ = batch
    mesh = S.make_mesh(data=1, model=1)
    _, model = M.load(tiny_ckpt, dtype="float32", mesh=mesh)
    with jax.set_mesh(mesh):
        sc = S.ShardingConfig(mesh)
        hidden = M.forward(model, S.shard_batch(ids, sc), S.shard_batch(mask, sc))
    assert _close(np.asarray(hidden), reference, mask) <= TOL


def test_shard_model_moves_random_decoder(tiny_ckpt, batch):
    from flax import nnx

    ids, mask, _ = batch
    config, loaded = M.load(tiny_ckpt, dtype="float32")
    model = M.Decoder(config, rngs=nnx.Rngs(3), dtype="float32")
    want = np.asarray(M.forward(model, ids, mask))
    mesh = S.make_mesh(data=1, model=1)
    S.shard_model(model, S.ShardingConfig(mesh))
    assert model.layers[0].mlp.up_proj.weight[...].sharding.mesh.axis_names == ("data", "model")
    with jax.set_mesh(mesh):
        got = np.asarray(M.forward(model, ids, mask))
    assert _close(got, want, mask) <= TOL


# ----------------------------------------------------------------------------------------------- devices
def test_eight_simulated_cpu_devices(tmp_path, tiny_ckpt, batch, reference):
    ids, mask, data_file = batch
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "eight.npz"
    meshes = [[4, 2], [8, 1], [2, 4], [1, 8]]
    _run_all([[sys.executable, str(worker), str(tiny_ckpt), str(data_file), str(out), json.dumps(meshes)]], _env(8), 300)
    got = np.load(out)
    info = json.loads(pathlib.Path(str(out) + ".json").read_text())
    assert info["device_count"] == 8
    for d, m in meshes:
        name = f"{d}x{m}"
        assert _close(got[name], reference, mask) <= TOL, name
        # q_proj [64, 64]: rows over 'model', columns over 'data' -> each device holds a [64/m, 64/d] block
        assert info[name]["q_shard"] == [64 // m, 64 // d], (name, info[name])
        assert info[name]["q_devices"] == 8
    assert "data" in info["4x2"]["hidden_spec"]
    # mesh 4x2: every sharded parameter's reads were single-device slices, never the whole tensor
    reads = info["reads"]
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        biggest, full = reads[key]
        assert biggest == full // 8, (key, biggest, full)
    assert reads["model.norm.weight"][0] == reads["model.norm.weight"][1]  # replicated: whole (tiny) vector


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_on_localhost(tmp_path, tiny_ckpt, batch, reference):
    ids, mask, data_file = batch
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "multi.npz"
    meshes = [[2, 2], [4, 1], [1, 4]]
    port = _free_port()
    cmds = [
        [sys.executable, str(worker), str(tiny_ckpt), str(data_file), str(out), json.dumps(meshes), str(port), str(i), "2"]
        for i in range(2)
    ]
    _run_all(cmds, _env(2), 300)
    got = np.load(out)
    info = json.loads(pathlib.Path(str(out) + ".json").read_text())
    assert info["process_count"] == 2 and info["device_count"] == 4
    for d, m in meshes:
        name = f"{d}x{m}"
        assert _close(got[name], reference, mask) <= TOL, name
        assert info[name]["q_devices"] == 4
    biggest, full = info["reads"]["model.layers.0.self_attn.q_proj.weight"]
    assert biggest == full // 4


LORA_WORKER = textwrap.dedent(
    r'''
    import sys
    import numpy as np
    import jax
    import pa_jax.models as M
    from pa_jax.models import lora, sharding as S

    ckpt, adapter, data_file, out_file = sys.argv[1:5]
    batch = np.load(data_file)
    mesh = S.make_mesh(data=4, model=2)
    sc = S.ShardingConfig(mesh)
    cfg, base = M.load(ckpt, dtype="float32", mesh=mesh)
    _, pol = M.load(adapter, dtype="float32", base_model=(cfg, base), lora_mode="delta")
    lin = pol.layers[1].self_attn.q_proj
    assert lin.lora_a is not None and lin.weight[...] is base.layers[1].self_attn.q_proj.weight[...]
    assert lin.lora_a[...].sharding.mesh.shape == mesh.shape, lin.lora_a[...].sharding
    with jax.set_mesh(mesh):
        hidden = M.forward(pol, S.shard_batch(batch["ids"], sc), S.shard_batch(batch["mask"], sc))
    np.save(out_file, np.asarray(hidden))
    '''
)


def test_unmerged_lora_on_eight_simulated_devices(tmp_path, tiny_ckpt, batch):
    """An adapter attached unmerged (lora_mode="delta") over a base sharded on a 4x2 mesh of simulated devices:
    its factors sit replicated on that mesh, and the forward equals the unsharded merged model's (1e-5)."""
    import jax

    from pa_jax.models import lora

    ids, mask, data_file = batch
    cfg, plain = M.load(tiny_ckpt, dtype="float32")
    lp = lora.init_lora(cfg, ["q_proj", "down_proj"], 4, jax.random.key(1), layers=[1])
    rng = np.random.default_rng(0)
    lp = {p: {"A": np.asarray(v["A"]), "B": rng.normal(0, 0.3, v["B"].shape).astype(np.float32)} for p, v in lp.items()}
    lora.write_peft_adapter(tmp_path / "adapter", lp, cfg, lora_alpha=8, base_model_name_or_path=str(tiny_ckpt))
    _, merged = M.load(tmp_path / "adapter", dtype="float32")
    want = np.asarray(M.forward(merged, ids, mask))
    assert _close(want, np.asarray(M.forward(plain, ids, mask)), mask) > 1e-3  # the adapter changes the model
    worker = tmp_path / "worker.py"
    worker.write_text(LORA_WORKER)
    out = tmp_path / "hidden.npy"
    _run_all([[sys.executable, str(worker), str(tiny_ckpt), str(tmp_path / "adapter"), str(data_file), str(out)]],
             _env(8), 300)
    assert _close(np.load(out), want, mask) <= TOL
