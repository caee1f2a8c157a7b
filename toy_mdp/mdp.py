"""Tabular MDPs, random generators and host-side validation (float64, NumPy).

A :class:`TabularMDP` is a plain frozen dataclass of NumPy ``float64`` arrays. It is validated on
the host when it is built; the JAX kernels in :mod:`toy_mdp.solve` never see invalid input.

Batches: every array may carry one leading batch axis (``transitions [N, S, A, S]``,
``rewards [N, S, A]``, ``gamma`` scalar or ``[N]``, ``initial [N, S]``); :func:`stack` builds such a
batch from single MDPs, and the solver/evaluator ``vmap`` over it. ``horizon`` is shared by a batch.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import numpy as np

# Rows of probabilities must sum to one within this absolute tolerance (loose enough for float32
# inputs); accepted rows are renormalized exactly in float64.
ROW_SUM_ATOL = 1e-6


def _as_float64(name: str, value) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected a real-valued array, got {type(value).__name__}") from exc
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: expected finite values, found NaN or inf")
    return arr


def check_distribution(name: str, probs: np.ndarray, *, axis: int = -1) -> np.ndarray:
    """Raise ValueError unless ``probs`` is finite, non-negative and sums to 1 along ``axis``
    (within ``ROW_SUM_ATOL``); return it renormalized exactly (float64)."""
    if not np.all(np.isfinite(probs)):
        raise ValueError(f"{name}: expected finite probabilities, found NaN or inf")
    if np.any(probs < 0):
        raise ValueError(f"{name}: expected non-negative probabilities, found min {probs.min():.3g}")
    sums = probs.sum(axis=axis)
    err = np.max(np.abs(sums - 1.0)) if sums.size else 0.0
    if err > ROW_SUM_ATOL:
        raise ValueError(
            f"{name}: expected each row (axis {axis}) to sum to 1, worst row sums to "
            f"{sums.flat[np.argmax(np.abs(sums - 1.0))]!r} (tolerance {ROW_SUM_ATOL})")
    return probs / np.expand_dims(sums, axis)


@dataclasses.dataclass(frozen=True, eq=False)
class TabularMDP:
    """A finite MDP: ``transitions[s, a, s'] = P(s'|s, a)``, ``rewards[s, a] = r(s, a)``.

    Discounted (``horizon=None``, ``0 <= gamma < 1``) or finite horizon (``horizon = H >= 1``,
    ``0 <= gamma <= 1``; time steps ``t = 0..H-1``, ``V_H = 0``). ``initial`` is the distribution of
    ``s_0`` (uniform if None). Optionally batched with one leading axis (see module docstring).
    """

    transitions: np.ndarray
    rewards: np.ndarray
    gamma: np.ndarray
    horizon: Optional[int] = None
    initial: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        P = _as_float64("transitions", self.transitions)
        R = _as_float64("rewards", self.rewards)
        if P.ndim not in (3, 4):
            raise ValueError(f"transitions: expected shape [S, A, S] (or [N, S, A, S]), got {P.shape}")
        batch = P.shape[:-3]
        S, A, S2 = P.shape[-3:]
        if S != S2 or S < 1 or A < 1:
            raise ValueError(f"transitions: expected shape [S, A, S] with S, A >= 1, got {P.shape}")
        if R.shape != batch + (S, A):
            raise ValueError(f"rewards: expected shape {batch + (S, A)} to match transitions "
                             f"{P.shape}, got {R.shape}")
        P = check_distribution("transitions", P)
        horizon = self.horizon
        if horizon is not None:
            if isinstance(horizon, bool) or int(horizon) != horizon or int(horizon) < 1:
                raise ValueError(f"horizon: expected None or an integer >= 1, got {horizon!r}")
            horizon = int(horizon)
        g = _as_float64("gamma", self.gamma)
        if g.shape not in ((),) + ((batch,) if batch else ()):
            raise ValueError(f"gamma: expected a scalar{' or shape ' + str(batch) if batch else ''}, "
                             f"got shape {g.shape}")
        if horizon is None and (np.any(g < 0) or np.any(g >= 1)):
            raise ValueError(f"gamma: expected 0 <= gamma < 1 for a discounted MDP (horizon=None), "
                             f"got {g!r}; pass horizon=H for gamma = 1")
        if horizon is not None and (np.any(g < 0) or np.any(g > 1)):
            raise ValueError(f"gamma: expected 0 <= gamma <= 1 with a horizon, got {g!r}")
        if self.initial is None:
            mu = np.full(batch + (S,), 1.0 / S)
        else:
            mu = _as_float64("initial", self.initial)
            if mu.shape != batch + (S,):
                raise ValueError(f"initial: expected shape {batch + (S,)}, got {mu.shape}")
            mu = check_distribution("initial", mu)
        for name, value in (("transitions", P), ("rewards", R), ("gamma", g), ("initial", mu)):
            value.setflags(write=False)
            object.__setattr__(self, name, value)
        object.__setattr__(self, "horizon", horizon)

    @property
    def num_states(self) -> int:
        return self.transitions.shape[-1]

    @property
    def num_actions(self) -> int:
        return self.transitions.shape[-2]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """``()`` for a single MDP, ``(N,)`` for a batch."""
        return self.transitions.shape[:-3]

    def __getitem__(self, i: int) -> "TabularMDP":
        """The ``i``-th MDP of a batch."""
        if not self.batch_shape:
            raise TypeError("TabularMDP: indexing needs a batched MDP")
        g = self.gamma if self.gamma.ndim == 0 else self.gamma[i]
        return TabularMDP(self.transitions[i], self.rewards[i], g, self.horizon, self.initial[i])


def stack(mdps: Sequence[TabularMDP]) -> TabularMDP:
    """Stack single MDPs of equal shape and horizon into one batched :class:`TabularMDP`."""
    if not mdps:
        raise ValueError("mdps: expected at least one MDP")
    if any(m.batch_shape for m in mdps):
        raise ValueError("mdps: expected unbatched MDPs")
    shapes = {m.transitions.shape for m in mdps}
    horizons = {m.horizon for m in mdps}
    if len(shapes) != 1 or len(horizons) != 1:
        raise ValueError(f"mdps: expected one shape and one horizon, got {shapes} and {horizons}")
    return TabularMDP(np.stack([m.transitions for m in mdps]), np.stack([m.rewards for m in mdps]),
                      np.stack([m.gamma for m in mdps]), mdps[0].horizon,
                      np.stack([m.initial for m in mdps]))


def check_reference_policy(mdp: TabularMDP, ref_policy, name: str = "ref_policy") -> np.ndarray:
    """Validate a (reference) policy against ``mdp``; return it as float64.

    Shape ``[S, A]`` (stationary) or, with a horizon, ``[H, S, A]`` (time-dependent); a batched
    MDP needs a leading ``[N]`` axis. Rows must be finite, non-negative and sum to 1. Exact zeros
    are allowed: such actions are outside the support (pi* = 0 there, advantage -inf, masked).
    """
    pi = _as_float64(name, ref_policy)
    batch, S, A = mdp.batch_shape, mdp.num_states, mdp.num_actions
    ok = [batch + (S, A)]
    if mdp.horizon is not None:
        ok.append(batch + (mdp.horizon, S, A))
    if pi.shape not in ok:
        raise ValueError(f"{name}: expected shape {' or '.join(map(str, ok))}, got {pi.shape}")
    return check_distribution(name, pi)


def check_beta(mdp: TabularMDP, beta) -> np.ndarray:
    """Validate the KL coefficient: finite, > 0, scalar or one per MDP of a batch."""
    b = _as_float64("beta", beta)
    batch = mdp.batch_shape
    if b.shape not in ((),) + ((batch,) if batch else ()):
        raise ValueError(f"beta: expected a scalar{' or shape ' + str(batch) if batch else ''}, "
                         f"got shape {b.shape}")
    if np.any(b <= 0):
        raise ValueError(f"beta: expected beta > 0, got {b!r}")
    return b


def _key_to_rng(key) -> np.random.Generator:
    """A NumPy generator seeded from a JAX PRNG key (typed or raw uint32) or an int."""
    if isinstance(key, (int, np.integer)):
        return np.random.default_rng(int(key))
    data = np.asarray(jax.random.key_data(key) if jax.dtypes.issubdtype(
        getattr(key, "dtype", np.uint32), jax.dtypes.prng_key) else key)
    return np.random.default_rng([int(x) for x in data.ravel()])


def random_mdp(key, num_states: int, num_actions: int, *, deterministic: bool = False,
               gamma: float = 0.9, horizon: Optional[int] = None, reward_scale: float = 1.0,
               concentration: float = 1.0, num_mdps: Optional[int] = None) -> TabularMDP:
    """A random MDP (or a batch of ``num_mdps``), reproducible from ``key``.

    Rewards ~ ``reward_scale * N(0, 1)``. Transitions: Dirichlet(``concentration``) over next
    states, or (``deterministic=True``) one uniformly drawn next state per (s, a). The initial
    distribution is uniform. ``key`` is a JAX PRNG key or an int seed.
    """
    if num_states < 1 or num_actions < 1:
        raise ValueError(f"num_states, num_actions: expected >= 1, got {num_states}, {num_actions}")
    rng = _key_to_rng(key)
    batch = () if num_mdps is None else (int(num_mdps),)
    shape = batch + (num_states, num_actions)
    if deterministic:
        nxt = rng.integers(0, num_states, size=shape)
        P = np.eye(num_states)[nxt]
    else:
        if concentration <= 0:
            raise ValueError(f"concentration: expected > 0, got {concentration}")
        P = rng.gamma(concentration, size=shape + (num_states,))
        P = np.maximum(P, 1e-300)
        P /= P.sum(-1, keepdims=True)
    R = reward_scale * rng.standard_normal(shape)
    g = np.full(batch, gamma, dtype=np.float64) if batch else gamma
    return TabularMDP(P, R, g, horizon)


def random_reference_policy(key, num_states: int, num_actions: int, *, min_prob: float = 1e-3,
                            horizon: Optional[int] = None, num_zeros: int = 0,
                            num_mdps: Optional[int] = None) -> np.ndarray:
    """A random reference policy ``[S, A]`` (``[H, S, A]`` with a horizon; ``[N, ...]`` batched).

    Log-probabilities are drawn uniformly so that ``min_prob`` is the smallest attainable
    probability scale (each row is a softmax of ``U(log(min_prob), 0)`` logits; the knob for
    near-zero probabilities: ``min_prob=1e-8`` gives probabilities down to about 1e-8). With
    ``num_zeros > 0`` that many actions per state get an exact zero (never all of them).
    """
    if not 0 < min_prob <= 1:
        raise ValueError(f"min_prob: expected 0 < min_prob <= 1, got {min_prob}")
    if not 0 <= num_zeros < num_actions:
        raise ValueError(f"num_zeros: expected 0 <= num_zeros < num_actions, got {num_zeros}")
    rng = _key_to_rng(key)
    shape = (() if num_mdps is None else (int(num_mdps),)) + \
        (() if horizon is None else (int(horizon),)) + (num_states, num_actions)
    logits = rng.uniform(np.log(min_prob), 0.0, size=shape)
    pi = np.exp(logits - logits.max(-1, keepdims=True))
    if num_zeros:
        order = rng.random(shape).argsort(-1)
        pi = np.where(order < num_zeros, 0.0, pi)
    return pi / pi.sum(-1, keepdims=True)
