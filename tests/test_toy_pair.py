"""The shipped toy pair: Proposition 1 target, transformers interoperability, and the training script."""
from __future__ import annotations

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from pa_jax.demo import default_pair_dir
from toy_mdp import text_env as te

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAIR = default_pair_dir()


def _train_module():
    spec = importlib.util.spec_from_file_location("train_toy_pair", ROOT / "experiments" / "train_toy_pair.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def shipped():
    from pa_jax.models import load, token_logprobs

    meta = json.loads((PAIR / "toy_pair.json").read_text())
    env = te.SteppingStones(horizon=meta["env"]["horizon"], goal=meta["env"]["goal"])
    tree = te.build_tree(env)
    tt = te.tree_tokens(env, tree)
    out = {"meta": meta, "env": env, "tree": tree, "tt": tt}
    for name in ("reference", "policy"):
        cfg, model = load(str(PAIR / name), dtype="float32")
        lp = np.asarray(token_logprobs(cfg, model, tt.ids, tt.mask), np.float64)
        out[name] = (cfg, model, lp, te.action_logprobs_from_tokens(lp, tt))
    return out


def _visit_probs(tree, action_lp):
    """P_pi(h_t = h, a_t = a) by a plain forward pass over the tree (loop over histories)."""
    ph = {0: 1.0}
    out = []
    for t in range(tree.horizon):
        w = np.zeros((len(tree.positions[t]), tree.num_actions))
        nxt: dict[int, float] = {}
        for h, p in ph.items():
            for a in range(tree.num_actions):
                w[h, a] = p * np.exp(action_lp[t][h, a])
                for o in range(tree.prob[t].shape[2]):
                    c = int(tree.child[t][h, a, o])
                    nxt[c] = nxt.get(c, 0.0) + w[h, a] * tree.prob[t][h, a, o]
        out.append(w)
        ph = nxt
    return out


def test_shipped_pair_meets_proposition1_target(shipped):
    beta = shipped["meta"]["beta"]
    tree = shipped["tree"]
    ref_lp, pol_lp = shipped["reference"][3], shipped["policy"][3]
    sol = te.solve_history_tree(tree, ref_lp, beta)
    pred = np.concatenate([beta * (p - r).ravel() for p, r in zip(pol_lp, ref_lp)])
    adv = np.concatenate([a.ravel() for a in sol.advantage])
    w = np.concatenate([x.ravel() for x in _visit_probs(tree, pol_lp)])
    # (a) exact expectation over the policy's visits: weighted Pearson
    w = w / w.sum()
    mx, my = (w * pred).sum(), (w * adv).sum()
    r_w = (w * (pred - mx) * (adv - my)).sum() / np.sqrt((w * (pred - mx) ** 2).sum() * (w * (adv - my) ** 2).sum())
    assert r_w >= 0.95
    # (b) the distinct pairs a sample of policy rollouts visits
    acts, outs = te.sample_histories(tree, pol_lp, 512, np.random.default_rng(0))
    seen = set()
    h = np.zeros(len(acts), np.int64)
    for t in range(tree.horizon):
        seen |= {(t, int(hh), int(a)) for hh, a in zip(h, acts[:, t])}
        h = tree.child[t][h, acts[:, t], outs[:, t]]
    x = np.array([beta * (pol_lp[t][hh, a] - ref_lp[t][hh, a]) for t, hh, a in seen])
    y = np.array([sol.advantage[t][hh, a] for t, hh, a in seen])
    assert np.corrcoef(x, y)[0, 1] >= 0.95
    # the RL policy is near-optimal for the regularized objective and better than the reference
    j_pol = te.evaluate_tree_policy(tree, pol_lp, ref_lp, beta)[1][0][0]
    j_ref = te.evaluate_tree_policy(tree, ref_lp, ref_lp, beta)[1][0][0]
    assert j_ref < j_pol <= sol.v[0][0] + 1e-6
    assert sol.v[0][0] - j_pol < 0.02


def _weighted_auroc(score, label, w):
    """P(score of a success > score of a failure) (+1/2 on ties), successes and failures weighted by w."""
    pos, neg = label == 1, label == 0
    d = score[pos][:, None] - score[neg][None, :]
    ww = w[pos][:, None] * w[neg][None, :]
    return float(((d > 1e-12) * ww + 0.5 * (np.abs(d) <= 1e-12) * ww).sum() / ww.sum())


def test_shipped_pair_meets_uq_target_exactly(shipped):
    """Population AUROC over every complete trajectory, weighted by its probability under the policy
    (commands renormalized over the valid ones, as the demo samples): progress advantage beats the
    policy log-prob with the same aggregation."""
    beta, tree, env = shipped["meta"]["beta"], shipped["tree"], shipped["env"]
    ref_lp, pol_lp = shipped["reference"][3], shipped["policy"][3]
    H = tree.horizon
    acts, outs = tree.actions[H], tree.outcomes[H]
    n_tok = np.array([len(c.text.split()) for c in env.commands])
    w = np.ones(len(acts))
    pa_sum, pa_mean, lp_sum, lp_mean = (np.zeros(len(acts)) for _ in range(4))
    h = np.zeros(len(acts), np.int64)
    for t in range(H):
        a, o = acts[:, t], outs[:, t]
        norm = pol_lp[t] - np.log(np.exp(pol_lp[t]).sum(1, keepdims=True))
        w *= np.exp(norm[h, a]) * tree.prob[t][h, a, o]
        ratio = beta * (pol_lp[t][h, a] - ref_lp[t][h, a])
        pa_sum += ratio
        pa_mean += ratio / n_tok[a] / H
        lp_sum += pol_lp[t][h, a]
        lp_mean += pol_lp[t][h, a] / n_tok[a] / H
        h = tree.child[t][h, a, o]
    np.testing.assert_allclose(w.sum(), 1.0, atol=1e-9)
    y = tree.terminal_reward[h].astype(int)
    assert _weighted_auroc(pa_sum, y, w) > _weighted_auroc(lp_sum, y, w)
    assert _weighted_auroc(pa_mean, y, w) > _weighted_auroc(lp_mean, y, w)


def _hf_logprobs(model, ids, mask):
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits
        lp = torch.log_softmax(logits.double(), -1)[:, :-1]
        return torch.gather(lp, 2, torch.tensor(ids[:, 1:], dtype=torch.long)[..., None])[..., 0].numpy()


@pytest.mark.parametrize("name", ["reference", "policy"])
def test_transformers_loads_pair_and_agrees(shipped, name, tmp_path):
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from pa_jax.models import load, token_logprobs

    d = PAIR / name
    size = sum(f.stat().st_size for f in d.iterdir())
    assert size < 4_000_000, f"{d} is {size} bytes"
    tok = PreTrainedTokenizerFast.from_pretrained(str(d))
    env, tt = shipped["env"], shipped["tt"]
    words, _ = env.render([1, 0, 2], [0, 0, 1], final_action=0)
    np.testing.assert_array_equal(tok(" ".join(words[1:]))["input_ids"], env.encode(words))

    hf = LlamaForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    rows = np.random.default_rng(0).choice(len(tt.ids), 64, replace=False)
    ids, mask = tt.ids[rows].copy(), tt.mask[rows].copy()
    mask[:8, 20:] = 0  # some right padding
    ids[:8, 20:] = 0
    want = _hf_logprobs(hf, ids, mask)
    valid = mask[:, 1:] > 0
    # rows we did not pad further: the tree batch scored by the fixture agrees too
    assert np.max(np.abs(shipped[name][2][rows[8:]] - want[8:])[valid[8:]]) < 1e-4
    got_padded = np.asarray(token_logprobs(shipped[name][0], shipped[name][1], ids, mask), np.float64)
    assert np.max(np.abs(got_padded - want)[valid]) < 1e-4

    # the other way: a directory written by transformers loads in pa-jax and agrees
    hf.save_pretrained(str(tmp_path / "hf"))
    cfg2, model2 = load(str(tmp_path / "hf"), dtype="float32")
    back = np.asarray(token_logprobs(cfg2, model2, ids, mask), np.float64)
    assert np.max(np.abs(back - want)[valid]) < 1e-4


def test_training_script_runs_and_exports(tmp_path):
    """A few steps of experiments/train_toy_pair.py on a 2-step environment, exported and reloaded."""
    from pa_jax.models import load, token_logprobs

    mod = _train_module()
    env = te.SteppingStones(horizon=2, goal=2)
    cfg, ref, pol, env, hist = mod.train(0, env=env, sft_steps=3, rl_steps=3, log_every=100, verbose=False)
    assert len(hist["sft_loss"]) == 3 and len(hist["rl_objective"]) == 3
    assert all(np.isfinite(hist["sft_loss"])) and all(np.isfinite(hist["rl_objective"]))
    mod.export(str(tmp_path), cfg, ref, pol, env, {"beta": 0.1, "env": {"horizon": 2, "goal": 2}})
    for name in ("reference", "policy"):
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (tmp_path / name / f).is_file()
    tree = te.build_tree(env)
    tt = te.tree_tokens(env, tree)
    lps = {}
    for name in ("reference", "policy"):
        c, m = load(str(tmp_path / name), dtype="float32")
        lps[name] = te.action_logprobs_from_tokens(np.asarray(token_logprobs(c, m, tt.ids, tt.mask), np.float64), tt)
    # the differentiable JAX objective used for training equals the float64 tree evaluation
    import jax.numpy as jnp

    j_jax = float(mod.regularized_return([jnp.asarray(x, jnp.float32) for x in lps["policy"]],
                                         [jnp.asarray(x, jnp.float32) for x in lps["reference"]],
                                         mod.tree_arrays_of(tree), 0.1))
    j_np = te.evaluate_tree_policy(tree, lps["policy"], lps["reference"], 0.1)[1][0][0]
    assert j_jax == pytest.approx(j_np, abs=2e-4)
