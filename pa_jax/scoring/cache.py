"""The per-token statistics cache: one directory per cache key, one file per finished batch.

Layout: ``<cache_dir>/<key>/index.json`` ({key, meta, num_batches, done: {batch index: file name},
trajectory_ids}) and ``<cache_dir>/<key>/batch_<i>.npz`` (arrays ``"<trajectory>/<field>"``), both
written atomically with ``pa_jax.io`` (temp file + ``os.replace``): an interrupted run leaves whole
files only, and the temp files of writes it did not finish are removed when the cache is opened
again (one writer per key at a time, as the index itself assumes).

``key`` hashes the models, the rendered tokens and every option that changes the numbers. A rerun
skips the batches already on disk. The plan is a pure function of the inputs and batches always
hold the same rows, so an interrupted-and-resumed run gives bit-identical statistics to an
uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any, Sequence

import numpy as np

from pa_jax.data.render import Rendered
from pa_jax.io import atomic_write_bytes, atomic_write_json, remove_stale_temps
from pa_jax.scoring.plan import RUNTIME_FIELDS, ScoringOptions

INDEX = "index.json"


def _json_default(o: Any):
    """JSON values of the NumPy and path objects a cache key's ``meta`` may hold (kept as it was: the
    key text, hence every existing cache directory name, must not change)."""
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, pathlib.Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def model_identity(path: str | os.PathLike | None) -> dict | None:
    """Path, and size + mtime of every file of a checkpoint (cheap identity for the cache key)."""
    if path is None:
        return None
    p = pathlib.Path(path).resolve()
    files = [p] if p.is_file() else sorted(x for x in p.iterdir() if x.is_file())
    return {"path": str(p), "files": [[x.name, x.stat().st_size, x.stat().st_mtime_ns] for x in files]}


def key_meta(options: ScoringOptions, prefix_length: int, has_reference: bool, extra: dict | None) -> dict:
    """What identifies a run's numbers besides the tokens: the options that can change them (all but
    ``RUNTIME_FIELDS``), the shared prefix, whether there is a reference, and ``extra`` (the caller's
    model identities, dtype, ...)."""
    return {"options": {k: v for k, v in dataclasses.asdict(options).items() if k not in RUNTIME_FIELDS},
            "prefix": prefix_length, "reference": has_reference, **(extra or {})}


def cache_key(rendered: Sequence[Rendered], meta: dict) -> str:
    """SHA-256 of the rendered tokens (ids + step ids) and ``meta`` (models, dtype, options)."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, default=_json_default).encode())
    for r in rendered:
        h.update(r.trajectory_id.encode())
        h.update(np.ascontiguousarray(r.input_ids, np.int32).tobytes())
        h.update(np.ascontiguousarray(r.step_ids, np.int32).tobytes())
    return h.hexdigest()[:24]


def save_batch(path: pathlib.Path, stats: dict[int, dict[str, np.ndarray]]) -> None:
    """Write {trajectory index: {field: array}} to one .npz atomically."""
    arrays = {f"{i}/{k}": v for i, d in stats.items() for k, v in d.items()}
    atomic_write_bytes(path, lambda f: np.savez(f, **arrays))


def load_batch(path: pathlib.Path) -> dict[int, dict[str, np.ndarray]]:
    """The {trajectory index: {field: array}} of a ``save_batch`` file."""
    out: dict[int, dict[str, np.ndarray]] = {}
    with np.load(path) as z:
        for name in z.files:
            i, k = name.split("/", 1)
            out.setdefault(int(i), {})[k] = z[name]
    return out


class BatchCache:
    """The cache directory of one key: which batches are done, their statistics, and recording new ones."""

    def __init__(self, directory: pathlib.Path, index: dict):
        self.directory = directory
        self.index = index

    @classmethod
    def open(cls, cache_dir: str | os.PathLike, rendered: Sequence[Rendered], meta: dict,
             num_batches: int) -> "BatchCache":
        """Open (or start) ``<cache_dir>/<cache_key(rendered, meta)>``. An index written for another
        number of batches is discarded (its batch files are never read: the index names them)."""
        key = cache_key(rendered, meta)
        directory = pathlib.Path(cache_dir) / key
        remove_stale_temps(directory)
        index: dict = {}
        idx_file = directory / INDEX
        if idx_file.exists():
            index = json.loads(idx_file.read_text())
            if index.get("num_batches") != num_batches:
                index = {}
        if not index:
            index = {"key": key, "meta": meta, "num_batches": num_batches, "done": {},
                     "trajectory_ids": [r.trajectory_id for r in rendered]}
            atomic_write_json(idx_file, index)
        return cls(directory, index)

    def load(self, batch_index: int) -> dict[int, dict[str, np.ndarray]] | None:
        """The statistics of a batch finished by an earlier run, or None."""
        f = self.index["done"].get(str(batch_index))
        if f is None or not (self.directory / f).exists():
            return None
        return load_batch(self.directory / f)

    def save(self, batch_index: int, stats: dict[int, dict[str, np.ndarray]]) -> None:
        """Write a finished batch, then record it in the index (so the index never names a missing file)."""
        name = f"batch_{batch_index:05d}.npz"
        save_batch(self.directory / name, stats)
        self.index["done"][str(batch_index)] = name
        atomic_write_json(self.directory / INDEX, self.index)
