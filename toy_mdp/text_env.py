"""Stepping stones: a small stochastic agent task rendered as text, with an exact history-tree solver.

The agent stands on stone 0 of a river and must be on stone ``goal`` (the far bank) after exactly
``horizon`` commands. Each command is a short word sequence (several tokens) and each has two outcomes:

======================  ==============================================  ===============================
command                 succeeds                                         slips
======================  ==============================================  ===============================
``walk ahead .``        p = 0.8: one stone ahead (``moved <stone> .``)    stays (``slipped <stone> .``)
``jump two stones .``   p = 0.5: two stones ahead (``landed <stone> .``)  back to stone 0 (``fell 0 .``)
``walk back .``         p = 0.8: one stone back (``moved <stone> .``)     stays (``slipped <stone> .``)
======================  ==============================================  ===============================

Commands have 3 or 4 tokens (so the token-mean heuristic is not just a rescaled sum) and two of them share
their first token.
Positions are clipped to ``[0, goal]``. The reward is 1 if the agent is on the goal stone after the last
command and 0 otherwise (a success reward at the end, nothing in between). A language model acting here
emits token sequences; any sequence that is not one of the three commands is an *invalid command*, which
ends the episode as a failure (value ``stop_value = 0``). So the model's action space is all of its token
sequences, the three commands plus one lumped "invalid" action, and the probability of a command is the
product of its tokens' probabilities: ``log pi(a|h) = sum_k log p(tok_k | h, tok_<k)``. Because every
command ends with ``.``, the commands form a prefix-free set and their probabilities are disjoint events
(their sum plus the invalid mass is exactly 1), whether or not they share first tokens (two do: ``walk``).

The MDP whose states are the *histories* (the text so far) is finite: with 3 commands x 2 outcomes there are
6^t histories at depth t. Against a reference policy that is any function of the history (a network's own
action probabilities at every history), :func:`solve_history_tree` solves the per-step KL-regularized
objective exactly by backward induction on the tree, in float64:

    V_H(h)   = R(h)                                   (terminal success reward)
    Q_t(h,a) = r_t(h,a) + sum_o P(o|h,a) V_{t+1}(h a o)
    V_t(h)   = beta * log( sum_a pi_ref(a|h) exp(Q_t(h,a)/beta) + pi_ref(stop|h) exp(stop_value/beta) )
    A*_t(h,a) = Q_t(h,a) - V_t(h),   pi*(a|h) = pi_ref(a|h) exp(A*_t(h,a)/beta)

where ``pi_ref(stop|h) = 1 - sum_a pi_ref(a|h)`` is the reference's mass on invalid commands. The dense
``[S, A, S]`` arrays of :mod:`toy_mdp` would need ``S = sum_t 6^t`` states; the tree needs only per-depth
arrays. Of ``pa_jax`` only the stdlib-only writer ``pa_jax.io`` is imported.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from pa_jax.io import atomic_write_text

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One stochastic outcome of a command: probability, how the position changes, observation text."""

    prob: float
    move: int | None  # position delta; None = fall back to stone 0
    text: str


@dataclasses.dataclass(frozen=True)
class Command:
    text: str
    outcomes: tuple[Outcome, ...]


DEFAULT_COMMANDS: tuple[Command, ...] = (
    Command("walk ahead .", (Outcome(0.8, +1, "moved"), Outcome(0.2, 0, "slipped"))),
    Command("jump two stones .", (Outcome(0.5, +2, "landed"), Outcome(0.5, None, "fell"))),
    Command("walk back .", (Outcome(0.8, -1, "moved"), Outcome(0.2, 0, "slipped"))),
)


@dataclasses.dataclass(frozen=True)
class SteppingStones:
    """The environment's parameters. ``horizon`` commands, goal stone ``goal``, start on stone 0."""

    horizon: int = 4
    goal: int = 3
    commands: tuple[Command, ...] = DEFAULT_COMMANDS
    stop_value: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.horizon, int) or self.horizon < 1:
            raise ValueError(f"horizon must be an int >= 1, got {self.horizon!r}")
        if not isinstance(self.goal, int) or self.goal < 1:
            raise ValueError(f"goal must be an int >= 1, got {self.goal!r}")
        if len(self.commands) < 1:
            raise ValueError("commands must be non-empty")
        n_out = {len(c.outcomes) for c in self.commands}
        if len(n_out) != 1:
            raise ValueError(f"every command needs the same number of outcomes, got {sorted(n_out)}")
        texts = [c.text.split() for c in self.commands]
        for i, a in enumerate(texts):
            for j, b in enumerate(texts):
                if i != j and b[: len(a)] == a:
                    raise ValueError(f"commands must be prefix-free: {self.commands[i].text!r} is a prefix of "
                                     f"{self.commands[j].text!r}")
        for c in self.commands:
            p = np.array([o.prob for o in c.outcomes])
            if np.any(p < 0) or abs(p.sum() - 1.0) > 1e-12:
                raise ValueError(f"outcome probabilities of {c.text!r} must be >= 0 and sum to 1, got {p}")

    @property
    def num_actions(self) -> int:
        return len(self.commands)

    @property
    def num_outcomes(self) -> int:
        return len(self.commands[0].outcomes)

    # ----- dynamics -----
    def step(self, position: int, action: int, outcome: int) -> int:
        """Next position after ``action`` with outcome index ``outcome``, clipped to ``[0, goal]``."""
        o = self.commands[action].outcomes[outcome]
        if o.move is None:
            return 0
        return int(min(max(position + o.move, 0), self.goal))

    def outcome_probs(self) -> np.ndarray:
        """``[A, O]`` outcome probabilities (independent of the position)."""
        return np.array([[o.prob for o in c.outcomes] for c in self.commands], dtype=np.float64)

    def reward(self, final_position: int) -> float:
        return 1.0 if final_position == self.goal else 0.0

    # ----- text -----
    def prompt_text(self) -> str:
        return f"cross to stone {self.goal} ."

    def observation_text(self, action: int, outcome: int, position: int) -> str:
        return f"{self.commands[action].outcomes[outcome].text} {position} ."

    def words(self) -> list[str]:
        """Every word the environment can render (the tokenizer's vocabulary, specials excluded)."""
        seen: dict[str, None] = {}
        texts = [self.prompt_text()] + [c.text for c in self.commands]
        texts += [o.text for c in self.commands for o in c.outcomes]
        texts += [f"{p} ." for p in range(self.goal + 1)]
        for t in texts:
            for w in t.split():
                seen.setdefault(w, None)
        return list(seen)

    def vocab(self) -> dict[str, int]:
        """Word -> id: the special tokens first, then every environment word."""
        return {w: i for i, w in enumerate(list(SPECIAL_TOKENS) + self.words())}

    def render(self, actions: Sequence[int], outcomes: Sequence[int], *, final_action: int | None = None
               ) -> tuple[list[str], list[tuple[int, int]]]:
        """Words of the history ``(a_0, o_0, ..., a_{t-1}, o_{t-1})`` [+ ``final_action``], with BOS.

        Returns the words and the ``[start, end)`` word span of each command (including ``final_action``).
        """
        if len(actions) != len(outcomes):
            raise ValueError(f"actions and outcomes must have equal length, got {len(actions)} and {len(outcomes)}")
        words = [BOS] + self.prompt_text().split()
        spans = []
        pos = 0
        for a, o in zip(actions, outcomes):
            cmd = self.commands[a].text.split()
            spans.append((len(words), len(words) + len(cmd)))
            words += cmd
            pos = self.step(pos, a, o)
            words += self.observation_text(a, o, pos).split()
        if final_action is not None:
            cmd = self.commands[final_action].text.split()
            spans.append((len(words), len(words) + len(cmd)))
            words += cmd
        return words, spans

    def encode(self, words: Sequence[str]) -> np.ndarray:
        v = self.vocab()
        try:
            return np.array([v[w] for w in words], dtype=np.int32)
        except KeyError as e:
            raise ValueError(f"word {e.args[0]!r} is not in the environment's vocabulary") from None

    def command_token_ids(self) -> list[np.ndarray]:
        return [self.encode(c.text.split()) for c in self.commands]


# ---------------------------------------------------------------------------------------------------
# The history tree
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HistoryTree:
    """Every history of a finite-horizon environment, per depth ``t = 0..H``.

    ``actions[t], outcomes[t]``: ``[N_t, t]`` ids of the history's commands and outcomes;
    ``positions[t]``: ``[N_t]``; ``child[t]``: ``[N_t, A, O]`` index into depth ``t + 1`` and
    ``prob[t]``: ``[N_t, A, O]`` its probability (``t < H``); ``reward[t]``: ``[N_t, A]`` immediate
    expected reward (``t < H``); ``terminal_reward``: ``[N_H]``.
    """

    actions: list[np.ndarray]
    outcomes: list[np.ndarray]
    positions: list[np.ndarray]
    child: list[np.ndarray]
    prob: list[np.ndarray]
    reward: list[np.ndarray]
    terminal_reward: np.ndarray

    @property
    def horizon(self) -> int:
        return len(self.child)

    @property
    def num_actions(self) -> int:
        return self.child[0].shape[1]

    def sizes(self) -> list[int]:
        return [len(p) for p in self.positions]

    def index(self, actions: Sequence[int], outcomes: Sequence[int]) -> int:
        """Index of a history within its depth (``len(actions)``)."""
        h = 0
        for t, (a, o) in enumerate(zip(actions, outcomes)):
            h = int(self.child[t][h, a, o])
        return h


def build_tree(env: SteppingStones) -> HistoryTree:
    """Enumerate every history. Child of ``(h, a, o)`` at depth ``t`` is ``(h * A + a) * O + o``."""
    A, O, H = env.num_actions, env.num_outcomes, env.horizon
    P = env.outcome_probs()
    step_table = np.array([[[env.step(p, a, o) for o in range(O)] for a in range(A)] for p in range(env.goal + 1)])
    actions = [np.zeros((1, 0), np.int32)]
    outcomes = [np.zeros((1, 0), np.int32)]
    positions = [np.zeros((1,), np.int32)]
    child, prob, reward = [], [], []
    for t in range(H):
        n = len(positions[t])
        idx = np.arange(n)[:, None, None] * A * O + np.arange(A)[None, :, None] * O + np.arange(O)[None, None, :]
        child.append(idx.astype(np.int64))
        prob.append(np.broadcast_to(P, (n, A, O)).copy())
        reward.append(np.zeros((n, A)))
        a_new = np.broadcast_to(np.arange(A)[None, :, None], (n, A, O)).reshape(-1)
        o_new = np.broadcast_to(np.arange(O)[None, None, :], (n, A, O)).reshape(-1)
        parent = np.repeat(np.arange(n), A * O)
        actions.append(np.concatenate([actions[t][parent], a_new[:, None]], 1).astype(np.int32))
        outcomes.append(np.concatenate([outcomes[t][parent], o_new[:, None]], 1).astype(np.int32))
        positions.append(step_table[positions[t][parent], a_new, o_new].astype(np.int32))
    terminal = (positions[H] == env.goal).astype(np.float64)
    return HistoryTree(actions, outcomes, positions, child, prob, reward, terminal)


# ---------------------------------------------------------------------------------------------------
# Exact KL-regularized solution on the tree (float64, NumPy)
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TreeSolution:
    """Per depth ``t``: ``q[t], advantage[t], log_policy[t]``: ``[N_t, A]``; ``v[t]``: ``[N_t]`` (t = 0..H);
    ``stop_log_policy[t]``: ``[N_t]`` log pi*(invalid | h)."""

    q: list[np.ndarray]
    v: list[np.ndarray]
    advantage: list[np.ndarray]
    log_policy: list[np.ndarray]
    stop_log_policy: list[np.ndarray]


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def _check_logprobs(tree: HistoryTree, logprobs: Sequence[np.ndarray], name: str, tol: float) -> list[np.ndarray]:
    if len(logprobs) != tree.horizon:
        raise ValueError(f"{name} must hold one [N_t, A] array per depth t < {tree.horizon}, got {len(logprobs)}")
    out = []
    for t, lp in enumerate(logprobs):
        lp = np.asarray(lp, dtype=np.float64)
        want = (len(tree.positions[t]), tree.num_actions)
        if lp.shape != want:
            raise ValueError(f"{name}[{t}] must have shape {want}, got {lp.shape}")
        if np.any(np.isnan(lp)) or np.any(lp == np.inf):
            raise ValueError(f"{name}[{t}] must hold log-probabilities (no NaN or +inf)")
        total = np.exp(_logsumexp(lp, 1))
        if np.any(total > 1.0 + tol):
            raise ValueError(f"{name}[{t}]: action probabilities must sum to <= 1 (+{tol}), max sum {total.max()}")
        out.append(lp)
    return out


def stop_logprob(logprobs: np.ndarray) -> np.ndarray:
    """log(1 - sum_a exp(logprobs[..., a])): the log-mass on invalid commands (-inf when it is <= 0)."""
    with np.errstate(divide="ignore"):
        return np.log(np.clip(-np.expm1(_logsumexp(logprobs, -1)), 0.0, None))


def solve_history_tree(tree: HistoryTree, ref_logprobs: Sequence[np.ndarray], beta: float, *,
                       stop_value: float = 0.0, tol: float = 1e-5) -> TreeSolution:
    """Exact backward induction of the per-step KL-regularized objective on the history tree.

    ``ref_logprobs[t]``: ``[N_t, A]`` log pi_ref(a | h) of each command at every depth-t history (their
    probabilities may sum to less than 1: the rest is the invalid command, worth ``stop_value``).
    Implements V_H = R, Q_t = r_t + E_o V_{t+1}, V_t = beta log(sum_a pi_ref e^{Q/beta} + pi_ref(stop) e^{stop/beta}).
    """
    if not np.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    ref = _check_logprobs(tree, ref_logprobs, "ref_logprobs", tol)
    H = tree.horizon
    v: list[np.ndarray] = [None] * (H + 1)  # type: ignore[list-item]
    q: list[np.ndarray] = [None] * H  # type: ignore[list-item]
    v[H] = np.asarray(tree.terminal_reward, np.float64)
    for t in range(H - 1, -1, -1):
        q[t] = tree.reward[t] + np.sum(tree.prob[t] * v[t + 1][tree.child[t]], axis=-1)
        ls = stop_logprob(ref[t])
        logits = np.concatenate([ref[t] + q[t] / beta, (ls + stop_value / beta)[:, None]], axis=1)
        v[t] = beta * _logsumexp(logits, 1)
    adv = [q[t] - v[t][:, None] for t in range(H)]
    log_pol = [ref[t] + adv[t] / beta for t in range(H)]
    stop_pol = [stop_logprob(ref[t]) + (stop_value - v[t]) / beta for t in range(H)]
    return TreeSolution(q, v, adv, log_pol, stop_pol)


def evaluate_tree_policy(tree: HistoryTree, policy_logprobs: Sequence[np.ndarray],
                         ref_logprobs: Sequence[np.ndarray], beta: float, *, stop_value: float = 0.0,
                         tol: float = 1e-5) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Exact regularized value of a history policy (float64): returns ``(q, v)`` per depth.

    V^pi_t(h) = sum_a pi(a|h) [Q^pi_t(h,a) - beta log(pi/pi_ref)] + pi(stop|h) [stop_value - beta log(pi/pi_ref)(stop)],
    Q^pi_t(h,a) = r_t(h,a) + E_o V^pi_{t+1}(h a o). ``v[0][0]`` is the objective J(pi).
    """
    if not np.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    pol = _check_logprobs(tree, policy_logprobs, "policy_logprobs", tol)
    ref = _check_logprobs(tree, ref_logprobs, "ref_logprobs", tol)
    H = tree.horizon
    v: list[np.ndarray] = [None] * (H + 1)  # type: ignore[list-item]
    q: list[np.ndarray] = [None] * H  # type: ignore[list-item]
    v[H] = np.asarray(tree.terminal_reward, np.float64)
    for t in range(H - 1, -1, -1):
        q[t] = tree.reward[t] + np.sum(tree.prob[t] * v[t + 1][tree.child[t]], axis=-1)
        p = np.exp(pol[t])
        with np.errstate(invalid="ignore"):
            term = np.where(p > 0, p * (q[t] - beta * (pol[t] - ref[t])), 0.0).sum(1)
            ps, rs = stop_logprob(pol[t]), stop_logprob(ref[t])
            term += np.where(np.exp(ps) > 0, np.exp(ps) * (stop_value - beta * (ps - rs)), 0.0)
        v[t] = term
    return q, v


# ---------------------------------------------------------------------------------------------------
# Rendering the tree for a language model
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TreeTokens:
    """Token ids that cover every (history, command) pair of the tree in one batch.

    ``ids``: ``[L, T]`` int32 right-padded with ``<pad>`` (one row per depth-(H-1) history and final command);
    ``mask``: ``[L, T]``; ``step_ids``: ``[L, T]`` the command index t of each command token, -1 elsewhere; for every depth ``t`` and pair ``(h, a)``: ``row[t]`` ``[N_t, A]`` the row holding it and
    ``pos[t]`` ``[N_t, A, K]`` the positions of its command tokens in that row (``pos_mask[t]`` marks the valid ones).
    A command's log-prob is ``sum_k token_logprob[row, pos_k - 1]`` (``token_logprobs`` is shifted by one).
    """

    ids: np.ndarray
    mask: np.ndarray
    step_ids: np.ndarray
    row: list[np.ndarray]
    pos: list[np.ndarray]
    pos_mask: list[np.ndarray]


def tree_tokens(env: SteppingStones, tree: HistoryTree) -> TreeTokens:
    A, O, H = env.num_actions, env.num_outcomes, env.horizon
    last = tree.actions[H - 1], tree.outcomes[H - 1]
    rows, spans = [], []
    for h in range(len(last[0])):
        for a in range(A):
            words, sp = env.render(last[0][h], last[1][h], final_action=a)
            rows.append(env.encode(words))
            spans.append(sp)
    T = max(len(r) for r in rows)
    ids = np.zeros((len(rows), T), np.int32)  # <pad> = 0
    mask = np.zeros((len(rows), T), np.int32)
    step_ids = np.full((len(rows), T), -1, np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
        for t, (s, e) in enumerate(spans[i]):
            step_ids[i, s:e] = t
    K = max(e - s for sp in spans for (s, e) in sp)
    row_t, pos_t, pmask_t = [], [], []
    for t in range(H):
        n = len(tree.positions[t])
        # representative leaf row of (h, a) at depth t: extend with outcome 0 and command 0 down to depth H-1.
        if t == H - 1:
            r = np.arange(n)[:, None] * A + np.arange(A)[None, :]
        else:
            h_rep = np.arange(n)[:, None] * A * O + np.arange(A)[None, :] * O  # depth t+1, outcome 0
            for _ in range(t + 1, H - 1):
                h_rep = h_rep * A * O  # command 0, outcome 0
            r = h_rep * A  # final command 0
        pos = np.zeros((n, A, K), np.int64)
        pm = np.zeros((n, A, K), bool)
        for h in range(n):
            for a in range(A):
                s, e = spans[r[h, a]][t]
                pos[h, a, : e - s] = np.arange(s, e)
                pm[h, a, : e - s] = True
        row_t.append(r.astype(np.int64))
        pos_t.append(pos)
        pmask_t.append(pm)
    return TreeTokens(ids, mask, step_ids, row_t, pos_t, pmask_t)


def action_logprobs_from_tokens(token_logprobs, tokens: TreeTokens, xp=np):
    """Per depth ``[N_t, A]`` command log-probs from ``token_logprobs`` ``[L, T-1]`` (``xp``: numpy or jax.numpy).

    log pi(a|h) = sum over the command's tokens k of token_logprobs[row, pos_k - 1].
    """
    out = []
    for r, p, m in zip(tokens.row, tokens.pos, tokens.pos_mask):
        g = token_logprobs[r[:, :, None], np.maximum(p - 1, 0)]
        out.append(xp.sum(xp.where(m, g, 0.0), axis=-1))
    return out


# ---------------------------------------------------------------------------------------------------
# Sampling and the tokenizer
# ---------------------------------------------------------------------------------------------------


def sample_histories(tree: HistoryTree, action_logprobs: Sequence[np.ndarray], num: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``num`` complete trajectories ``(actions [num, H], outcomes [num, H])``.

    Commands are drawn from ``action_logprobs`` renormalized over the valid commands (an invalid command
    would end the episode; callers report its mass), outcomes from the environment.
    """
    H, A = tree.horizon, tree.num_actions
    acts = np.zeros((num, H), np.int32)
    outs = np.zeros((num, H), np.int32)
    h = np.zeros(num, np.int64)
    for t in range(H):
        lp = np.asarray(action_logprobs[t], np.float64)[h]
        p = np.exp(lp - lp.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        a = (rng.random(num)[:, None] > np.cumsum(p, 1)[:, :-1]).sum(1)
        po = tree.prob[t][h, a]
        o = (rng.random(num)[:, None] > np.cumsum(po, 1)[:, :-1]).sum(1)
        acts[:, t], outs[:, t] = a, o
        h = tree.child[t][h, a, o]
    return acts, outs


def build_tokenizer(env: SteppingStones):
    """A word-level ``tokenizers.Tokenizer`` over the environment's words that prepends ``<s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = env.vocab()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, vocab[BOS])])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    for s in SPECIAL_TOKENS:
        tok.add_special_tokens([s])
    return tok


def save_tokenizer(env: SteppingStones, directory: str) -> None:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` that ``PreTrainedTokenizerFast`` loads."""
    os.makedirs(directory, exist_ok=True)
    atomic_write_text(os.path.join(directory, "tokenizer.json"), build_tokenizer(env).to_str(pretty=True))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "unk_token": UNK,
           "pad_token": PAD, "model_max_length": 256, "clean_up_tokenization_spaces": False,
           "add_bos_token": False}
    atomic_write_text(os.path.join(directory, "tokenizer_config.json"), json.dumps(cfg, indent=2) + "\n")
