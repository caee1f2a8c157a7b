"""`pa-jax uq|bon|fa|score --reference-merge METHOD:alpha1,alpha2,...`: one run against many references.

The reference is replaced by weight-space merges pi_alpha = pi_ref + alpha * tau (pa_jax.merging) for each
(method, alpha) asked for, and the command's application runs against each. The policy's per-token
statistics do not depend on the reference, so it is scored **once**; the unmerged reference and every
merged one are scored once each, alone (a single-model pass gives its log-probs and entropies; the
paired exact KL is not computed in a sweep). Each merged reference is built in memory from the loaded
checkpoints (``merged_delta`` once per method, ``.at(alpha)`` per alpha, parameters placed where the
reference's live) and dropped after its pass. With ``--cache`` each model's statistics are cached under
their own key (the merged ones keyed by base, policy, method, knobs and alpha), so a second sweep over the
same data computes no forward at all.

Then the command's own evaluation runs once per variant (its ``run`` with the variant's statistics handed
in through ``args._prepared``); the results JSON is the unmerged run's (``metrics`` etc.) plus
``merges``: one block per (method, alpha) with its ``metrics`` (and the command's other per-run fields),
and ``reference_merge``: options, forwards counted, timings. ``paper_figs/merge_sweep.py`` draws it.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import pathlib
import tempfile
import time
from typing import Any

from pa_jax import merging as M

REQUIRE = {"uq": "reward", "bon": "reward", "fa": "mistake_step", "score": None}
# fields of a run's results that describe the shared inputs, kept once at the top level
SHARED_FIELDS = ("command", "config", "versions", "inputs", "models", "n_loaded", "n_scored", "n_skipped", "skipped",
                 "n_truncated", "truncated", "cache_dir")


def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("reference merging (weight space, pa_jax.merging; needs --reference)")
    g.add_argument("--reference-merge", action="append", default=None, metavar="METHOD:A1,A2,...",
                   help=f"score against merged references pi_ref + alpha * (pi_policy - pi_ref); METHOD one of "
                        f"{', '.join(M.MERGE_METHODS)}; |alpha| <= {M.ALPHA_BOUND:g}; repeat the option for several "
                        f"methods. The policy is scored once, each reference once")
    g.add_argument("--merge-density", type=float, default=M.DEFAULT_DENSITY,
                   help="fraction of tau kept by TIES' trim / DARE's drop (default 0.2, the authors')")
    g.add_argument("--merge-seed", type=int, default=0, help="DARE's seed (default 0)")
    g.add_argument("--merge-rescale", choices=("auto", "on", "off"), default="auto",
                   help="divide the kept entries by the density (auto: on for dare_*, off for ties)")
    g.add_argument("--merge-emr-norm", choices=M.EMR_NORMS, default="tensor_mean",
                   help="EMR lambda: tensor_mean (authors' code) or element_sum (EMR paper)")
    g.add_argument("--merge-extra-policy", action="append", default=[], metavar="CKPT",
                   help="another post-trained sibling of the reference, a further task vector for the TIES / "
                        "DARE-TIES / EMR election (repeatable)")
    g.add_argument("--merge-anchor", default=None, metavar="CKPT",
                   help="a third checkpoint as merge base (the reference becomes a task vector and EMR's target)")


def parse_specs(specs: list[str]) -> list[tuple[str, list[float]]]:
    out = [M.parse_merge_spec(s) for s in specs]
    methods = [m for m, _ in out]
    dup = sorted({m for m in methods if methods.count(m) > 1})
    if dup:
        raise ValueError(f"--reference-merge: method {dup[0]!r} given twice (list all its alphas in one option)")
    return out


def merge_options(args: argparse.Namespace) -> dict:
    rescale = {"auto": None, "on": True, "off": False}[args.merge_rescale]
    return {"density": M.check_density(args.merge_density), "seed": args.merge_seed, "rescale": rescale,
            "emr_norm": args.merge_emr_norm}


def combine(policy_stats: list, reference_stats: list) -> list:
    """The policy's statistics with a separately scored reference's log-probs and entropies (no KL)."""
    out = []
    for p, r in zip(policy_stats, reference_stats, strict=True):
        if p.id != r.id:
            raise ValueError(f"internal: trajectory order differs between passes ({p.id} vs {r.id})")
        out.append(dataclasses.replace(p, reference_logprob=r.policy_logprob, reference_entropy=r.policy_entropy,
                                       kl=None))
    return out


def sweep(args: argparse.Namespace, module: Any, command: str) -> int:
    """Run ``module.run`` (a command) against the unmerged and every merged reference; see the module doc."""
    from pa_jax.commands import _common as C
    from pa_jax.scoring import model_identity

    specs = parse_specs(args.reference_merge)
    if args.reference is None:
        raise ValueError("--reference-merge needs --reference (the merge base)")
    if pathlib.Path(args.reference).resolve() == pathlib.Path(args.policy).resolve():
        raise ValueError("--reference-merge: --reference is the --policy checkpoint (tau would be 0)")
    knobs = merge_options(args)
    if any(m == "linear" for m, _ in specs) and args.merge_extra_policy:
        raise ValueError("--merge-extra-policy: linear merging uses only the policy; drop linear or the extra policies")
    t_all = time.perf_counter()
    inputs = C.load_inputs(args, require=REQUIRE[command], command=command)
    dt = args.dtype
    t0 = time.perf_counter()
    policy = C.load_model(args.policy, dtype=dt, mesh=inputs.mesh, role="policy", base=getattr(args, "policy_base", None))
    reference = C.load_model(args.reference, dtype=dt, mesh=inputs.mesh, role="reference")
    extras = [C.load_model(e, dtype=dt, mesh=inputs.mesh, role="merge-extra-policy") for e in args.merge_extra_policy]
    anchor = C.load_model(args.merge_anchor, dtype=dt, mesh=inputs.mesh, role="merge-anchor") if args.merge_anchor else None
    t_load = time.perf_counter() - t0
    ident = {"policy": model_identity(args.policy), "reference": model_identity(args.reference)}

    def single(identity) -> dict:  # cache key of one model scored alone
        return {"policy": identity, "reference": None, "dtype": dt}

    passes = []  # (role, ScoreResult), in order: the forward count

    def score(model, identity, role):
        res = C.score_models(args, inputs, model, None, single(identity), desc=role)
        passes.append({"role": role, "batches_computed": res.batches_computed,
                       "batches_from_cache": res.batches_from_cache, "score_s": res.seconds})
        return res

    pol_res = score(policy, ident["policy"], "policy")
    ref_res = score(reference, ident["reference"], "reference")
    variants = [(None, None, {}, ref_res)]
    tensors = {"reference": M.model_tensors(*reference), "policy": M.model_tensors(*policy)}
    extra_t = [M.model_tensors(*e) for e in extras]
    anchor_t = M.model_tensors(*anchor) if anchor is not None else None
    cfg_ref, model_ref = reference if anchor is None else anchor
    for method, alphas in specs:
        t0 = time.perf_counter()
        delta = M.merged_delta(tensors["reference"], tensors["policy"], method, extra_policies=extra_t,
                               anchor=anchor_t, **knobs)
        t_delta = time.perf_counter() - t0
        for alpha in alphas:
            merged = M.replace_params(cfg_ref, model_ref, delta.at(alpha))
            identity = {"merged_reference": {
                **ident, "extra_policies": [model_identity(e) for e in args.merge_extra_policy],
                "anchor": model_identity(args.merge_anchor), **delta.info, "alpha": alpha}}
            res = score((cfg_ref, merged), identity, f"{method}:{alpha:g}")
            info = dict(delta.info)
            info["merge_s"] = t_delta
            variants.append((method, alpha, info, res))
            del merged
        del delta

    vocab = int(policy[1].unembedding().shape[0])
    blocks = []
    unmerged = None
    with tempfile.TemporaryDirectory(prefix="pa_jax_merge_") as tmp:
        for i, (method, alpha, info, res) in enumerate(variants):
            timing = {"render_s": inputs.render_s, "load_models_s": t_load, "score_s": res.seconds,
                      "policy_score_s": pol_res.seconds, "tokens": sum(len(r) for r in inputs.rendered),
                      "batches_computed": res.batches_computed, "batches_from_cache": res.batches_from_cache,
                      "policy_batches_computed": pol_res.batches_computed, "models_run": 1}
            sc = C.Scored(inputs.dataset, inputs.trajectories, inputs.rendered, combine(pol_res.stats, res.stats),
                          True, False, vocab, timing, res.cache_dir)
            v = copy.copy(args)
            v._prepared = sc
            v.reference_merge = None
            v.out = str(pathlib.Path(tmp) / f"v{i}.json")
            if command == "score":
                v.jsonl = _jsonl_path(args, method, alpha, tmp, i)
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                rc = module.run(v)
            if rc:
                raise ValueError(f"--reference-merge: the {command} evaluation failed for {method}:{alpha}")
            out = json.loads(pathlib.Path(v.out).read_text())
            if method is None:
                unmerged = out
            else:
                blocks.append({"method": method, "alpha": alpha, "options": M.MergeOptions(method, **knobs).as_dict(),
                               "info": info, **{k: val for k, val in out.items() if k not in SHARED_FIELDS}})
    result = dict(unmerged)
    result["config"] = C.config_dict(args)
    result["merges"] = blocks
    result["reference_merge"] = {
        "specs": list(args.reference_merge), "options": knobs, "extra_policies": list(args.merge_extra_policy),
        "anchor": args.merge_anchor, "passes": passes,
        "forwards": {"policy": sum(p["role"] == "policy" for p in passes),
                     "references": sum(p["role"] != "policy" for p in passes)},
        "note": "each model scored alone (policy once, every reference once); the paired exact KL is not computed",
        "wall_s": time.perf_counter() - t_all,
    }
    C.write_results(args.out, result)
    print(summary(command, result))
    f = result["reference_merge"]["forwards"]
    print(f"{len(inputs.trajectories)} trajectories; passes: policy {f['policy']}, references {f['references']} "
          f"(batches computed: {sum(p['batches_computed'] for p in passes)}, from cache: "
          f"{sum(p['batches_from_cache'] for p in passes)})")
    if args.out:
        print(f"wrote {args.out}")
    return 0


def _jsonl_path(args, method, alpha, tmp, i) -> str:
    if args.out and args.out.endswith(".json"):
        stem = args.out[: -len(".json")]
        return f"{stem}.jsonl" if method is None else f"{stem}.{method}-{alpha:g}.jsonl"
    return str(pathlib.Path(tmp) / f"v{i}.jsonl")


HEADLINE = {"uq": "auroc", "bon": "bon_success_rate"}


def summary(command: str, result: dict) -> str:
    """A table of the headline metric of every progress-advantage score per reference."""
    from pa_jax.commands._common import PA, table

    rows = []
    blocks = [("unmerged", "", result.get("metrics", {}))] + [
        (b["method"], b["alpha"], b.get("metrics", {})) for b in result["merges"]]
    if command in HEADLINE:
        key = HEADLINE[command]
        for method, alpha, metrics in blocks:
            for score, m in metrics.items():
                if score.startswith(PA) and isinstance(m, dict) and key in m:
                    rows.append([method, alpha, score, m[key]])
        return table(rows, ["reference", "alpha", "score", key])
    if command == "fa":
        for method, alpha, metrics in blocks:
            for split, per in metrics.items():
                for score, rules in per.items():
                    if score.startswith(PA):
                        for rule, v in rules.items():
                            rows.append([method, alpha, split, score, rule, v["step_accuracy"]])
        return table(rows, ["reference", "alpha", "split", "score", "rule", "step acc"])
    passes = result["reference_merge"]["passes"]
    return table([[p["role"], p["batches_computed"], p["batches_from_cache"]] for p in passes],
                 ["model", "batches computed", "from cache"])
