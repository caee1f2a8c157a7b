"""Shared reading / saving of the figure scripts in paper_figs/ (fig_*.py)."""
from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402,F401

from pa_jax.io import atomic_write_bytes  # noqa: E402
from pa_jax.io import read_jsonl as _read_jsonl  # noqa: E402


def read_json(path: str) -> dict:
    """A JSON object from ``path``; a clear ValueError naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return obj


def read_jsonl(path: str) -> list[dict]:
    """JSON objects, one per non-blank line (``pa_jax.io.read_jsonl``: errors name the file and the line);
    an unreadable file is a ValueError naming it too."""
    try:
        return _read_jsonl(path)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc})") from exc


def need(obj: dict, fields, where: str) -> None:
    missing = [f for f in fields if f not in obj]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")


def save(fig, path: str) -> str:
    """Save a figure atomically as PNG (pa_jax.io) and close it."""
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=130, bbox_inches="tight"))
    plt.close(fig)
    return path
