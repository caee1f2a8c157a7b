"""Train the shipped toy pair (pa_jax/assets/toy_pair/{reference,policy}) from a seed.

    python experiments/train_toy_pair.py --seed 0 --out pa_jax/assets/toy_pair

Environment: :mod:`toy_mdp.text_env` (stepping stones: 3 commands of 3-4 tokens, 2 outcomes each, a
horizon of ``--horizon`` commands; every history enumerable). Model: a 2-layer llama decoder of width 64 (``pa_jax.models.Decoder``), word-level
tokenizer.

1. Reference (SFT): fresh trajectories of a fixed, position-dependent behaviour policy each step;
   cross-entropy on the command tokens only (observations are the environment's, not the model's).
2. Policy (KL-regularized RL from the reference, per-step KL, ``beta``): the *exact* policy gradient.
   Every (history, command) pair of the tree is covered by one batch of 648 token rows; the network's
   command log-probs (token sums) at every history give the exact regularized objective

       J(theta) = E_{pi_theta}[ sum_t r_t - beta * KL(pi_theta(.|h_t) || pi_ref(.|h_t)) ]

   by backward induction on the tree (the invalid-command mass ends the episode with value 0, exactly as
   in :func:`toy_mdp.text_env.solve_history_tree`), and ``jax.grad`` differentiates it. Why this
   estimator: it is exact RL on the true objective (no sampling variance, no reward model, no clipping
   surrogate), deterministic (reproducible from the seed), and its unique maximizer over history policies
   is the pi* for which Proposition 1 holds, so any remaining gap between beta * log-ratio and A* is
   optimization/capacity error that we measure, not estimator bias. REINFORCE/GRPO with a KL penalty have
   the same fixed point but need far more steps to reach it to the precision the correlation target needs.
3. Export both with ``pa_jax.models.save_pretrained`` + the tokenizer files (float32 safetensors).

Progress is reported as the visitation-weighted Pearson correlation (exact expectation over the tree under
pi_theta) between beta * log(pi_theta/pi_ref) and A* computed against the reference network.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pa_jax.io import atomic_write_json  # noqa: E402
from toy_mdp import text_env as te  # noqa: E402

DEFAULT_BETA = 0.5
DEFAULT_HORIZON = 4
DEFAULT_SFT_STEPS = 400
DEFAULT_RL_STEPS = 300
DEFAULT_RL_LR = 3e-3

# behaviour policy of the SFT data: P(command | position), commands (walk ahead, jump, walk back)
BEHAVIOUR = np.array([
    [0.50, 0.35, 0.15],
    [0.55, 0.30, 0.15],
    [0.60, 0.20, 0.20],
    [0.45, 0.25, 0.30],
])


def model_hf_config(vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                    intermediate: int = 128, max_positions: int = 64) -> dict:
    """A llama config.json dict (transformers' LlamaConfig fields) for the toy pair."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 2,
        "eos_token_id": 3,
        "pad_token_id": 0,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
    }


def behaviour_logprobs(tree: te.HistoryTree) -> list[np.ndarray]:
    return [np.log(BEHAVIOUR[p]) for p in tree.positions[:-1]]


def leaf_rows(tree: te.HistoryTree, actions: np.ndarray, outcomes: np.ndarray) -> np.ndarray:
    """Row of :func:`toy_mdp.text_env.tree_tokens` holding each sampled trajectory's commands."""
    H, A = tree.horizon, tree.num_actions
    h = np.zeros(len(actions), np.int64)
    for t in range(H - 1):
        h = tree.child[t][h, actions[:, t], outcomes[:, t]]
    return h * A + actions[:, H - 1]


def token_logprobs_fn(graphdef):
    """(params, ids [B,T], mask [B,T]) -> [B, T-1] log p(ids[:, 1:] | prefix) (full softmax; V is tiny)."""

    def f(params, ids, mask):
        model = nnx.merge(graphdef, params)
        hidden = model(ids, mask)
        logits = jnp.einsum("btd,vd->btv", hidden[:, :-1], model.unembedding())
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(lp, ids[:, 1:, None], axis=-1)[..., 0]

    return f


def _stop_logprob(lp: jax.Array, floor: float = 1e-8) -> jax.Array:
    """log(max(1 - sum_a exp(lp_a), floor)): the (float32-safe) mass on invalid commands."""
    return jnp.log(jnp.maximum(-jnp.expm1(jax.nn.logsumexp(lp, axis=-1)), floor))


def regularized_return(policy_lp: list, ref_lp: list, tree_arrays: dict, beta: float,
                       stop_value: float = 0.0) -> jax.Array:
    """Exact J(pi) = V^pi_0(root) on the history tree (float32, differentiable).

    V^pi_t(h) = sum_a pi(a|h) [Q^pi_t(h,a) - beta log(pi/pi_ref)(a|h)] + pi(stop|h) [stop_value - beta log(pi/pi_ref)(stop|h)],
    Q^pi_t(h,a) = r_t(h,a) + sum_o P(o|h,a) V^pi_{t+1}(h a o), V^pi_H = terminal reward.
    """
    v = tree_arrays["terminal"]
    for t in range(len(policy_lp) - 1, -1, -1):
        q = tree_arrays["reward"][t] + jnp.sum(tree_arrays["prob"][t] * v[tree_arrays["child"][t]], axis=-1)
        lp, rp = policy_lp[t], ref_lp[t]
        ps, rs = _stop_logprob(lp), _stop_logprob(rp)
        v = jnp.sum(jnp.exp(lp) * (q - beta * (lp - rp)), axis=-1) + jnp.exp(ps) * (stop_value - beta * (ps - rs))
    return v[0]


def tree_arrays_of(tree: te.HistoryTree) -> dict:
    return {
        "terminal": jnp.asarray(tree.terminal_reward, jnp.float32),
        "reward": [jnp.asarray(r, jnp.float32) for r in tree.reward],
        "prob": [jnp.asarray(p, jnp.float32) for p in tree.prob],
        "child": [jnp.asarray(c, jnp.int32) for c in tree.child],
    }


def visitation(tree: te.HistoryTree, action_lp: list[np.ndarray]) -> list[np.ndarray]:
    """P_pi(h, a) for every depth: probability that pi reaches history h and then emits command a."""
    out, ph = [], np.ones(1)
    for t in range(tree.horizon):
        pa = ph[:, None] * np.exp(np.asarray(action_lp[t], np.float64))
        out.append(pa)
        nxt = np.zeros(len(tree.positions[t + 1]))
        np.add.at(nxt, tree.child[t].reshape(-1), (pa[:, :, None] * tree.prob[t]).reshape(-1))
        ph = nxt
    return out


def weighted_pearson(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    w = w / w.sum()
    mx, my = (w * x).sum(), (w * y).sum()
    cov = (w * (x - mx) * (y - my)).sum()
    den = np.sqrt((w * (x - mx) ** 2).sum() * (w * (y - my) ** 2).sum())
    return float(cov / den) if den > 0 else float("nan")


def proposition1_report(tree, pol_lp, ref_lp, beta) -> dict:
    """Visitation-weighted agreement of beta * log(pi/pi_ref) with exact A* (against the reference's probs)."""
    ref64 = [np.asarray(r, np.float64) for r in ref_lp]
    sol = te.solve_history_tree(tree, ref64, beta)
    pred = np.concatenate([beta * (np.asarray(p, np.float64) - r).ravel() for p, r in zip(pol_lp, ref64)])
    adv = np.concatenate([a.ravel() for a in sol.advantage])
    w = np.concatenate([v.ravel() for v in visitation(tree, pol_lp)])
    err = np.abs(pred - adv)
    return {"pearson_weighted": weighted_pearson(pred, adv, w), "mean_abs_err_weighted": float((w * err).sum() / w.sum()),
            "pearson_all_pairs": weighted_pearson(pred, adv, np.ones_like(pred)),
            "max_abs_err_visited_1e-3": float(err[w > 1e-3].max()) if np.any(w > 1e-3) else float("nan")}


def train(seed: int = 0, *, beta: float = DEFAULT_BETA, sft_steps: int = DEFAULT_SFT_STEPS, sft_batch: int = 64,
          sft_lr: float = 3e-3, rl_steps: int = DEFAULT_RL_STEPS, rl_lr: float = DEFAULT_RL_LR, rl_clip: float = 1.0,
          log_every: int = 25,
          env: te.SteppingStones | None = None, verbose: bool = True):
    """Returns ``(config, reference_model, policy_model, env, history)``."""
    from pa_jax.models.config import ModelConfig
    from pa_jax.models.decoder import Decoder

    env = env or te.SteppingStones(horizon=DEFAULT_HORIZON)
    tree = te.build_tree(env)
    tt = te.tree_tokens(env, tree)
    hf = model_hf_config(len(env.vocab()), max_positions=int(2 ** np.ceil(np.log2(tt.ids.shape[1]))))
    config = ModelConfig.from_hf_dict(hf)
    rng = np.random.default_rng(seed)
    model = Decoder(config, rngs=nnx.Rngs(seed), dtype="float32")
    graphdef, params = nnx.split(model)
    tok_lp = token_logprobs_fn(graphdef)
    ids, mask = jnp.asarray(tt.ids), jnp.asarray(tt.mask)
    act_mask = jnp.asarray(tt.step_ids[:, 1:] >= 0, jnp.float32)  # targets that are command tokens
    history: dict[str, list] = {"sft_loss": [], "rl_objective": [], "rl_report": []}

    def log(msg):
        if verbose:
            print(msg, flush=True)

    # ---------------- SFT reference ----------------
    sched = optax.warmup_cosine_decay_schedule(0.0, sft_lr, min(20, sft_steps - 1), sft_steps, sft_lr * 0.05)
    opt = optax.adam(sched)
    opt_state = opt.init(params)
    blp = behaviour_logprobs(tree)

    @jax.jit
    def sft_step(params, opt_state, rows):
        def loss_fn(p):
            lp = tok_lp(p, ids[rows], mask[rows])
            m = act_mask[rows]
            return -jnp.sum(lp * m) / jnp.sum(m)

        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, loss

    t0 = time.time()
    for step in range(sft_steps):
        acts, outs = te.sample_histories(tree, blp, sft_batch, rng)
        rows = jnp.asarray(leaf_rows(tree, acts, outs))
        params, opt_state, loss = sft_step(params, opt_state, rows)
        history["sft_loss"].append(float(loss))
        if step % log_every == 0 or step == sft_steps - 1:
            log(f"sft {step:4d} loss {float(loss):.4f} ({time.time() - t0:.0f}s)")
    ref_params = params

    # ---------------- exact KL-regularized RL ----------------
    tarr = tree_arrays_of(tree)
    row = [jnp.asarray(r) for r in tt.row]
    pos = [jnp.asarray(np.maximum(p - 1, 0)) for p in tt.pos]
    pmask = [jnp.asarray(m) for m in tt.pos_mask]

    # tree data travel as jit arguments (as closure constants XLA would try to constant-fold them)
    data = {"ids": ids, "mask": mask, "row": row, "pos": pos, "pmask": pmask, "tree": tarr}

    def action_lp(p, d):
        lp = tok_lp(p, d["ids"], d["mask"])
        return [jnp.sum(jnp.where(m, lp[r[:, :, None], q], 0.0), axis=-1) for r, q, m in zip(d["row"], d["pos"], d["pmask"])]

    action_lp_jit = jax.jit(action_lp)
    ref_lp = [jax.lax.stop_gradient(x) for x in action_lp_jit(ref_params, data)]
    ref_np = [np.asarray(x, np.float64) for x in ref_lp]
    stop_mass = max(float((-np.expm1(te._logsumexp(r, 1))).max()) for r in ref_np)
    log(f"reference: max invalid-command mass over histories {stop_mass:.2e}")

    opt = optax.chain(optax.clip_by_global_norm(rl_clip),
                      optax.adam(optax.warmup_cosine_decay_schedule(0.0, rl_lr, min(20, rl_steps - 1), rl_steps, rl_lr * 0.05)))
    opt_state = opt.init(params)

    @jax.jit
    def rl_step(params, opt_state, d, ref_lp):
        J, g = jax.value_and_grad(lambda p: regularized_return(action_lp(p, d), ref_lp, d["tree"], beta))(params)
        upd, opt_state = opt.update(jax.tree.map(lambda x: -x, g), opt_state, params)
        return optax.apply_updates(params, upd), opt_state, J

    t0 = time.time()
    for step in range(rl_steps):
        params, opt_state, J = rl_step(params, opt_state, data, ref_lp)
        history["rl_objective"].append(float(J))
        if step % log_every == 0 or step == rl_steps - 1:
            rep = proposition1_report(tree, [np.asarray(x) for x in action_lp_jit(params, data)], ref_np, beta)
            rep["step"] = step
            history["rl_report"].append(rep)
            log(f"rl {step:4d} J {float(J):.5f} pearson_w {rep['pearson_weighted']:.4f} "
                f"mae_w {rep['mean_abs_err_weighted']:.4f} pearson_all {rep['pearson_all_pairs']:.4f} "
                f"({time.time() - t0:.0f}s)")
    sol = te.solve_history_tree(tree, ref_np, beta)
    history["optimal_objective"] = float(sol.v[0][0])
    log(f"optimal J* = {sol.v[0][0]:.5f}")
    reference = nnx.merge(graphdef, ref_params)
    policy = nnx.merge(graphdef, params)
    return config, reference, policy, env, history


def export(out_dir: str, config, reference, policy, env: te.SteppingStones, meta: dict) -> None:
    from pa_jax.models import save_pretrained

    for name, model in (("reference", reference), ("policy", policy)):
        d = os.path.join(out_dir, name)
        os.makedirs(d, exist_ok=True)
        save_pretrained(config, model, d)
        te.save_tokenizer(env, d)
    atomic_write_json(os.path.join(out_dir, "toy_pair.json"), meta)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--beta", type=float, default=DEFAULT_BETA)
    ap.add_argument("--horizon", type=int, default=DEFAULT_HORIZON)
    ap.add_argument("--goal", type=int, default=3)
    ap.add_argument("--sft-steps", type=int, default=DEFAULT_SFT_STEPS)
    ap.add_argument("--rl-steps", type=int, default=DEFAULT_RL_STEPS)
    ap.add_argument("--rl-lr", type=float, default=DEFAULT_RL_LR)
    ap.add_argument("--out", default=None, help="write the pair here (e.g. pa_jax/assets/toy_pair)")
    args = ap.parse_args(argv)
    env = te.SteppingStones(horizon=args.horizon, goal=args.goal)
    config, ref, pol, env, hist = train(args.seed, beta=args.beta, sft_steps=args.sft_steps, rl_steps=args.rl_steps,
                                        rl_lr=args.rl_lr, env=env)
    if args.out:
        meta = {"beta": args.beta, "seed": args.seed, "sft_steps": args.sft_steps, "rl_steps": args.rl_steps,
                "rl_lr": args.rl_lr,
                "env": {"horizon": env.horizon, "goal": env.goal, "stop_value": env.stop_value},
                "behaviour_policy": BEHAVIOUR.tolist(), "optimal_objective": hist["optimal_objective"],
                "final_objective": hist["rl_objective"][-1], "final_report": hist["rl_report"][-1],
                "estimator": "exact regularized-return gradient over the enumerated history tree",
                "command": "python experiments/train_toy_pair.py " + " ".join(argv if argv is not None else sys.argv[1:])}
        export(args.out, config, ref, pol, env, meta)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
