"""Shared plumbing of the `pa-jax score|uq|bon|fa` subcommands.

load data -> render with the policy tokenizer -> score both models (pa_jax.scoring, cached) ->
per-trajectory and per-step scores of every method (pa_jax.advantage / pa_jax.baselines) ->
the command's application -> results JSON (configuration, package versions, SHA-256 of every
input file, skipped items with reasons, truncation records) written atomically, and a summary table.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import pathlib
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pa_jax import advantage, baselines
from pa_jax.advantage import STEP_AGGS, TOKEN_AGGS  # noqa: F401  (re-exported: the commands' choices)
from pa_jax.data import RENDERINGS, Dataset, Rendered, Trajectory, render
from pa_jax.head import HeadStats

PA = "progress_advantage"


# ---------------------------------------------------------------------------------------------- arguments
def _agg_list(choices: Sequence[str]):
    def parse(s: str) -> list[str]:
        items = list(choices) if s == "all" else [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected 'all' or a comma list of {list(choices)}, got {s!r}")
        return items
    return parse


def add_common_arguments(p: argparse.ArgumentParser, *, token_agg: str = "mean", step_agg: str = "mean",
                         need_reference: bool = False) -> None:
    p.add_argument("--policy", required=True,
                   help="policy checkpoint: HF directory, .gguf file, or a PEFT LoRA adapter directory (see --policy-base)")
    p.add_argument("--policy-base", default=None,
                   help="base checkpoint (HF directory or .gguf) of a --policy given as a PEFT LoRA adapter directory; "
                        "default: the adapter's base_model_name_or_path when that is a local path")
    p.add_argument("--lora-mode", choices=("merge", "delta"), default="merge",
                   help="a --policy LoRA adapter: merge it into the base weights (default; the fastest forward) or "
                        "apply it unmerged on the attention/MLP projections, x W^T + s (x A^T) B^T (delta: no merged "
                        "copy of the adapted weights). When its base is the --reference checkpoint, the base is "
                        "loaded once and the policy holds the reference's arrays for every tensor not merged")
    p.add_argument("--reference", required=need_reference, default=None,
                   help="reference checkpoint (same tokenizer); omit for policy-only baselines")
    p.add_argument("--data", required=True, help="trajectory file or directory (format auto-detected)")
    p.add_argument("--rendering", choices=RENDERINGS, default="reference",
                   help="reference: the authors' '\\n[role]: content' text; chat: the tokenizer's chat template")
    p.add_argument("--token-agg", type=_agg_list(TOKEN_AGGS), default=_agg_list(TOKEN_AGGS)(token_agg),
                   help=f"token aggregation(s): comma list of {TOKEN_AGGS} or 'all' (default {token_agg})")
    p.add_argument("--step-agg", type=_agg_list(STEP_AGGS), default=_agg_list(STEP_AGGS)(step_agg),
                   help=f"step aggregation(s): comma list of {STEP_AGGS} or 'all' (default {step_agg})")
    p.add_argument("--beta", type=float, default=1.0, help="progress advantage scale beta (default 1)")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per trajectory; longer ones keep their tail (reported per trajectory). Default: "
                        "the smaller context window of the two models; more is refused without --allow-beyond-context")
    p.add_argument("--allow-beyond-context", action="store_true",
                   help="allow a --max-length beyond a model's context window (max_position_embeddings)")
    p.add_argument("--allow-duplicates", action="store_true",
                   help="keep duplicated rollouts (same task and trial) as separate rollouts, listed in the "
                        "results (default: refused)")
    p.add_argument("--out", default=None, help="results JSON (written atomically)")
    p.add_argument("--cache", default=None,
                   help="cache directory of per-token statistics (reused and resumed across runs)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="parameter / activation dtype (matmuls and head statistics accumulate in float32). "
                        "auto (default): the faster one on this platform by a measured rule "
                        "(pa_jax.models.dtype.auto_dtype; recorded in the results); bfloat16 moves per-token "
                        "log-probs by up to a few tenths of a nat (bench_scoring.py)")
    p.add_argument("--top-k", type=int, default=20, help="top-k log-probs kept per token (authors: 20)")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="tokens per device batch")
    p.add_argument("--limit", type=int, default=None,
                   help="score only the first N trajectories (after loading; for subsets)")
    p.add_argument("--tasks", type=int, default=None,
                   help="score only the trajectories of the first N task ids (all their rollouts; for subsets)")
    p.add_argument("--no-share-prefix", action="store_true", help="do not reuse a prefix shared by all trajectories")
    p.add_argument("--no-pack", action="store_true", help="do not pack short trajectories into one row")
    p.add_argument("--no-shared-trunk", action="store_true",
                   help="run policy and reference separately even when their embeddings and leading layers are "
                        "identical (default: those run once per batch; detected from a --policy LoRA adapter over "
                        "the --reference checkpoint, else from tensor digests; recorded as shared_trunk_layers)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def resolve_dtype_arg(args: argparse.Namespace) -> None:
    """--dtype auto -> the platform's dtype (pa_jax.models.dtype.auto_dtype), resolved once; the request and the
    rule are kept in args (so in the results' config): dtype_requested, dtype_rule."""
    if getattr(args, "dtype", None) == "auto":
        from pa_jax.models.dtype import resolve_dtype

        args.dtype_requested = "auto"
        args.dtype, args.dtype_rule = resolve_dtype("auto")


# ---------------------------------------------------------------------------------------------- provenance
def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("pa-jax", "jax", "jaxlib", "flax", "numpy", "scipy", "scikit-learn", "transformers", "tokenizers", "gguf"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def config_dict(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "func"}


def write_results(path: str | None, obj: dict) -> None:
    """Strict JSON (NaN/inf -> null), written atomically."""
    if path:
        from pa_jax.io import atomic_write_json

        atomic_write_json(path, obj)


# ---------------------------------------------------------------------------------------------- models
def load_model(path: str, *, dtype: str, mesh=None, role: str, base: str | None = None, lora_mode: str = "merge",
               base_model=None):
    """(config, model) of a checkpoint, or of a PEFT LoRA adapter directory applied to ``base`` (default: the
    adapter's local base_model_name_or_path; merged, or unmerged with ``lora_mode="delta"``; ``base_model`` that
    base already loaded, whose arrays the result shares); any failure becomes a ValueError naming the option and
    path."""
    from pa_jax.models import load as load_checkpoint

    p = pathlib.Path(path)
    if not p.exists():
        raise ValueError(f"--{role} {path}: no such file or directory")
    try:
        return load_checkpoint(p, dtype=dtype, mesh=mesh, base=base, lora_mode=lora_mode, base_model=base_model)
    except ValueError as e:  # the loaders' errors name the file and tensor
        raise ValueError(f"--{role} {path}: {e}") from e
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"--{role} {path}: cannot load as a decoder-only causal LM ({type(e).__name__}: {e})") from e


def tokenizer_source(path: str, base: str | None, role: str) -> str:
    """Where the tokenizer of ``--role`` comes from: the checkpoint itself, or for a LoRA adapter directory
    without tokenizer files its base (``base``, else the adapter's local base_model_name_or_path)."""
    from pa_jax.models.lora import is_adapter_dir, resolve_base

    p = pathlib.Path(path)
    if base is not None and not is_adapter_dir(p):
        raise ValueError(f"--{role}-base {base} given but --{role} {path} is not a PEFT adapter directory "
                         f"(no adapter_config.json)")
    if not is_adapter_dir(p) or (p / "tokenizer_config.json").is_file() or (p / "tokenizer.json").is_file():
        return path
    try:
        return str(resolve_base(p, base))
    except ValueError as e:
        raise ValueError(f"--{role} {path}: {e}") from e


@dataclass
class Scored:
    """Everything an application needs after scoring."""

    dataset: Dataset
    trajectories: list[Trajectory]
    rendered: list[Rendered]
    stats: list  # list[pa_jax.scoring.TrajectoryStats]
    has_reference: bool
    reference_is_policy: bool
    vocab_size: int
    timing: dict
    cache_dir: str | None
    preflight: dict | None = None  # what pa_jax.commands.preflight established (context, notes, duplicates)


@dataclass
class Inputs:
    """Checked, loaded and rendered trajectories (what every model scores)."""

    dataset: Dataset
    trajectories: list[Trajectory]
    rendered: list[Rendered]
    tokenizer: Any
    render_s: float
    mesh: Any
    pad_id: int
    same: bool  # the reference is the policy checkpoint (same path or same content)
    preflight: dict | None = None


def load_inputs(args: argparse.Namespace, *, require: str | None, command: str = "score") -> Inputs:
    """Check everything that can be checked before a model is loaded (pa_jax.commands.preflight: options,
    paths, outputs, configs, context windows, tokenizers, data), then render."""
    import jax

    from pa_jax.commands import preflight

    resolve_dtype_arg(args)
    pf = preflight.check(args, command=command, require=require)
    ds, trajs, tok, same = pf.dataset, pf.trajectories, pf.tokenizer, pf.reference_is_policy
    t0 = time.perf_counter()
    rendered = [render(t, tok, rendering=args.rendering, max_length=args.max_length) for t in trajs]
    t_render = time.perf_counter() - t0
    mesh = None
    if jax.device_count() > 1:
        from pa_jax.models.sharding import make_mesh

        mesh = make_mesh()
    pad = getattr(tok, "pad_token_id", None)
    pad = pad if pad is not None else (getattr(tok, "eos_token_id", None) or 0)
    return Inputs(ds, trajs, rendered, tok, t_render, mesh, int(pad), bool(same), pf.record)


def score_models(args: argparse.Namespace, inputs: Inputs, policy, reference, meta: dict, desc: str = "scoring",
                 trunk=None):
    """pa_jax.scoring.score_rendered of ``inputs`` with the options of ``args`` (progress bar unless
    --no-progress); ``meta`` identifies the models in the cache key. A failure after the first forward says
    how to resume (the cache keeps every finished batch). ``trunk``: the pair's shared trunk if already known
    (``policy_adapter_trunk``), else the engine detects it."""
    from pa_jax import scoring
    from pa_jax.commands import preflight

    opts = scoring.ScoringOptions(top_k=args.top_k, max_batch_tokens=args.max_batch_tokens,
                                  pack=not args.no_pack, share_prefix=not args.no_share_prefix,
                                  shared_trunk=not getattr(args, "no_shared_trunk", False))
    rendered = inputs.rendered
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(r) for r in rendered), unit="tok", unit_scale=True, desc=desc, file=sys.stderr,
                   smoothing=0.1)

    def progress(batch, ntok):
        if bar is not None:
            bar.update(sum(len(rendered[i]) for row in batch.rows for i in row))

    repairs = None
    if args.cache and inputs.preflight is not None:  # -> results["checks"]["cache_repairs"] ([]: all verified)
        repairs = inputs.preflight.setdefault("cache_repairs", [])

    def repaired(rec):  # a cached batch (or the cache index) that did not verify: one line, and recorded
        print(f"pa-jax: warning: cache {rec['file']}: {rec['reason']}; {rec['action']}", file=sys.stderr)
        if repairs is not None:
            repairs.append(rec)

    try:
        return scoring.score_rendered(rendered, policy, reference, options=opts, cache_dir=args.cache,
                                      cache_meta=meta, mesh=inputs.mesh, pad_id=inputs.pad_id, progress=progress,
                                      trunk=trunk, on_cache_repair=repaired)
    except (ValueError, OSError) as e:  # after the first forward: say how to resume
        raise (OSError if isinstance(e, OSError) else ValueError)(f"{e} ({preflight.resume_hint(args)})") from e
    except BaseException:  # interrupted, out of memory, ...: the traceback stays, with the way back
        print(f"pa-jax: scoring stopped; {preflight.resume_hint(args)}", file=sys.stderr)
        raise
    finally:
        if bar is not None:
            bar.close()


def model_meta(args: argparse.Namespace, with_reference: bool) -> dict:
    """The models' identity for the cache key: paths, file sizes and times, an adapter's base, the dtype."""
    from pa_jax.models.lora import is_adapter_dir, resolve_base
    from pa_jax.scoring import model_identity

    policy_base = getattr(args, "policy_base", None)
    meta = {"policy": model_identity(args.policy),
            "reference": model_identity(args.reference) if with_reference else None, "dtype": args.dtype}
    for role, path, base in (("policy", args.policy, policy_base), ("reference", args.reference, None)):
        if path is not None and (role == "policy" or with_reference) and is_adapter_dir(path):
            meta[f"{role}_base"] = model_identity(resolve_base(path, base))  # an adapter's base is part of its identity
    if getattr(args, "lora_mode", "merge") != "merge" and is_adapter_dir(args.policy):
        meta["lora_mode"] = args.lora_mode  # rounding differs from the merged weights' (merge: key as before)
    return meta


def policy_base_is_reference(args: argparse.Namespace) -> bool:
    """True when --policy is a LoRA adapter whose base is the --reference checkpoint itself (same resolved path,
    the reference not an adapter): the pair then shares the base (loaded once) and its trunk."""
    from pa_jax.models.lora import is_adapter_dir, resolve_base

    if args.reference is None or not is_adapter_dir(args.policy) or is_adapter_dir(args.reference):
        return False
    base = resolve_base(args.policy, getattr(args, "policy_base", None))
    return base.resolve() == pathlib.Path(args.reference).resolve()


def policy_adapter_trunk(args: argparse.Namespace, config):
    """The shared trunk of a --policy LoRA adapter whose base is the --reference checkpoint itself (both loaded
    with one --dtype): the layers below the first one the adapter changes are the base's
    (pa_jax.models.shared.trunk_from_adapter, nothing hashed). None otherwise (the engine then compares tensor
    digests)."""
    from pa_jax.models.shared import trunk_from_adapter

    if getattr(args, "no_shared_trunk", False) or not policy_base_is_reference(args):
        return None
    return trunk_from_adapter(args.policy, config)


def prepare(args: argparse.Namespace, *, require: str | None, command: str = "score") -> Scored:
    """Check (preflight), load, render, and score (both models) the trajectories named by ``args``. A
    reference-merge sweep (pa_jax.commands._merge) hands each variant's already scored data in as
    ``args._prepared``."""
    pre = getattr(args, "_prepared", None)
    if pre is not None:
        return pre
    inputs = load_inputs(args, require=require, command=command)
    same = inputs.same
    t0 = time.perf_counter()
    from pa_jax.models.lora import is_adapter_dir

    lora_mode = getattr(args, "lora_mode", "merge")
    reference = None
    shares_base = args.reference is not None and not same and policy_base_is_reference(args)
    if shares_base:
        # the base once: the policy holds the reference's arrays for every tensor its adapter does not merge
        reference = load_model(args.reference, dtype=args.dtype, mesh=inputs.mesh, role="reference")
        policy = load_model(args.policy, dtype=args.dtype, mesh=inputs.mesh, role="policy",
                            base=getattr(args, "policy_base", None), lora_mode=lora_mode, base_model=reference)
    else:
        policy = load_model(args.policy, dtype=args.dtype, mesh=inputs.mesh, role="policy",
                            base=getattr(args, "policy_base", None), lora_mode=lora_mode)
        if args.reference is not None and not same:
            reference = load_model(args.reference, dtype=args.dtype, mesh=inputs.mesh, role="reference")
    t_load = time.perf_counter() - t0
    meta = model_meta(args, reference is not None)
    rendered = inputs.rendered
    total = sum(len(r) for r in rendered)
    trunk = policy_adapter_trunk(args, policy[0]) if reference is not None else None
    res = score_models(args, inputs, policy, reference, meta, trunk=trunk)
    timing = {"render_s": inputs.render_s, "load_models_s": t_load, "score_s": res.seconds,
              "tokens": total, "tokens_computed": res.tokens_computed,
              "batches_computed": res.batches_computed, "batches_from_cache": res.batches_from_cache,
              "tokens_per_s": (res.tokens_computed / res.seconds) if res.batches_computed and res.seconds > 0 else None,
              "shared_prefix_tokens": res.plan.prefix_length,
              "shared_prefix_trajectories": len(res.plan.prefix_members), "models_run": 1 + (reference is not None),
              "shared_trunk_layers": res.shared_trunk["layers"], "shared_trunk": res.shared_trunk,
              "lora_mode": lora_mode if is_adapter_dir(args.policy) else None,
              "policy_shares_reference_base": shares_base}
    stats = res.stats
    if same:  # the same checkpoint as reference: its statistics are the policy's (progress advantage == 0)
        import dataclasses

        stats = [dataclasses.replace(s, reference_logprob=s.policy_logprob, reference_entropy=s.policy_entropy,
                                     kl=np.zeros_like(s.policy_logprob)) for s in stats]
    vocab = int(policy[1].unembedding().shape[0])
    return Scored(inputs.dataset, inputs.trajectories, rendered, stats, args.reference is not None, same, vocab,
                  timing, res.cache_dir, inputs.preflight)


# ---------------------------------------------------------------------------------------------- scores
def _dense(sc: Scored):
    from pa_jax.scoring import dense

    st = sc.stats
    step_ids = dense(st, "step_ids")
    num_steps = np.array([s.num_steps for s in st], np.int32)
    return st, step_ids, num_steps


def trajectory_method_scores(sc: Scored, token_aggs: Sequence[str], step_aggs: Sequence[str], beta: float,
                             ) -> dict[str, np.ndarray]:
    """``{"method/token_agg/step_agg": [B]}`` (higher = more confident) for progress advantage (when a
    reference is given) and every baseline of pa_jax.baselines; token-pooled baselines (Self-Certainty,
    DeepConf) have one entry ``"method"``; two length controls ``length_control/steps`` and
    ``length_control/tokens`` (negative number of steps / tokens)."""
    from pa_jax.scoring import dense

    st, sid, ns = _dense(sc)
    smax = max(1, int(ns.max()))
    pol = dense(st, "policy_logprob")
    out: dict[str, np.ndarray] = {}
    # Only what the baselines read (pa_jax.baselines.BASELINES[*].reads); the cache holds no logsumexp /
    # top-k ids, and no top-k or vocabulary mean for the reference.
    phs = HeadStats(target_logprob=pol, logsumexp=None, entropy=dense(st, "policy_entropy"),
                    topk_logprobs=dense(st, "policy_topk"), topk_ids=None,
                    mean_logprob=dense(st, "policy_mean_logprob"))
    rhs = None
    if sc.has_reference:
        rhs = HeadStats(target_logprob=dense(st, "reference_logprob"), logsumexp=None,
                        entropy=None, topk_logprobs=None, topk_ids=None, mean_logprob=None)
        table = advantage.all_trajectory_scores(pol, rhs.target_logprob, sid, ns, beta=beta, max_steps=smax)
        for ta in token_aggs:
            for sa in step_aggs:
                out[f"{PA}/{ta}/{sa}"] = np.asarray(table[(ta, sa)])
    # Each baseline computed once; one entry per distinct score, i.e. per aggregation it takes
    # ("method/token_agg/step_agg", "method/token_agg" or "method").
    tables = baselines.baseline_tables(phs, sid, ns, vocab_size=sc.vocab_size, reference=rhs, max_steps=smax)
    present = [b for b in baselines.BASELINES if b.name in tables]
    for ta in token_aggs:
        for sa in step_aggs:
            for b in present:
                out.setdefault(b.label(ta, sa), np.asarray(tables[b.name][b.key(ta, sa)]))
    # Length controls, no model involved: fewer steps / tokens = more confident. On tau-bench airline
    # successful trajectories are shorter, so a sum-aggregated score can rank by length alone; a
    # score that does not beat these carries nothing beyond length. Tokens before truncation.
    out["length_control/steps"] = -ns.astype(np.float64)
    out["length_control/tokens"] = -np.array([r.truncation.original_tokens for r in sc.rendered], np.float64)
    return out


def step_method_scores(sc: Scored, token_agg: str, beta: float) -> dict[str, list[np.ndarray]]:
    """Per-step scores ``{method: [S_b] per trajectory}``: progress advantage (with a reference),
    policy log-prob and the authors' top-k mean log-prob (their FA "self_certainty"), all with
    ``token_agg`` over each step's tokens; empty steps score 0.0 (the authors' FA rule)."""
    from pa_jax.scoring import dense

    st, sid, ns = _dense(sc)
    smax = max(1, int(ns.max()))
    pol = dense(st, "policy_logprob")
    per: dict[str, np.ndarray] = {}
    if sc.has_reference:
        a, _ = advantage.step_advantages(pol, dense(st, "reference_logprob"), sid, ns, token_agg=token_agg,
                                         beta=beta, max_steps=smax)
        per[PA] = np.asarray(a)
    v, _ = advantage.step_values(pol, sid, ns, token_agg=token_agg, empty="zero", max_steps=smax)
    per["policy_logprob"] = beta * np.asarray(v)
    tk = np.asarray(baselines.topk_mean_logprob_token(dense(st, "policy_topk")))
    v, _ = advantage.step_values(tk, sid, ns, token_agg=token_agg, empty="zero", max_steps=smax)
    per["topk_mean_logprob"] = np.asarray(v)
    return {k: [m[b, : ns[b]] for b in range(len(ns))] for k, m in per.items()}


# ---------------------------------------------------------------------------------------------- reporting
def base_results(args: argparse.Namespace, command: str, sc: Scored) -> dict:
    truncated = [{"id": r.trajectory_id, **r.truncation.as_dict()} for r in sc.rendered if r.truncation.truncated]
    files = sorted(set(sc.dataset.files))
    models = {"policy": args.policy, "policy_base": getattr(args, "policy_base", None), "reference": args.reference,
              "reference_is_policy": sc.reference_is_policy}
    return {
        "command": command,
        "config": config_dict(args),
        "versions": package_versions(),
        "inputs": {f: sha256_file(f) for f in files},
        "models": models,
        "n_loaded": len(sc.dataset.trajectories),
        "n_scored": len(sc.trajectories),
        "n_skipped": len(sc.dataset.skipped),
        "skipped": [s.as_dict() for s in sc.dataset.skipped],
        "n_truncated": len(truncated),
        "truncated": truncated,
        "timing": sc.timing,
        "cache_dir": sc.cache_dir,
        "checks": sc.preflight,
    }


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    def fmt(x):
        if isinstance(x, float):
            return "nan" if np.isnan(x) else f"{x:.3f}"
        if isinstance(x, (list, tuple)) and len(x) == 2 and all(isinstance(v, float) for v in x):
            return f"[{fmt(x[0])}, {fmt(x[1])}]"
        return str(x)

    cells = [[fmt(x) for x in r] for r in rows]
    w = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(header)]
    line = lambda r: "  ".join(str(c).ljust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([line(header), line(["-" * x for x in w])] + [line(r) for r in cells])


def print_footer(sc: Scored, out: str | None) -> None:
    t = sc.timing
    msg = (f"scored {len(sc.trajectories)} trajectories ({t['tokens']} tokens; {t['batches_computed']} batches computed, "
           f"{t['batches_from_cache']} from cache)")
    if t.get("tokens_per_s"):
        msg += f" at {t['tokens_per_s']:.1f} tokens/s"
    print(msg)
    if sc.dataset.skipped:
        print(f"skipped {len(sc.dataset.skipped)} items (reasons in the results JSON)")
    n_tr = sum(r.truncation.truncated for r in sc.rendered)
    if n_tr:
        print(f"{n_tr} trajectories truncated to --max-length (tail kept; records in the results JSON)")
    if sc.reference_is_policy:
        print("note: --reference is the --policy checkpoint: progress advantage is identically 0 (sanity check)")
    if out:
        print(f"wrote {out}")
