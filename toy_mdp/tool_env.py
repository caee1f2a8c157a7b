"""A small stochastic tool-use task (tau-bench-like) whose every history can be enumerated.

A customer asks a support agent to cancel order 7, or to refund it if it has already shipped. The agent
answers each turn with exactly one tool call, chosen among ``COMMANDS``; anything else it writes is the one
"invalid" action, which ends the episode as a failure (reward 0). The environment answers stochastically:

* ``get_order(7)``: the order service fails with probability ``p_lookup_error`` ("Error: order service
  unavailable."); otherwise it reveals the order's status, pending or shipped (``p_shipped``), once drawn it
  stays fixed for the episode.
* ``cancel_order(7)``: a pending order is cancelled with probability ``1 - p_timeout`` (success, episode
  ends) or the call times out (status now known: pending); a shipped order cannot be cancelled (the reply
  says so: status known).
* ``refund_order(7)``: a shipped order is refunded with probability ``1 - p_timeout`` (success, episode
  ends) or the call times out (status known: shipped); refunding a pending order is refused and the ticket
  is closed (failure, episode ends).
* ``transfer_to_human()``: the episode ends, reward 0.

An episode ends after ``horizon`` decisions at the latest (reward 0 unless resolved). The hidden status is
drawn lazily (at the first action whose reply depends on it), which gives the same distribution over
histories as drawing it at the start. Every history (the chat text) determines the hidden state, so the
history tree is exact: ``pi_ref(a | h)`` for every history ``h`` and command ``a`` plus
``pi_ref(invalid | h) = 1 - sum_a pi_ref(a | h)`` give the KL-regularized optimum by backward induction::

    Q(h, a) = sum_o P(o | h, a) [r(h, a, o) + V(h a o)]          (V of an ended episode = 0)
    V(h)    = beta log( sum_a pi_ref(a|h) e^{Q(h,a)/beta} + pi_ref(invalid|h) e^{0/beta} )
    A*(h, a) = Q(h, a) - V(h) = beta log pi*(a|h) / pi_ref(a|h)

Rendering (``messages``/``tree_tokens``) starts with the system prompt and one fixed demonstration exchange
(``DEMO``), then the request, and goes through the tokenizer's chat template (SmolLM2's ChatML); tool replies
are user turns that start with ``[tool]``. A command's token ids include the end-of-message token, so the
commands are disjoint events (a command followed by more text is "invalid").

This module depends on NumPy only (the model side is :mod:`pa_jax.rl`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

COMMANDS: tuple[str, ...] = ("get_order(7)", "cancel_order(7)", "refund_order(7)", "transfer_to_human()")
GET, CANCEL, REFUND, TRANSFER = range(4)
UNKNOWN, PENDING, SHIPPED = range(3)

SYSTEM_PROMPT = (
    "You are a customer support agent for an online shop. You act only through tool calls. "
    "Each reply must be exactly one tool call from this list and nothing else:\n"
    "get_order(7)\ncancel_order(7)\nrefund_order(7)\ntransfer_to_human()"
)
USER_REQUEST = "Hi, please cancel my order 7. If it has already shipped, refund it instead."
# A fixed earlier exchange at the start of every chat (one in-context demonstration of the reply format:
# without it SmolLM2-135M-Instruct almost never answers the first turn with a bare tool call).
DEMO: tuple[dict[str, str], ...] = (
    {"role": "user", "content": "What is the status of order 3?"},
    {"role": "assistant", "content": "get_order(3)"},
    {"role": "user", "content": "[tool] Order 3: status shipped."},
)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One stochastic reply: probability, the observation text, the next hidden status, and
    ``reward`` (a float: the episode ends with this reward) or ``None`` (the episode goes on)."""
    prob: float
    text: str
    status: int
    reward: float | None


@dataclasses.dataclass(frozen=True)
class ToolEnv:
    horizon: int = 4
    p_lookup_error: float = 0.3
    p_shipped: float = 0.5
    p_timeout: float = 0.3

    def __post_init__(self):
        if not isinstance(self.horizon, int) or self.horizon < 1:
            raise ValueError(f"ToolEnv.horizon must be an int >= 1, got {self.horizon!r}")
        for name in ("p_lookup_error", "p_shipped", "p_timeout"):
            p = getattr(self, name)
            if not (0.0 <= p <= 1.0):
                raise ValueError(f"ToolEnv.{name} must be a probability in [0, 1], got {p!r}")

    @property
    def num_actions(self) -> int:
        return len(COMMANDS)

    def _status_draws(self, status: int) -> list[tuple[float, int]]:
        if status != UNKNOWN:
            return [(1.0, status)]
        return [(1.0 - self.p_shipped, PENDING), (self.p_shipped, SHIPPED)]

    def outcomes(self, status: int, action: int) -> list[Outcome]:
        """The replies to ``action`` from hidden ``status`` (zero-probability replies dropped)."""
        out: list[Outcome] = []
        if action == GET:
            out.append(Outcome(self.p_lookup_error, "[tool] Error: order service unavailable.", status, None))
            for p, s in self._status_draws(status):
                word = "pending (not shipped yet)" if s == PENDING else "shipped"
                out.append(Outcome((1 - self.p_lookup_error) * p, f"[tool] Order 7: status {word}.", s, None))
        elif action == CANCEL:
            for p, s in self._status_draws(status):
                if s == PENDING:
                    out.append(Outcome(p * (1 - self.p_timeout), "[tool] Order 7 cancelled.", s, 1.0))
                    out.append(Outcome(p * self.p_timeout, "[tool] Error: cancel_order timed out.", s, None))
                else:
                    out.append(Outcome(p, "[tool] Error: order 7 has already shipped and cannot be cancelled.",
                                       s, None))
        elif action == REFUND:
            for p, s in self._status_draws(status):
                if s == SHIPPED:
                    out.append(Outcome(p * (1 - self.p_timeout), "[tool] Order 7 refunded.", s, 1.0))
                    out.append(Outcome(p * self.p_timeout, "[tool] Error: refund_order timed out.", s, None))
                else:
                    out.append(Outcome(p, "[tool] Refund refused: order 7 has not shipped. Ticket closed.", s, 0.0))
        elif action == TRANSFER:
            out.append(Outcome(1.0, "[tool] Transferred to a human agent.", status, 0.0))
        else:
            raise ValueError(f"action must be in [0, {len(COMMANDS)}), got {action!r}")
        return [o for o in out if o.prob > 0]


@dataclasses.dataclass(frozen=True)
class ToolTree:
    """Every history at which the agent acts, parents before children (node 0 = the first turn).

    ``depth[n]``, ``status[n]`` (hidden), ``parent[n]`` (-1 for the root), ``turns[n]``: the
    ``(command index, observation text)`` pairs so far. Per (node, action, outcome slot ``o < O``):
    ``prob`` ``[N, A, O]`` (0 = unused slot), ``child`` ``[N, A, O]`` (node index, -1 when the episode
    ends), ``reward`` ``[N, A, O]`` (the final reward when it ends, else 0).
    """
    depth: np.ndarray
    status: np.ndarray
    parent: np.ndarray
    turns: list[tuple[tuple[int, str], ...]]
    prob: np.ndarray
    child: np.ndarray
    reward: np.ndarray

    @property
    def num_nodes(self) -> int:
        return len(self.depth)

    @property
    def num_actions(self) -> int:
        return self.prob.shape[1]


def build_tree(env: ToolEnv) -> ToolTree:
    """Enumerate every history (breadth first). A decision at depth ``horizon - 1`` that does not end the
    episode ends it with reward 0."""
    A = env.num_actions
    depth, status, parent, turns = [0], [UNKNOWN], [-1], [()]
    rows: list[list[list[tuple[float, int, float]]]] = []
    n = 0
    while n < len(depth):
        per_action = []
        for a in range(A):
            slots = []
            for o in env.outcomes(status[n], a):
                if o.reward is not None:
                    slots.append((o.prob, -1, o.reward))
                elif depth[n] + 1 >= env.horizon:
                    slots.append((o.prob, -1, 0.0))
                else:
                    depth.append(depth[n] + 1)
                    status.append(o.status)
                    parent.append(n)
                    turns.append(turns[n] + ((a, o.text),))
                    slots.append((o.prob, len(depth) - 1, 0.0))
            per_action.append(slots)
        rows.append(per_action)
        n += 1
    O = max(len(s) for r in rows for s in r)
    N = len(depth)
    prob = np.zeros((N, A, O))
    child = np.full((N, A, O), -1, np.int64)
    reward = np.zeros((N, A, O))
    for i, r in enumerate(rows):
        for a, slots in enumerate(r):
            for o, (p, c, rew) in enumerate(slots):
                prob[i, a, o], child[i, a, o], reward[i, a, o] = p, c, rew
    return ToolTree(np.array(depth), np.array(status), np.array(parent), turns, prob, child, reward)


# ---------------------------------------------------------------------------------------------------
# Exact solve and evaluation (float64 NumPy)
# ---------------------------------------------------------------------------------------------------


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def invalid_logprob(logprobs: np.ndarray) -> np.ndarray:
    """``log(1 - sum_a exp(logprobs[..., a]))``: the log-mass of the invalid action (-inf when <= 0)."""
    with np.errstate(divide="ignore"):
        return np.log(np.clip(-np.expm1(_logsumexp(logprobs, -1)), 0.0, None))


def check_logprobs(tree: ToolTree, logprobs: np.ndarray, name: str, tol: float = 1e-5) -> np.ndarray:
    """``logprobs`` ``[N, A]`` of the valid commands at every node; their mass must be <= 1 (+tol)."""
    lp = np.asarray(logprobs, np.float64)
    if lp.shape != (tree.num_nodes, tree.num_actions):
        raise ValueError(f"{name} must have shape {(tree.num_nodes, tree.num_actions)}, got {lp.shape}")
    if np.any(np.isnan(lp)) or np.any(lp == np.inf):
        raise ValueError(f"{name} must hold log-probabilities (no NaN or +inf)")
    tot = np.exp(_logsumexp(lp, -1))
    if np.any(tot > 1 + tol):
        raise ValueError(f"{name}: command probabilities must sum to <= 1 (+{tol}) per history, max {tot.max()}")
    return lp


@dataclasses.dataclass(frozen=True)
class ToolSolution:
    """``q``, ``advantage`` (A* = Q* - V*), ``log_policy`` (log pi*): ``[N, A]``; ``v``: ``[N]``;
    ``invalid_log_policy``: ``[N]`` log pi*(invalid | h)."""
    q: np.ndarray
    v: np.ndarray
    advantage: np.ndarray
    log_policy: np.ndarray
    invalid_log_policy: np.ndarray


def solve(tree: ToolTree, ref_logprobs: np.ndarray, beta: float, *, invalid_value: float = 0.0) -> ToolSolution:
    """Exact KL-regularized optimum by backward induction over the tree (children after parents)::

        Q*(h, a) = sum_o P(o|h,a) [r(h,a,o) + V*(child)],   V*(h) = beta log(sum_a pi_ref e^{Q*/beta}
                   + pi_ref(invalid|h) e^{invalid_value/beta}),   A* = Q* - V*,   log pi* = log pi_ref + A*/beta.
    """
    if not np.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    ref = check_logprobs(tree, ref_logprobs, "ref_logprobs")
    N = tree.num_nodes
    v = np.zeros(N)
    q = np.zeros(ref.shape)
    linv = invalid_logprob(ref)
    for n in range(N - 1, -1, -1):
        cv = np.where(tree.child[n] >= 0, v[np.maximum(tree.child[n], 0)], 0.0)
        q[n] = np.sum(tree.prob[n] * (tree.reward[n] + cv), axis=-1)
        v[n] = beta * _logsumexp(np.concatenate([ref[n] + q[n] / beta, [linv[n] + invalid_value / beta]]))
    adv = q - v[:, None]
    return ToolSolution(q, v, adv, ref + adv / beta, linv + (invalid_value - v) / beta)


def reach_probabilities(tree: ToolTree, policy_logprobs: np.ndarray) -> np.ndarray:
    """``Pr_pi(reach node n)`` ``[N]`` (forward pass; parents come before children)."""
    pol = np.exp(check_logprobs(tree, policy_logprobs, "policy_logprobs"))
    reach = np.zeros(tree.num_nodes)
    reach[0] = 1.0
    for n in range(tree.num_nodes):
        for a in range(tree.num_actions):
            for o in range(tree.prob.shape[2]):
                c = tree.child[n, a, o]
                if c >= 0:
                    reach[c] += reach[n] * pol[n, a] * tree.prob[n, a, o]
    return reach


def success_rate(tree: ToolTree, policy_logprobs: np.ndarray) -> float:
    """Exact ``Pr_pi(episode ends with reward 1)`` = sum_n reach(n) sum_{a,o} pi(a|n) P(o) r (rewards are 0/1)."""
    reach = reach_probabilities(tree, policy_logprobs)
    pol = np.exp(np.asarray(policy_logprobs, np.float64))
    end = np.sum(tree.prob * tree.reward * (tree.child < 0), axis=-1)  # [N, A]
    return float(np.sum(reach[:, None] * pol * end))


def regularized_value(tree: ToolTree, policy_logprobs: np.ndarray, ref_logprobs: np.ndarray, beta: float,
                      *, invalid_value: float = 0.0) -> float:
    """``J(pi) = E_pi[R - beta sum_t log pi(a_t|h_t)/pi_ref(a_t|h_t)]`` (invalid included), exact."""
    pol = check_logprobs(tree, policy_logprobs, "policy_logprobs")
    ref = check_logprobs(tree, ref_logprobs, "ref_logprobs")
    pinv, rinv = invalid_logprob(pol), invalid_logprob(ref)
    v = np.zeros(tree.num_nodes)
    for n in range(tree.num_nodes - 1, -1, -1):
        cv = np.where(tree.child[n] >= 0, v[np.maximum(tree.child[n], 0)], 0.0)
        q = np.sum(tree.prob[n] * (tree.reward[n] + cv), axis=-1)
        p = np.exp(pol[n])
        val = np.sum(np.where(p > 0, p * (q - beta * (pol[n] - ref[n])), 0.0))
        if np.exp(pinv[n]) > 0:
            val += np.exp(pinv[n]) * (invalid_value - beta * (pinv[n] - rinv[n]))
        v[n] = val
    return float(v[0])


# ---------------------------------------------------------------------------------------------------
# Rendering with a chat tokenizer (duck-typed: apply_chat_template + __call__)
# ---------------------------------------------------------------------------------------------------


def messages(turns: Sequence[tuple[int, str]]) -> list[dict[str, str]]:
    """The chat of a history: system prompt, user request, then (assistant command, tool reply) per turn."""
    msgs = [{"role": "system", "content": SYSTEM_PROMPT}, *DEMO, {"role": "user", "content": USER_REQUEST}]
    for a, obs in turns:
        msgs.append({"role": "assistant", "content": COMMANDS[a]})
        msgs.append({"role": "user", "content": obs})
    return msgs


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclasses.dataclass(frozen=True)
class TreeTokens:
    """``prefix[n]``: token ids of history n up to and including the assistant header (the model's next
    token is the command's first); ``commands[a]``: ids of ``COMMANDS[a]`` followed by the end-of-message
    token."""
    prefix: list[list[int]]
    commands: list[list[int]]
    end_of_message: int


def tree_tokens(tree: ToolTree, tokenizer: Any, end_of_message: str = "<|im_end|>") -> TreeTokens:
    """Token ids of every history and command through the tokenizer's chat template. Checks that a
    history's ids followed by a command's ids are exactly the tokenization of the rendered chat with that
    command as the assistant's message (so the token-sum log-prob is the command's probability)."""
    eom = tokenizer.convert_tokens_to_ids(end_of_message)
    if eom is None or eom == getattr(tokenizer, "unk_token_id", -1):
        raise ValueError(f"tokenizer has no end-of-message token {end_of_message!r}")
    cmds = [_ids(tokenizer, c) + [eom] for c in COMMANDS]
    prefix = []
    for n in range(tree.num_nodes):
        msgs = messages(tree.turns[n])
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        prefix.append(_ids(tokenizer, text))
    # one check per command on the root: prefix + command == the full chat's ids (before the trailing newline)
    for a, c in enumerate(COMMANDS):
        full = tokenizer.apply_chat_template(messages(()) + [{"role": "assistant", "content": c}], tokenize=False)
        ids = _ids(tokenizer, full)
        if ids[: len(prefix[0]) + len(cmds[a])] != prefix[0] + cmds[a]:
            raise ValueError(f"command {c!r}: history ids + command ids differ from the chat's tokenization")
    return TreeTokens(prefix, cmds, int(eom))


def prop1_agreement(tree: ToolTree, policy_logprobs: np.ndarray, ref_logprobs: np.ndarray, solution: ToolSolution,
                    beta: float, *, min_visit: float = 1e-3, invalid_value: float = 0.0) -> dict:
    """Proposition 1 on the tree: ``x = beta * log pi(a|h) / pi_ref(a|h)`` against the exact ``A*(h, a)`` for
    every command and "invalid" (``A*(h, invalid) = invalid_value - V*(h)``).

    With ``d(h, a) = Pr_pi(reach h) pi(a|h)`` (the probability that an episode of the policy takes ``a`` at
    ``h``), returns

    * ``pearson``, ``mean_abs_error``, ``max_abs_error``, ``history_actions``: over the history-actions the
      policy visits, ``d(h, a) >= min_visit``, each once (the exact counterpart of "the distinct pairs seen
      in sampled rollouts");
    * ``pearson_weighted``, ``weighted_mean_abs_error``: over all history-actions, weighted by ``d(h, a)``;
    * ``all_actions``: the same three numbers over every action (taken or not) at the histories the policy
      reaches with probability >= ``min_visit``."""
    pol = check_logprobs(tree, policy_logprobs, "policy_logprobs")
    ref = check_logprobs(tree, ref_logprobs, "ref_logprobs")
    reach = reach_probabilities(tree, pol)
    pol_full = np.concatenate([pol, invalid_logprob(pol)[:, None]], axis=1)
    ref_full = np.concatenate([ref, invalid_logprob(ref)[:, None]], axis=1)
    a_star = np.concatenate([solution.advantage, (invalid_value - solution.v)[:, None]], axis=1)
    with np.errstate(invalid="ignore"):
        score = beta * (pol_full - ref_full)
    finite = np.isfinite(score) & np.isfinite(a_star)
    d = reach[:, None] * np.exp(pol_full)

    def stats(keep):
        x, y = score[keep], a_star[keep]
        err = np.abs(x - y)
        defined = len(x) > 1 and np.std(x) > 0 and np.std(y) > 0  # else undefined (e.g. the policy IS pi_ref)
        return {"pearson": float(np.corrcoef(x, y)[0, 1]) if defined else float("nan"),
                "mean_abs_error": float(err.mean()) if len(x) else float("nan"),
                "max_abs_error": float(err.max()) if len(x) else float("nan"),
                "history_actions": int(keep.sum())}

    out = stats(finite & (d >= min_visit))
    keep = finite & (d > 0)
    x, y, w = score[keep], a_star[keep], d[keep] / d[keep].sum()
    mx, my = np.sum(w * x), np.sum(w * y)
    den = np.sqrt(np.sum(w * (x - mx) ** 2) * np.sum(w * (y - my) ** 2))
    out["pearson_weighted"] = float(np.sum(w * (x - mx) * (y - my)) / den) if den > 0 else float("nan")
    out["weighted_mean_abs_error"] = float(np.sum(w * np.abs(x - y)))
    out["all_actions"] = stats(finite & (reach >= min_visit)[:, None])
    out["min_visit"] = float(min_visit)
    return out
