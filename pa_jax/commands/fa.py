"""`pa-jax fa`: failure attribution -- which step was the decisive error (Who&When).

Per-step scores (progress advantage with a reference; the policy log-prob and the authors' top-k
mean log-prob as policy-only baselines), aggregated over each step's tokens with --token-agg
(default min, as the authors' FA script), then the decisive step by the authors' three rules and by
the progress k-advantage (pa_jax.apps.fa). Metrics per split: exact step accuracy, within-1
accuracy, mean absolute error (in messages) and agent-level accuracy.
"""
from __future__ import annotations

import argparse

from pa_jax.apps import fa
from pa_jax.commands import _common as C


def add_arguments(p: argparse.ArgumentParser) -> None:
    C.add_common_arguments(p, token_agg="min", step_agg="mean")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 3], help="k of the progress k-advantage rule")


def run(args: argparse.Namespace) -> int:
    sc = C.prepare(args, require="mistake_step", command="fa")
    results = C.base_results(args, "fa", sc)
    splits: dict[str, list[int]] = {}
    for i, t in enumerate(sc.trajectories):
        splits.setdefault(t.meta.get("split", t.format or "all"), []).append(i)
    metrics: dict = {}
    rows = []
    for ta in args.token_agg:
        per = C.step_method_scores(sc, ta, args.beta)
        for split, idx in splits.items():
            trajs = [sc.trajectories[i] for i in idx]
            acts = [t.action_indices for t in trajs]
            truth = [t.mistake_step for t in trajs]
            agents = [[m.agent for m in t.messages] for t in trajs]
            blamed = [t.mistake_agent for t in trajs]
            for method, steps in per.items():
                s = [steps[i] for i in idx]
                rules = [r for r in fa.RULES if r != "k_advantage"]
                m = fa.attribute(s, acts, truth, message_agents=agents, mistake_agents=blamed, rules=rules)
                for k in args.k:
                    m.update(fa.attribute(s, acts, truth, message_agents=agents, mistake_agents=blamed,
                                          rules=["k_advantage"], k=k))
                metrics.setdefault(split, {})[f"{method}/{ta}"] = m
                for rule, v in m.items():
                    rows.append([split, f"{method}/{ta}", rule, v["step_accuracy"], v["within1_accuracy"], v["mae"],
                                 v["agent_accuracy"], v["n"]])
    results["metrics"] = metrics
    C.write_results(args.out, results)
    print(C.table(rows, ["split", "method/token_agg", "rule", "step acc", "within-1", "MAE", "agent acc", "n"]))
    C.print_footer(sc, args.out)
    return 0
