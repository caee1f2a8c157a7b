"""`pa-jax fa`: failure attribution -- which step was the decisive error (Who&When).

Per-step scores (progress advantage with a reference; the policy log-prob and the authors' top-k
mean log-prob as policy-only baselines; Kang et al.'s Self-Certainty with --self-certainty;
external step scores with --extra-scores), aggregated over each step's tokens with --token-agg
(default sum, as the authors' FA script scripts/fa.sh runs it), then the decisive step by the
authors' three rules, their earliest_below_threshold rule and the progress k-advantage (optionally
discounted by --gamma) (pa_jax.apps.fa). Metrics per split: exact step accuracy, within-1 accuracy,
mean absolute error (in messages) and agent-level accuracy; the step accuracy of a random action.
"""
from __future__ import annotations

import argparse

from pa_jax.apps import fa
from pa_jax.commands import _analyses as X
from pa_jax.commands import _common as C
from pa_jax.commands import _merge as M


def add_arguments(p: argparse.ArgumentParser) -> None:
    C.add_common_arguments(p, token_agg="sum", step_agg="mean")
    M.add_merge_arguments(p)  # --reference-merge: a sweep over merged references (pa_jax.commands._merge)
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 3], help="k of the progress k-advantage rule")
    p.add_argument("--gamma", type=float, nargs="+", default=[1.0],
                   help="discount(s) of the k-advantage window, in (0, 1] (default 1: undiscounted)")
    p.add_argument("--threshold", type=float, nargs="+", default=[0.0],
                   help="threshold(s) of the earliest_below_threshold rule (default 0; the authors use 0.5 "
                        "for ThinkPRM's P(correct))")
    p.add_argument("--self-certainty", action="store_true",
                   help="also Kang et al.'s Self-Certainty KL(U || p) per step (token-aggregated like the others)")
    X.add_arguments(p, kind="fa")


def _all_rules(s, acts, truth, agents, blamed, args) -> dict:
    kw = dict(message_agents=agents, mistake_agents=blamed)
    m = fa.attribute(s, acts, truth, rules=["min_cumulative", "sharpest_drop", "sharpest_consecutive_drop"], **kw)
    for thr in args.threshold:
        m.update(fa.attribute(s, acts, truth, rules=["earliest_below_threshold"], threshold=thr, **kw))
    for k in args.k:
        for g in args.gamma:
            m.update(fa.attribute(s, acts, truth, rules=["k_advantage"], k=k, gamma=g, **kw))
    return m


def run(args: argparse.Namespace) -> int:
    X.check(args)
    preset = X.apply_preset(args)
    sc = C.prepare(args, require="mistake_step", command="fa")
    extras = X.load_extras(args, sc)
    bad = [e.name for e in extras if e.step_scores is None]
    if bad:
        raise ValueError(f"--extra-scores {bad}: failure attribution needs 'step_scores' per trajectory")
    results = C.base_results(args, "fa", sc)
    results["aggregation_preset"] = preset
    X.record_extras(results, extras)
    splits: dict[str, list[int]] = {}
    for i, t in enumerate(sc.trajectories):
        splits.setdefault(t.meta.get("split", t.format or "all"), []).append(i)
    metrics: dict = {}
    rows = []
    per_ta = []
    for ta in args.token_agg:
        per = {f"{k}/{ta}": v for k, v in C.step_method_scores(sc, ta, args.beta).items()}
        if args.self_certainty:
            from pa_jax.scoring import dense

            ns = [s.num_steps for s in sc.stats]
            per[f"self_certainty/{ta}"] = fa.self_certainty_steps(dense(sc.stats, "policy_mean_logprob"),
                                                                  dense(sc.stats, "step_ids"), ns, sc.vocab_size, ta)
        per_ta.append(per)
    per_ta.append({f"{e.name}/steps": e.step_scores for e in extras})
    chance = {}
    for split, idx in splits.items():
        trajs = [sc.trajectories[i] for i in idx]
        acts = [t.action_indices for t in trajs]
        truth = [t.mistake_step for t in trajs]
        agents = [[m.agent for m in t.messages] for t in trajs]
        blamed = [t.mistake_agent for t in trajs]
        chance[split] = fa.chance_step_accuracy(acts, truth)
        for per in per_ta:
            for key, steps in per.items():
                m = _all_rules([steps[i] for i in idx], acts, truth, agents, blamed, args)
                metrics.setdefault(split, {})[key] = m
                for rule, v in m.items():
                    rows.append([split, key, rule, v["step_accuracy"], v["within1_accuracy"], v["mae"],
                                 v["agent_accuracy"], v["n"]])
    results["metrics"] = metrics
    results["chance_step_accuracy"] = chance
    err = None
    if args.heldout_folds:
        sel = {}
        for split, idx in splits.items():
            trajs = [sc.trajectories[i] for i in idx]
            default = {k.rpartition("/")[0]: f"{k}|min_cumulative" for k in metrics[split]
                       if k.endswith(f"/{args.token_agg[0]}") or k.endswith("/steps")}
            sel[split], err = X.guarded(lambda: X.fa_selection(args, [t.task_id for t in trajs], metrics[split],
                                                               [t.mistake_step for t in trajs], default))
            if err is not None:
                break
        results["selection"] = sel
    C.write_results(args.out, results)
    if err is not None:
        raise err
    print(C.table(rows, ["split", "method/token_agg", "rule", "step acc", "within-1", "MAE", "agent acc", "n"]))
    print("random-action step accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in chance.items()))
    if args.heldout_folds:
        for split, s in results["selection"].items():
            X.print_selection(s, C.table, f"{split} step accuracy (candidates: token_agg|rule)")
    C.print_footer(sc, args.out)
    return 0
