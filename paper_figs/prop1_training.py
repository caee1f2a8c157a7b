"""Figure: does a post-trained policy's log-ratio recover A* during training? (issue 6)

Reads the JSON of ``python -m toy_mdp train --algo all --json PATH`` and draws, against training
steps, one line per algorithm (means over the MDP batch; the worst error also as a band up to the
max over MDPs): the worst and the mean visitation-weighted ``|beta log(pi/pi_ref) - A*|`` (log
scale), the weighted Pearson and Spearman correlation with ``A*``, the pairwise action-ranking
agreement, and the least-squares effective beta (dashed line: the ``beta`` of ``A*``).

    python paper_figs/prop1_training.py results/prop1_training.json --out results/prop1_training.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pa_jax.io import atomic_write_bytes  # noqa: E402

COLORS = {"exact_pg": "black", "reinforce_kl": "tab:blue", "grpo": "tab:orange",
          "ppo_clip": "tab:red", "ppo_kl": "tab:green"}
LABELS = {"exact_pg": "exact KL PG", "reinforce_kl": "REINFORCE + KL", "grpo": "GRPO (k3 KL)",
          "ppo_clip": "PPO clip (no KL)", "ppo_kl": "PPO + KL"}
PANELS = [("worst_abs_error", "worst |β log π/π_ref − A*| (visited)", True),
          ("mean_abs_error", "mean |β log π/π_ref − A*| (visitation-weighted)", True),
          ("pearson", "Pearson(β log π/π_ref, A*)", False),
          ("spearman", "Spearman(log π/π_ref, A*)", False),
          ("pair_agreement", "action-pair ranking agreement", False),
          ("beta_eff", "effective β (least squares of A* on log-ratio)", False)]


EXTRA_COLORS = ["tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray"]


def _colors(labels) -> dict:
    """Fixed colours for the five algorithms; distinct others for any further labels (ablations)."""
    extra = iter(EXTRA_COLORS * (1 + len(labels) // len(EXTRA_COLORS)))
    return {lab: COLORS[lab] if lab in COLORS else next(extra) for lab in labels}


def _arr(xs) -> np.ndarray:
    return np.array([np.nan if x is None else x for x in xs], dtype=float)


def load(path: str) -> dict:
    try:
        with open(path) as fh:
            result = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the training JSON ({exc})") from exc
    if not isinstance(result, dict) or not isinstance(result.get("runs"), dict) or not result["runs"]:
        raise ValueError(f"{path}: expected a JSON object with a non-empty 'runs' field "
                         "(output of `python -m toy_mdp train`)")
    for algo, run in result["runs"].items():
        hist = run.get("history", {}) if isinstance(run, dict) else {}
        missing = [k for k in ["step"] + [p[0] for p in PANELS] if k not in hist]
        if missing:
            raise ValueError(f"{path}: runs.{algo}.history lacks fields {missing}")
    return result


def draw(result: dict, out: str) -> None:
    """Draw the 2x3 panel figure and save it atomically as PNG."""
    env = result["config"]["env"]
    beta = env["beta"]
    colors = _colors(list(result["runs"]))
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), constrained_layout=True)
    for ax, (key, title, logy) in zip(axes.ravel(), PANELS):
        for algo, run in result["runs"].items():
            h = run["history"]
            steps = np.asarray(h["step"], float)
            y = _arr(h[key])
            c = colors[algo]
            if logy:
                y = np.maximum(y, 1e-16)
            ax.plot(steps, y, color=c, label=LABELS.get(algo, algo), lw=1.8)
            if key + "_max" in h:
                ax.fill_between(steps, y, np.maximum(_arr(h[key + "_max"]), 1e-16), color=c,
                                alpha=0.12, lw=0)
        if key == "beta_eff":
            ax.axhline(beta, color="gray", ls="--", lw=1, label=f"β = {beta:g}")
        if key in ("pearson", "spearman", "pair_agreement"):
            ax.axhline(1.0, color="gray", ls=":", lw=1)
        if logy:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=9, loc="lower left")
    axes[1, 2].legend(fontsize=9)
    h = env.get("horizon")
    setting = f"horizon {h}" if h else f"discounted γ={env['gamma']:g}"
    fig.suptitle(f"Post-training from π_ref on {env['num_mdps']} random MDPs (S={env['num_states']}, "
                 f"A={env['num_actions']}, {setting}, β={beta:g}): does β log π/π_ref approach A*?  "
                 "(lines: mean over MDPs; band: up to max)", fontsize=11)
    try:
        atomic_write_bytes(out, lambda f: fig.savefig(f, dpi=110, format="png"))
    finally:
        plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", help="output of `python -m toy_mdp train --json PATH`")
    p.add_argument("--out", default=None, help="PNG path (default: beside the JSON)")
    args = p.parse_args(argv)
    out = args.out or os.path.splitext(args.json)[0] + ".png"
    try:
        draw(load(args.json), out)
    except ValueError as exc:
        p.error(str(exc))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
