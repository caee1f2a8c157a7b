"""Which reference? An alpha sweep of weight-space merged references on the shipped toy pair, exactly.

Proposition 1 says beta * log pi_theta / pi_ref = A* when pi_theta is the KL-regularized optimum against
pi_ref. Replacing pi_ref by a merged pi_alpha = theta_ref + alpha * tau (pa_jax.merging) moves the
log-ratio; *if* log-probabilities were linear in the weights it would become (1 - alpha) log pi/pi_ref, a
rescaling that leaves Pearson with A* unchanged. They are not, so this measures, for every method and alpha,
on every (history, command) of the toy task's tree (exact, no sampling):

* Proposition 1 against the true reference's exact A*: Pearson and mean |error| of beta log pi/pi_alpha;
* how far log pi/pi_alpha is from (1 - alpha) log pi/pi_ref: relative L2 distance
  ||lr_alpha - (1 - alpha) lr|| / ||lr||, the least-squares slope of lr_alpha on lr (linear theory:
  1 - alpha) and the Pearson between them;
* applications on ``--num-rollouts`` policy rollouts (sampled once): UQ AUROC for success of the trajectory
  progress advantage (token sum / step sum = the exact log-ratio, and token mean / step mean).

The policy's log-probs are computed once; each merged reference once (tree batch + rollout batch). The
results JSON has the sweep layout of ``paper_figs/merge_sweep.py`` (``metrics`` unmerged, ``merges`` blocks).

    python experiments/toy_pair_merge_sweep.py --out docs/results/merge_sweep_toy_pair.json
    python paper_figs/merge_sweep.py docs/results/merge_sweep_toy_pair.json --score prop1/all_tree_pairs \\
        --metric pearson --out docs/figures/merge_sweep_toy_pair.png
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _pearson(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="linear,ties,dare_linear,dare_ties,emr")
    ap.add_argument("--alphas", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1")
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-rollouts", type=int, default=512)
    ap.add_argument("--pair", default=None)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "merge_sweep_toy_pair.json"))
    args = ap.parse_args(argv)

    from pa_jax import merging as M
    from pa_jax.apps import uq as uq_app
    from pa_jax.demo import _history_indices, _load_pair, _render_rollouts, _token_logprobs, default_pair_dir
    from pa_jax.io import atomic_write_json
    from toy_mdp import text_env as te

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        M.check_method(m)
    alphas = [M.check_alpha(a) for a in args.alphas.split(",")]
    t_start = time.time()
    pair = pathlib.Path(args.pair) if args.pair else default_pair_dir()
    meta, ref, pol = _load_pair(pair)
    beta = float(meta["beta"])
    env = te.SteppingStones(horizon=int(meta["env"]["horizon"]), goal=int(meta["env"]["goal"]),
                            stop_value=float(meta["env"].get("stop_value", 0.0)))
    H = env.horizon
    tree = te.build_tree(env)
    tt = te.tree_tokens(env, tree)
    forwards = {"policy": 0, "references": 0}

    def tree_lp(model_pair):
        return te.action_logprobs_from_tokens(_token_logprobs(model_pair, tt.ids, tt.mask), tt)

    pol_tree = tree_lp(pol)
    ref_tree = tree_lp(ref)
    sol = te.solve_history_tree(tree, ref_tree, beta, stop_value=env.stop_value)
    a_star = np.concatenate([a.ravel() for a in sol.advantage])
    lr_ref = np.concatenate([(p - r).ravel() for p, r in zip(pol_tree, ref_tree)])

    rng = np.random.default_rng(args.seed)
    acts, outs = te.sample_histories(tree, pol_tree, args.num_rollouts, rng)
    hist = _history_indices(tree, acts, outs)
    final = np.array([tree.positions[H][tree.child[H - 1][hist[i, -1], acts[i, -1], outs[i, -1]]]
                      for i in range(args.num_rollouts)])
    success = (final == env.goal).astype(np.int64)
    ids, mask, step_ids = _render_rollouts(env, acts, outs)
    sid = np.where(mask[:, 1:] > 0, step_ids[:, 1:], -1)
    valid = mask[:, 1:] > 0

    def rollout_lp(model_pair):
        return np.where(valid, _token_logprobs(model_pair, ids, mask), 0.0)

    lp_pol = rollout_lp(pol)
    forwards["policy"] += 1

    def evaluate(ref_pair, alpha):
        """Metrics of one reference (tree + rollouts); alpha is None for the unmerged reference."""
        forwards["references"] += 1
        r_tree = ref_tree if ref_pair is ref else tree_lp(ref_pair)
        lr = np.concatenate([(p - r).ravel() for p, r in zip(pol_tree, r_tree)])
        pred = beta * lr
        # pi_alpha equal to pi_theta up to float rounding (linear / EMR with one policy at alpha = 1): the
        # log-ratio is rounding noise and its correlations are undefined (null, with the reason)
        degenerate = float(np.linalg.norm(lr)) < 1e-4 * float(np.linalg.norm(lr_ref))
        out = {"prop1/all_tree_pairs": {"pearson": None if degenerate else _pearson(pred, a_star),
                                        "mean_abs_err": float(np.abs(pred - a_star).mean()), "n": int(len(a_star)),
                                        "degenerate": degenerate}}
        a = 0.0 if alpha is None else alpha
        scaled = (1.0 - a) * lr_ref
        denom = float(np.linalg.norm(lr_ref))
        out["log_ratio_vs_scaled"] = {
            "rel_l2": float(np.linalg.norm(lr - scaled) / denom),
            "slope": float(lr @ lr_ref / (lr_ref @ lr_ref)),
            "linear_theory_slope": 1.0 - a,
            "pearson": None if degenerate else _pearson(lr, lr_ref),
            "max_abs_diff": float(np.abs(lr - scaled).max()),
        }
        lp_r = rollout_lp(ref_pair)
        tok = np.where(valid & (sid >= 0), lp_pol - lp_r, 0.0)  # command tokens only
        per_traj_sum = beta * tok.sum(1)
        steps = np.zeros((len(ids), H))
        for t in range(H):
            m = sid == t
            steps[:, t] = (tok * m).sum(1) / np.maximum(m.sum(1), 1)
        out["uq/pa_sum_sum"] = {"auroc": None if degenerate else uq_app.auroc(per_traj_sum, success)}
        out["uq/pa_mean_mean"] = {"auroc": None if degenerate else uq_app.auroc(beta * steps.mean(1), success)}
        return out

    result = {"pair": str(pair), "beta": beta, "num_rollouts": args.num_rollouts, "success_rate": float(success.mean()),
              "metrics": evaluate(ref, None), "merges": []}
    cfg_r, model_r = ref
    t_ref, t_pol = M.model_tensors(cfg_r, model_r), M.model_tensors(*pol)
    for method in methods:
        delta = M.merged_delta(t_ref, t_pol, method, density=args.density, seed=args.seed)
        for alpha in alphas:
            merged = (cfg_r, M.replace_params(cfg_r, model_r, delta.at(alpha)))
            block = {"method": method, "alpha": alpha, "options": delta.options.as_dict(), "info": dict(delta.info),
                     "metrics": evaluate(merged, alpha)}
            result["merges"].append(block)
            m = block["metrics"]
            f = lambda v: "  n/a " if v is None else f"{v:.4f}"  # noqa: E731
            print(f"{method:12s} alpha={alpha:5.2f}  Pearson(beta lr, A*)={f(m['prop1/all_tree_pairs']['pearson'])}  "
                  f"mean|err|={m['prop1/all_tree_pairs']['mean_abs_err']:.4f}  slope={m['log_ratio_vs_scaled']['slope']:.3f} "
                  f"(linear theory {1 - alpha:.2f})  rel_l2={m['log_ratio_vs_scaled']['rel_l2']:.3f}  "
                  f"AUROC sum/sum={f(m['uq/pa_sum_sum']['auroc'])} mean/mean={f(m['uq/pa_mean_mean']['auroc'])}",
                  flush=True)
    result["forwards"] = forwards
    result["wall_s"] = time.time() - t_start
    m = result["metrics"]
    print(f"unmerged reference: Pearson={m['prop1/all_tree_pairs']['pearson']:.4f}  AUROC sum/sum="
          f"{m['uq/pa_sum_sum']['auroc']:.3f} mean/mean={m['uq/pa_mean_mean']['auroc']:.3f}; forwards {forwards}")
    atomic_write_json(args.out, result)
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
