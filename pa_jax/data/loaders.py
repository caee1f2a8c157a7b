"""Loaders: tau2-bench simulations, tau-bench v1 trajectories, Who&When, best-of-N directories.

``load(path)`` auto-detects the format of a file or a directory and returns a `Dataset`.
Structural problems (malformed JSON, missing fields, unknown roles, wrong types) raise
`DataError` naming the file and the item. Items that are well formed but cannot be scored
(no messages, no scored action, out-of-range mistake step) are kept out of the trajectories and
listed in ``Dataset.skipped`` with the reason. A missing label is *not* skipped here (``pa-jax
score`` needs none): the applications call ``Dataset.require("reward" | "mistake_step")``.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import re
from typing import Any, Iterable

from pa_jax.data.schema import DataError, Dataset, Message, Skipped, ToolCall, Trajectory

TAU_ROLES = frozenset({"system", "user", "assistant", "tool"})
WHO_AND_WHEN_SPLITS = ("Hand-Crafted", "Algorithm-Generated")
_TRIAL_RE = re.compile(r"^trial_(\d+)$")


def _read_json(path: pathlib.Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON ({e})") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e


def _field(obj: Any, key: str, where: str, types: type | tuple[type, ...] | None = None) -> Any:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise DataError(f"{where}: missing field {key!r}")
    v = obj[key]
    if types is not None and not isinstance(v, types):
        raise DataError(f"{where}: field {key!r} must be {types}, got {type(v).__name__}")
    return v


def _content(msg: dict, where: str) -> str:
    c = msg.get("content", "")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # OpenAI content parts
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in c)
    raise DataError(f"{where}: field 'content' must be a string, list or null, got {type(c).__name__}")


def _reward(v: Any, where: str) -> float | None:
    """A reward label: None (absent) or a finite number (JSON's NaN / Infinity tokens are refused: a NaN
    reward would count as a failure and +inf as a success without anyone noticing)."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise DataError(f"{where}: reward must be a number, got {v!r}")
    if not math.isfinite(v):
        raise DataError(f"{where}: reward must be a finite number, got {v!r}")
    return float(v)


def _trial(v: Any, where: str) -> int | None:
    """A trial index: None (absent), an integer or a string holding one (refused otherwise)."""
    if v is None:
        return None
    if isinstance(v, bool) or isinstance(v, float) and not v.is_integer():
        raise DataError(f"{where}: trial must be an integer, got {v!r}")
    try:
        return int(str(v).strip()) if isinstance(v, str) else int(v)
    except (TypeError, ValueError):
        raise DataError(f"{where}: trial must be an integer, got {v!r}") from None


def _tool_call(name: Any, args: Any, where: str) -> ToolCall:
    """A tool call: the name a non-empty string; the arguments an object, a JSON string of one, or absent."""
    if not isinstance(name, str) or not name:
        raise DataError(f"{where}: tool call 'name' must be a non-empty string, got {name!r}")
    raw = args if isinstance(args, str) else None  # kept verbatim: the authors' rendering prints the string
    args = _parse_args(args)
    if args is not None and not isinstance(args, (dict, str)):
        raise DataError(f"{where}: tool call 'arguments' must be an object or a JSON string, got "
                        f"{type(args).__name__} {args!r:.60}")
    return ToolCall(name, args if args is not None else {}, raw)


def _parse_args(args: Any) -> Any:
    if isinstance(args, str):
        try:
            return json.loads(args)
        except json.JSONDecodeError:
            return args
    return args


def _tau_messages(raw: Any, where: str, *, openai_tool_calls: bool) -> tuple[Message, ...]:
    if not isinstance(raw, list):
        raise DataError(f"{where}: messages must be a list, got {type(raw).__name__}")
    out = []
    for j, m in enumerate(raw):
        w = f"{where} message {j}"
        role = _field(m, "role", w, str)
        if role not in TAU_ROLES:
            raise DataError(f"{w}: unknown role {role!r} (expected one of {sorted(TAU_ROLES)})")
        calls = []
        for k, tc in enumerate(m.get("tool_calls") or []):
            wk = f"{w} tool_call {k}"
            if not tc:
                continue
            if not isinstance(tc, dict):
                raise DataError(f"{wk}: expected a JSON object, got {type(tc).__name__}")
            if openai_tool_calls and "function" in tc:
                fn = _field(tc, "function", wk, dict)
                calls.append(_tool_call(_field(fn, "name", wk), fn.get("arguments", {}), wk))
            else:
                calls.append(_tool_call(_field(tc, "name", wk), tc.get("arguments", {}), wk))
        out.append(Message(role=role, content=_content(m, w), tool_calls=tuple(calls)))
    return tuple(out)


def _tau_action_mask(messages: tuple[Message, ...], raw: Any = None, where: str = "") -> tuple[bool, ...]:
    """Scored actions of tau-bench trajectories: the assistant messages (authors' rule).

    pa-jax extension (tau2 files): an assistant message with ``"scored": false`` is not one of the agent's
    decisions (e.g. an in-context demonstration exchange at the start of every chat) and is not scored."""
    mask = [m.role == "assistant" for m in messages]
    for j, m in enumerate(raw if isinstance(raw, list) else []):
        if isinstance(m, dict) and "scored" in m:
            v = m["scored"]
            if not isinstance(v, bool):
                raise DataError(f"{where} message {j}: field 'scored' must be true or false, got {v!r}")
            if not v and messages[j].role != "assistant":
                raise DataError(f"{where} message {j}: 'scored': false applies to assistant messages only "
                                f"(role {messages[j].role!r} is never scored)")
            mask[j] = mask[j] and v
    return tuple(mask)


def _mistake_step(v: Any, where: str) -> int | None:
    """Optional ``mistake_step`` (an integer, or a string holding one): index into the messages of the decisive
    error (Who&When's field; in tau2 files a pa-jax extension for tasks with exact ground truth)."""
    if v is None:
        return None
    if isinstance(v, bool):
        raise DataError(f"{where}: mistake_step must hold an integer, got {v!r}")
    try:
        return int(str(v).strip())
    except ValueError:
        raise DataError(f"{where}: mistake_step must hold an integer, got {v!r}") from None


def _finish(traj: Trajectory, skipped: list[Skipped], out: list[Trajectory]) -> None:
    if not traj.messages:
        skipped.append(Skipped(traj.source, traj.item, "empty trajectory (no messages)"))
    elif traj.num_steps == 0:
        skipped.append(Skipped(traj.source, traj.item, "no scored action message"))
    else:
        out.append(traj)


def load_tau2(path: str | os.PathLike, *, trial: int | None = None, id_prefix: str = "") -> Dataset:
    """tau2-bench simulation file: ``{"simulations": [{id, task_id, messages, reward_info{reward}}]}``."""
    path = pathlib.Path(path)
    data = _read_json(path)
    sims = _field(data, "simulations", str(path), list)
    if not sims:
        raise DataError(f"{path}: 'simulations' is empty")
    out: list[Trajectory] = []
    skipped: list[Skipped] = []
    for i, sim in enumerate(sims):
        where = f"{path} simulation {i}"
        raw_msgs = _field(sim, "messages", where)
        msgs = _tau_messages(raw_msgs, where, openai_tool_calls=False)
        ri = sim.get("reward_info")
        reward = _reward(ri.get("reward") if isinstance(ri, dict) else None, where)
        t_trial = trial if trial is not None else _trial(sim.get("trial"), where)
        sid = str(sim.get("id", i))
        traj = Trajectory(
            id=f"{id_prefix}{sid}", task_id=str(_field(sim, "task_id", where)), messages=msgs,
            action_mask=_tau_action_mask(msgs, raw_msgs, where), reward=reward,
            success=None if reward is None else reward >= 1.0, source=str(path),
            item=f"simulation {i}", trial=t_trial, format="tau2",
            mistake_step=_mistake_step(sim.get("mistake_step"), where),
        )
        if traj.mistake_step is not None and not (0 <= traj.mistake_step < len(msgs)
                                                  and traj.action_mask[traj.mistake_step]):
            skipped.append(Skipped(str(path), traj.item, f"mistake_step {traj.mistake_step} is not a scored "
                                   f"action message of this simulation ({len(msgs)} messages)"))
            continue
        _finish(traj, skipped, out)
    _unique_ids(out)
    return Dataset(out, skipped, [str(path)])


def load_tau_bench_v1(path: str | os.PathLike) -> Dataset:
    """tau-bench v1 trajectory file: ``[{task_id, reward, traj: [OpenAI chat], trial}]``."""
    path = pathlib.Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of trajectories, got {type(data).__name__}")
    if not data:
        raise DataError(f"{path}: no trajectories")
    out: list[Trajectory] = []
    skipped: list[Skipped] = []
    for i, x in enumerate(data):
        where = f"{path} item {i}"
        msgs = _tau_messages(_field(x, "traj", where), where, openai_tool_calls=True)
        reward = _reward(x.get("reward"), where)
        task_id = str(_field(x, "task_id", where))
        trial = _trial(x.get("trial"), where)
        traj = Trajectory(
            id=f"{task_id}/trial{trial}" if trial is not None else f"item{i}", task_id=task_id,
            messages=msgs, action_mask=_tau_action_mask(msgs), reward=reward,
            success=None if reward is None else reward >= 1.0, source=str(path), item=f"item {i}",
            trial=trial, format="tau_bench_v1",
        )
        _finish(traj, skipped, out)
    _unique_ids(out)
    return Dataset(out, skipped, [str(path)])


def _unique_ids(trajs: list[Trajectory]) -> None:
    """A repeated id keeps its text with a suffix on the repeats (``3/trial0``, ``3/trial0#2``): ids stay
    unique and readable, the others untouched. Whether a repeat is a duplicated rollout is decided (refused,
    or kept and listed) by pa_jax.commands.preflight, not renamed away here."""
    seen: dict[str, int] = {}
    for j, t in enumerate(trajs):
        seen[t.id] = seen.get(t.id, 0) + 1
        if seen[t.id] > 1:
            trajs[j] = t.replace(id=f"{t.id}#{seen[t.id]}")


def _who_when_agent(role: str) -> str:
    """Hand-Crafted roles such as 'Orchestrator (thought)' / 'Orchestrator (-> WebSurfer)' -> base name."""
    return role.split(" (", 1)[0].strip()


def load_who_and_when_file(path: str | os.PathLike, split: str | None = None) -> Dataset:
    """One Who&When item: ``{history: [{role, content[, name]}], mistake_agent, mistake_step: "k"}``.

    split: 'Hand-Crafted' (agent in ``role``) or 'Algorithm-Generated' (agent in ``name``); None
    takes it from the parent directory name, else from whether messages carry ``name``.
    Scored actions (authors' rule): every message with non-empty content, except the opening
    ``human`` message of Hand-Crafted.
    """
    path = pathlib.Path(path)
    data = _read_json(path)
    where = str(path)
    history = _field(data, "history", where, list)
    if split is None:
        split = path.parent.name if path.parent.name in WHO_AND_WHEN_SPLITS else None
    if split is None:
        split = "Algorithm-Generated" if any(isinstance(m, dict) and "name" in m for m in history) else "Hand-Crafted"
    if split not in WHO_AND_WHEN_SPLITS:
        raise DataError(f"{where}: unknown Who&When split {split!r}")
    msgs, mask = [], []
    for j, m in enumerate(history):
        w = f"{where} history {j}"
        role = _field(m, "role", w, str)
        if not role.strip():
            raise DataError(f"{w}: empty role")
        content = _content(m, w)
        if split == "Algorithm-Generated":
            agent = m.get("name")
            if not isinstance(agent, str) or not agent:
                raise DataError(f"{w}: Algorithm-Generated message lacks the agent field 'name'")
        else:
            agent = _who_when_agent(role)
        msgs.append(Message(role=role, content=content, agent=agent))
        if split == "Hand-Crafted" and j == 0 and role.lower() == "human":
            mask.append(False)
        else:
            mask.append(bool(content.strip()))
    ms = data.get("mistake_step")
    skipped: list[Skipped] = []
    mistake_step = None
    if ms is not None:
        try:
            mistake_step = int(str(ms).strip())
        except ValueError:
            raise DataError(f"{where}: mistake_step must hold an integer, got {ms!r}") from None
    item = f"{split}/{path.name}"
    traj = Trajectory(
        id=f"{split}/{path.stem}", task_id=str(data.get("question_ID", path.stem)), messages=tuple(msgs),
        action_mask=tuple(mask), mistake_step=mistake_step,
        mistake_agent=data.get("mistake_agent"), source=str(path), item=item,
        format="who_and_when_" + split.lower().replace("-", "_"),
        meta={"split": split, "mistake_reason": data.get("mistake_reason")},
    )
    out: list[Trajectory] = []
    if mistake_step is not None and not 0 <= mistake_step < len(msgs):
        skipped.append(Skipped(str(path), item, f"mistake_step {mistake_step} outside history of {len(msgs)}"))
    else:
        _finish(traj, skipped, out)
    return Dataset(out, skipped, [str(path)])


def _numeric_key(p: pathlib.Path) -> tuple:
    return (0, int(p.stem), "") if p.stem.isdigit() else (1, 0, p.stem)


def _concat(parts: Iterable[Dataset]) -> Dataset:
    t, s, f = [], [], []
    for d in parts:
        t += d.trajectories
        s += d.skipped
        f += d.files
    ids = [x.id for x in t]
    dup = {i for i in ids if ids.count(i) > 1} if len(set(ids)) != len(ids) else set()
    if dup:
        raise DataError(f"duplicate trajectory ids across inputs: {sorted(dup)[:5]}")
    return Dataset(t, s, f)


def load_who_and_when(path: str | os.PathLike) -> Dataset:
    """A Who&When split directory (``Hand-Crafted/`` or ``Algorithm-Generated/``) or their parent."""
    path = pathlib.Path(path)
    splits = [path / s for s in WHO_AND_WHEN_SPLITS if (path / s).is_dir()]
    if splits:
        return _concat(load_who_and_when(s) for s in splits)
    files = sorted(path.glob("*.json"), key=_numeric_key)
    if not files:
        raise DataError(f"{path}: no *.json Who&When items")
    split = path.name if path.name in WHO_AND_WHEN_SPLITS else None
    return _concat(load_who_and_when_file(f, split) for f in files)


def load_best_of_n(path: str | os.PathLike, domain: str | None = None) -> Dataset:
    """Best-of-N directory ``trial_<i>/<domain>.json`` (tau2 simulation files), grouped by task id."""
    path = pathlib.Path(path)
    trials = sorted(
        ((int(m.group(1)), p) for p in path.iterdir() if p.is_dir() and (m := _TRIAL_RE.match(p.name))),
    )
    if not trials:
        raise DataError(f"{path}: no trial_<i>/ subdirectories")
    parts = []
    for i, d in trials:
        files = sorted(d.glob("*.json")) if domain is None else [d / f"{domain}.json"]
        if not files:  # an empty trial would silently turn best-of-N into best-of-fewer
            raise DataError(f"{d}: best-of-N trial directory holds no *.json file (remove it or fill it)")
        for f in files:
            if not f.exists():
                raise DataError(f"{f}: missing (best-of-N trial {i}, domain {domain!r})")
            ds = load_file(f)
            ds.trajectories = [t.replace(trial=i, id=f"trial_{i}/{f.stem}/{t.id}") for t in ds.trajectories]
            parts.append(ds)
    return _concat(parts)


def detect_format(data: Any) -> str:
    if isinstance(data, dict) and "simulations" in data:
        return "tau2"
    if isinstance(data, dict) and "history" in data:
        return "who_and_when"
    if isinstance(data, list) and data and isinstance(data[0], dict) and "traj" in data[0]:
        return "tau_bench_v1"
    return "unknown"


def load_file(path: str | os.PathLike) -> Dataset:
    path = pathlib.Path(path)
    fmt = detect_format(_read_json(path))
    if fmt == "tau2":
        return load_tau2(path)
    if fmt == "tau_bench_v1":
        return load_tau_bench_v1(path)
    if fmt == "who_and_when":
        return load_who_and_when_file(path)
    raise DataError(
        f"{path}: unrecognized trajectory format (expected a tau2 simulation file with 'simulations', "
        "a tau-bench v1 list of items with 'traj', or a Who&When item with 'history')"
    )


def load(path: str | os.PathLike) -> Dataset:
    """Load a file or a directory, detecting the format.

    Directories: ``trial_<i>/`` subdirectories -> best-of-N; ``Hand-Crafted/`` /
    ``Algorithm-Generated/`` subdirectories or a directory of Who&When items -> Who&When;
    otherwise every ``*.json`` in it.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_file():
        return load_file(path)
    if any(_TRIAL_RE.match(p.name) for p in path.iterdir() if p.is_dir()):
        return load_best_of_n(path)
    if any((path / s).is_dir() for s in WHO_AND_WHEN_SPLITS):
        return load_who_and_when(path)
    files = sorted(path.glob("*.json"), key=_numeric_key)
    if not files:
        raise DataError(f"{path}: no *.json files")
    if detect_format(_read_json(files[0])) == "who_and_when":
        return load_who_and_when(path)
    return _concat(load_file(f) for f in files)
