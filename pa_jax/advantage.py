"""Progress advantage: token -> step -> trajectory aggregation of ``beta * log pi_theta / pi_ref``.

Inputs for a batch of ``B`` trajectories padded to ``T`` tokens:

* ``policy_logprobs``, ``reference_logprobs``: ``[B, T]`` float, ``log pi(a_t | s_t)`` per token;
* ``step_ids``: ``[B, T]`` int, ``-1`` for tokens that are not part of a scored action (prompt,
  observations, padding), ``0 .. n_b - 1`` for the action step a token belongs to; every step's
  tokens form one contiguous run;
* ``num_steps``: ``[B]`` int, the number of action steps ``n_b`` of each trajectory. A step with no
  tokens (e.g. truncated away) still counts.

Step value of step ``s`` (token aggregation ``agg`` over its tokens ``t in s``), two orders::

    per_model:    A_s = beta * (agg_t log pi_theta(t) - agg_t log pi_ref(t))
    token_level:  A_s = beta * agg_t (log pi_theta(t) - log pi_ref(t))

They coincide for ``mean``, ``sum`` and ``last`` (computed from the per-token differences for
both orders, which avoids float32 cancellation between two large sums) and differ for ``min``
and ``max``. ``token_level`` with ``sum`` is the exact step-level log-ratio
``beta * log pi_theta(step) / pi_ref(step)``. Trajectory score = ``step_agg_s A_s`` over the steps
``s < n_b``.

Conventions reproduced from the authors' released code (deeplearning-wisc/progress-advantage):

* ``pa/scoring.py::score_trajectory_progress_advantage`` aggregates each model's gathered
  log-probs within an action span (``aggregate_tokens``) and subtracts them, multiplied by beta:
  that is ``order="per_model"`` (the default here). A truncated/empty action span contributes a
  step value of 0.0 "rather than being dropped, keeping the step-count divisor stable"
  (``empty="zero"``); ``per_step_progress_advantage`` likewise returns 0.0 for empty spans.
* ``pa/aggregations.py``: token aggregations mean/sum/last/min/max with 0.0 for an empty span;
  step aggregations mean/sum/last/min/max/bottom10 with 0.0 for a trajectory without steps, and
  ``bottom10 = mean of the max(1, ceil(0.10 * n)) smallest step values`` (for ``n < 400`` their
  float ``ceil(0.10 * n)`` equals the integer ``ceil(n / 10)`` used here).
* ``score_trajectory_self_certainty`` (the certainty baselines) *skips* empty spans instead
  (``empty="skip"``, see :mod:`pa_jax.baselines`).

Everything is validated on the host (shapes, step ids, contiguity, finiteness, names), then one
jitted function computes all ``5 x 6`` (token_agg, step_agg) combinations for the whole batch with
segment reductions over ``B * S_max`` segments (no Python loop over tokens or trajectories).
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

TOKEN_AGGS: tuple[str, ...] = ("mean", "sum", "last", "min", "max")
STEP_AGGS: tuple[str, ...] = ("mean", "sum", "last", "min", "max", "bottom10")
ORDERS: tuple[str, ...] = ("per_model", "token_level")
EMPTY_RULES: tuple[str, ...] = ("zero", "skip")


# ----------------------------------------------------------------------------------------------
# host-side validation


def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _check_name(arg: str, value, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{arg} must be one of {allowed}, got {value!r}")
    return value


def validate_step_inputs(
    values: Mapping[str, object],
    step_ids,
    num_steps,
    *,
    max_steps: int | None = None,
) -> tuple[list[Array], Array, Array, int]:
    """Check per-token float arrays, ``step_ids`` and ``num_steps`` on the host.

    Args:
      values: ``{argument name: [B, T] float array}`` (all the same shape, all finite).
      step_ids: ``[B, T]`` int in ``[-1, num_steps[b])``, each step one contiguous run.
      num_steps: ``[B]`` int ``>= 0``.
      max_steps: static width ``S_max`` of the per-step outputs (``>= max(num_steps)``); default
        ``max(1, max(num_steps))``. Fix it to reuse one compiled function across batches.

    Returns:
      ``(float32 value arrays, int32 step_ids, int32 num_steps, S_max)``.

    Raises:
      ValueError naming the offending argument. Inside a trace (tracer inputs) only the static
      checks run and ``max_steps`` is required.
    """
    step_ids_a = step_ids if _is_tracer(step_ids) else np.asarray(step_ids)
    num_steps_a = num_steps if _is_tracer(num_steps) else np.asarray(num_steps)
    if step_ids_a.ndim != 2:
        raise ValueError(f"step_ids must have shape [B, T], got shape {tuple(step_ids_a.shape)}")
    bsz, tlen = step_ids_a.shape
    if not jnp.issubdtype(step_ids_a.dtype, jnp.integer):
        raise ValueError(f"step_ids must be an integer array, got dtype {step_ids_a.dtype}")
    if num_steps_a.shape != (bsz,):
        raise ValueError(f"num_steps must have shape [B]=({bsz},), got shape {tuple(num_steps_a.shape)}")
    if not jnp.issubdtype(num_steps_a.dtype, jnp.integer):
        raise ValueError(f"num_steps must be an integer array, got dtype {num_steps_a.dtype}")
    out = []
    for name, v in values.items():
        va = v if _is_tracer(v) else np.asarray(v)
        if va.shape != (bsz, tlen):
            raise ValueError(f"{name} must have the shape of step_ids {(bsz, tlen)}, got {tuple(va.shape)}")
        if not (jnp.issubdtype(va.dtype, jnp.floating) or jnp.issubdtype(va.dtype, jnp.integer)):
            raise ValueError(f"{name} must be a float array, got dtype {va.dtype}")
        if not _is_tracer(va) and va.size and not np.isfinite(va).all():
            bad = np.argwhere(~np.isfinite(va))[0]
            raise ValueError(
                f"{name} must be finite (no NaN/inf); found {va[tuple(bad)]} at [b={bad[0]}, t={bad[1]}]"
                " (pad non-action positions with 0.0)"
            )
        out.append(jnp.asarray(va, jnp.float32))
    if max_steps is not None and not (isinstance(max_steps, (int, np.integer)) and max_steps >= 1):
        raise ValueError(f"max_steps must be a positive int or None, got {max_steps!r}")
    traced = _is_tracer(step_ids_a) or _is_tracer(num_steps_a)
    if traced:
        if max_steps is None:
            raise ValueError("max_steps is required when step_ids/num_steps are traced (inside jit)")
        s_max = int(max_steps)
    else:
        if bsz and num_steps_a.min() < 0:
            raise ValueError(f"num_steps must be >= 0, got min {num_steps_a.min()}")
        n_max = int(num_steps_a.max()) if bsz else 0
        if max_steps is not None and max_steps < n_max:
            raise ValueError(f"max_steps={max_steps} is smaller than max(num_steps)={n_max}")
        s_max = int(max_steps) if max_steps is not None else max(1, n_max)
        _check_step_ids(step_ids_a, num_steps_a)
    return out, jnp.asarray(step_ids_a, jnp.int32), jnp.asarray(num_steps_a, jnp.int32), s_max


def _check_step_ids(sid: np.ndarray, num_steps: np.ndarray) -> None:
    if sid.size == 0:
        return
    if sid.min() < -1:
        b, t = np.argwhere(sid < -1)[0]
        raise ValueError(f"step_ids must be -1 or a step index >= 0, got {sid[b, t]} at [b={b}, t={t}]")
    over = sid >= num_steps[:, None]
    if over.any():
        b, t = np.argwhere(over)[0]
        raise ValueError(
            f"step_ids out of range: step_ids[{b}, {t}] = {sid[b, t]} but num_steps[{b}] = {num_steps[b]}"
        )
    prev = np.concatenate([np.full((sid.shape[0], 1), -2, sid.dtype), sid[:, :-1]], axis=1)
    starts = (sid >= 0) & (sid != prev)
    b_idx, t_idx = np.nonzero(starts)
    keys = b_idx.astype(np.int64) * (int(sid.max()) + 1) + sid[b_idx, t_idx]
    uniq, counts = np.unique(keys, return_counts=True)
    if (counts > 1).any():
        key = uniq[np.argmax(counts > 1)]
        b, s = divmod(int(key), int(sid.max()) + 1)
        raise ValueError(
            f"step_ids must group each step's tokens in one contiguous run; step {s} of trajectory {b} "
            "appears in several runs"
        )


def _check_beta(beta) -> None:
    if _is_tracer(beta):
        return
    b = np.asarray(beta)
    if b.shape != () or not np.isfinite(b):
        raise ValueError(f"beta must be a finite scalar, got {beta!r}")


# ----------------------------------------------------------------------------------------------
# jitted kernels


def _segments(step_ids: Array, s_max: int) -> tuple[Array, int]:
    """Flat segment id ``b * S + s`` per token (``B * S`` for non-action tokens) and the count."""
    bsz = step_ids.shape[0]
    seg = jnp.where(step_ids >= 0, jnp.arange(bsz, dtype=jnp.int32)[:, None] * s_max + step_ids, bsz * s_max)
    return seg.reshape(-1), bsz * s_max + 1


def token_aggregates(values: Array, step_ids: Array, s_max: int) -> tuple[dict[str, Array], Array]:
    """All token aggregations of ``values`` [B, T] within each step: ``{agg: [B, S]}`` and counts.

    ``mean_s = (1/|s|) sum_{t in s} v_t``, ``sum_s``, ``last_s = v_{max t in s}``, ``min_s``,
    ``max_s``; a step without tokens gets 0.0 for every aggregation. ``counts`` is ``|s|``.
    """
    bsz, tlen = values.shape
    seg, nseg = _segments(step_ids, s_max)
    v = jnp.where(step_ids >= 0, values, 0.0).reshape(-1)
    shape = (bsz, s_max)

    def seg_op(op, x):
        return op(x, seg, num_segments=nseg)[:-1].reshape(shape)

    count = seg_op(jax.ops.segment_sum, jnp.ones_like(seg, jnp.int32))
    nonempty = count > 0
    total = seg_op(jax.ops.segment_sum, v)
    pos = jnp.broadcast_to(jnp.arange(tlen, dtype=jnp.int32), (bsz, tlen)).reshape(-1)
    last_pos = jnp.clip(seg_op(jax.ops.segment_max, pos), 0, tlen - 1)
    last = jnp.take_along_axis(values, last_pos, axis=1)
    aggs = {
        "mean": total / jnp.maximum(count, 1),
        "sum": total,
        "last": last,
        "min": seg_op(jax.ops.segment_min, v),
        "max": seg_op(jax.ops.segment_max, v),
    }
    return {k: jnp.where(nonempty, a, 0.0) for k, a in aggs.items()}, count


def step_aggregates(step_values: Array, include: Array) -> dict[str, Array]:
    """All step aggregations over the included steps: ``{agg: [...]}`` for ``step_values`` [..., S].

    With ``I`` the included steps (``n = |I|``): ``mean = (1/n) sum_I A_s``, ``sum``,
    ``last = A_{max I}``, ``min``, ``max``, ``bottom10 = (1/k) sum of the k smallest A_s with
    k = max(1, ceil(n / 10))``. Every aggregation is 0.0 when ``n = 0``.
    """
    include = jnp.broadcast_to(include, step_values.shape)
    s_max = step_values.shape[-1]
    n = jnp.sum(include, axis=-1)
    has = n > 0
    v0 = jnp.where(include, step_values, 0.0)
    total = jnp.sum(v0, axis=-1)
    last_idx = s_max - 1 - jnp.argmax(include[..., ::-1], axis=-1)
    last = jnp.take_along_axis(v0, last_idx[..., None], axis=-1)[..., 0]
    ascending = jnp.sort(jnp.where(include, step_values, jnp.inf), axis=-1)
    k = jnp.maximum(1, (n + 9) // 10)
    csum = jnp.cumsum(jnp.where(jnp.isfinite(ascending), ascending, 0.0), axis=-1)
    bottom = jnp.take_along_axis(csum, (k - 1)[..., None], axis=-1)[..., 0] / k
    out = {
        "mean": total / jnp.maximum(n, 1),
        "sum": total,
        "last": last,
        "min": jnp.min(jnp.where(include, step_values, jnp.inf), axis=-1),
        "max": jnp.max(jnp.where(include, step_values, -jnp.inf), axis=-1),
        "bottom10": bottom,
    }
    return {k_: jnp.where(has, a, 0.0) for k_, a in out.items()}


def _include(count: Array, num_steps: Array, s_max: int, empty: str) -> Array:
    inc = jnp.arange(s_max, dtype=jnp.int32)[None, :] < num_steps[:, None]
    if empty == "skip":
        inc = inc & (count > 0)
    return inc


@functools.partial(jax.jit, static_argnames=("s_max", "order"))
def _advantage_steps(policy, reference, step_ids, num_steps, beta, *, s_max: int, order: str):
    """``{token_agg: [B, S]}`` step advantages (0 for empty/out-of-range steps) and the mask."""
    diff, count = token_aggregates(policy - reference, step_ids, s_max)
    if order == "per_model":
        pol, _ = token_aggregates(policy, step_ids, s_max)
        ref, _ = token_aggregates(reference, step_ids, s_max)
        for name in ("min", "max"):
            diff[name] = pol[name] - ref[name]
    mask = _include(count, num_steps, s_max, "zero")
    beta = jnp.asarray(beta, jnp.float32)
    return {k: jnp.where(mask, beta * v, 0.0) for k, v in diff.items()}, mask


@functools.partial(jax.jit, static_argnames=("s_max", "order"))
def _advantage_table(policy, reference, step_ids, num_steps, beta, *, s_max: int, order: str) -> Array:
    steps, mask = _advantage_steps(policy, reference, step_ids, num_steps, beta, s_max=s_max, order=order)
    stacked = jnp.stack([steps[t] for t in TOKEN_AGGS])  # [5, B, S]
    traj = step_aggregates(stacked, mask)
    return jnp.stack([traj[s] for s in STEP_AGGS], axis=1)  # [5, 6, B]


@functools.partial(jax.jit, static_argnames=("s_max", "empty"))
def _value_steps(values, step_ids, num_steps, *, s_max: int, empty: str):
    aggs, count = token_aggregates(values, step_ids, s_max)
    mask = _include(count, num_steps, s_max, empty)
    return {k: jnp.where(mask, v, 0.0) for k, v in aggs.items()}, mask


@functools.partial(jax.jit, static_argnames=("s_max", "empty"))
def _value_table(values, step_ids, num_steps, *, s_max: int, empty: str) -> Array:
    steps, mask = _value_steps(values, step_ids, num_steps, s_max=s_max, empty=empty)
    traj = step_aggregates(jnp.stack([steps[t] for t in TOKEN_AGGS]), mask)
    return jnp.stack([traj[s] for s in STEP_AGGS], axis=1)


def _table_to_dict(table: Array) -> dict[tuple[str, str], Array]:
    return {(t, s): table[i, j] for i, t in enumerate(TOKEN_AGGS) for j, s in enumerate(STEP_AGGS)}


# ----------------------------------------------------------------------------------------------
# public API: progress advantage


def trajectory_scores(
    policy_logprobs,
    reference_logprobs,
    step_ids,
    num_steps,
    *,
    token_agg: str = "mean",
    step_agg: str = "mean",
    beta: float = 1.0,
    order: str = "per_model",
    max_steps: int | None = None,
) -> Array:
    """Progress-advantage trajectory score ``step_agg_{s < n_b} A_s`` per trajectory, ``[B]``.

    ``A_s = beta * (token_agg log pi_theta - token_agg log pi_ref)`` over the tokens of step ``s``
    (``order="per_model"``, the authors' rule) or ``beta * token_agg (log pi_theta - log pi_ref)``
    (``order="token_level"``); an empty step has ``A_s = 0`` and still counts. See the module
    docstring for the inputs and conventions.
    """
    _check_name("token_agg", token_agg, TOKEN_AGGS)
    _check_name("step_agg", step_agg, STEP_AGGS)
    table = all_trajectory_scores(
        policy_logprobs, reference_logprobs, step_ids, num_steps, beta=beta, order=order, max_steps=max_steps
    )
    return table[(token_agg, step_agg)]


def all_trajectory_scores(
    policy_logprobs,
    reference_logprobs,
    step_ids,
    num_steps,
    *,
    beta: float = 1.0,
    order: str = "per_model",
    max_steps: int | None = None,
) -> dict[tuple[str, str], Array]:
    """All ``5 x 6`` progress-advantage scores in one jitted call: ``{(token_agg, step_agg): [B]}``.

    Same semantics as :func:`trajectory_scores`; the keys run over :data:`TOKEN_AGGS` x
    :data:`STEP_AGGS`. Use :func:`all_trajectory_scores_array` for the stacked ``[5, 6, B]`` array.
    """
    return _table_to_dict(
        all_trajectory_scores_array(
            policy_logprobs, reference_logprobs, step_ids, num_steps, beta=beta, order=order, max_steps=max_steps
        )
    )


def all_trajectory_scores_array(
    policy_logprobs,
    reference_logprobs,
    step_ids,
    num_steps,
    *,
    beta: float = 1.0,
    order: str = "per_model",
    max_steps: int | None = None,
) -> Array:
    """Stacked ``[len(TOKEN_AGGS), len(STEP_AGGS), B]`` version of :func:`all_trajectory_scores`."""
    _check_name("order", order, ORDERS)
    _check_beta(beta)
    (pol, ref), sid, ns, s_max = validate_step_inputs(
        {"policy_logprobs": policy_logprobs, "reference_logprobs": reference_logprobs},
        step_ids, num_steps, max_steps=max_steps,
    )
    return _advantage_table(pol, ref, sid, ns, jnp.float32(beta) if not _is_tracer(beta) else beta, s_max=s_max, order=order)


def step_advantages(
    policy_logprobs,
    reference_logprobs,
    step_ids,
    num_steps,
    *,
    token_agg: str = "mean",
    beta: float = 1.0,
    order: str = "per_model",
    max_steps: int | None = None,
) -> tuple[Array, Array]:
    """Per-step progress advantages ``A [B, S_max]`` and ``mask = s < num_steps[b]`` ``[B, S_max]``.

    ``A[b, s]`` as in :func:`trajectory_scores` (0.0 for empty steps and for ``s >= num_steps[b]``),
    ``S_max = max_steps`` or ``max(1, max(num_steps))``. For failure attribution see
    :func:`running_advantage` and :func:`k_step_advantage`.
    """
    _check_name("token_agg", token_agg, TOKEN_AGGS)
    _check_name("order", order, ORDERS)
    _check_beta(beta)
    (pol, ref), sid, ns, s_max = validate_step_inputs(
        {"policy_logprobs": policy_logprobs, "reference_logprobs": reference_logprobs},
        step_ids, num_steps, max_steps=max_steps,
    )
    steps, mask = _advantage_steps(
        pol, ref, sid, ns, jnp.float32(beta) if not _is_tracer(beta) else beta, s_max=s_max, order=order
    )
    return steps[token_agg], mask


@jax.jit
def running_advantage(advantages: Array, mask: Array) -> Array:
    """Running sum ``R[b, s] = sum_{j <= s} A[b, j]`` over the valid steps (0 where ``~mask``)."""
    a = jnp.where(mask, advantages, 0.0)
    return jnp.where(mask, jnp.cumsum(a, axis=-1), 0.0)


@functools.partial(jax.jit, static_argnames=("k",))
def _k_step(advantages, mask, k: int):
    a = jnp.where(mask, advantages, 0.0)
    s_max = a.shape[-1]
    csum = jnp.cumsum(a, axis=-1)
    hi = jnp.minimum(jnp.arange(s_max) + k - 1, s_max - 1)
    upper = jnp.take(csum, hi, axis=-1)
    return jnp.where(mask, upper - csum + a, 0.0)


def k_step_advantage(advantages: Array, mask: Array, k: int) -> Array:
    """Progress k-advantage ``K_k[b, s] = sum_{j=s}^{min(s+k, n_b) - 1} A[b, j]`` (0 where ``~mask``).

    The sum of the next ``k`` step advantages starting at step ``s``; in the toy MDP with
    ``A = Q* - V*`` (deterministic, undiscounted) it telescopes to
    ``sum_{j=s}^{s+k-1} r_j + V*(s_{s+k}) - V*(s_s)``. ``k = 1`` returns ``A`` itself.
    """
    if not (isinstance(k, (int, np.integer)) and k >= 1):
        raise ValueError(f"k must be a positive int, got {k!r}")
    advantages, mask = jnp.asarray(advantages), jnp.asarray(mask)
    if advantages.shape != mask.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal advantages shape {tuple(advantages.shape)}")
    return _k_step(advantages, mask, int(k))


# ----------------------------------------------------------------------------------------------
# public API: the same machinery for any per-token value (used by pa_jax.baselines)


def step_values(
    token_values,
    step_ids,
    num_steps,
    *,
    token_agg: str = "mean",
    empty: str = "zero",
    max_steps: int | None = None,
    name: str = "token_values",
) -> tuple[Array, Array]:
    """Per-step ``token_agg`` of any per-token value: ``([B, S_max], mask)``.

    ``empty="zero"``: empty steps are 0.0 and included in ``mask`` (the authors' rule for
    log-prob scores); ``empty="skip"``: they are excluded from ``mask`` (the authors' rule for
    certainty baselines). ``name`` is used in error messages.
    """
    _check_name("token_agg", token_agg, TOKEN_AGGS)
    _check_name("empty", empty, EMPTY_RULES)
    (vals,), sid, ns, s_max = validate_step_inputs({name: token_values}, step_ids, num_steps, max_steps=max_steps)
    steps, mask = _value_steps(vals, sid, ns, s_max=s_max, empty=empty)
    return steps[token_agg], mask


def aggregate_trajectory(
    token_values,
    step_ids,
    num_steps,
    *,
    token_agg: str = "mean",
    step_agg: str = "mean",
    empty: str = "zero",
    max_steps: int | None = None,
    name: str = "token_values",
) -> Array:
    """``step_agg`` over steps of the ``token_agg`` over each step's tokens of any value, ``[B]``.

    Empty steps: see :func:`step_values`. A trajectory with no included step scores 0.0.
    """
    _check_name("token_agg", token_agg, TOKEN_AGGS)
    _check_name("step_agg", step_agg, STEP_AGGS)
    return aggregate_all(token_values, step_ids, num_steps, empty=empty, max_steps=max_steps, name=name)[
        (token_agg, step_agg)
    ]


def aggregate_all(
    token_values, step_ids, num_steps, *, empty: str = "zero", max_steps: int | None = None, name: str = "token_values"
) -> dict[tuple[str, str], Array]:
    """All ``5 x 6`` aggregations of any per-token value in one jitted call."""
    _check_name("empty", empty, EMPTY_RULES)
    (vals,), sid, ns, s_max = validate_step_inputs({name: token_values}, step_ids, num_steps, max_steps=max_steps)
    return _table_to_dict(_value_table(vals, sid, ns, s_max=s_max, empty=empty))
