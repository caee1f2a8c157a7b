"""Every check that can run before a model is loaded, in one place (`pa-jax score|uq|bon|fa`).

``check(args, command=..., require=...)`` runs, in this order, and raises ``ValueError`` (exit status 2, one
line naming the option, file, item, field or tensor and what was expected) at the first problem:

1. options: finite numbers in range (``--beta``, ``--success-threshold``, ``--bins``, ``--bootstrap``, ...);
2. paths: ``--policy`` / ``--reference`` / ``--data`` exist locally (nothing is ever downloaded: a name such
   as ``gpt2`` that is not a path is refused, not looked up on a hub);
3. outputs: ``--out`` / ``--jsonl`` / ``--cache`` can be written (a probe file is created and removed in the
   destination directory); stale temp files of this run's own outputs are removed;
4. checkpoints: config.json / GGUF metadata parse as a supported decoder; the context window of each model
   (`context_window`); the tokenizer files are there and load offline; both tokenizers agree; every
   tokenizer id is inside both models' vocabularies; a reference byte-identical to the policy (another path,
   same content) is noticed and run once;
5. data: loads (`pa_jax.data.load`: structure, finite rewards, integer trials, tool calls), every message
   text is valid Unicode (no lone surrogates), labels present (``require``), duplicate rollouts
   (same task and trial, or the same content) refused unless ``--allow-duplicates``; best-of-N groups of
   unequal size are reported; no scorable trajectory: the results file listing the skipped items is written
   and the error gives their reasons;
6. lengths: ``--max-length`` defaults to the smaller context window of the two models; an explicit value
   above it is refused unless ``--allow-beyond-context``; ``--top-k`` above the vocabulary is clamped (noted).

What can only fail later (an interrupted or failing forward) keeps every finished batch in ``--cache``; the
same command with the same ``--cache`` resumes from there (said in the error, see ``resume_hint``).
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import math
import os
import pathlib
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

from pa_jax.data import DataError, Dataset, Trajectory, load, message_texts
from pa_jax.data.tokenizers import check_tokenizers, load_tokenizer as _load_tokenizer
from pa_jax.models.lora import is_adapter_dir, resolve_base

# files that carry a tokenizer in a Hugging Face checkpoint directory (any one suffices)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken", "vocab.txt")
# rope scalings that extend the trained context to original_max_position_embeddings * factor
_EXTENDING_ROPE = ("linear", "dynamic", "yarn", "longrope", "llama3")


@dataclass
class Checked:
    """What the checks established, for the scoring that follows and for the results file."""

    dataset: Dataset
    trajectories: list[Trajectory]
    tokenizer: Any
    reference_is_policy: bool
    record: dict = field(default_factory=dict)  # -> results["checks"]


def note(checked_notes: list[str], msg: str) -> None:
    """A note the user should see: printed to stderr now and kept in the results."""
    checked_notes.append(msg)
    print(f"pa-jax: note: {msg}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- options
def _finite(name: str, v: float, *, positive: bool = False) -> None:
    if v is None:
        return
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")


def _at_least(name: str, v: int | None, lo: int) -> None:
    if v is not None and v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")


def check_options(args: argparse.Namespace) -> None:
    """Numbers in range and finite (argparse's float() takes 'nan' and 'inf')."""
    _finite("--beta", args.beta, positive=True)
    _finite("--success-threshold", getattr(args, "success_threshold", None))
    _at_least("--max-length", args.max_length, 2)
    _at_least("--top-k", args.top_k, 1)
    _at_least("--max-batch-tokens", args.max_batch_tokens, 1)
    _at_least("--limit", args.limit, 1)
    _at_least("--tasks", getattr(args, "tasks", None), 1)
    _at_least("--bins", getattr(args, "bins", None), 1)
    _at_least("--bootstrap", getattr(args, "bootstrap", None), 1)
    _at_least("--folds", getattr(args, "folds", None), 2)
    for k in getattr(args, "k", None) or []:
        _at_least("--k", k, 1)
    for g in getattr(args, "gamma", None) or []:
        if not (math.isfinite(g) and 0.0 < g <= 1.0):
            raise ValueError(f"--gamma must be in (0, 1], got {g}")


# ---------------------------------------------------------------------------------------------- paths
def check_model_path(path: str, role: str) -> pathlib.Path:
    """A local checkpoint: a directory with config.json and a tokenizer, or a .gguf file."""
    p = pathlib.Path(path)
    if not p.exists():
        raise ValueError(f"--{role} {path}: no such file or directory (pa-jax reads local checkpoints only, "
                         "never a hub name: give a checkpoint directory or a .gguf file)")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(f"--{role} {path}: a file but not a .gguf file (give a checkpoint directory with "
                             "config.json, or a .gguf file)")
        return p
    if not (p / "config.json").is_file():
        raise ValueError(f"--{role} {path}: no config.json in the directory (not a Hugging Face checkpoint)")
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(f"--{role} {path}: no tokenizer in the directory (expected one of {', '.join(TOKENIZER_FILES)}; "
                         "copy the tokenizer files of the model into it)")
    return p


def checkpoint_and_tokenizer(path: str, base: str | None, role: str) -> tuple[pathlib.Path, pathlib.Path]:
    """(the checkpoint whose config and weights define the model, where its tokenizer is). A PEFT adapter
    directory (adapter_config.json) stands on its base: ``--ROLE-base``, else the adapter's own
    base_model_name_or_path when that is a local path (never a hub name); its tokenizer is the adapter's own
    when it ships one, else the base's."""
    p = pathlib.Path(path)
    if not p.exists():
        return check_model_path(path, role), p  # raises: no such file
    if not is_adapter_dir(p):
        if base is not None:
            raise ValueError(f"--{role}-base {base} given but --{role} {path} is not a PEFT adapter directory "
                             "(no adapter_config.json)")
        q = check_model_path(path, role)
        return q, q
    try:
        b = resolve_base(p, base)
    except ValueError as e:
        raise ValueError(f"--{role} {path}: {e}") from None
    b = check_model_path(str(b), f"{role}-base")
    has_tok = any((p / f).is_file() for f in TOKENIZER_FILES)
    return b, (p if has_tok else b)


# ---------------------------------------------------------------------------------------------- outputs
def check_writable(path: str, option: str) -> None:
    """``path`` can be created or replaced: it is not a directory, its nearest existing ancestor is a
    directory, and a probe file can be created (and is removed) in the destination directory."""
    p = pathlib.Path(path)
    if p.is_dir():
        raise ValueError(f"{option} {path}: is a directory (give a file name)")
    anc = p.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise ValueError(f"{option} {path}: {anc} is a file, not a directory")
    probe_dir = p.parent if p.parent.exists() else anc
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot write in {probe_dir} ({e.strerror or e})") from None


def check_cache_dir(path: str) -> None:
    """The cache directory exists (made if missing) and takes a probe file."""
    p = pathlib.Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"--cache {path}: is a file, not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--cache {path}: cannot create the directory ({e.strerror or e})") from None
    check_writable(str(p / "probe"), "--cache")


def clean_stale_temps(path: str | None) -> list[str]:
    """Remove temp files of earlier interrupted atomic writes of ``path`` (``<name>.*.tmp``, at least a
    minute old so that a concurrent writer's file is left alone)."""
    if not path:
        return []
    from pa_jax.io import remove_stale_temps

    p = pathlib.Path(path)
    return [str(x) for x in remove_stale_temps(p.parent, p.name, min_age_s=60.0)]


# ---------------------------------------------------------------------------------------------- checkpoints
def model_config(p: pathlib.Path, role: str):
    """The checkpoint's ModelConfig from config.json or the GGUF metadata (nothing else read)."""
    from pa_jax.models.config import ModelConfig

    try:
        if p.suffix == ".gguf":
            from pa_jax.models.gguf import gguf_config_dict

            return ModelConfig.from_hf_dict(gguf_config_dict(p))
        return ModelConfig.from_json_file(str(p / "config.json"))
    except Exception as e:  # noqa: BLE001 - re-raised naming the option and the path
        raise ValueError(f"--{role} {p}: cannot load as a decoder-only causal LM ({type(e).__name__}: {e})") from None


def check_weight_files(p: pathlib.Path, role: str) -> None:
    """Every safetensors shard is there, its header parses and every tensor lies inside the file (headers
    only; a .gguf file's tensors were checked when its metadata was read)."""
    if p.suffix == ".gguf":
        return
    from pa_jax.models.load import open_safetensors_dir

    try:
        open_safetensors_dir(p)
    except (ValueError, OSError) as e:
        raise ValueError(f"--{role} {p}: {e}") from None


def context_window(cfg) -> dict:
    """The number of positions a model was trained for: ``max_position_embeddings``, or, with a rope
    scaling that extends it (linear, dynamic, yarn, longrope, llama3), ``original_max_position_embeddings *
    factor`` when that is larger. A sliding window limits how far attention reaches, not the length, so it
    is recorded but not a limit."""
    n, source = int(cfg.max_position_embeddings), "max_position_embeddings"
    rope = dict(getattr(cfg, "rope", ()) or ()).get("full_attention")
    if rope is not None and rope.rope_type in _EXTENDING_ROPE and rope.factor and rope.original_max_position_embeddings:
        ext = int(rope.original_max_position_embeddings * rope.factor)
        if ext > n:
            n, source = ext, f"rope_scaling {rope.rope_type}: original_max_position_embeddings x factor"
    return {"positions": n, "source": source, "sliding_window": cfg.sliding_window}


def load_tokenizer(p: pathlib.Path, role: str) -> Any:
    """The checkpoint's tokenizer (:func:`pa_jax.data.tokenizers.load_tokenizer`, local files only: never a
    download); a failure names the option, the path and the loader's first line."""
    try:
        return _load_tokenizer(p)
    except ValueError as e:
        cause = e.__cause__ or e
        first = str(cause).splitlines()[0] if str(cause) else ""
        raise ValueError(f"--{role} {p}: cannot load its tokenizer ({type(cause).__name__}: {first})") from None


def max_token_id(tok: Any) -> int:
    """The largest id the tokenizer can produce (its vocabulary and added tokens)."""
    return max(tok.get_vocab().values())


def checkpoint_files(p: pathlib.Path) -> list[pathlib.Path]:
    """The files that define a checkpoint's model (weights and config; not the tokenizer or README)."""
    if p.is_file():
        return [p]
    return sorted(x for x in p.iterdir() if x.is_file() and (x.suffix == ".safetensors" or x.name in (
        "config.json", "model.safetensors.index.json")))


def same_content(a: list[pathlib.Path], b: list[pathlib.Path]) -> str | None:
    """SHA-256 of the files' contents when the two lists hold byte-identical files (in order), else None.
    The files are read side by side and the comparison stops at the first differing chunk, so two
    different models of one architecture (equal sizes, different weights) cost a few reads, not a hash of
    both."""
    if [f.stat().st_size for f in a] != [f.stat().st_size for f in b]:
        return None
    h = hashlib.sha256()
    for fa, fb in zip(a, b):
        with open(fa, "rb") as x, open(fb, "rb") as y:
            while True:
                ca, cb = x.read(1 << 22), y.read(1 << 22)
                if ca != cb:
                    return None
                if not ca:
                    break
                h.update(ca)
        h.update(b"\0")
    return h.hexdigest()


def same_checkpoint(a: pathlib.Path, b: pathlib.Path) -> str | None:
    """Why ``a`` and ``b`` are the same model ('same path' / 'same content (sha256 ...)'), or None."""
    if a.resolve() == b.resolve():
        return "same path"
    digest = same_content(checkpoint_files(a), checkpoint_files(b))
    return f"same content (sha256 {digest[:16]})" if digest else None


# ---------------------------------------------------------------------------------------------- data
def check_texts(trajs: list[Trajectory]) -> None:
    """Every message text encodes as UTF-8 (a lone surrogate from a '\\ud800' JSON escape does not)."""
    for t in trajs:
        for name, value in (("id", t.id), ("task_id", t.task_id)):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise DataError(f"{t.source} [{t.item}]: {name} is not valid Unicode text (lone surrogate "
                                f"{value[e.start:e.end]!r} at character {e.start})") from None
        for j, text in enumerate(message_texts(t)):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise DataError(f"{t.source} [{t.item}] message {j}: not valid Unicode text (lone surrogate "
                                f"{text[e.start:e.end]!r} at character {e.start}); fix the source text") from None


def find_duplicates(trajs: list[Trajectory]) -> list[dict]:
    """Rollouts that repeat one another: the same (task_id, trial) when the trial is known, else the same
    task and the same messages. Each group: task_id, trial, and the places (file, item) it occurs."""
    groups: dict = collections.defaultdict(list)
    for t in trajs:
        key = (t.task_id, t.trial) if t.trial is not None else (t.task_id, None, repr(t.messages))
        groups[key].append(t)
    return [{"task_id": k[0], "trial": k[1], "items": [f"{t.source} [{t.item}]" for t in v]}
            for k, v in groups.items() if len(v) > 1]


def group_sizes(trajs: list[Trajectory]) -> dict:
    """Best-of-N groups: rollouts per task; tasks with fewer than the largest group are listed."""
    sizes = collections.Counter(t.task_id for t in trajs)
    n = max(sizes.values())
    small = {k: v for k, v in sizes.items() if v < n}
    return {"n_tasks": len(sizes), "expected_n": n, "smaller_groups": small}


def skipped_summary(skipped) -> str:
    c = collections.Counter(s.reason for s in skipped)
    return "; ".join(f"{k} (x{v})" if v > 1 else k for k, v in c.most_common(5)) + ("; ..." if len(c) > 5 else "")


def write_refusal(args: argparse.Namespace, command: str, ds: Dataset, reason: str) -> None:
    """The results file of a run that scored nothing: why, and every skipped item with its reason."""
    if not args.out:
        return
    from pa_jax.io import atomic_write_json

    atomic_write_json(args.out, {
        "command": command, "error": reason,
        "config": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "n_loaded": len(ds.trajectories), "n_scored": 0, "n_skipped": len(ds.skipped),
        "skipped": [s.as_dict() for s in ds.skipped], "inputs": sorted(set(ds.files)),
    })


def resume_hint(args: argparse.Namespace) -> str:
    """What to do after a failure that happens while scoring (finished batches are in the cache)."""
    if getattr(args, "cache", None):
        return f"finished batches are kept in --cache {args.cache}; rerun the same command to resume from them"
    return "rerun with --cache DIR to keep finished batches (a rerun then resumes from them)"


# ---------------------------------------------------------------------------------------------- all
def check(args: argparse.Namespace, *, command: str, require: str | None) -> Checked:
    """Run every check (module docstring); set ``args.max_length`` / ``args.top_k`` to the values used."""
    notes: list[str] = []
    check_options(args)
    # paths and outputs first: nothing is loaded for a run that could not start or could not save
    pol, pol_tok = checkpoint_and_tokenizer(args.policy, getattr(args, "policy_base", None), "policy")
    ref, ref_tok = (checkpoint_and_tokenizer(args.reference, None, "reference") if args.reference is not None
                    else (None, None))
    adapters = any(x is not None and is_adapter_dir(pathlib.Path(x)) for x in (args.policy, args.reference))
    if getattr(args, "lora_mode", "merge") != "merge" and not is_adapter_dir(pathlib.Path(args.policy)):
        raise ValueError(f"--lora-mode {args.lora_mode}: --policy {args.policy} is not a PEFT LoRA adapter directory "
                         f"(no adapter_config.json); the option applies only to an adapter policy")
    if not pathlib.Path(args.data).exists():
        raise ValueError(f"--data {args.data}: no such file or directory")
    jsonl = getattr(args, "jsonl", None)
    if command == "score" and not jsonl and args.out and args.out.endswith(".json"):
        jsonl = args.out[: -len(".json")] + ".jsonl"  # score's default JSON-lines file beside --out
    for opt, path in (("--out", args.out), ("--jsonl", jsonl)):
        if path:
            check_writable(path, opt)
    if args.out and jsonl and pathlib.Path(args.out).resolve() == pathlib.Path(jsonl).resolve():
        raise ValueError(f"--out and --jsonl name the same file {args.out}")
    if args.cache:
        check_cache_dir(args.cache)
    removed = clean_stale_temps(args.out) + clean_stale_temps(jsonl)
    if removed:
        note(notes, f"removed {len(removed)} temp file(s) left by an interrupted earlier write: {removed[:3]}")

    # checkpoints: configs, context windows, tokenizers, same model
    cfgs = {"policy": model_config(pol, "policy")}
    check_weight_files(pol, "policy")
    if ref is not None:
        cfgs["reference"] = model_config(ref, "reference")
        check_weight_files(ref, "reference")
    # an adapter over a base is not its base: compare only plain checkpoints (the same adapter path twice is
    # still caught as the same path)
    if ref is not None and adapters:
        same = ("same path" if pathlib.Path(args.policy).resolve() == pathlib.Path(args.reference).resolve()
                else None)
    else:
        same = same_checkpoint(pol, ref) if ref is not None else None
    if same and same != "same path":
        note(notes, f"--reference {args.reference} is the --policy checkpoint ({same}): run once; progress "
                    "advantage is identically 0")
    tok = load_tokenizer(pol_tok, "policy")
    if ref is not None and not same:
        check_tokenizers(tok, load_tokenizer(ref_tok, "reference"))
    top = max_token_id(tok)
    for role, cfg in cfgs.items():
        if top >= cfg.vocab_size:
            raise ValueError(f"--{role} {getattr(args, role)}: the model's vocabulary has {cfg.vocab_size} rows but "
                             f"the tokenizer produces ids up to {top} (tokenizer and weights do not belong together)")
    windows = {role: context_window(cfg) for role, cfg in cfgs.items()}
    limit_role = min(windows, key=lambda r: windows[r]["positions"])
    limit = windows[limit_role]["positions"]
    allow_beyond = bool(getattr(args, "allow_beyond_context", False))
    if args.max_length is None:
        args.max_length, ml_source = limit, f"default: the context window of --{limit_role}"
    elif args.max_length > limit:
        if not allow_beyond:
            raise ValueError(
                f"--max-length {args.max_length} exceeds the context window of --{limit_role} "
                f"{getattr(args, limit_role)} ({limit} positions, {windows[limit_role]['source']}): give "
                f"--max-length {limit} or less (longer trajectories keep their tail, recorded per trajectory), "
                "or --allow-beyond-context to score past the trained positions")
        ml_source = "explicit, beyond the context window (--allow-beyond-context)"
        note(notes, f"--max-length {args.max_length} scores positions beyond the {limit}-position context window "
                    f"of --{limit_role} (--allow-beyond-context)")
    else:
        ml_source = "explicit"
    vocab = min(cfg.vocab_size for cfg in cfgs.values())
    if args.top_k > vocab:
        note(notes, f"--top-k {args.top_k} is larger than the {vocab}-token vocabulary: clamped to {vocab}")
        args.top_k = vocab

    # data
    ds = load(args.data)
    check_texts(ds.trajectories)
    if require:
        ds = ds.require(require)
    dups = find_duplicates(ds.trajectories)
    if dups and not getattr(args, "allow_duplicates", False):
        shown = "; ".join(f"task {d['task_id']!r} trial {d['trial']}: {' and '.join(d['items'][:3])}" for d in dups[:3])
        raise DataError(f"--data {args.data}: {len(dups)} duplicated rollout(s) (same task and trial, or same "
                        f"task and messages): {shown}{'; ...' if len(dups) > 3 else ''}; remove them, or pass "
                        "--allow-duplicates to keep them as separate rollouts (listed in the results)")
    if dups:
        note(notes, f"{len(dups)} duplicated rollout(s) kept as separate rollouts (--allow-duplicates; listed in "
                    "the results)")
    trajs = list(ds.trajectories)
    if getattr(args, "tasks", None):
        keep = set(list(dict.fromkeys(t.task_id for t in trajs))[: args.tasks])
        trajs = [t for t in trajs if t.task_id in keep]
    if args.limit:
        trajs = trajs[: args.limit]
    if not trajs:
        why = f"no scorable trajectory ({len(ds.skipped)} skipped: {skipped_summary(ds.skipped) or 'none loaded'})"
        write_refusal(args, command, ds, why)
        raise DataError(f"--data {args.data}: {why}" + (f"; every skipped item is listed in {args.out}" if args.out else ""))
    groups = None
    if command == "bon":
        groups = group_sizes(trajs)
        if groups["expected_n"] == 1:
            note(notes, f"every task has a single rollout: best-of-N is best-of-1 ({groups['n_tasks']} tasks)")
        elif groups["smaller_groups"]:
            sm = groups["smaller_groups"]
            note(notes, f"{len(sm)} of {groups['n_tasks']} tasks have fewer than {groups['expected_n']} rollouts "
                        f"(e.g. {dict(list(sm.items())[:3])}); their best-of-N is over fewer candidates")

    record = {
        "context_window": windows, "max_length": args.max_length, "max_length_source": ml_source,
        "top_k": args.top_k, "reference_is_policy": same, "duplicates": dups, "groups": groups,
        "removed_temp_files": removed, "notes": notes,
    }
    return Checked(ds, trajs, tok, bool(same), record)

