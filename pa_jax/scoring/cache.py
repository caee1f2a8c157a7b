"""The per-token statistics cache: one directory per cache key, one file per finished batch, verified on read.

Layout: ``<cache_dir>/<key>/index.json`` and ``<cache_dir>/<key>/batch_<i>.npz`` (arrays
``"<trajectory>/<field>"``), both written atomically with ``pa_jax.io`` (temp file + ``os.replace``):
an interrupted run leaves whole files only, and the temp files of writes it did not finish are removed
when the cache is opened again (one writer per key at a time, as the index itself assumes).

The index (``INDEX_FORMAT`` 2) is ``{format, key, meta, num_batches, trajectory_ids, done}`` with
``done = {batch index: {"file": name, "arrays": {array name: {"shape", "dtype", "sha256"}}}}``: the
shape, dtype (``numpy.dtype.str``) and SHA-256 of the C-order bytes of every array of the batch,
recorded when the batch is written (``array_record``).

Nothing is used unverified. A batch is taken from the cache only if its file reads as an ``.npz``
(a truncated or garbled file is not), holds exactly the arrays its index entry names, each with the
recorded shape, dtype and SHA-256 (an edited, shortened or retyped array is not), and holds what the
plan puts in this batch: exactly its trajectories, the expected fields, one row per scored token and
the rendered step ids (``verify_batch``). A batch that does not verify, or whose file is missing, is
recomputed and rewritten. An index that is not valid JSON, not of this structure, written for another
key, other trajectories or another number of batches, or written by an earlier pa-jax without checksums
(format 1: its batches cannot be verified, so none is trusted) is discarded: the key's cache starts
afresh. Each of these *repairs* is a record ``{file, batch, reason, action}`` in ``BatchCache.repairs``
and is passed to the ``warn`` callback (the CLI prints one line on stderr and lists them in the results
under ``checks.cache_repairs``).

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
from typing import Any, Callable, Collection, Mapping, Sequence

import numpy as np

from pa_jax.data.render import Rendered
from pa_jax.io import atomic_write_bytes, atomic_write_json, remove_stale_temps
from pa_jax.scoring.plan import RUNTIME_FIELDS, ScoringOptions

INDEX = "index.json"
INDEX_FORMAT = 2  # 1 (no "format" field): done = {batch: file name}, no checksums


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


# ---------------------------------------------------------------------------------------------- batch files
def array_record(a: np.ndarray) -> dict:
    """What the index records of one array: ``{"shape": list, "dtype": numpy dtype.str, "sha256": hex
    SHA-256 of the array's bytes in C order}``."""
    a = np.asarray(a)
    return {"shape": list(a.shape), "dtype": a.dtype.str, "sha256": hashlib.sha256(a.tobytes(order="C")).hexdigest()}


def save_batch(path: pathlib.Path, stats: dict[int, dict[str, np.ndarray]]) -> dict[str, dict]:
    """Write {trajectory index: {field: array}} to one .npz atomically; return ``{array name:
    array_record}`` of what was written (the index entry's ``arrays``)."""
    arrays = {f"{i}/{k}": np.asarray(v) for i, d in stats.items() for k, v in d.items()}
    atomic_write_bytes(path, lambda f: np.savez(f, **arrays))
    return {name: array_record(a) for name, a in arrays.items()}


def load_batch(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Every array of a ``save_batch`` file, by name (raises whatever NumPy / zipfile raise on a file that
    is not a whole .npz: ``BadZipFile``, ``EOFError``, ``ValueError``, ``OSError``, ...)."""
    with np.load(path, allow_pickle=False) as z:
        return {name: z[name] for name in z.files}


def _shape(s) -> str:
    return "(" + ", ".join(str(x) for x in s) + ("," if len(s) == 1 else "") + ")"


def verify_batch(path: pathlib.Path, arrays_expected: Mapping[str, dict], expect: Mapping[int, np.ndarray] | None = None,
                 fields: Collection[str] | None = None) -> tuple[dict[int, dict[str, np.ndarray]] | None, str | None]:
    """Read a batch file and check it: ``(statistics, None)`` when it verifies, else ``(None, reason)``.

    Checks, in order: the file reads as an .npz; it holds exactly the arrays of ``arrays_expected`` (the
    index entry), each with the recorded shape, dtype and SHA-256 (``array_record``); and, when given,
    what the plan expects: exactly the trajectories of ``expect`` (trajectory index -> step ids of its
    scored tokens), each with exactly ``fields``, every array with one row per scored token, and
    ``step_ids`` equal to the expected step ids."""
    if not path.exists():
        return None, "missing (the index lists it as finished)"
    try:
        arrays = load_batch(path)
    except Exception as e:  # noqa: BLE001 -- any failure to read means: not a whole batch file
        return None, f"not a readable .npz file ({type(e).__name__}: {e})"
    names, recorded = set(arrays), set(arrays_expected)
    if names != recorded:
        missing, extra = sorted(recorded - names), sorted(names - recorded)
        return None, (f"holds other arrays than its index entry records (missing {missing[:4]}, "
                      f"unexpected {extra[:4]})")
    for name in sorted(arrays):
        a, rec = arrays[name], arrays_expected[name]
        if list(a.shape) != list(rec.get("shape", [])):
            return None, f"array {name!r} has shape {_shape(a.shape)}, the index records {_shape(rec.get('shape', []))}"
        if a.dtype.str != rec.get("dtype"):
            return None, f"array {name!r} has dtype {a.dtype.str}, the index records {rec.get('dtype')}"
        if hashlib.sha256(a.tobytes(order="C")).hexdigest() != rec.get("sha256"):
            return None, f"array {name!r}: SHA-256 differs from the one recorded (the values were changed)"
    out: dict[int, dict[str, np.ndarray]] = {}
    for name, a in arrays.items():
        i, _, k = name.partition("/")
        if not i.isdigit() or not k:
            return None, f"array name {name!r} is not '<trajectory>/<field>'"
        out.setdefault(int(i), {})[k] = a
    if expect is not None:
        if set(out) != set(expect):
            return None, f"holds trajectories {sorted(out)}, the plan puts {sorted(expect)} in this batch"
        for i, sid in expect.items():
            if fields is not None and set(out[i]) != set(fields):
                return None, f"trajectory {i}: fields {sorted(out[i])}, expected {sorted(fields)}"
            for k, a in out[i].items():
                if a.ndim == 0 or a.shape[0] != len(sid):
                    return None, (f"array '{i}/{k}' has shape {_shape(a.shape)}, trajectory {i} has {len(sid)} "
                                  f"scored tokens")
            if "step_ids" in out[i] and not np.array_equal(out[i]["step_ids"], sid):
                return None, f"array '{i}/step_ids' differs from the rendered trajectory's step ids"
    return out, None


# ---------------------------------------------------------------------------------------------- index
def _index_problem(index: Any, key: str, num_batches: int, ids: list[str]) -> str | None:
    """Why a parsed index.json cannot be used for this run (None: it can)."""
    if not isinstance(index, dict):
        return f"not a cache index (a JSON {type(index).__name__}, expected an object)"
    if index.get("format") is None and isinstance(index.get("done"), dict):
        n = len(index["done"])
        return (f"written by an earlier pa-jax without checksums: its {n} finished batch(es) cannot be "
                f"verified, so none is used")
    if index.get("format") != INDEX_FORMAT:
        return f"index format {index.get('format')!r}, this pa-jax reads format {INDEX_FORMAT}"
    for field, kind in (("key", str), ("num_batches", int), ("done", dict), ("trajectory_ids", list)):
        if not isinstance(index.get(field), kind):
            return f"field {field!r} missing or not a {kind.__name__}"
    if index["key"] != key:
        return f"written for cache key {index['key']!r}, not {key!r} (the directory was renamed or copied?)"
    if index["trajectory_ids"] != ids:
        return "written for other trajectories than this run's"
    if index["num_batches"] != num_batches:
        return (f"written for {index['num_batches']} batches, this run plans {num_batches} (another "
                f"--max-batch-tokens?)")
    return None


def _entry_problem(batch: str, entry: Any) -> str | None:
    """Why one ``done`` entry of the index is malformed (None: it is well formed)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or not isinstance(entry.get("arrays"), dict):
        return f"index entry of batch {batch} is malformed (expected {{file, arrays}})"
    if pathlib.PurePath(entry["file"]).name != entry["file"] or not entry["file"].endswith(".npz"):
        return f"index entry of batch {batch} names {entry['file']!r}, not a .npz file of the cache directory"
    if not all(isinstance(r, dict) for r in entry["arrays"].values()):
        return f"index entry of batch {batch}: array records must be objects"
    return None


class BatchCache:
    """The cache directory of one key: which batches are done, their verified statistics, recording new
    ones, and the repairs made on the way (``repairs``: a batch or index that did not verify)."""

    def __init__(self, directory: pathlib.Path, index: dict, warn: Callable[[dict], None] | None = None):
        self.directory = directory
        self.index = index
        self.repairs: list[dict] = []
        self.warn = warn

    def _repair(self, file: pathlib.Path, batch: int | None, reason: str, action: str) -> None:
        rec = {"file": str(file), "batch": batch, "reason": reason, "action": action}
        self.repairs.append(rec)
        if self.warn is not None:
            self.warn(rec)

    @classmethod
    def open(cls, cache_dir: str | os.PathLike, rendered: Sequence[Rendered], meta: dict,
             num_batches: int, warn: Callable[[dict], None] | None = None) -> "BatchCache":
        """Open (or start) ``<cache_dir>/<cache_key(rendered, meta)>``. An index that cannot be used
        (module docstring) is discarded, with a repair record: the key's cache starts afresh (its batch
        files are never read without an index entry naming them and their checksums)."""
        key = cache_key(rendered, meta)
        directory = pathlib.Path(cache_dir) / key
        remove_stale_temps(directory)
        ids = [r.trajectory_id for r in rendered]
        cache = cls(directory, {}, warn)
        idx_file = directory / INDEX
        problem = None
        if idx_file.exists():
            try:
                index = json.loads(idx_file.read_text(encoding="utf-8"))
            except ValueError as e:  # invalid JSON or UTF-8
                problem = f"not valid JSON ({e})"
            except OSError as e:
                problem = f"cannot be read ({e.strerror or e})"
            else:
                problem = _index_problem(index, key, num_batches, ids)
                if problem is None:
                    cache.index = index
            if problem is not None:
                cache._repair(idx_file, None, problem,
                              f"the cache of this key starts afresh ({num_batches} batch(es) to compute)")
        if not cache.index:
            cache.index = {"format": INDEX_FORMAT, "key": key, "meta": meta, "num_batches": num_batches,
                           "trajectory_ids": ids, "done": {}}
            atomic_write_json(idx_file, cache.index)
        return cache

    def load(self, batch_index: int, expect: Mapping[int, np.ndarray] | None = None,
             fields: Collection[str] | None = None) -> dict[int, dict[str, np.ndarray]] | None:
        """The statistics of a batch finished by an earlier run, verified (``verify_batch``; ``expect`` and
        ``fields`` as there), or None: not finished, or it did not verify (then it is dropped from the
        index and a repair recorded: the caller recomputes it)."""
        entry = self.index["done"].get(str(batch_index))
        if entry is None:
            return None
        problem = _entry_problem(str(batch_index), entry)
        path = self.directory / (entry["file"] if problem is None else f"batch_{batch_index:05d}.npz")
        got = None
        if problem is None:
            got, problem = verify_batch(path, entry["arrays"], expect, fields)
        if problem is not None:
            del self.index["done"][str(batch_index)]
            self._repair(path, batch_index, problem, "recomputed")
        return got

    def save(self, batch_index: int, stats: dict[int, dict[str, np.ndarray]]) -> None:
        """Write a finished batch, then record it (file, and shape, dtype, SHA-256 of every array) in the
        index (so the index never names a missing file)."""
        name = f"batch_{batch_index:05d}.npz"
        arrays = save_batch(self.directory / name, stats)
        self.index["done"][str(batch_index)] = {"file": name, "arrays": arrays}
        atomic_write_json(self.directory / INDEX, self.index)
