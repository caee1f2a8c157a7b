"""REINFORCE with the KL penalty in the reward, on an enumerable tree task (float64 host side, JAX loss).

The task is given as arrays over its decision nodes (histories), parents before children:
``prob`` ``[N, A, O]`` (outcome probabilities, 0 = unused slot), ``child`` ``[N, A, O]`` (next node, -1 when
the episode ends) and ``reward`` ``[N, A, O]``. Action ``A`` (one past the commands) is "invalid": the
episode ends with reward ``invalid_reward``.

Per step the shaped reward is ``r_t - beta * log(pi(a_t|h_t) / pi_ref(a_t|h_t))`` (the KL penalty in the
reward, with the behaviour policy's log-ratio); the return-to-go ``G_t = sum_{t' >= t}`` of it, the
baseline ``b_t`` the leave-one-out mean of ``G_t`` over the batch's episodes alive at depth ``t``, and the
surrogate loss::

    L(theta) = - (1/B) sum_episodes sum_t (G_t - b_t) log pi_theta(a_t | h_t)

whose gradient is the REINFORCE estimate of ``-grad J`` with ``J = E[R - beta sum_t log pi/pi_ref]``.
Visits are aggregated per distinct node: ``L = - sum_{n, a} W[n, a] log pi_theta(a | n)``.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def with_invalid(logprobs):
    """``[..., A]`` command log-probs -> ``[..., A+1]`` with ``log(1 - sum exp)`` appended (clipped at 1e-30)."""
    xp = jnp if isinstance(logprobs, jax.Array) else np
    tot = xp.exp(jax.nn.logsumexp(logprobs, axis=-1) if xp is jnp else _lse(logprobs))
    inv = xp.log(xp.clip(1.0 - tot, 1e-30, None))
    return xp.concatenate([logprobs, inv[..., None]], axis=-1)


def _lse(x):
    m = np.max(x, axis=-1, keepdims=True)
    return (m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True)))[..., 0]


@dataclasses.dataclass(frozen=True)
class Episodes:
    """``B`` sampled episodes, up to ``H`` decisions each: ``nodes``/``actions`` ``[B, H]`` (action ``A`` =
    invalid; -1 past the end), ``rewards`` ``[B, H]`` the environment reward at each step, ``log_ratio``
    ``[B, H]`` the behaviour log pi/pi_ref of the chosen action, ``success`` ``[B]`` final reward."""
    nodes: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    log_ratio: np.ndarray
    success: np.ndarray


def sample_episodes(prob: np.ndarray, child: np.ndarray, reward: np.ndarray, policy_logprobs: np.ndarray,
                    ref_logprobs: np.ndarray, batch: int, horizon: int, rng: np.random.Generator,
                    invalid_reward: float = 0.0) -> Episodes:
    """Episodes of the policy whose action distribution at node n is ``with_invalid(policy_logprobs[n])``."""
    pol = np.exp(with_invalid(np.asarray(policy_logprobs, np.float64)))
    pol /= pol.sum(-1, keepdims=True)
    lr = with_invalid(np.asarray(policy_logprobs, np.float64)) - with_invalid(np.asarray(ref_logprobs, np.float64))
    A = prob.shape[1]
    nodes = np.full((batch, horizon), -1, np.int64)
    actions = np.full((batch, horizon), -1, np.int64)
    rewards = np.zeros((batch, horizon))
    log_ratio = np.zeros((batch, horizon))
    success = np.zeros(batch)
    for b in range(batch):
        n = 0
        for t in range(horizon):
            a = int(rng.choice(A + 1, p=pol[n]))
            nodes[b, t], actions[b, t], log_ratio[b, t] = n, a, lr[n, a]
            if a == A:
                rewards[b, t] = invalid_reward
                success[b] = invalid_reward
                break
            p = prob[n, a] / prob[n, a].sum()
            o = int(rng.choice(len(p), p=p))
            if child[n, a, o] < 0:
                rewards[b, t] = reward[n, a, o]
                success[b] = reward[n, a, o]
                break
            n = int(child[n, a, o])
        else:
            raise ValueError("an episode reached the horizon without ending: child[] must be -1 at the last depth")
    return Episodes(nodes, actions, rewards, log_ratio, success)


def reinforce_weights(ep: Episodes, beta: float, num_actions: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Aggregate the per-visit coefficients ``(G_t - b_t) / B`` per distinct node.

    Returns ``(unique_nodes [U], W [U, A+1], mean shaped return)``: ``L = - sum W[u, a] log pi(a | node_u)``."""
    live = ep.nodes >= 0
    shaped = np.where(live, ep.rewards - beta * ep.log_ratio, 0.0)
    G = np.cumsum(shaped[:, ::-1], axis=1)[:, ::-1]
    B, H = G.shape
    adv = np.zeros_like(G)
    for t in range(H):
        m = live[:, t]
        k = int(m.sum())
        if k >= 2:
            loo = (G[m, t].sum() - G[m, t]) / (k - 1)
            adv[m, t] = G[m, t] - loo
        elif k == 1:
            adv[m, t] = 0.0  # no baseline available from a single episode: skip the visit
    uniq, inv = np.unique(ep.nodes[live], return_inverse=True)
    W = np.zeros((len(uniq), num_actions + 1))
    np.add.at(W, (inv, ep.actions[live]), adv[live] / B)
    return uniq, W, float(G[:, 0].mean())


def surrogate_loss(logprobs: jax.Array, W: jax.Array) -> jax.Array:
    """``- sum_{u,a} W[u, a] log pi(a | u)`` with ``logprobs`` ``[U, A]`` command log-probs (invalid appended)."""
    return -jnp.sum(W * with_invalid(logprobs))


def train_step_fn(logprobs_fn, optimizer):
    """A jitted ``step(lora, opt_state, state, inputs, W) -> (lora, opt_state, loss)``: one optax update of
    the LoRA parameters on :func:`surrogate_loss` (``logprobs_fn(state, lora, *inputs) -> [U, A]``)."""
    import optax

    def loss_fn(lora, state, inputs, W):
        return surrogate_loss(logprobs_fn(state, lora, *inputs), W)

    @jax.jit
    def step(lora, opt_state, state, inputs, W):
        loss, g = jax.value_and_grad(loss_fn)(lora, state, inputs, W)
        upd, opt_state = optimizer.update(g, opt_state, lora)
        return optax.apply_updates(lora, upd), opt_state, loss

    return step


def pad_nodes(nodes: np.ndarray, W: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad the visited nodes to a fixed ``size`` (one compiled step) with node 0 and zero weights."""
    if len(nodes) > size:
        raise ValueError(f"{len(nodes)} distinct nodes visited, more than the padded size {size}")
    n = np.concatenate([nodes, np.zeros(size - len(nodes), nodes.dtype)])
    w = np.concatenate([W, np.zeros((size - len(nodes), W.shape[1]))])
    return n, w
