"""`pa-jax score`: per-step and per-trajectory scores as JSON lines, for your own application.

One line per trajectory: id, task id, labels, number of steps, truncation record, per-step scores
(progress advantage when a reference is given, policy log-prob, authors' top-k mean log-prob) for the
first --token-agg, and trajectory scores of every method and aggregation. Skipped items are
written as lines with ``"skipped": reason``.
"""
from __future__ import annotations

import argparse
import hashlib
import pathlib

from pa_jax.apps.per_token import per_token_record, scored_token_ids
from pa_jax.commands import _common as C
from pa_jax.commands import _merge as M
from pa_jax.io import atomic_write_bytes, atomic_write_text, dumps_strict


def add_arguments(p: argparse.ArgumentParser) -> None:
    C.add_common_arguments(p, token_agg="mean", step_agg="mean")
    M.add_merge_arguments(p)  # --reference-merge: a sweep over merged references (pa_jax.commands._merge)
    p.add_argument("--jsonl", default=None, help="JSON-lines output (default: <--out without .json>.jsonl, or stdout)")
    p.add_argument("--per-token", default=None, metavar="FILE.jsonl",
                   help="also write per-token beta * log-ratio and policy log-prob of every scored action token "
                        "(from the statistics / cache; pa_jax.apps.per_token; for paper_figs/fig_token_signal.py)")


def run(args: argparse.Namespace) -> int:
    sc = C.prepare(args, require=None, command="score")
    traj_scores = C.trajectory_method_scores(sc, args.token_agg, args.step_agg, args.beta)
    steps = C.step_method_scores(sc, args.token_agg[0], args.beta)
    lines = []
    for b, (t, r) in enumerate(zip(sc.trajectories, sc.rendered)):
        lines.append({
            "id": t.id, "task_id": t.task_id, "trial": t.trial, "reward": t.reward, "success": t.success,
            "mistake_step": t.mistake_step, "mistake_agent": t.mistake_agent, "source": t.source,
            "num_steps": r.num_steps, "action_message_indices": list(t.action_indices),
            "num_tokens": len(r), "truncation": r.truncation.as_dict(),
            "step_scores": {k: [float(x) for x in v[b]] for k, v in steps.items()},
            "step_token_agg": args.token_agg[0],
            "trajectory_scores": {k: float(v[b]) for k, v in traj_scores.items()},
        })
    for s in sc.dataset.skipped:
        lines.append({"skipped": s.reason, "source": s.source, "item": s.item})
    text = "".join(dumps_strict(x, indent=None) + "\n" for x in lines)
    path = args.jsonl or (args.out[: -len(".json")] + ".jsonl" if args.out and args.out.endswith(".json") else None)
    # the pair stays consistent: the old --out (the manifest) goes first, the .jsonl is replaced, and the new
    # --out, naming the .jsonl's SHA-256 and line count, is written last; a run killed in between leaves a
    # .jsonl without a manifest, never a new .jsonl next to an old manifest
    if args.out and path:
        pathlib.Path(args.out).unlink(missing_ok=True)
    if path:
        atomic_write_bytes(pathlib.Path(path), text.encode())
    else:
        print(text, end="")
    if args.per_token:
        _write_per_token(args.per_token, sc, args.beta)
    res = C.base_results(args, "score", sc)
    res["jsonl"] = path
    res["per_token"] = args.per_token
    if path:
        res["jsonl_sha256"] = hashlib.sha256(text.encode()).hexdigest()
        res["jsonl_lines"] = len(lines)
    C.write_results(args.out, res)
    if path:
        print(C.table([[k, float(v.mean()), float(v.min()), float(v.max())] for k, v in traj_scores.items()],
                      ["method/token_agg/step_agg", "mean", "min", "max"]))
        print(f"wrote {path}")
        C.print_footer(sc, args.out)
    return 0


def _write_per_token(path: str, sc, beta: float) -> None:
    lines = []
    for t, r, st in zip(sc.trajectories, sc.rendered, sc.stats):
        ids = scored_token_ids(r)
        lines.append(per_token_record(t, st, beta, ids if len(ids) == st.num_tokens else None))
    atomic_write_text(path, "".join(dumps_strict(x, indent=None) + "\n" for x in lines))
