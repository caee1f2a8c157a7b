"""Rendering trajectories to token ids and per-token step ids.

Two renderings:

* ``reference`` reproduces the authors' released scorer: message ``i`` becomes the text
  ``"\\n[role]: content"`` (no leading newline for the first message); an assistant message
  gets its tool calls appended as ``"\\ntool_call(name, args)"`` lines (``args`` printed as the
  Python dict, or verbatim when the source stored the arguments as a JSON string) and, if the
  result is empty, the text ``[assistant action]``. Each message text is tokenized on its own
  (no special tokens) and the pieces are concatenated after BOS (when the tokenizer has one).
* ``chat`` renders the messages through the tokenizer's chat template; each message's content is
  located in the rendered text and its character range mapped to the tokens that overlap it.

Output per trajectory: ``input_ids [T]`` and ``step_ids [T]``: ``step_ids[p] = k`` when token
``p`` is a token of the k-th scored action (and is a prediction target, i.e. ``p >= 1``), else
-1. The log-prob of token ``p`` is predicted at position ``p-1``, so a scorer pairs
``targets = input_ids[1:]`` with ``step_ids[1:]``. ``num_steps`` counts every action of the
trajectory, including actions truncated away (the authors count them as 0.0-valued steps).

Over-long trajectories keep their tail (the authors' rule): the first ``T - max_length`` tokens
are dropped and the `Truncation` record says how many tokens and steps were lost.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pa_jax.data.schema import DataError, Message, Trajectory

RENDERINGS = ("reference", "chat")


@dataclass(frozen=True)
class Truncation:
    """What max-length truncation removed from one trajectory (all zeros when nothing was cut)."""

    original_tokens: int
    kept_tokens: int
    dropped_tokens: int
    steps_partly_cut: int  # actions that lost some but not all of their target tokens
    steps_lost: int  # actions with no target token left

    @property
    def truncated(self) -> bool:
        return self.dropped_tokens > 0

    def as_dict(self) -> dict:
        return {
            "original_tokens": self.original_tokens, "kept_tokens": self.kept_tokens,
            "dropped_tokens": self.dropped_tokens, "steps_partly_cut": self.steps_partly_cut,
            "steps_lost": self.steps_lost,
        }


@dataclass(frozen=True)
class Rendered:
    """Token ids [T] int32, step ids [T] int32 (-1 = not a scored target), num_steps, truncation."""

    trajectory_id: str
    input_ids: np.ndarray
    step_ids: np.ndarray
    num_steps: int
    truncation: Truncation

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def format_tool_call(name: str, arguments: Any, arguments_text: str | None = None) -> str:
    """``tool_call(name, args)`` as the authors' ``pa/trajectory.py`` formats it, ``f"{args}"`` of
    the stored value: a dict prints as Python prints it; arguments stored as a JSON string
    (``arguments_text``: tau-bench v1, BFCL-style files) print verbatim, character for character."""
    if arguments_text is not None:
        return f"tool_call({name}, {arguments_text})"
    return f"tool_call({name}, {arguments if arguments is not None else {}})"


def message_texts(traj: Trajectory) -> list[str]:
    """The authors' per-message texts: ``"\\n[role]: content"`` (+ tool calls for assistants)."""
    texts = []
    for i, m in enumerate(traj.messages):
        sep = "\n" if i > 0 else ""
        if m.role == "assistant" and traj.format in ("tau2", "tau_bench_v1"):
            texts.append(f"{sep}[assistant]: {_assistant_text(m)}")
        else:
            texts.append(f"{sep}[{m.role}]: {m.content}")
    return texts


def _assistant_text(m: Message) -> str:
    tc = ""
    if m.tool_calls:
        tc = "\n" + "\n".join(format_tool_call(c.name, c.arguments, c.arguments_text) for c in m.tool_calls)
    return (m.content + tc).strip() or "[assistant action]"


def _encode_many(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Tokenize each text on its own without special tokens (HF tokenizer or tokenizers.Tokenizer)."""
    if not texts:
        return []
    if hasattr(tokenizer, "encode_batch") and not hasattr(tokenizer, "apply_chat_template"):
        return [e.ids for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]
    return [list(x) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def bos_token_id(tokenizer: Any) -> int | None:
    return getattr(tokenizer, "bos_token_id", None)


def _truncate(
    ids: np.ndarray, step_ids: np.ndarray, num_steps: int, max_length: int | None
) -> tuple[np.ndarray, np.ndarray, Truncation]:
    """Keep the last ``max_length`` tokens; position 0 is never a target, so its step id is -1."""
    n = int(ids.shape[0])
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    before = np.bincount(step_ids[step_ids >= 0], minlength=num_steps)
    if max_length is not None and n > max_length:
        ids, step_ids = ids[n - max_length:], step_ids[n - max_length:].copy()
    step_ids = step_ids.copy()
    if step_ids.shape[0]:
        step_ids[0] = -1
    after = np.bincount(step_ids[step_ids >= 0], minlength=num_steps)
    had = before > 0
    lost = int(np.sum(had & (after == 0)))
    partly = int(np.sum(had & (after > 0) & (after < before)))
    kept = int(ids.shape[0])
    return ids, step_ids, Truncation(n, kept, n - kept, partly, lost)


def render_reference(traj: Trajectory, tokenizer: Any, max_length: int | None = None) -> Rendered:
    """The authors' rendering (module docstring); ``max_length`` keeps the tail."""
    texts = message_texts(traj)
    pieces = _encode_many(tokenizer, texts)
    bos = bos_token_id(tokenizer)
    ids: list[int] = [bos] if bos is not None else []
    steps: list[int] = [-1] * len(ids)
    k = 0
    for piece, is_action in zip(pieces, traj.action_mask):
        ids.extend(piece)
        steps.extend([k if is_action else -1] * len(piece))
        k += int(is_action)
    arr, st, tr = _truncate(np.asarray(ids, np.int32), np.asarray(steps, np.int32), k, max_length)
    return Rendered(traj.id, arr, st, k, tr)


def chat_messages(traj: Trajectory) -> list[dict]:
    """Messages for a chat template: role as in the source, tool calls appended to the content."""
    out = []
    for m in traj.messages:
        content = _assistant_text(m) if m.role == "assistant" and m.tool_calls else m.content
        out.append({"role": m.role, "content": content})
    return out


def render_chat(traj: Trajectory, tokenizer: Any, max_length: int | None = None) -> Rendered:
    """Chat-template rendering: action tokens are those whose character range overlaps the content
    of an action message inside the rendered text (special / template tokens are not scored)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("rendering 'chat' needs a tokenizer with a chat template; use --rendering reference")
    msgs = chat_messages(traj)
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
    steps = np.full(ids.shape, -1, np.int32)
    cursor, k = 0, 0
    for i, (m, is_action) in enumerate(zip(msgs, traj.action_mask)):
        content = m["content"]
        if not content.strip():
            k += int(is_action)
            continue
        start = text.find(content, cursor)
        if start < 0:
            content = content.strip()
            start = text.find(content, cursor)
        if start < 0:
            raise DataError(
                f"{traj.source} [{traj.item}]: message {i} not found verbatim in the chat-template output"
            )
        end = start + len(content)
        cursor = end
        if is_action:
            hit = (offsets[:, 1] > start) & (offsets[:, 0] < end) & (offsets[:, 1] > offsets[:, 0])
            steps[hit] = k
            k += 1
    arr, st, tr = _truncate(ids, steps, k, max_length)
    return Rendered(traj.id, arr, st, k, tr)


def render(traj: Trajectory, tokenizer: Any, *, rendering: str = "reference", max_length: int | None = None) -> Rendered:
    if rendering == "reference":
        return render_reference(traj, tokenizer, max_length)
    if rendering == "chat":
        return render_chat(traj, tokenizer, max_length)
    raise ValueError(f"rendering must be one of {RENDERINGS}, got {rendering!r}")
