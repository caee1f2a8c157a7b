"""``python -m toy_mdp train``: arguments, the results JSON (written atomically by
:func:`pa_jax.io.atomic_write_json`) and the final-metrics table."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional, Sequence

from pa_jax.io import atomic_write_json
from toy_mdp.train.config import ALGOS, EnvConfig
from toy_mdp.train.driver import run


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as strict JSON to ``path`` atomically (:func:`pa_jax.io.atomic_write_json`; NaN/inf
    -> null). Kept for callers of the old name; argument order ``(obj, path)``."""
    atomic_write_json(path, obj)


def format_table(result: dict[str, Any]) -> str:
    """Markdown table of the final metrics (mean over MDPs; worst error also the max)."""
    beta = result["config"]["env"]["beta"]
    lines = [f"beta = {beta}; means over {result['config']['env']['num_mdps']} MDPs "
             f"(worst error: mean / max over MDPs)", "",
             "| algorithm | steps | worst abs error | mean abs error | Pearson | Spearman | "
             "pair agreement | beta_eff | residual |",
             "|---|---|---|---|---|---|---|---|---|"]

    def f(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    for algo, r in result["runs"].items():
        fi = r["final"]
        lines.append(
            f"| {algo} | {r['config']['steps']} | {f(fi['worst_abs_error'], '.2e')} / "
            f"{f(fi['worst_abs_error_max'], '.2e')} | {f(fi['mean_abs_error'], '.2e')} | "
            f"{f(fi['pearson'], '.4f')} | {f(fi['spearman'], '.4f')} | "
            f"{f(fi['pair_agreement'], '.3f')} | {f(fi['beta_eff'], '.3f')} | "
            f"{f(fi['beta_eff_residual'], '.3f')} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m toy_mdp train",
        description="Train tabular policies from pi_ref with exact PG / REINFORCE-KL / GRPO / PPO "
                    "on random MDPs and track |beta log(pi/pi_ref) - A*| during training.")
    p.add_argument("--algo", default="all", choices=ALGOS + ("all",))
    p.add_argument("--steps", type=int, default=None,
                   help="training steps for every algorithm (default: per algorithm, see DEFAULTS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-mdps", type=int, default=EnvConfig.num_mdps)
    p.add_argument("--num-states", type=int, default=EnvConfig.num_states)
    p.add_argument("--num-actions", type=int, default=EnvConfig.num_actions)
    p.add_argument("--horizon", type=int, default=EnvConfig.horizon,
                   help="finite horizon H (0: discounted, infinite horizon; needs --gamma < 1)")
    p.add_argument("--gamma", type=float, default=None,
                   help="discount (default 1.0 with a horizon, 0.9 without)")
    p.add_argument("--beta", type=float, default=EnvConfig.beta)
    p.add_argument("--reward-scale", type=float, default=EnvConfig.reward_scale)
    p.add_argument("--ref-min-prob", type=float, default=EnvConfig.ref_min_prob)
    p.add_argument("--deterministic", action="store_true", help="deterministic transitions")
    p.add_argument("--rollout-len", type=int, default=EnvConfig.rollout_len,
                   help="episode truncation for sampled algorithms when discounted")
    p.add_argument("--episodes", type=int, default=None, help="episodes per MDP per step")
    p.add_argument("--lr", type=float, default=None, help="policy learning rate (all algorithms)")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--json", required=True, help="output JSON path (written atomically)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m toy_mdp train ...``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _main(args, argv)
    except ValueError as exc:  # bad hyperparameters: a usage error naming the field
        parser.error(str(exc))
        return 2


def _main(args: argparse.Namespace, argv: Optional[Sequence[str]]) -> int:
    horizon = args.horizon if args.horizon and args.horizon > 0 else None
    gamma = args.gamma if args.gamma is not None else (1.0 if horizon else 0.9)
    env = EnvConfig(num_mdps=args.num_mdps, num_states=args.num_states,
                    num_actions=args.num_actions, horizon=horizon, gamma=gamma, beta=args.beta,
                    reward_scale=args.reward_scale, ref_min_prob=args.ref_min_prob,
                    deterministic=args.deterministic, rollout_len=args.rollout_len)
    algos = list(ALGOS) if args.algo == "all" else [args.algo]
    overrides = {"episodes": args.episodes, "lr": args.lr, "eval_every": args.eval_every}
    result = run(env, algos, args.seed, steps=args.steps, overrides=overrides,
                 log=lambda s: print(s, flush=True))
    result["config"]["argv"] = list(argv) if argv is not None else sys.argv[1:]
    write_json_atomic(result, args.json)
    print(format_table(result))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
