"""Episode sampling, pure JAX: ``lax.scan`` over time, ``vmap`` over episodes (and, in the driver,
over MDPs); inverse-CDF draws from one uniform each, so the same key gives the same episodes."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from toy_mdp.train.problem import Problem

Array = jax.Array

class Episodes(NamedTuple):
    states: Array       # [N, T] int
    actions: Array      # [N, T] int
    rewards: Array      # [N, T]
    last_state: Array   # [N] the state after the last step (bootstrap for truncated episodes)


def _time_index(T: int, hp: int) -> Array:
    """Row of the logits table used at each step t < T: ``min(t, Hp - 1)`` (0 when stationary)."""
    return jnp.minimum(jnp.arange(T), hp - 1)


def sample_episode(key: Array, logits: Array, transitions: Array, rewards: Array, s0: Array,
                   T: int) -> tuple[Array, Array, Array, Array]:
    """One episode of ``T`` steps from ``s0``: ``a_t ~ softmax(logits[min(t, Hp-1), s_t])``,
    ``s_{t+1} ~ P(.|s_t, a_t)``, both by inverse-CDF sampling of one uniform each
    (``x = #{i : CDF_i < u}``); ``lax.scan`` over time."""
    hp = logits.shape[0]
    cdf_pi = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)   # [Hp, S, A]
    cdf_p = jnp.cumsum(transitions, axis=-1)                         # [S, A, S]
    A, S = cdf_pi.shape[-1], cdf_p.shape[-1]
    u = jax.random.uniform(key, (T, 2), dtype=cdf_pi.dtype)

    def step(s, inp):
        t, u_t = inp
        a = jnp.minimum(jnp.sum(cdf_pi[t, s] < u_t[0]), A - 1)
        s_next = jnp.minimum(jnp.sum(cdf_p[s, a] < u_t[1]), S - 1)
        return s_next, (s, a, rewards[s, a])

    last, (states, actions, rews) = jax.lax.scan(step, s0, (_time_index(T, hp), u))
    return states, actions, rews, last


def sample_initial(key: Array, initial: Array, n: int) -> Array:
    """``n`` draws of ``s_0 ~ mu`` (inverse CDF)."""
    u = jax.random.uniform(key, (n,), dtype=initial.dtype)
    return jnp.minimum(jnp.sum(jnp.cumsum(initial)[None, :] < u[:, None], axis=1),
                       initial.shape[0] - 1)


def sample_episodes(key: Array, logits: Array, prob: Problem, num_episodes: int, T: int,
                    s0: Optional[Array] = None) -> Episodes:
    """``num_episodes`` episodes (``vmap``); ``s0 [N]`` given or drawn from ``mu``."""
    k0, ke = jax.random.split(key)
    if s0 is None:
        s0 = sample_initial(k0, prob.initial, num_episodes)
    keys = jax.random.split(ke, num_episodes)
    st, ac, rw, last = jax.vmap(sample_episode, in_axes=(0, None, None, None, 0, None))(
        keys, logits, prob.transitions, prob.rewards, s0, T)
    return Episodes(st, ac, rw, last)


def _discount_matrix(factor: Array, T: int) -> Array:
    """``D[t, u] = factor^(u - t)`` for ``u >= t``, else 0 (so ``x @ D.T`` is a reverse discounted sum)."""
    t = jnp.arange(T)
    diff = t[None, :] - t[:, None]
    return jnp.where(diff >= 0, factor ** jnp.maximum(diff, 0), 0.0)


def _gather(table: Array, ep: Episodes) -> Array:
    """``table[min(t, Hp-1), s_t, a_t]`` for every step of every episode: ``[N, T]``."""
    tix = _time_index(ep.states.shape[1], table.shape[0])
    return table[tix[None, :], ep.states, ep.actions]


def _values(value: Array, ep: Episodes, horizon: Optional[int]) -> tuple[Array, Array]:
    """Critic values ``V(t, s_t)`` and ``V(t+1, s_{t+1})`` (0 after the horizon, bootstrap otherwise)."""
    T = ep.states.shape[1]
    hp = value.shape[0]
    tix = _time_index(T, hp)
    v = value[tix[None, :], ep.states]
    nxt = jnp.concatenate([ep.states[:, 1:], ep.last_state[:, None]], axis=1)
    tn = jnp.minimum(jnp.arange(1, T + 1), hp - 1)
    v_next = value[tn[None, :], nxt]
    if horizon is not None:
        v_next = v_next.at[:, -1].set(0.0)
    return v, v_next
