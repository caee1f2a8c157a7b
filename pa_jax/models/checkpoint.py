"""Save and restore converted decoder parameters with orbax (skip the GGUF / safetensors conversion next time).

Layout of a checkpoint directory::

    path/config.json     the Hugging Face config dict the model was built from
    path/params/         orbax StandardCheckpointer tree of the NNX parameter state

Restoring builds an abstract :class:`Decoder` (no memory), attaches each parameter's target sharding
(from ``mesh`` and :mod:`pa_jax.models.sharding`'s rules, or one device) and lets orbax read every array
straight into place. Writes are atomic (orbax commits through a temporary directory; config.json with
``pa_jax.io.atomic_write_text``).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pa_jax.io import atomic_write_text
from pa_jax.models.config import ModelConfig
from pa_jax.models.decoder import Decoder
from pa_jax.models.sharding import as_sharding_config

__all__ = ["save_params", "restore_params"]


def _ocp():
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # pragma: no cover - orbax ships with the project's environment
        raise ImportError("pa_jax.models.checkpoint needs orbax-checkpoint (pip install orbax-checkpoint)") from e
    return ocp


def save_params(config: ModelConfig, model: Decoder, path: str | os.PathLike, *, overwrite: bool = False) -> pathlib.Path:
    """Write ``config.json`` and the parameter state of ``model`` under ``path``; returns the path."""
    ocp = _ocp()
    out = pathlib.Path(path).absolute()
    params = out / "params"
    if params.exists() and not overwrite:
        raise ValueError(f"checkpoint {out} already exists (pass overwrite=True to replace it)")
    out.mkdir(parents=True, exist_ok=True)
    hf = config.to_hf_dict()
    hf["dtype"] = jnp.dtype(model.dtype).name
    hf.pop("torch_dtype", None)
    atomic_write_text(out / "config.json", json.dumps(hf, indent=2, sort_keys=True))
    _, state = nnx.split(model)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(params, state, force=overwrite)
        ckptr.wait_until_finished()
    return out


def restore_params(path: str | os.PathLike, *, dtype: Any = None, mesh: Any = None) -> tuple[ModelConfig, Decoder]:
    """``(config, model)`` from a :func:`save_params` directory.

    ``dtype``: cast on restore (default: the dtype saved). ``mesh``: a Mesh or ShardingConfig; each
    parameter is restored directly into its sharding (default: the first local device).
    """
    ocp = _ocp()
    root = pathlib.Path(path).absolute()
    cfg_file, params = root / "config.json", root / "params"
    if not cfg_file.is_file() or not params.is_dir():
        raise ValueError(f"{root}: not a pa-jax orbax checkpoint (expected config.json and params/)")
    config = ModelConfig.from_json_file(str(cfg_file))
    saved = json.loads(cfg_file.read_text()).get("dtype", "float32")
    dt = jnp.dtype(dtype if dtype is not None else saved)
    abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0), dtype=dt))
    graphdef, state = nnx.split(abstract)
    if mesh is not None:
        shard = as_sharding_config(mesh).param_sharding
    else:
        single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shard = lambda name, shape: single  # noqa: E731

    def target(path, leaf):
        name = ".".join(str(getattr(p, "key", p)) for p in path)
        return jax.ShapeDtypeStruct(leaf.shape, dt, sharding=shard(name, tuple(leaf.shape)))

    abstract_state = jax.tree_util.tree_map_with_path(target, state)
    with ocp.StandardCheckpointer() as ckptr:
        try:
            restored = ckptr.restore(params, abstract_state)
        except (ValueError, KeyError) as e:
            raise ValueError(f"{params}: checkpoint does not match the model of {cfg_file}: {e}") from e
    return config, nnx.merge(graphdef, restored)
