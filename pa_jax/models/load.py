"""Loading Hugging Face safetensors directories into :class:`Decoder`, and writing them back.

Design (shared with the GGUF loader and the sharding rules):

* A checkpoint is a ``Mapping[str, LazyTensor]`` from Hugging Face key to a lazily read tensor. A
  :class:`LazyTensor` exposes ``shape``, ``dtype`` (storage dtype) and ``read(index=None) -> np.ndarray``,
  where ``index`` is a tuple of slices (one per axis, as ``jax.make_array_from_callback`` passes them) and
  only that slice is read. :func:`open_safetensors_dir` builds one for a directory (memory-mapped, so a
  slice read touches only its bytes); the GGUF loader builds one of dequantized tensors in HF layout.
* :func:`load_from_tensors` maps keys to parameter paths with :mod:`pa_jax.models.params`, checks that every
  tensor is used or explicitly ignored, every parameter filled and every shape right (ValueError naming the
  tensors otherwise), then fills the parameters one tensor at a time.
* Sharding hook: ``sharding_fn(path: str, shape: tuple[int, ...]) -> jax.sharding.Sharding | None``. For each
  parameter whose sharding is not None the array is built with ``jax.make_array_from_callback(shape,
  sharding, lambda index: tensor.read(index))``: each device reads only its own slice of the file. With
  ``mesh`` (a Mesh or a ``pa_jax.models.sharding.ShardingConfig``) and no ``sharding_fn``, :func:`load`
  uses ``pa_jax.models.sharding.as_sharding_config(mesh).param_sharding`` (FSDP + tensor-parallel rules).

safetensors' own ``safe_open(framework="numpy")`` cannot return bfloat16 tensors, so the reader here parses
the (simple, documented) safetensors header itself and memory-maps the data with ``ml_dtypes`` dtypes.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Any, Callable, Mapping, Protocol

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from pa_jax.io import atomic_write_bytes, atomic_write_text
from pa_jax.models import gguf
from pa_jax.models import params as P
from pa_jax.models import sharding as S
from pa_jax.models.config import ModelConfig
from pa_jax.models.decoder import Decoder

ShardingFn = Callable[[str, tuple], "jax.sharding.Sharding | None"]

_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class LazyTensor(Protocol):
    """A checkpoint tensor read on demand: whole (index=None) or one slice per axis."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def read(self, index: tuple[slice, ...] | None = None) -> np.ndarray: ...


class SafetensorsTensor:
    """One tensor of a .safetensors file, memory-mapped on first read."""

    def __init__(self, file: pathlib.Path, key: str, data_start: int, begin: int, end: int, dtype: np.dtype, shape):
        self.file, self.key = file, key
        self.offset = data_start + begin
        self.nbytes = end - begin
        self.dtype = dtype
        self.shape = tuple(int(s) for s in shape)
        expected = int(np.prod(self.shape, dtype=np.int64)) * dtype.itemsize
        if expected != self.nbytes:
            raise ValueError(f"{file}: tensor {key!r} has {self.nbytes} bytes, shape {self.shape} needs {expected}")

    def read(self, index: tuple[slice, ...] | None = None) -> np.ndarray:
        if not self.shape or 0 in self.shape:
            arr = np.fromfile(self.file, dtype=self.dtype, count=int(np.prod(self.shape)), offset=self.offset)
            arr = arr.reshape(self.shape)
        else:
            arr = np.memmap(self.file, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)
        out = arr if index is None else arr[tuple(index)]
        return np.array(out, copy=True)

    def __repr__(self) -> str:
        return f"SafetensorsTensor({self.key!r}, {self.shape}, {self.dtype})"


def read_safetensors_header(file: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """(header dict, byte offset of the data section) of a .safetensors file."""
    file = pathlib.Path(file)
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{file}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError(f"{file}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: corrupt safetensors header: {e}") from e
    return header, 8 + n


def open_safetensors_file(file: str | os.PathLike) -> dict[str, SafetensorsTensor]:
    """Mapping key -> lazy tensor of one .safetensors file (nothing read but the header)."""
    file = pathlib.Path(file)
    header, start = read_safetensors_header(file)
    size = file.stat().st_size
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dt = info.get("dtype")
        if dt not in _ST_DTYPES:
            raise ValueError(f"{file}: tensor {key!r} has unsupported dtype {dt!r}")
        b, e = info["data_offsets"]
        if start + e > size:
            raise ValueError(f"{file}: tensor {key!r} ends at byte {start + e} but the file has {size} bytes "
                             "(truncated file? copy or download it again)")
        out[key] = SafetensorsTensor(file, key, start, b, e, _ST_DTYPES[dt], info["shape"])
    return out


def open_safetensors_dir(path: str | os.PathLike) -> dict[str, SafetensorsTensor]:
    """Mapping key -> lazy tensor over all shards of a checkpoint directory (index.json when present)."""
    path = pathlib.Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: missing 'weight_map'")
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (path / f).is_file():
                raise ValueError(f"{index}: shard {f!r} listed in weight_map does not exist")
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
        weight_map = None
    if not files:
        raise ValueError(f"{path}: no *.safetensors files (and no model.safetensors.index.json)")
    tensors: dict[str, SafetensorsTensor] = {}
    for f in files:
        for key, t in open_safetensors_file(path / f).items():
            if key in tensors:
                raise ValueError(f"{path}: tensor {key!r} appears in both {tensors[key].file.name} and {f}")
            tensors[key] = t
    if weight_map is not None:
        for key, f in weight_map.items():
            if key not in tensors or tensors[key].file.name != f:
                raise ValueError(f"{index}: tensor {key!r} is not in shard {f!r}")
    return tensors


class ArrayTensor:
    """A LazyTensor over an in-memory array (or a zero-argument callable producing it on demand)."""

    def __init__(self, shape, dtype, get: Callable[[], np.ndarray]):
        self.shape, self.dtype, self._get = tuple(int(d) for d in shape), np.dtype(dtype), get

    def read(self, index: tuple[slice, ...] | None = None) -> np.ndarray:
        a = np.asarray(self._get())
        return a if index is None else a[tuple(index)]


def as_lazy_tensors(tensors: Mapping[str, Any]) -> Mapping[str, LazyTensor]:
    """Accept LazyTensor values, plain arrays, or a lazy mapping with a ``shape(key)`` method (GGUF).

    Only keys are iterated and shapes queried; a value is produced when its parameter is filled.
    """
    shape_of = getattr(tensors, "shape", None)
    if callable(shape_of):
        return {
            k: ArrayTensor(shape_of(k), np.float32, lambda k=k: tensors[k]) for k in tensors
        }
    out: dict[str, LazyTensor] = {}
    for k in tensors:
        v = tensors[k]
        out[k] = v if hasattr(v, "read") else ArrayTensor(np.shape(v), np.asarray(v).dtype, lambda v=v: v)
    return out


def _abstract_model(config: ModelConfig, dtype) -> Decoder:
    return nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0), dtype=dtype))


def _fmt(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def plan_load(config: ModelConfig, tensors: Mapping[str, LazyTensor], param_shapes: Mapping[str, tuple]) -> dict[str, str]:
    """Parameter path -> checkpoint key; ValueError naming every unexpected, missing or misshapen tensor."""
    plan: dict[str, str] = {}
    unexpected, mismatched = [], []
    for key in tensors:
        path = P.hf_key_to_path(config, key)
        if path == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: the embedding is the unembedding; a stored copy is redundant
        if path is None or path not in param_shapes:
            if P.is_ignored(key):
                continue
            unexpected.append(key)
            continue
        if path in plan:
            raise ValueError(f"checkpoint tensors {plan[path]!r} and {key!r} both map to parameter {path!r}")
        if tuple(tensors[key].shape) != tuple(param_shapes[path]):
            mismatched.append(f"{key} (checkpoint {tuple(tensors[key].shape)}, expected {tuple(param_shapes[path])})")
        plan[path] = key
    missing = [p for p in param_shapes if p not in plan]
    errors = []
    if unexpected:
        errors.append(f"unexpected tensors (no {config.model_type} parameter): {_fmt(sorted(unexpected))}")
    if missing:
        keys = []
        for p in missing:
            try:
                keys.append(P.path_to_hf_key(config, p))
            except ValueError:
                keys.append(p)
        errors.append(f"missing tensors: {_fmt(keys)}")
    if mismatched:
        errors.append(f"wrongly shaped tensors: {_fmt(mismatched)}")
    if errors:
        raise ValueError("checkpoint does not match the model config: " + "; ".join(errors))
    return plan


def load_from_tensors(
    config: ModelConfig,
    tensors: Mapping[str, LazyTensor],
    *,
    dtype="bfloat16",
    sharding_fn: ShardingFn | None = None,
) -> Decoder:
    """Build a :class:`Decoder` whose every parameter is read from ``tensors`` (HF key -> LazyTensor).

    One tensor at a time: read (or, with a sharding, each device's slice), cast to ``dtype``, place,
    release. See the module docstring for the ``sharding_fn`` hook.
    """
    target = np.dtype(jnp.dtype(dtype))
    tensors = as_lazy_tensors(tensors)
    abstract = _abstract_model(config, dtype)
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    shapes = {P.path_str(path): tuple(var.get_value().shape) for path, var in flat}
    plan = plan_load(config, tensors, shapes)
    for path, var in flat:
        name = P.path_str(path)
        tensor = tensors[plan[name]]
        sharding = sharding_fn(name, shapes[name]) if sharding_fn is not None else None
        if sharding is not None:
            # reads each distinct slice once per process
            arr = S.array_from_slices(shapes[name], target, sharding, tensor.read)
        else:
            arr = jax.device_put(np.asarray(tensor.read()).astype(target))
        _check_finite(arr, plan[name], tensor)
        var.set_value(arr)
    return nnx.merge(graphdef, state)


def _check_finite(arr: jax.Array, key: str, tensor: Any) -> None:
    """Refuse a parameter holding NaN or inf as it loads (naming the file and tensor), rather than
    scoring every trajectory to NaN."""
    if jnp.issubdtype(arr.dtype, jnp.floating) and not bool(jnp.isfinite(arr).all()):
        n = int((~jnp.isfinite(arr)).sum())
        src = getattr(tensor, "file", None) or getattr(getattr(tensor, "_owner", None), "path", None) or "checkpoint"
        raise ValueError(f"{src}: tensor {key!r} holds {n} non-finite value(s) (NaN/inf): corrupt weights")


def _default_sharding_fn(mesh) -> ShardingFn:
    """``mesh`` (a Mesh or pa_jax.models.sharding.ShardingConfig) -> its parameter sharding rules."""
    return S.as_sharding_config(mesh).param_sharding


def load_checkpoint(path: str | os.PathLike, *, dtype="bfloat16", mesh=None, sharding_fn: ShardingFn | None = None):
    """(config, model) from a Hugging Face directory (config.json + *.safetensors) or a .gguf file.

    dtype: parameter/compute dtype ("bfloat16" or "float32"). mesh: a jax Mesh; parameters are laid out by
    ``sharding_fn`` (default: pa_jax.models.sharding's rules), each device reading only its own slice.
    A PEFT LoRA adapter directory is loaded by pa_jax.models.load (pa_jax.models.lora.load), which calls this
    for its base.
    """
    p = pathlib.Path(path)
    if (p / "adapter_config.json").is_file():
        raise ValueError(f"{p} is a PEFT adapter directory: load it over its base with "
                         "pa_jax.models.load(adapter_dir, base=BASE) (pa_jax.models.lora.load)")
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ValueError(f"GGUF file {p} does not exist")
        hf, tensors = gguf.load_gguf(p)
        config = ModelConfig.from_hf_dict(hf)
        if sharding_fn is None and mesh is not None:
            sharding_fn = _default_sharding_fn(mesh)
        return config, load_from_tensors(config, tensors, dtype=dtype, sharding_fn=sharding_fn)
    if not p.is_dir():
        raise ValueError(f"model path {p} is neither a directory nor a .gguf file")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{p}: no config.json")
    config = ModelConfig.from_json_file(str(cfg_file))
    tensors = open_safetensors_dir(p)
    if sharding_fn is None and mesh is not None:
        sharding_fn = _default_sharding_fn(mesh)
    model = load_from_tensors(config, tensors, dtype=dtype, sharding_fn=sharding_fn)
    return config, model


# ---------------------------------------------------------------------------------------------- saving
def write_safetensors_streaming(
    file, specs: Mapping[str, tuple[tuple[int, ...], Any]], produce: Callable[[str], np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a .safetensors file whose tensors are produced one at a time, in sorted name order:
    ``specs[name] = (shape, dtype)`` makes the header, ``produce(name)`` the data (checked against the
    spec, then released). Atomic (``pa_jax.io.atomic_write_bytes``): a reader never sees a partial file."""
    names = sorted(specs)
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name in names:
        shape, dt = tuple(int(d) for d in specs[name][0]), np.dtype(specs[name][1])
        if dt not in _ST_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {dt} cannot be written to safetensors")
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        header[name] = {"dtype": _ST_NAMES[dt], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    def write(f):
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            arr = np.ascontiguousarray(produce(name))
            want = (tuple(header[name]["shape"]), np.dtype(specs[name][1]))
            if (arr.shape, arr.dtype) != want:
                raise ValueError(f"tensor {name!r}: produced {arr.shape} {arr.dtype}, header says {want[0]} {want[1]}")
            f.write(arr.tobytes())
            del arr

    atomic_write_bytes(file, write)


def write_safetensors(file: str | os.PathLike, arrays: Mapping[str, Any], metadata: dict[str, str] | None = None) -> None:
    """Write arrays (NumPy or JAX, fetched one at a time) to a .safetensors file atomically (temp + rename)."""
    specs = {k: (tuple(a.shape), np.dtype(a.dtype)) for k, a in arrays.items()}
    write_safetensors_streaming(file, specs, lambda k: np.asarray(jax.device_get(arrays[k])), metadata)


def model_tensors(config: ModelConfig, model: Decoder) -> dict[str, jax.Array]:
    """HF key -> parameter array of a model (the inverse of loading). A model carrying an unmerged LoRA adapter
    (``lora_mode="delta"``) has no such tensors: ValueError naming the module."""
    _, state = nnx.split(model)
    out = {}
    for path, var in nnx.to_flat_state(state):
        name = P.path_str(path)
        if name.endswith((".lora_a", ".lora_b")):
            raise ValueError(f"{name}: the model carries an unmerged LoRA adapter (lora_mode='delta'); load it with "
                             f"lora_mode='merge' to save or merge its weights")
        out[P.path_to_hf_key(config, name)] = var.get_value()
    return out


def save_pretrained(config: ModelConfig, model: Decoder, path: str | os.PathLike) -> None:
    """Write config.json + model.safetensors with Hugging Face key names (transformers loads the directory).

    Tied models store only the embedding (as transformers does). Files are written atomically.
    """
    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    hf = config.to_hf_dict()
    hf["dtype"] = jnp.dtype(model.dtype).name
    hf.pop("torch_dtype", None)
    tensors = model_tensors(config, model)
    write_safetensors(out / "model.safetensors", tensors)
    atomic_write_text(out / "config.json", json.dumps(hf, indent=2, sort_keys=True))
