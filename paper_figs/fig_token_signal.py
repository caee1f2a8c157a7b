"""Per-token signal along one trajectory (the paper's Figure 3).

From the per-token export of ``pa-jax score --per-token FILE.jsonl`` (cached statistics, no model
recomputed): beta * log(pi_theta / pi_ref) and the policy log-prob of every scored action token, in
token order; the tokens of alternate steps are shaded, and the decisive step (Who&When
``mistake_step``) is marked where the file knows it.

    python paper_figs/fig_token_signal.py per_token.jsonl --out signal.png [--id TRAJECTORY_ID]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _figio import need, plt, read_jsonl, save  # noqa: E402

FIELDS = ("id", "step_ids", "policy_logprob", "beta_log_ratio")


def pick(records: list[dict], path: str, tid: str | None) -> dict:
    if not records:
        raise ValueError(f"{path}: no records")
    for i, r in enumerate(records):
        need(r, FIELDS, f"{path} record {i + 1}")
    if tid is None:
        return records[0]
    for r in records:
        if str(r["id"]) == tid:
            return r
    raise ValueError(f"{path}: no trajectory with id {tid!r} (first ids: {[r['id'] for r in records[:5]]})")


def draw(rec: dict):
    sid = np.asarray(rec["step_ids"], int)
    lp = np.asarray(rec["policy_logprob"], float)
    if len(sid) != len(lp):
        raise ValueError(f"record {rec['id']!r}: step_ids and policy_logprob differ in length ({len(sid)}, {len(lp)})")
    lr = None if rec["beta_log_ratio"] is None else np.asarray(rec["beta_log_ratio"], float)
    x = np.arange(len(sid))
    rows = 2 if lr is not None else 1
    fig, axes = plt.subplots(rows, 1, figsize=(11, 2.6 * rows), sharex=True, squeeze=False)
    series = ([(r"$\beta\,\log \pi_\theta/\pi_{ref}$", lr, "C0")] if lr is not None else []) + \
        [(r"$\log \pi_\theta$", lp, "C1")]
    decisive = rec.get("decisive_action")
    for ax, (name, y, c) in zip(axes[:, 0], series):
        for s in np.unique(sid):
            where = np.flatnonzero(sid == s)
            if len(where) == 0:
                continue
            lo, hi = where[0] - 0.5, where[-1] + 0.5
            if decisive is not None and s == decisive:
                ax.axvspan(lo, hi, color="red", alpha=0.18, lw=0)
            elif s % 2 == 0:
                ax.axvspan(lo, hi, color="0.85", alpha=0.6, lw=0)
        ax.plot(x, y, lw=0.7, color=c)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_ylabel(name)
    axes[-1, 0].set_xlabel("scored action token (shaded bands: alternate steps" +
                           ("; red: decisive step)" if decisive is not None else ")"))
    title = f"{rec['id']}"
    if rec.get("success") is not None:
        title += f"  success={rec['success']}"
    if rec.get("mistake_step") is not None:
        title += f"  mistake_step={rec['mistake_step']}"
    axes[0, 0].set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("per_token", help="JSON lines of pa-jax score --per-token")
    ap.add_argument("--out", required=True)
    ap.add_argument("--id", default=None, help="trajectory id (default: the first)")
    a = ap.parse_args(argv)
    rec = pick(read_jsonl(a.per_token), a.per_token, a.id)
    save(draw(rec), a.out)
    print(f"wrote {a.out} ({rec['id']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
