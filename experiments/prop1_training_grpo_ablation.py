"""Which part of GRPO moves its log-ratio away from A*? (issue 6 ablation)

Trains four GRPO variants on the same random MDPs as ``python -m toy_mdp train`` (same seed, same
sampling keys): KL as a k3 loss vs a k1 penalty in the outcome reward, with and without the group
std normalisation (Dr. GRPO). Prints a Markdown table and writes the JSON (atomically); draw it with
``python paper_figs/prop1_training.py OUT.json --out OUT.png``.

    python experiments/prop1_training_grpo_ablation.py --json results/prop1_training_grpo_ablation.json
"""
from __future__ import annotations

import argparse
import sys

from toy_mdp import train as T

VARIANTS = {
    "grpo": dict(grpo_kl="k3_loss", grpo_std_normalize=True),
    "grpo_no_std": dict(grpo_kl="k3_loss", grpo_std_normalize=False),
    "grpo_kl_reward": dict(grpo_kl="reward", grpo_std_normalize=True),
    "grpo_kl_reward_no_std": dict(grpo_kl="reward", grpo_std_normalize=False),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-mdps", type=int, default=T.EnvConfig.num_mdps)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    env = T.EnvConfig(num_mdps=args.num_mdps)
    cfgs = [(name, T.default_algo_config("grpo", env.beta, steps=args.steps, **kw))
            for name, kw in VARIANTS.items()]
    result = T.run_configs(env, cfgs, args.seed, log=lambda s: print(s, flush=True))
    result["config"]["argv"] = list(sys.argv[1:] if argv is None else argv)
    T.write_json_atomic(result, args.json)
    print(T.format_table(result))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
