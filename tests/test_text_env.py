"""The stepping-stones text environment, its tokenizer and the exact history-tree solver."""
from __future__ import annotations

import numpy as np
import pytest

import toy_mdp
from toy_mdp import text_env as te


def _random_ref(tree: te.HistoryTree, rng: np.random.Generator, *, stop_range=(1e-3, 0.2)) -> list[np.ndarray]:
    """History-dependent reference: random command probabilities, plus a random invalid-command mass."""
    out = []
    for n in tree.sizes()[:-1]:
        p = rng.dirichlet(np.ones(tree.num_actions) * 0.7, size=n)
        stop = rng.uniform(*stop_range, size=(n, 1))
        out.append(np.log(p * (1 - stop)))
    return out


def _dense_mdp(env: te.SteppingStones, tree: te.HistoryTree, ref: list[np.ndarray]):
    """The same problem as a dense finite-horizon TabularMDP: states = every history + a sink.

    Actions: the commands, plus 'invalid' (ends in the sink, reward stop_value). The terminal success
    reward is paid as the expected reward of the last command (V_H = 0 in toy_mdp).
    """
    H, A, O = tree.horizon, tree.num_actions, env.num_outcomes
    sizes = tree.sizes()
    off = np.concatenate([[0], np.cumsum(sizes)])
    S = int(off[-1]) + 1
    sink = S - 1
    P = np.zeros((S, A + 1, S))
    R = np.zeros((S, A + 1))
    P[:, :, sink] = 1.0  # default: everything goes to the sink
    for t in range(H):
        for h in range(sizes[t]):
            s = off[t] + h
            for a in range(A):
                P[s, a, :] = 0.0
                for o in range(O):
                    c = tree.child[t][h, a, o]
                    P[s, a, off[t + 1] + c] += tree.prob[t][h, a, o]
                    if t == H - 1:
                        R[s, a] += tree.prob[t][h, a, o] * tree.terminal_reward[c]
            R[s, A] = env.stop_value
    ref_dense = np.full((H, S, A + 1), 1.0 / (A + 1))
    for t in range(H):
        p = np.exp(ref[t])
        ref_dense[t, off[t]: off[t + 1], :A] = p
        ref_dense[t, off[t]: off[t + 1], A] = 1.0 - p.sum(1)
    init = np.zeros(S)
    init[0] = 1.0
    return toy_mdp.TabularMDP(P, R, 1.0, horizon=H, initial=init), ref_dense, off


@pytest.mark.parametrize("horizon,beta", [(2, 0.05), (3, 0.3), (3, 4.0)])
def test_tree_solver_equals_dense_toy_mdp_solver(horizon, beta):
    env = te.SteppingStones(horizon=horizon, goal=2 if horizon == 2 else 3)
    tree = te.build_tree(env)
    ref = _random_ref(tree, np.random.default_rng(horizon))
    sol = te.solve_history_tree(tree, ref, beta)
    mdp, ref_dense, off = _dense_mdp(env, tree, ref)
    dense = toy_mdp.solve_kl_regularized(mdp, ref_dense, beta)
    for t in range(horizon):
        sl = slice(off[t], off[t + 1])
        np.testing.assert_allclose(sol.v[t], dense.v[t, sl], atol=1e-12, rtol=0)
        np.testing.assert_allclose(sol.q[t], dense.q[t, sl, :-1], atol=1e-12, rtol=0)
        np.testing.assert_allclose(sol.advantage[t], dense.advantage[t, sl, :-1], atol=1e-12, rtol=0)
        np.testing.assert_allclose(sol.stop_log_policy[t], dense.log_policy[t, sl, -1], atol=1e-10, rtol=0)


def test_tree_solution_identities_and_optimality():
    env = te.SteppingStones(horizon=4, goal=3)
    tree = te.build_tree(env)
    rng = np.random.default_rng(0)
    ref = _random_ref(tree, rng)
    beta = 0.2
    sol = te.solve_history_tree(tree, ref, beta)
    for t in range(tree.horizon):
        # sum_a pi_ref exp(A*/beta) (commands + invalid) = 1, i.e. pi* is a distribution
        total = np.exp(sol.log_policy[t]).sum(1) + np.exp(sol.stop_log_policy[t])
        np.testing.assert_allclose(total, 1.0, atol=1e-12)
        # E_{a~pi*}[A*] = beta * KL(pi* || pi_ref) (invalid command included)
        p, ps = np.exp(sol.log_policy[t]), np.exp(sol.stop_log_policy[t])
        stop_adv = env.stop_value - sol.v[t]
        lhs = (p * sol.advantage[t]).sum(1) + ps * stop_adv
        rs = np.log(1 - np.exp(ref[t]).sum(1))
        kl = (p * (sol.log_policy[t] - ref[t])).sum(1) + ps * (sol.stop_log_policy[t] - rs)
        np.testing.assert_allclose(lhs, beta * kl, atol=1e-12)
    # Proposition 1 by independent policy evaluation: A^{pi*} = Q^{pi*} - V^{pi*} equals A*
    q, v = te.evaluate_tree_policy(tree, sol.log_policy, ref, beta)
    for t in range(tree.horizon):
        np.testing.assert_allclose(q[t] - v[t][:, None], beta * (sol.log_policy[t] - ref[t]), atol=1e-10)
    # optimality against the reference and random perturbations of pi*
    j_star = v[0][0]
    assert j_star >= te.evaluate_tree_policy(tree, ref, ref, beta)[1][0][0] - 1e-12
    for _ in range(5):
        pert = []
        for lp, ls in zip(sol.log_policy, sol.stop_log_policy):
            x = np.concatenate([lp, ls[:, None]], 1) + rng.normal(0, 0.3, (len(lp), lp.shape[1] + 1))
            x -= np.log(np.exp(x).sum(1, keepdims=True))
            pert.append(x[:, :-1])
        assert te.evaluate_tree_policy(tree, pert, ref, beta)[1][0][0] < j_star


def test_build_tree_dynamics_against_direct_simulation():
    env = te.SteppingStones()
    tree = te.build_tree(env)
    assert tree.sizes() == [6 ** t for t in range(env.horizon + 1)]
    rng = np.random.default_rng(1)
    for _ in range(50):
        acts = rng.integers(0, 3, env.horizon)
        outs = rng.integers(0, 2, env.horizon)
        pos, h = 0, 0
        for t in range(env.horizon):
            h = tree.child[t][h, acts[t], outs[t]]
            # plain re-implementation of the rules in the module docstring
            move = {(0, 0): 1, (0, 1): 0, (1, 0): 2, (1, 1): None, (2, 0): -1, (2, 1): 0}[(acts[t], outs[t])]
            pos = 0 if move is None else min(max(pos + move, 0), env.goal)
            assert tree.positions[t + 1][h] == pos
            assert tree.index(acts[: t + 1], outs[: t + 1]) == h
            np.testing.assert_array_equal(tree.actions[t + 1][h], acts[: t + 1])
            np.testing.assert_array_equal(tree.outcomes[t + 1][h], outs[: t + 1])
        assert tree.terminal_reward[h] == float(pos == env.goal)
    np.testing.assert_allclose(tree.prob[0].sum(-1), 1.0)


def test_tree_tokens_cover_every_history_command():
    env = te.SteppingStones()
    tree = te.build_tree(env)
    tt = te.tree_tokens(env, tree)
    assert tt.ids.shape[0] == 6 ** (env.horizon - 1) * 3
    vocab = env.vocab()
    for t in range(env.horizon):
        for h in range(len(tree.positions[t])):
            for a in range(3):
                words, spans = env.render(tree.actions[t][h], tree.outcomes[t][h], final_action=a)
                ids = np.array([vocab[w] for w in words])
                r = tt.row[t][h, a]
                np.testing.assert_array_equal(tt.ids[r, : len(ids)], ids)  # the row extends h + a
                k = tt.pos_mask[t][h, a].sum()
                assert k == len(env.commands[a].text.split())
                np.testing.assert_array_equal(tt.pos[t][h, a, :k], np.arange(len(ids) - k, len(ids)))
                assert np.all(tt.step_ids[r, len(ids) - k: len(ids)] == t)
    # gathering from token log-probs sums exactly the command's tokens
    lp = np.random.default_rng(0).normal(size=(tt.ids.shape[0], tt.ids.shape[1] - 1))
    got = te.action_logprobs_from_tokens(lp, tt)
    r, p = tt.row[1][4, 2], tt.pos[1][4, 2][tt.pos_mask[1][4, 2]]
    assert got[1][4, 2] == pytest.approx(lp[r, p - 1].sum())


def test_sampling_matches_probabilities():
    env = te.SteppingStones(horizon=2, goal=2)
    tree = te.build_tree(env)
    lp = [np.log(np.broadcast_to([0.6, 0.3, 0.1], (n, 3))) for n in tree.sizes()[:-1]]
    acts, outs = te.sample_histories(tree, lp, 40000, np.random.default_rng(0))
    np.testing.assert_allclose(np.bincount(acts[:, 0], minlength=3) / 40000, [0.6, 0.3, 0.1], atol=0.01)
    jump = acts[:, 1] == 1
    assert abs(outs[jump, 1].mean() - 0.5) < 0.02
    walk = acts[:, 1] == 0
    assert abs(outs[walk, 1].mean() - 0.2) < 0.02


def test_tokenizer_loads_in_transformers(tmp_path):
    from transformers import PreTrainedTokenizerFast

    env = te.SteppingStones()
    te.save_tokenizer(env, str(tmp_path))
    tok = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    words, _ = env.render([0, 1, 2], [0, 1, 1], final_action=1)
    text = " ".join(words[1:])  # the tokenizer adds <s> itself
    ids = tok(text)["input_ids"]
    np.testing.assert_array_equal(ids, env.encode(words))
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.pad_token == "<pad>" and tok.pad_token_id == 0 and tok.bos_token_id == env.vocab()["<s>"]
    assert tok("walk sideways .")["input_ids"][2] == tok.unk_token_id


def test_bad_input():
    tree = te.build_tree(te.SteppingStones(horizon=2, goal=2))
    ok = [np.log(np.full((n, 3), 0.3)) for n in tree.sizes()[:-1]]
    with pytest.raises(ValueError, match="beta"):
        te.solve_history_tree(tree, ok, 0.0)
    with pytest.raises(ValueError, match=r"ref_logprobs\[1\] must have shape"):
        te.solve_history_tree(tree, [ok[0], ok[1][:3]], 1.0)
    with pytest.raises(ValueError, match="sum to <= 1"):
        te.solve_history_tree(tree, [ok[0], np.log(np.full((6, 3), 0.5))], 1.0)
    with pytest.raises(ValueError, match="NaN"):
        te.solve_history_tree(tree, [ok[0] * np.nan, ok[1]], 1.0)
    with pytest.raises(ValueError, match="one \\[N_t, A\\] array per depth"):
        te.solve_history_tree(tree, ok[:1], 1.0)
    with pytest.raises(ValueError, match="horizon"):
        te.SteppingStones(horizon=0)
    with pytest.raises(ValueError, match="prefix-free"):
        te.SteppingStones(commands=(te.Command("walk", (te.Outcome(1.0, 1, "moved"),)),
                                    te.Command("walk ahead .", (te.Outcome(1.0, 1, "moved"),))))
    with pytest.raises(ValueError, match="sum to 1"):
        te.SteppingStones(commands=(te.Command("walk .", (te.Outcome(0.5, 1, "moved"), te.Outcome(0.4, 0, "slipped"))),))
    with pytest.raises(ValueError, match="not in the environment's vocabulary"):
        te.SteppingStones().encode(["swim"])
