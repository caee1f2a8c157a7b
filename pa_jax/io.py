"""Small file helpers every layer may use: the one atomic writer and strict JSON.

Standard library and NumPy only (no JAX, nothing else from pa_jax), so ``toy_mdp``, ``experiments/``
and ``paper_figs/`` can import it without importing the scoring engine.

Atomic write: the content goes to a temp file ``<name>.<random>.tmp`` in the destination's directory,
which then replaces the destination with ``os.replace`` (atomic on POSIX): a reader sees the old file
or the new one, never a partial one; on any error the temp file is removed and the destination is
untouched. Files get the usual ``0666 & ~umask`` permissions (``mkstemp`` alone would make them 0600).

Strict JSON: ``NaN`` and ``inf`` are not JSON; ``dumps_strict`` writes them as ``null`` (the caller
records why a value is undefined next to it) and converts NumPy scalars/arrays and paths.

JSON lines: ``iter_jsonl`` / ``read_jsonl`` read one JSON object per non-blank line; a bad line is a
``JSONLError`` (a ValueError) naming the file and the line number.
"""
from __future__ import annotations

import functools
import json
import math
import os
import pathlib
from typing import Any, Callable, Iterator

import numpy as np

TMP_SUFFIX = ".tmp"


@functools.cache
def _umask() -> int:
    """The process umask, read once (reading it means setting it, so not on every write, where another
    thread could create a file in between)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, write: Callable[[Any], None] | bytes) -> None:
    """Write a file atomically. ``write`` is either the bytes to write or a callable ``write(f)`` that
    fills the temp file (opened binary), e.g. ``lambda f: np.savez(f, **arrays)`` or
    ``lambda f: fig.savefig(f, format="png")``. Parent directories are created."""
    import tempfile

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            if isinstance(write, (bytes, bytearray, memoryview)):
                f.write(write)
            else:
                write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text atomically (see ``atomic_write_bytes``)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _sanitize(o: Any) -> Any:
    """Recursively replace non-finite floats by None and NumPy / path objects by plain JSON values."""
    if isinstance(o, dict):
        return {str(k) if not isinstance(k, str) else k: _sanitize(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_sanitize(v) for v in o]
    if isinstance(o, np.ndarray):
        return _sanitize(o.tolist())
    if isinstance(o, (bool, np.bool_)):
        return bool(o)
    if isinstance(o, (int, np.integer)):
        return int(o)
    if isinstance(o, (float, np.floating)):
        f = float(o)
        return f if math.isfinite(f) else None
    if isinstance(o, pathlib.PurePath):
        return str(o)
    return o


def dumps_strict(obj: Any, indent: int | None = 2) -> str:
    """JSON text that every parser accepts: NaN/inf become ``null`` (never the bare ``NaN`` token),
    NumPy scalars and arrays become numbers and lists, paths become strings."""
    return json.dumps(_sanitize(obj), indent=indent, allow_nan=False)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as strict JSON (``dumps_strict``) to ``path`` atomically, with a final newline."""
    atomic_write_text(path, dumps_strict(obj) + "\n")


class JSONLError(ValueError):
    """A JSON-lines file that is not one JSON object per non-blank line; the message names the file and,
    where there is one, the line."""


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of the UTF-8 file ``path`` (numbers from 1, blank
    lines skipped but counted), read lazily in order. A line that is not JSON, or not a JSON object, is a
    :class:`JSONLError` ``"<path> line <n>: ..."``; text that is not UTF-8 is one naming the file. A missing
    or unreadable file raises the ``OSError`` itself (``FileNotFoundError``...), for the caller to name the
    option it came from. Python's ``json`` reader is used as is, so the bare ``NaN`` / ``Infinity`` tokens
    parse as floats (callers that need finite numbers check them)."""
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise JSONLError(f"{path}: not UTF-8 text ({e})") from None
    for ln, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise JSONLError(f"{path} line {ln}: malformed JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise JSONLError(f"{path} line {ln}: expected a JSON object, got {type(obj).__name__}")
        yield ln, obj


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of ``path``, one per non-blank line, in order (errors: see :func:`iter_jsonl`)."""
    return [obj for _, obj in iter_jsonl(path)]


def remove_stale_temps(directory: str | os.PathLike, name: str | None = None, *,
                       min_age_s: float = 0.0) -> list[pathlib.Path]:
    """Delete temp files left by interrupted atomic writes in ``directory`` (``<name>.*.tmp``; every
    ``*.tmp`` of this writer's pattern when ``name`` is None), only those last modified at least
    ``min_age_s`` seconds ago (so a concurrent writer's temp file is left alone). Returns what was removed."""
    import time

    now = time.time()
    d = pathlib.Path(directory)
    if not d.is_dir():
        return []
    pattern = f"{name}.*{TMP_SUFFIX}" if name else f"*.*{TMP_SUFFIX}"
    removed = []
    for p in d.glob(pattern):
        if p.is_file():
            try:
                if min_age_s and now - p.stat().st_mtime < min_age_s:
                    continue
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed
