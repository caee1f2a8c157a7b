"""Device meshes and partition rules for the decoder: FSDP over ``data``, tensor parallelism over ``model``.

The mesh has two axes, ``('data', 'model')``. Parameters keep Hugging Face layout (``weight`` is
[out, in]), so one rule table serves every family:

* column-parallel projections (q/k/v, gate/up, lm_head, embeddings) [out, in]: ``P('model', 'data')``
  (output features split over ``model``, the FSDP shard of the input features over ``data``);
* row-parallel projections (o_proj, down_proj) [out, in]: ``P('data', 'model')``;
* norms and everything else: replicated.

A rule's axis is dropped (that dimension replicated) where the dimension is not divisible by the axis
size, so every rule set is valid on every mesh. Activations: the batch dimension is split over
``data``. Parameters are created already sharded at load time (``jax.make_array_from_callback``:
each device reads only its own slice of the checkpoint tensor), never gathered on one device.

Use ``jax.set_mesh(mesh)`` around calls (not ``with mesh:``). Works on 1 device (a 1x1 mesh), on
simulated CPU devices, across processes (``jax.distributed.initialize``), and on TPU pod slices.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = [
    "DATA",
    "MODEL",
    "DEFAULT_RULES",
    "ShardingConfig",
    "as_sharding_config",
    "make_mesh",
    "partition_spec",
    "param_sharding_fn",
    "array_from_slices",
    "shard_batch",
    "shard_model",
]

DATA = "data"
MODEL = "model"

Rule = tuple[str, P]

DEFAULT_RULES: tuple[Rule, ...] = (
    (r"(.*\.)?embed_tokens\.weight", P(MODEL, DATA)),
    (r"(.*\.)?lm_head\.weight", P(MODEL, DATA)),
    (r".*\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.weight", P(MODEL, DATA)),
    (r".*\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.bias", P(MODEL)),
    (r".*\.(o_proj|down_proj)\.weight", P(DATA, MODEL)),
    # issue 7: Gemma 4's per-layer embedding table (2.8e9 params at E4B, only gathered from): vocab rows split
    # over every device; its projections and Qwen 3.5's Gated DeltaNet projections like the others.
    (r"(.*\.)?embed_tokens_per_layer\.weight", P((DATA, MODEL))),
    (r".*(per_layer_model_projection|per_layer_input_gate|in_proj_qkv|in_proj_z)\.weight", P(MODEL, DATA)),
    (r".*\.(per_layer_projection|out_proj)\.weight", P(DATA, MODEL)),
    (r".*", P()),
)
"""(regex fully matching a dotted parameter path, PartitionSpec in HF layout); first match wins."""


def make_mesh(data: int | None = None, model: int = 1, *, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``('data', 'model')`` mesh of shape (data, model) over ``devices`` (default: all global devices).

    ``data`` defaults to ``len(devices) // model``; ``data * model`` must equal the device count.
    Both axes are ``AxisType.Auto`` (the compiler propagates shardings through the forward).
    """
    devs = list(jax.devices() if devices is None else devices)
    if not isinstance(model, int) or model <= 0:
        raise ValueError(f"make_mesh: model={model!r} must be a positive integer")
    if data is None:
        if len(devs) % model:
            raise ValueError(f"make_mesh: model={model} does not divide the {len(devs)} devices")
        data = len(devs) // model
    if not isinstance(data, int) or data <= 0:
        raise ValueError(f"make_mesh: data={data!r} must be a positive integer")
    if data * model != len(devs):
        raise ValueError(f"make_mesh: data * model = {data} * {model} != {len(devs)} devices")
    auto = (jax.sharding.AxisType.Auto, jax.sharding.AxisType.Auto)
    return jax.make_mesh((data, model), (DATA, MODEL), axis_types=auto, devices=devs)


def partition_spec(path: str, shape: Sequence[int], mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES) -> P:
    """The PartitionSpec of the parameter at dotted ``path`` with ``shape`` on ``mesh``.

    The first rule whose regex fully matches ``path`` gives the spec; entries beyond the array's rank
    are dropped and an axis whose size does not divide its dimension becomes None (replicated).
    """
    for pattern, spec in rules:
        if re.fullmatch(pattern, path):
            break
    else:
        return P()
    out = []
    for dim, axis in zip(shape, tuple(spec)[: len(shape)]):
        names = () if axis is None else ((axis,) if isinstance(axis, str) else tuple(axis))
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        out.append(axis if names and dim % size == 0 and size > 1 else None)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
    """A mesh plus partition rules: where each parameter and each batch lives.

    ``ShardingConfig(make_mesh(data=4, model=2))``; ``rules`` as :data:`DEFAULT_RULES`.
    """

    mesh: Mesh
    rules: tuple[Rule, ...] = DEFAULT_RULES

    def __post_init__(self) -> None:
        missing = {DATA, MODEL} - set(self.mesh.axis_names)
        if missing:
            raise ValueError(f"ShardingConfig: mesh axes {self.mesh.axis_names} lack {sorted(missing)}")

    def param_spec(self, path: str, shape: Sequence[int]) -> P:
        return partition_spec(path, shape, self.mesh, self.rules)

    def param_sharding(self, path: str, shape: Sequence[int]) -> NamedSharding:
        return NamedSharding(self.mesh, self.param_spec(path, shape))

    def batch_sharding(self, shape: Sequence[int]) -> NamedSharding:
        """Leading (batch) dimension over ``data`` when divisible, the rest replicated."""
        n = self.mesh.shape[DATA]
        spec = P(DATA) if shape and n > 1 and shape[0] % n == 0 else P()
        return NamedSharding(self.mesh, spec)

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())


def as_sharding_config(mesh: Mesh | ShardingConfig | None) -> ShardingConfig | None:
    """Accept a Mesh (default rules), a ShardingConfig, or None."""
    if mesh is None or isinstance(mesh, ShardingConfig):
        return mesh
    if isinstance(mesh, Mesh):
        return ShardingConfig(mesh)
    raise ValueError(f"mesh must be a jax.sharding.Mesh or ShardingConfig, got {type(mesh).__name__}")


def param_sharding_fn(config: Any, mesh: Mesh | ShardingConfig) -> Callable[[str, tuple], NamedSharding]:
    """The loader's hook: ``fn(param_path, shape) -> NamedSharding`` under ``mesh``'s rules.

    ``config`` (the model's ModelConfig) is accepted for family-specific rules; the default rules
    need only parameter paths and shapes.
    """
    sc = as_sharding_config(mesh)
    if sc is None:
        raise ValueError("param_sharding_fn: mesh must not be None")
    return sc.param_sharding


def array_from_slices(
    shape: Sequence[int],
    dtype: Any,
    sharding: NamedSharding,
    read: Callable[[tuple[slice, ...]], np.ndarray],
) -> jax.Array:
    """A global array whose every addressable shard is ``read(index)`` cast to ``dtype``.

    ``read`` receives the shard's index (a tuple of slices into the full tensor) and returns only that
    slice (e.g. a safetensors ``get_slice(key)[index]``), so no process reads more than its devices hold.
    Identical shards (replicas) are read once per process.
    """
    shape = tuple(int(d) for d in shape)
    dt = np.dtype(dtype)
    cache: dict[tuple, np.ndarray] = {}

    def cb(index: tuple[slice, ...]) -> np.ndarray:
        norm = tuple(slice(*s.indices(d)) for s, d in zip(index, shape)) + tuple(
            slice(0, d, 1) for d in shape[len(index):]
        )
        key = tuple((s.start, s.stop, s.step) for s in norm)
        if key not in cache:
            block = np.asarray(read(norm))
            want = tuple(len(range(*s.indices(d))) for s, d in zip(norm, shape))
            if block.shape != want:
                raise ValueError(f"slice reader returned shape {block.shape} for index {norm}, expected {want}")
            cache[key] = block.astype(dt, copy=False)
        return cache[key]

    return jax.make_array_from_callback(shape, sharding, cb)


def shard_batch(x: Any, config: ShardingConfig, dtype: Any | None = None) -> jax.Array:
    """A host array (the same full batch on every process) -> a global array, batch over ``data``."""
    arr = np.asarray(x) if dtype is None else np.asarray(x, dtype=dtype)
    return array_from_slices(arr.shape, arr.dtype, config.batch_sharding(arr.shape), lambda idx: arr[idx])


def shard_model(model: Any, config: ShardingConfig) -> Any:
    """Move an in-memory NNX model's parameters onto ``config``'s shardings (in place; returns it).

    For models built here (e.g. a random :class:`Decoder`); loading sharded is :func:`pa_jax.models.load`'s
    ``mesh=`` argument, which never materializes an unsharded copy.
    """
    state = nnx.state(model)
    flat = nnx.to_flat_state(state)
    updated = []
    for path, var in flat:
        value = var[...] if hasattr(var, "__getitem__") else var.value
        name = ".".join(str(p) for p in path)
        if isinstance(value, jax.Array | np.ndarray):
            sharding = config.param_sharding(name, value.shape)
            if isinstance(value, jax.Array) and not value.is_fully_addressable:
                new = jax.device_put(value, sharding)  # already global: let XLA reshard
            else:  # local value: every process builds its own devices' slices (works multi-process)
                h = np.asarray(value)
                new = array_from_slices(h.shape, h.dtype, sharding, lambda idx, h=h: h[idx])
            updated.append((path, var.replace(new)))
        else:
            updated.append((path, var))
    nnx.update(model, nnx.from_flat_state(updated))
    return model
