"""`pa-jax demo`: Proposition 1 and the three applications on the shipped toy LLM pair, exactly.

The shipped pair (``pa_jax/assets/toy_pair/{reference,policy}``) is a 2-layer llama decoder trained on
the stepping-stones task of :mod:`toy_mdp.text_env`: the reference by SFT on a behaviour policy, the
policy by exact KL-regularized RL from it (``experiments/train_toy_pair.py``). Every history of the task
can be enumerated, so the optimal advantage A*(h, a) is computed *exactly* against the reference
network's own command probabilities at every history (float64 backward induction on the history tree),
and Proposition 1 predicts ``beta * log pi_theta(a|h) / pi_ref(a|h) = A*(h, a)``.

Steps (no network access, no input):

1. Load both checkpoints with :func:`pa_jax.models.load` and score every (history, command) of the tree
   with :func:`pa_jax.models.token_logprobs` (the path real checkpoints take); solve the tree exactly.
2. Sample ``--num-rollouts`` trajectories from the policy, render them as text, and score them again
   through the LLM path (:func:`pa_jax.models.token_logprobs`, :func:`pa_jax.head.head_statistics` for
   the Self-Certainty baseline, :mod:`pa_jax.advantage` for token -> step aggregation).
3. Proposition 1 on the visited (history, command) pairs: Pearson correlation, mean and worst absolute
   error between beta * log-ratio and A*, for the token aggregations sum (the exact command log-ratio)
   and mean / min / max (heuristics).
4. Applications with exact ground truth: UQ (AUROC for success), best-of-N (groups of ``--group-size``
   rollouts), failure attribution (decisive error = the step with the most negative exact A*).
5. ``results.json`` (atomic write) and ``demo.png`` in ``--out``.
"""
from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import pathlib
import time

import numpy as np

from pa_jax.io import atomic_write_bytes, atomic_write_json

TOKEN_AGGS_SHOWN = ("sum", "mean", "min", "max")


def default_pair_dir() -> pathlib.Path:
    """The shipped pair inside the installed package."""
    return pathlib.Path(str(importlib.resources.files("pa_jax") / "assets" / "toy_pair"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="pa_jax_demo_out", help="output directory (default: ./pa_jax_demo_out)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--num-rollouts", type=int, default=1024, help="policy rollouts to sample (default 1024)")
    parser.add_argument("--group-size", type=int, default=8, help="rollouts per best-of-N group (default 8)")
    parser.add_argument("--pair", default=None,
                        help="'toy' (default): the shipped 2-layer toy pair; 'smollm2': SmolLM2-135M-Instruct + the "
                             "LoRA adapters post-trained here (pa_jax/assets/smollm2_pair); or a directory with "
                             "reference/ and policy/")
    parser.add_argument("--num-episodes", type=int, default=512,
                        help="smollm2: sampled episodes per model for the success rates (default 512)")
    parser.add_argument("--num-heldout", type=int, default=512,
                        help="smollm2: held-out policy rollouts for pa-jax uq/bon/fa (default 512)")
    parser.add_argument("--no-figure", action="store_true", help="skip the PNG figure")


# ---------------------------------------------------------------------------------------------------
# pieces


def _load_pair(pair_dir: pathlib.Path):
    from pa_jax.models import load

    meta_path = pair_dir / "toy_pair.json"
    for sub in ("reference", "policy"):
        if not (pair_dir / sub / "config.json").is_file():
            raise ValueError(f"--pair {pair_dir}: missing {sub}/config.json (expected an HF directory)")
    if not meta_path.is_file():
        raise ValueError(f"--pair {pair_dir}: missing toy_pair.json (beta and environment parameters)")
    meta = json.loads(meta_path.read_text())
    ref = load(str(pair_dir / "reference"), dtype="float32")
    pol = load(str(pair_dir / "policy"), dtype="float32")
    return meta, ref, pol


def _token_logprobs(model_pair, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    from pa_jax.models import token_logprobs

    config, model = model_pair
    return np.asarray(token_logprobs(config, model, ids, mask), np.float64)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _render_rollouts(env, actions: np.ndarray, outcomes: np.ndarray):
    """ids [N, T], mask [N, T], step_ids [N, T] of complete trajectories (final observation included)."""
    rows, sids = [], []
    for a, o in zip(actions, outcomes):
        words, spans = env.render(a, o)
        rows.append(env.encode(words))
        s = np.full(len(words), -1, np.int32)
        for t, (b, e) in enumerate(spans):
            s[b:e] = t
        sids.append(s)
    T = max(len(r) for r in rows)
    ids = np.zeros((len(rows), T), np.int32)
    mask = np.zeros((len(rows), T), np.int32)
    step_ids = np.full((len(rows), T), -1, np.int32)
    for i, (r, s) in enumerate(zip(rows, sids)):
        ids[i, : len(r)], mask[i, : len(r)], step_ids[i, : len(s)] = r, 1, s
    return ids, mask, step_ids


def _history_indices(tree, actions: np.ndarray, outcomes: np.ndarray) -> np.ndarray:
    """[N, H] index of the history h_t (before command t) within depth t."""
    N, H = actions.shape
    out = np.zeros((N, H), np.int64)
    h = np.zeros(N, np.int64)
    for t in range(H):
        out[:, t] = h
        h = tree.child[t][h, actions[:, t], outcomes[:, t]]
    return out


# ---------------------------------------------------------------------------------------------------
# main


def run_demo(out_dir: str | os.PathLike, *, seed: int = 0, num_rollouts: int = 1024, group_size: int = 8,
             pair_dir: str | os.PathLike | None = None, figure: bool = True, verbose: bool = True) -> dict:
    """Run the whole demo; returns the results dict (also written to ``out_dir/results.json``)."""
    import jax.numpy as jnp

    from pa_jax.advantage import step_advantages, step_values
    from pa_jax.apps import bon as bon_app
    from pa_jax.apps import fa as fa_app
    from pa_jax.apps import uq as uq_app
    from pa_jax.baselines import policy_logprob_scores, self_certainty_scores
    from pa_jax.head import head_statistics
    from toy_mdp import text_env as te

    if num_rollouts < 2:
        raise ValueError(f"--num-rollouts must be >= 2, got {num_rollouts}")
    if group_size < 2 or num_rollouts % group_size:
        raise ValueError(f"--group-size must be >= 2 and divide --num-rollouts ({num_rollouts}), got {group_size}")
    t_start = time.time()
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pair = pathlib.Path(pair_dir) if pair_dir is not None else default_pair_dir()
    meta, ref, pol = _load_pair(pair)
    beta = float(meta["beta"])
    env = te.SteppingStones(horizon=int(meta["env"]["horizon"]), goal=int(meta["env"]["goal"]),
                            stop_value=float(meta["env"].get("stop_value", 0.0)))
    if ref[0].vocab_size != len(env.vocab()):
        raise ValueError(f"--pair {pair}: vocab_size {ref[0].vocab_size} != environment vocabulary {len(env.vocab())}")
    H = env.horizon

    # 1. every (history, command) of the tree through the LLM path; exact solution against the reference
    tree = te.build_tree(env)
    tt = te.tree_tokens(env, tree)
    ref_tree = te.action_logprobs_from_tokens(_token_logprobs(ref, tt.ids, tt.mask), tt)
    pol_tree = te.action_logprobs_from_tokens(_token_logprobs(pol, tt.ids, tt.mask), tt)
    sol = te.solve_history_tree(tree, ref_tree, beta, stop_value=env.stop_value)
    pol_eval = te.evaluate_tree_policy(tree, pol_tree, ref_tree, beta, stop_value=env.stop_value)[1][0][0]
    ref_eval = te.evaluate_tree_policy(tree, ref_tree, ref_tree, beta, stop_value=env.stop_value)[1][0][0]
    invalid_mass = max(float(np.exp(te.stop_logprob(p)).max()) for p in pol_tree)

    # 2. sample rollouts from the policy and score them through the LLM path
    rng = np.random.default_rng(seed)
    acts, outs = te.sample_histories(tree, pol_tree, num_rollouts, rng)
    hist = _history_indices(tree, acts, outs)
    final_pos = np.array([tree.positions[H][tree.child[H - 1][hist[i, -1], acts[i, -1], outs[i, -1]]]
                          for i in range(num_rollouts)])
    success = (final_pos == env.goal).astype(np.int64)
    exact_adv = np.stack([sol.advantage[t][hist[:, t], acts[:, t]] for t in range(H)], 1)  # [N, H]

    ids, mask, step_ids = _render_rollouts(env, acts, outs)
    lp_pol = _token_logprobs(pol, ids, mask)
    lp_ref = _token_logprobs(ref, ids, mask)
    sid = np.where(mask[:, 1:] > 0, step_ids[:, 1:], -1)  # step id of each *target* token
    lp_pol = np.where(mask[:, 1:] > 0, lp_pol, 0.0)
    lp_ref = np.where(mask[:, 1:] > 0, lp_ref, 0.0)
    nsteps = np.full(num_rollouts, H, np.int32)
    step_pa = {agg: np.asarray(step_advantages(lp_pol, lp_ref, sid, nsteps, token_agg=agg, beta=beta)[0], np.float64)
               for agg in TOKEN_AGGS_SHOWN}
    cfg_p, model_p = pol
    hidden = model_p(jnp.asarray(ids), jnp.asarray(mask))
    stats = head_statistics(hidden[:, :-1], model_p.unembedding(), jnp.asarray(ids[:, 1:]),
                            softcap=cfg_p.final_logit_softcap, top_k=5)
    mean_lp = np.where(mask[:, 1:] > 0, np.asarray(stats.mean_logprob), 0.0)

    # 3. Proposition 1 on the visited (history, command) pairs (each distinct pair once)
    keys = np.stack([np.broadcast_to(np.arange(H), (num_rollouts, H)), hist, acts], -1).reshape(-1, 3)
    _, first = np.unique(keys, axis=0, return_index=True)
    a_star = exact_adv.reshape(-1)[first]
    prop1: dict = {"n_visited_pairs": int(len(first)), "n_step_occurrences": int(num_rollouts * H),
                   "aggregations": {}}
    for agg in TOKEN_AGGS_SHOWN:
        pred = step_pa[agg].reshape(-1)[first]
        err = np.abs(pred - a_star)
        prop1["aggregations"][agg] = {"pearson": _pearson(pred, a_star), "mean_abs_err": float(err.mean()),
                                      "max_abs_err": float(err.max())}
    pred_all = step_pa["sum"].reshape(-1)
    prop1["sum_occurrence_weighted"] = {"pearson": _pearson(pred_all, exact_adv.reshape(-1)),
                                        "mean_abs_err": float(np.abs(pred_all - exact_adv.reshape(-1)).mean())}
    tree_pred = np.concatenate([beta * (p - r).ravel() for p, r in zip(pol_tree, ref_tree)])
    tree_adv = np.concatenate([a.ravel() for a in sol.advantage])
    prop1["all_tree_pairs"] = {"n": int(len(tree_adv)), "pearson": _pearson(tree_pred, tree_adv),
                               "mean_abs_err": float(np.abs(tree_pred - tree_adv).mean())}
    # the same quantities straight from the tree batch agree with the rollout batch (two LLM batches)
    tree_sum_at_visited = np.stack([beta * (pol_tree[t] - ref_tree[t])[hist[:, t], acts[:, t]] for t in range(H)], 1)
    prop1["rollout_vs_tree_batch_max_diff"] = float(np.abs(tree_sum_at_visited - step_pa["sum"]).max())

    # 4a. UQ: which trajectory score predicts success
    pa_scores = {f"progress_adv(token={agg},step={sagg})": s
                 for agg in ("sum", "mean") for sagg, s in
                 (("sum", step_pa[agg].sum(1)), ("mean", step_pa[agg].mean(1)))}
    baseline_scores = {
        "policy_logprob(token=mean,step=mean)": np.asarray(policy_logprob_scores(lp_pol, sid, nsteps), np.float64),
        "policy_logprob(token=sum,step=sum)": np.asarray(
            policy_logprob_scores(lp_pol, sid, nsteps, token_agg="sum", step_agg="sum"), np.float64),
        "self_certainty": np.asarray(self_certainty_scores(mean_lp, cfg_p.vocab_size, sid, nsteps), np.float64),
    }
    oracle_scores = {"exact_sum_A*": exact_adv.sum(1)}
    all_scores = {**pa_scores, **baseline_scores, **oracle_scores}
    uq = {name: {"auroc": uq_app.auroc(s, success), "auroc_ci95": list(uq_app.bootstrap_ci(s, success, num_resamples=200, seed=seed)["auroc"])}
          for name, s in all_scores.items()}

    # 4b. best-of-N over groups of rollouts of the same task
    task_ids = [i // group_size for i in range(num_rollouts)]
    bon = {}
    for name, s in all_scores.items():
        r = bon_app.best_of_n(task_ids, s, success.astype(np.float64))
        bon[name] = r["bon_success_rate"]
    bon_ref = bon_app.best_of_n(task_ids, np.zeros(num_rollouts), success.astype(np.float64))
    bon_summary = {"group_size": group_size, "n_groups": num_rollouts // group_size,
                   "pass_at_1": bon_ref["pass_at_1"], "oracle_pass_at_n": bon_ref["oracle_pass_at_n"],
                   "selected_success": bon}

    # 4c. failure attribution: the decisive error is the step with the most negative exact A*
    failed = np.where((success == 0) & (exact_adv.min(1) < -1e-3))[0]
    truth = [int(np.argmin(exact_adv[i])) for i in failed]
    steps_idx = list(range(H))
    step_lp = np.asarray(step_values(lp_pol, sid, nsteps, token_agg="sum")[0], np.float64)
    predictors = {f"progress_adv(token={agg})": step_pa[agg] for agg in TOKEN_AGGS_SHOWN}
    predictors["policy_logprob(token=sum)"] = step_lp
    fa = {"n_failed_with_error": int(len(failed)), "n_failed": int((success == 0).sum()),
          "chance_accuracy": float(np.mean([1.0 / H] * max(1, len(failed)))), "accuracy": {}}
    for name, sc in predictors.items():
        m = fa_app.attribute([sc[i] for i in failed], [steps_idx] * len(failed), truth, rules=("sharpest_drop",))
        fa["accuracy"][name] = m["sharpest_drop"]["step_accuracy"]
    # the same rule on the exact A* recovers the definition (a check of the plumbing)
    m = fa_app.attribute([exact_adv[i] for i in failed], [steps_idx] * len(failed), truth, rules=("sharpest_drop",))
    fa["accuracy"]["exact_A*"] = m["sharpest_drop"]["step_accuracy"]

    results = {
        "pair": str(pair), "beta": beta, "seed": seed, "num_rollouts": num_rollouts,
        "env": {"name": "stepping_stones", "horizon": H, "goal": env.goal, "num_histories": int(sum(tree.sizes()[:-1])),
                "num_history_commands": int(sum(tree.sizes()[:-1]) * env.num_actions)},
        "objective": {"policy": float(pol_eval), "reference": float(ref_eval), "optimal": float(sol.v[0][0])},
        "policy_invalid_command_mass_max": invalid_mass,
        "success_rate": float(success.mean()),
        "proposition1": prop1, "uq": uq, "bon": bon_summary, "fa": fa,
        "targets": {
            "pearson_sum_ge_0.95": prop1["aggregations"]["sum"]["pearson"] >= 0.95,
            # same aggregation on both sides: the paper's default (token mean, step mean) and the exact sum
            "pa_auroc_gt_policy_logprob": all(
                uq[f"progress_adv(token={a},step={a})"]["auroc"] > uq[f"policy_logprob(token={a},step={a})"]["auroc"]
                for a in ("mean", "sum")),
        },
    }
    results["wall_seconds"] = time.time() - t_start
    atomic_write_json(out / "results.json", results)
    if figure:
        _figure(out / "demo.png", step_pa, exact_adv, first, results)
    results["wall_seconds"] = time.time() - t_start
    atomic_write_json(out / "results.json", results)
    if verbose:
        print(summary_table(results))
        print(f"\nwrote {out / 'results.json'}" + ("" if not figure else f" and {out / 'demo.png'}")
              + f" ({results['wall_seconds']:.1f}s)")
    return results


def _null_as_nan(o):
    """A results object read back from strict JSON, with its nulls (undefined values) as NaN again."""
    if isinstance(o, dict):
        return {k: _null_as_nan(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_null_as_nan(v) for v in o]
    return float("nan") if o is None else o


def summary_table(r: dict) -> str:
    """The printed summary of a results object (as run_demo returns it or read back from results.json)."""
    r = _null_as_nan(r)
    p = r["proposition1"]
    lines = [
        f"pa-jax demo: stepping stones (H={r['env']['horizon']}, {r['env']['num_history_commands']} history-commands), "
        f"beta={r['beta']}, {r['num_rollouts']} policy rollouts, success {r['success_rate']:.3f}",
        f"regularized objective J: reference {r['objective']['reference']:.4f}  policy {r['objective']['policy']:.4f}"
        f"  optimal {r['objective']['optimal']:.4f}",
        "",
        f"Proposition 1: beta*log(pi/pi_ref) vs exact A* on {p['n_visited_pairs']} visited (history, command) pairs",
        f"  {'token aggregation':<22}{'Pearson':>9}{'mean|err|':>11}{'max|err|':>10}",
    ]
    for agg, m in p["aggregations"].items():
        tag = " (exact log-ratio)" if agg == "sum" else " (heuristic)"
        lines.append(f"  {agg + tag:<22}{m['pearson']:>9.4f}{m['mean_abs_err']:>11.4f}{m['max_abs_err']:>10.4f}")
    lines += ["", "UQ: AUROC for success (higher is better)"]
    for name, m in r["uq"].items():
        lines.append(f"  {name:<40}{m['auroc']:>7.3f}  [{m['auroc_ci95'][0]:.3f}, {m['auroc_ci95'][1]:.3f}]")
    b = r["bon"]
    lines += ["", f"Best-of-{b['group_size']} ({b['n_groups']} groups): pass@1 {b['pass_at_1']:.3f}, "
              f"oracle pass@{b['group_size']} {b['oracle_pass_at_n']:.3f}; success of the selected rollout:"]
    for name, v in b["selected_success"].items():
        lines.append(f"  {name:<40}{v:>7.3f}")
    f = r["fa"]
    lines += ["", f"Failure attribution on {f['n_failed_with_error']} failed rollouts with an error "
              f"(argmin exact A*); chance {f['chance_accuracy']:.3f}; accuracy:"]
    for name, v in f["accuracy"].items():
        lines.append(f"  {name:<40}{v:>7.3f}")
    t = r["targets"]
    lines += ["", f"targets: Pearson(sum) >= 0.95: {'PASS' if t['pearson_sum_ge_0.95'] else 'FAIL'}; "
              f"progress-advantage AUROC > policy log-prob AUROC (mean/mean and sum/sum): {'PASS' if t['pa_auroc_gt_policy_logprob'] else 'FAIL'}"]
    return "\n".join(lines)


def _figure(path: pathlib.Path, step_pa: dict, exact_adv: np.ndarray, first: np.ndarray, r: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9.5))
    ax = axes[0, 0]
    a = exact_adv.reshape(-1)[first]
    colors = {"sum": "tab:blue", "mean": "tab:orange", "min": "tab:green", "max": "tab:red"}
    for agg in ("mean", "min", "max", "sum"):
        x = step_pa[agg].reshape(-1)[first]
        pr = r["proposition1"]["aggregations"][agg]["pearson"]
        ax.scatter(a, x, s=14 if agg == "sum" else 7, alpha=0.9 if agg == "sum" else 0.35, color=colors[agg],
                   label=f"token {agg}{' (exact)' if agg == 'sum' else ''}: r = {pr:.3f}", zorder=3 if agg == "sum" else 2)
    lo, hi = float(min(a.min(), step_pa["sum"].min())), float(max(a.max(), step_pa["sum"].max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x (Proposition 1)")
    ax.set_xlabel("exact optimal advantage A*(h, a)")
    ax.set_ylabel("beta * log pi_theta / pi_ref (LLM)")
    ax.set_title(f"Proposition 1 on the LLM pair ({r['proposition1']['n_visited_pairs']} visited pairs)")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)

    def bars(ax, names, values, title, ylabel, refs=()):
        short = [n.replace("progress_adv", "PA").replace("policy_logprob", "logprob").replace("(token=", "(").replace(",step=", "/")
                 for n in names]
        col = ["tab:blue" if n.startswith("progress") else "tab:gray" if "exact" in n else "tab:orange" for n in names]
        ax.bar(range(len(values)), values, color=col)
        for i, v in enumerate(values):
            ax.text(i, v + 0.01, f"{v:.2f}", ha="center", fontsize=8)
        for val, lab, st in refs:
            ax.axhline(val, ls=st, color="k", lw=1, label=lab)
        if refs:
            ax.legend(fontsize=8, loc="lower right")
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels(short, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1.12)
        ax.grid(axis="y", alpha=0.3)

    names = list(r["uq"])
    bars(axes[0, 1], names, [r["uq"][n]["auroc"] for n in names], "UQ: AUROC for success", "AUROC",
         [(0.5, "chance", ":")])
    b = r["bon"]
    names = list(b["selected_success"])
    bars(axes[1, 0], names, [b["selected_success"][n] for n in names],
         f"Best-of-{b['group_size']}: success of the selected rollout", "success rate",
         [(b["pass_at_1"], "pass@1", ":"), (b["oracle_pass_at_n"], f"oracle pass@{b['group_size']}", "--")])
    f = r["fa"]
    names = list(f["accuracy"])
    bars(axes[1, 1], names, [f["accuracy"][n] for n in names],
         f"Failure attribution ({f['n_failed_with_error']} failed rollouts)", "step accuracy",
         [(f["chance_accuracy"], "chance", ":")])
    fig.suptitle(f"pa-jax demo: stepping stones, beta = {r['beta']}, {r['num_rollouts']} policy rollouts", fontsize=12)
    fig.tight_layout()
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    if args.pair == "smollm2":
        from pa_jax import demo_smollm2

        res = demo_smollm2.run_smollm2_demo(args.out, seed=args.seed, num_episodes=args.num_episodes,
                                            num_heldout=args.num_heldout, group_size=args.group_size,
                                            figure=not args.no_figure)
        print(demo_smollm2.summary_table(res))
        return 0
    if args.pair == "toy":
        args.pair = None
    res = run_demo(args.out, seed=args.seed, num_rollouts=args.num_rollouts, group_size=args.group_size,
                   pair_dir=args.pair, figure=not args.no_figure)
    # A missed target is reported in the table and the JSON, not as a failed command.
    del res
    return 0
