"""toy_mdp.tool_env: enumeration and exact KL-regularized solve against a recursive NumPy oracle."""
import zlib

import numpy as np
import pytest

from toy_mdp import tool_env as te


def fake_ref(turns, A=4):
    """A history-dependent pi_ref (valid commands + invalid mass) from a hash of the history's text."""
    seed = zlib.crc32(repr(turns).encode())
    p = np.random.default_rng(seed).dirichlet(np.ones(A + 1))
    return np.log(p[:A])


def oracle(env, beta, turns=(), status=te.UNKNOWN, depth=0):
    """Recursive soft Bellman on histories, straight from env.outcomes: returns (V, {turns: (Q, V)}, n_nodes)."""
    lp = fake_ref(turns)
    q = np.zeros(4)
    table, count = {}, 1
    for a in range(4):
        for o in env.outcomes(status, a):
            if o.reward is not None:
                q[a] += o.prob * o.reward
            elif depth + 1 >= env.horizon:
                q[a] += 0.0
            else:
                v, sub, c = oracle(env, beta, turns + ((a, o.text),), o.status, depth + 1)
                q[a] += o.prob * v
                table.update(sub)
                count += c
    p_inv = 1 - np.exp(lp).sum()
    v = beta * np.log(np.sum(np.exp(lp + q / beta)) + p_inv)
    table[turns] = (q, v)
    return v, table, count


def oracle_success(env, pol_fn, turns=(), status=te.UNKNOWN, depth=0):
    p = np.exp(pol_fn(turns))
    s = 0.0
    for a in range(4):
        for o in env.outcomes(status, a):
            if o.reward is not None:
                s += p[a] * o.prob * o.reward
            elif depth + 1 < env.horizon:
                s += p[a] * o.prob * oracle_success(env, pol_fn, turns + ((a, o.text),), o.status, depth + 1)
    return s


@pytest.mark.parametrize("horizon", [2, 3, 4])
def test_enumeration_and_solve_match_recursive_oracle(horizon):
    env = te.ToolEnv(horizon=horizon, p_lookup_error=0.25, p_shipped=0.4, p_timeout=0.2)
    tree = te.build_tree(env)
    beta = 0.3
    v0, table, count = oracle(env, beta)
    assert tree.num_nodes == count == len(table)
    assert len(set(tree.turns)) == tree.num_nodes  # every history distinct
    # outcome probabilities of every (node, action) sum to 1
    np.testing.assert_allclose(tree.prob.sum(-1), 1.0, atol=1e-12)
    ref = np.stack([fake_ref(t) for t in tree.turns])
    sol = te.solve(tree, ref, beta)
    for n, turns in enumerate(tree.turns):
        q, v = table[turns]
        np.testing.assert_allclose(sol.q[n], q, rtol=0, atol=1e-12)
        np.testing.assert_allclose(sol.v[n], v, rtol=0, atol=1e-12)
    np.testing.assert_allclose(sol.v[0], v0, atol=1e-12)
    # A* = beta log pi*/pi_ref and pi* (commands + invalid) is a distribution
    np.testing.assert_allclose(sol.advantage, beta * (sol.log_policy - ref), atol=1e-12)
    total = np.exp(sol.log_policy).sum(1) + np.exp(sol.invalid_log_policy)
    np.testing.assert_allclose(total, 1.0, atol=1e-12)
    # exact success rates (reference and optimum) against the recursion
    idx = {t: n for n, t in enumerate(tree.turns)}
    for lp in (ref, sol.log_policy):
        want = oracle_success(env, lambda t: lp[idx[t]])
        assert te.success_rate(tree, lp) == pytest.approx(want, abs=1e-12)
    # the optimum maximizes the regularized objective, and its value is V*(root)
    assert te.regularized_value(tree, sol.log_policy, ref, beta) == pytest.approx(sol.v[0], abs=1e-10)
    assert te.regularized_value(tree, ref, ref, beta) < sol.v[0]


def test_bad_inputs_are_refused():
    tree = te.build_tree(te.ToolEnv(horizon=2))
    with pytest.raises(ValueError, match="shape"):
        te.solve(tree, np.zeros((3, 4)), 0.1)
    with pytest.raises(ValueError, match="sum to <= 1"):
        te.solve(tree, np.zeros((tree.num_nodes, 4)), 0.1)
    with pytest.raises(ValueError, match="beta"):
        te.solve(tree, np.full((tree.num_nodes, 4), -3.0), 0.0)
    with pytest.raises(ValueError, match="p_timeout"):
        te.ToolEnv(p_timeout=1.5)


class _CharTokenizer:
    """A ChatML stand-in: one id per character, one id for each special token."""
    specials = ["<|im_start|>", "<|im_end|>"]

    def convert_tokens_to_ids(self, t):
        return self.specials.index(t) if t in self.specials else None

    def apply_chat_template(self, msgs, tokenize=False, add_generation_prompt=False):
        s = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
        return s + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=False):
        ids, i = [], 0
        while i < len(text):
            for k, s in enumerate(self.specials):
                if text.startswith(s, i):
                    ids.append(k)
                    i += len(s)
                    break
            else:
                ids.append(2 + ord(text[i]))
                i += 1
        return {"input_ids": ids}


def test_tree_tokens_render_the_chat():
    tree = te.build_tree(te.ToolEnv(horizon=2))
    tok = _CharTokenizer()
    tt = te.tree_tokens(tree, tok)
    assert tt.end_of_message == 1
    assert all(c[-1] == 1 for c in tt.commands)
    n = tree.num_nodes - 1
    text = "".join("<" if i == 0 else ">" if i == 1 else chr(i - 2) for i in tt.prefix[n])
    assert text.endswith("assistant\n")
    for a, obs in tree.turns[n]:
        assert te.COMMANDS[a] in text and obs in text
