"""``python -m toy_mdp verify [--num-mdps N] [--seed S] [--json PATH]`` and
``python -m toy_mdp train ...`` (dispatched to ``toy_mdp.train.main(argv)``)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        import importlib
        try:
            train = importlib.import_module("toy_mdp.train")  # lazy: heavy imports stay out of verify
        except ModuleNotFoundError as exc:
            if exc.name != "toy_mdp.train":
                raise
            print("python -m toy_mdp train: toy_mdp.train is not available", file=sys.stderr)
            return 2
        return int(train.main(argv[1:]) or 0)
    parser = argparse.ArgumentParser(prog="python -m toy_mdp",
                                     description="Exact KL-regularized tabular MDPs (Proposition 1).")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check Proposition 1 and its consequences on random MDPs")
    v.add_argument("--num-mdps", type=int, default=500, help="number of random MDPs (default 500)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--json", dest="json_path", default=None, help="also write the report as JSON")
    v.add_argument("--states", type=int, default=30, help="states per MDP (default 30)")
    v.add_argument("--actions", type=int, default=10, help="actions per MDP (default 10)")
    sub.add_parser("train", help="RL training on toy MDPs (see `python -m toy_mdp train -h`)")
    args = parser.parse_args(argv)
    from toy_mdp import verify
    try:
        return verify.main(args.num_mdps, args.seed, args.json_path, num_states=args.states,
                           num_actions=args.actions)
    except ValueError as exc:
        parser.error(str(exc))
        return 2


if __name__ == "__main__":
    sys.exit(main())
