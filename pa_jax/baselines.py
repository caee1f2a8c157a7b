"""Policy-only (and reference-only) confidence baselines from the same per-token statistics.

Every function takes per-token values aligned with ``step_ids [B, T]`` (``-1`` = not a scored
action token) and ``num_steps [B]`` (see :mod:`pa_jax.advantage`), typically fields of
:class:`pa_jax.head.HeadStats` computed at the action tokens, and returns one score per trajectory
``[B]`` oriented so that **higher = more confident / better**. Step and trajectory aggregation
reuse :func:`pa_jax.advantage.aggregate_all` (token_agg in ``TOKEN_AGGS``, step_agg in
``STEP_AGGS``).

Empty (truncated) action steps, following the authors' released code
(deeplearning-wisc/progress-advantage, ``pa/scoring.py``): the log-prob scores count them as 0.0
(``score_trajectory_progress_advantage`` with ``reference=None``), the certainty baselines skip
them (``score_trajectory_self_certainty``: "the top-K mean is undefined when a span has no
tokens"). Token-level baselines (Self-Certainty, DeepConf) pool the scored tokens and have no
empty-step question.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from pa_jax.advantage import (
    STEP_AGGS,
    TOKEN_AGGS,
    _check_name,
    _is_tracer,
    aggregate_all,
    step_aggregates,
    validate_step_inputs,
)
from pa_jax.head import HeadStats

Array = jax.Array

DEEPCONF_WINDOW = 2048
DEEPCONF_TAIL = 2048
DEEPCONF_VARIANTS: tuple[str, ...] = ("mean", "tail", "bottom10", "lowest_group")


def _check_aggs(token_agg: str, step_agg: str) -> None:
    _check_name("token_agg", token_agg, TOKEN_AGGS)
    _check_name("step_agg", step_agg, STEP_AGGS)


def _select(table: Mapping[tuple[str, str], Array], token_agg: str, step_agg: str) -> Array:
    _check_aggs(token_agg, step_agg)
    return table[(token_agg, step_agg)]


# ----------------------------------------------------------------------------------------------
# log-prob baselines (empty steps count as 0.0)


def policy_logprob_scores(
    policy_logprobs, step_ids, num_steps, *, token_agg: str = "mean", step_agg: str = "mean",
    max_steps: int | None = None,
) -> Array:
    """Policy log-prob: ``step_agg_{s < n_b} token_agg_{t in s} log pi_theta(a_t | s_t)``.

    Empty steps count as 0.0 (the authors' progress-advantage scorer without a reference).
    """
    return _logprob_scores(policy_logprobs, step_ids, num_steps, token_agg, step_agg, max_steps, "policy_logprobs")


def reference_logprob_scores(
    reference_logprobs, step_ids, num_steps, *, token_agg: str = "mean", step_agg: str = "mean",
    max_steps: int | None = None,
) -> Array:
    """Reference log-prob: ``step_agg_{s < n_b} token_agg_{t in s} log pi_ref(a_t | s_t)`` (empty = 0.0)."""
    return _logprob_scores(reference_logprobs, step_ids, num_steps, token_agg, step_agg, max_steps,
                           "reference_logprobs")


def _logprob_scores(logprobs, step_ids, num_steps, token_agg, step_agg, max_steps, name) -> Array:
    """Shared body of the log-prob scores: empty steps count as 0.0; ``name`` is used in errors."""
    _check_aggs(token_agg, step_agg)
    return aggregate_all(logprobs, step_ids, num_steps, empty="zero", max_steps=max_steps,
                         name=name)[(token_agg, step_agg)]


# ----------------------------------------------------------------------------------------------
# certainty baselines (empty steps skipped)


def negative_entropy_scores(
    entropy, step_ids, num_steps, *, token_agg: str = "mean", step_agg: str = "mean",
    max_steps: int | None = None,
) -> Array:
    """Predictive entropy as a confidence: ``step_agg_s token_agg_{t in s} (-H_t)``.

    ``H_t = -sum_v p_t(v) log p_t(v)`` over the full vocabulary (``HeadStats.entropy``); the sign
    is flipped so that higher = more confident (``min`` then picks the most uncertain token).
    Empty steps are skipped.
    """
    _check_aggs(token_agg, step_agg)
    neg = _neg(entropy, "entropy")
    return aggregate_all(neg, step_ids, num_steps, empty="skip", max_steps=max_steps,
                         name="entropy")[(token_agg, step_agg)]


def self_certainty_token(mean_logprob: Array, vocab_size: int) -> Array:
    """Per-token Self-Certainty (Kang et al. 2025): ``KL(U || p_t)`` with ``U`` uniform over ``V``.

    ``KL(U || p) = sum_v (1/V) log((1/V) / p_v) = -log V - (1/V) sum_v log p_v``
    ``           = -log V - mean_logprob``   (``HeadStats.mean_logprob``); ``>= 0``, 0 iff ``p = U``.
    """
    return -math.log(vocab_size) - jnp.asarray(mean_logprob, jnp.float32)


def self_certainty_scores(
    mean_logprob, vocab_size: int, step_ids, num_steps, *, token_agg: str | None = None,
    step_agg: str | None = None, max_steps: int | None = None,
) -> Array:
    """Self-Certainty (Kang et al. 2025, "Scalable Best-of-N Selection via Self-Certainty").

    Default (``token_agg = step_agg = None``), the paper's definition, pooled over the ``N`` scored
    tokens of the trajectory::

        SC = (1/N) sum_t KL(U || p_t) = -(1/(N V)) sum_t sum_v log(V p_t(v))
           = (1/N) sum_t (-log V - mean_logprob_t)

    With ``token_agg`` and ``step_agg`` given, the per-token ``KL(U || p_t)`` goes through the
    step machinery instead (empty steps skipped). A trajectory with no scored token scores 0.0.
    """
    if not (isinstance(vocab_size, (int, np.integer)) and vocab_size >= 1):
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    (vals,), sid, ns, s_max = validate_step_inputs({"mean_logprob": mean_logprob}, step_ids, num_steps,
                                                  max_steps=max_steps)
    tok = self_certainty_token(vals, int(vocab_size))
    if token_agg is None and step_agg is None:
        return _pooled_mean(tok, sid)
    return _select(aggregate_all(tok, sid, ns, empty="skip", max_steps=s_max, name="mean_logprob"),
                   token_agg or "mean", step_agg or "mean")


def topk_mean_logprob_token(topk_logprobs: Array, k: int | None = None) -> Array:
    """``(1/k) sum_{j <= k} log p_t(v_(j))``: mean of the ``k`` largest log-probs (``[B, T]``)."""
    x = jnp.asarray(topk_logprobs, jnp.float32)
    if k is not None:
        x = x[..., :k]
    return jnp.mean(x, axis=-1)


def topk_mean_logprob_scores(
    topk_logprobs, step_ids, num_steps, *, token_agg: str = "mean", step_agg: str = "mean",
    k: int | None = None, max_steps: int | None = None,
) -> Array:
    """The authors' released "self_certainty": aggregated top-k mean log-prob (empty steps skipped).

    Token value ``m_t = (1/k) sum_{j<=k} log p_t(v_(j))`` (``k = 20`` in their code,
    ``LogprobScorer(top_k=20)``), then ``step_agg_s token_agg_{t in s} m_t`` over the non-empty
    action steps (``pa/scoring.py::score_trajectory_self_certainty``). Note ``m_t = -C_t`` of
    DeepConf and it is *not* Kang et al.'s Self-Certainty (:func:`self_certainty_scores`).
    Their "DeepConf" (``score_trajectory_deepconf``) is this score with ``step_agg="last"``
    (variant ``tail``) or ``"bottom10"`` (variant ``b10``): see :func:`authors_deepconf_scores`.
    """
    tok = _topk_token(topk_logprobs, step_ids, k)
    return _select(aggregate_all(tok, step_ids, num_steps, empty="skip", max_steps=max_steps,
                                 name="topk_logprobs"), token_agg, step_agg)


def authors_deepconf_scores(
    topk_logprobs, step_ids, num_steps, *, variant: str = "tail", token_agg: str = "mean",
    k: int | None = None, max_steps: int | None = None,
) -> Array:
    """The authors' "DeepConf": :func:`topk_mean_logprob_scores` with step_agg ``last`` (``tail``)
    or ``bottom10`` (``bottom10``/``b10``), as in their ``score_trajectory_deepconf``."""
    step_agg = {"tail": "last", "bottom10": "bottom10", "b10": "bottom10"}.get(variant)
    if step_agg is None:
        raise ValueError(f"variant must be one of ('tail', 'bottom10', 'b10'), got {variant!r}")
    return topk_mean_logprob_scores(topk_logprobs, step_ids, num_steps, token_agg=token_agg,
                                    step_agg=step_agg, k=k, max_steps=max_steps)


# ----------------------------------------------------------------------------------------------
# DeepConf (Fu et al. 2025, "Deep Think with Confidence"): token-level, pooled over scored tokens


def deepconf_token_confidence(topk_logprobs: Array, k: int | None = None) -> Array:
    """DeepConf token confidence ``C_t = -(1/k) sum_{j<=k} log p_t(v_(j))`` over the top-k tokens."""
    return -topk_mean_logprob_token(topk_logprobs, k)


def deepconf_scores(
    topk_logprobs, step_ids, num_steps, *, window: int = DEEPCONF_WINDOW, tail: int = DEEPCONF_TAIL,
    k: int | None = None,
) -> dict[str, Array]:
    """DeepConf trace confidences (Fu et al. 2025) over the ``N`` scored tokens of each trajectory.

    With ``C_t`` the token confidence (:func:`deepconf_token_confidence`) of the scored tokens
    ``t = 1..N`` in order (non-action tokens removed), ``w = min(window, N)``:

    * ``mean``:          ``(1/N) sum_t C_t`` (average trace confidence)
    * ``tail``:          ``(1/m) sum_{t > N - m} C_t`` with ``m = min(tail, N)``
    * group confidence   ``G_i = (1/w) sum_{t=i-w+1}^{i} C_t`` for ``i = w..N`` (sliding windows
      of ``w`` tokens, stride 1; one group when ``N <= window``)
    * ``bottom10``:      mean of the ``max(1, ceil(n_G / 10))`` smallest ``G_i``
    * ``lowest_group``:  ``min_i G_i``

    Higher = more confident. A trajectory with no scored token gets 0.0. Returns
    ``{variant: [B]}`` for the variants in :data:`DEEPCONF_VARIANTS`.
    """
    for name, v in (("window", window), ("tail", tail)):
        if not (isinstance(v, (int, np.integer)) and v >= 1):
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    conf = -_topk_token(topk_logprobs, step_ids, k)
    traced = _is_tracer(step_ids) or _is_tracer(num_steps)  # then only static checks (max_steps unused)
    (conf,), sid, _, _ = validate_step_inputs({"topk_logprobs": conf}, step_ids, num_steps,
                                              max_steps=1 if traced else None)
    return _deepconf(conf, sid, window=int(window), tail=int(tail))


@functools.partial(jax.jit, static_argnames=("window", "tail"))
def _deepconf(conf: Array, step_ids: Array, *, window: int, tail: int) -> dict[str, Array]:
    bsz, tlen = conf.shape
    scored = step_ids >= 0
    n = jnp.sum(scored, axis=-1)
    order = jnp.argsort(~scored, axis=-1, stable=True)  # scored tokens first, in order
    idx = jnp.arange(tlen)
    valid = idx[None, :] < n[:, None]
    c = jnp.where(valid, jnp.take_along_axis(conf, order, axis=-1), 0.0)
    mu = jnp.sum(c, axis=-1) / jnp.maximum(n, 1)
    x = jnp.where(valid, c - mu[:, None], 0.0)  # centred: cumulative sums stay small
    cs = jnp.concatenate([jnp.zeros((bsz, 1), jnp.float32), jnp.cumsum(x, axis=-1)], axis=-1)  # [B, T+1]

    def prefix(i):
        return jnp.take_along_axis(cs, i[:, None] if i.ndim == 1 else i, axis=-1)

    m = jnp.minimum(tail, n)
    tail_conf = mu + (prefix(n)[:, 0] - prefix(n - m)[:, 0]) / jnp.maximum(m, 1)
    w = jnp.minimum(window, n)
    ends = jnp.broadcast_to(jnp.arange(tlen + 1), (bsz, tlen + 1))
    starts = jnp.clip(ends - w[:, None], 0, tlen)
    groups = mu[:, None] + (prefix(ends) - prefix(starts)) / jnp.maximum(w, 1)[:, None]
    in_group = (ends >= w[:, None]) & (ends <= n[:, None]) & (n[:, None] > 0)
    g = step_aggregates(groups, in_group)
    has = n > 0
    return {
        "mean": jnp.where(has, mu, 0.0),
        "tail": jnp.where(has, tail_conf, 0.0),
        "bottom10": g["bottom10"],
        "lowest_group": g["min"],
    }


@jax.jit
def _pooled_mean(values: Array, step_ids: Array) -> Array:
    """``(1/N) sum_{t: step_ids_t >= 0} values_t`` per row (0.0 when ``N = 0``)."""
    scored = step_ids >= 0
    n = jnp.sum(scored, axis=-1)
    return jnp.where(n > 0, jnp.sum(jnp.where(scored, values, 0.0), axis=-1) / jnp.maximum(n, 1), 0.0)


def _neg(x, name: str):
    if _is_tracer(x):
        return -x
    a = np.asarray(x)
    if not (jnp.issubdtype(a.dtype, jnp.floating)):
        raise ValueError(f"{name} must be a float array, got dtype {a.dtype}")
    return -a


def _topk_token(topk_logprobs, step_ids, k: int | None) -> Array:
    x = topk_logprobs if _is_tracer(topk_logprobs) else np.asarray(topk_logprobs)
    sid_shape = tuple(np.shape(step_ids))
    if x.ndim != 3 or tuple(x.shape[:2]) != sid_shape:
        raise ValueError(f"topk_logprobs must have shape [B, T, k] with [B, T] = {sid_shape}, got {tuple(x.shape)}")
    if x.shape[-1] == 0:
        raise ValueError("topk_logprobs has k = 0 columns (compute head statistics with top_k >= 1)")
    if k is not None and not (isinstance(k, (int, np.integer)) and 1 <= k <= x.shape[-1]):
        raise ValueError(f"k must be an int in [1, {x.shape[-1]}] (the top_k of topk_logprobs), got {k!r}")
    return topk_mean_logprob_token(x, k)


# ----------------------------------------------------------------------------------------------
# what each baseline takes, and everything at once


@dataclasses.dataclass(frozen=True)
class Baseline:
    """A baseline's signature: whose statistics it reads and which aggregations it takes.

    * ``model``: ``"policy"`` or ``"reference"`` (whose :class:`~pa_jax.head.HeadStats` it reads);
    * ``reads``: the HeadStats fields it reads (nothing else of the HeadStats is touched);
    * ``token_agg`` / ``step_agg``: whether it takes a token / step aggregation. Both: one score per
      (token_agg, step_agg) in ``TOKEN_AGGS x STEP_AGGS``; token only: its step aggregation is fixed
      (the authors' DeepConf: ``last`` or ``bottom10``); neither: pooled over the scored tokens.
    """

    name: str
    model: str
    reads: tuple[str, ...]
    token_agg: bool
    step_agg: bool

    def key(self, token_agg: str, step_agg: str) -> tuple[str, ...]:
        """The aggregations of ``(token_agg, step_agg)`` this baseline takes: its key in
        :func:`baseline_tables` (``(token_agg, step_agg)``, ``(token_agg,)`` or ``()``)."""
        _check_aggs(token_agg, step_agg)
        return (token_agg, step_agg)[: self.token_agg + self.step_agg]

    def label(self, token_agg: str, step_agg: str) -> str:
        """``name``, ``name/token_agg`` or ``name/token_agg/step_agg``: one label per distinct score."""
        return "/".join((self.name, *self.key(token_agg, step_agg)))


BASELINES: tuple[Baseline, ...] = (
    Baseline("policy_logprob", "policy", ("target_logprob",), token_agg=True, step_agg=True),
    Baseline("negative_entropy", "policy", ("entropy",), token_agg=True, step_agg=True),
    Baseline("self_certainty", "policy", ("mean_logprob",), token_agg=False, step_agg=False),
    Baseline("topk_mean_logprob", "policy", ("topk_logprobs",), token_agg=True, step_agg=True),
    Baseline("authors_deepconf_tail", "policy", ("topk_logprobs",), token_agg=True, step_agg=False),
    Baseline("authors_deepconf_bottom10", "policy", ("topk_logprobs",), token_agg=True, step_agg=False),
    Baseline("reference_logprob", "reference", ("target_logprob",), token_agg=True, step_agg=True),
    *(Baseline(f"deepconf_{v}", "policy", ("topk_logprobs",), token_agg=False, step_agg=False)
      for v in sorted(DEEPCONF_VARIANTS)),  # sorted: the order of the jitted dict, as listed before
)
"""Every baseline of :func:`baseline_tables`, in the order their scores are listed."""

_AUTHORS_DEEPCONF_STEP = {"authors_deepconf_tail": "last", "authors_deepconf_bottom10": "bottom10"}


def baseline_tables(
    policy: HeadStats,
    step_ids,
    num_steps,
    *,
    vocab_size: int,
    reference: HeadStats | None = None,
    window: int = DEEPCONF_WINDOW,
    tail: int = DEEPCONF_TAIL,
    max_steps: int | None = None,
) -> dict[str, dict[tuple[str, ...], Array]]:
    """Every baseline of :data:`BASELINES`, each computed once: ``{name: {key: [B]}}`` with ``key`` as
    :meth:`Baseline.key` (all ``5 x 6`` aggregations, the 5 token aggregations, or ``()`` for a pooled
    score). ``reference_logprob`` is present only when ``reference`` is given. Only the fields named in a
    baseline's ``reads`` are touched, so the others may be None."""
    kw = dict(max_steps=max_steps)
    out: dict[str, dict[tuple[str, ...], Array]] = {
        "policy_logprob": aggregate_all(policy.target_logprob, step_ids, num_steps, empty="zero",
                                        name="policy_logprobs", **kw),
        "negative_entropy": aggregate_all(_neg(policy.entropy, "entropy"), step_ids, num_steps, empty="skip",
                                          name="entropy", **kw),
        "self_certainty": {(): self_certainty_scores(policy.mean_logprob, vocab_size, step_ids, num_steps, **kw)},
    }
    topk = aggregate_all(_topk_token(policy.topk_logprobs, step_ids, None), step_ids, num_steps, empty="skip",
                         name="topk_logprobs", **kw)
    out["topk_mean_logprob"] = topk
    for name, step_agg in _AUTHORS_DEEPCONF_STEP.items():
        out[name] = {(t,): topk[(t, step_agg)] for t in TOKEN_AGGS}
    if reference is not None:
        out["reference_logprob"] = aggregate_all(reference.target_logprob, step_ids, num_steps, empty="zero",
                                                 name="reference_logprobs", **kw)
    for name, v in deepconf_scores(policy.topk_logprobs, step_ids, num_steps, window=window, tail=tail).items():
        out[f"deepconf_{name}"] = {(): v}
    return out


def all_baseline_scores(
    policy: HeadStats,
    step_ids,
    num_steps,
    *,
    vocab_size: int,
    reference: HeadStats | None = None,
    token_agg: str = "mean",
    step_agg: str = "mean",
    window: int = DEEPCONF_WINDOW,
    tail: int = DEEPCONF_TAIL,
    max_steps: int | None = None,
) -> dict[str, Array]:
    """Every baseline for one (token_agg, step_agg) choice: ``{name: [B]}`` (higher = more confident).

    Keys: ``policy_logprob``, ``reference_logprob`` (if ``reference`` is given),
    ``negative_entropy``, ``self_certainty`` (Kang et al., pooled), ``topk_mean_logprob`` (the
    authors' "self_certainty"), ``authors_deepconf_tail``, ``authors_deepconf_bottom10`` and
    ``deepconf_{mean,tail,bottom10,lowest_group}`` (Fu et al.). ``policy`` / ``reference`` are
    :class:`~pa_jax.head.HeadStats` with leading shape ``step_ids.shape``. For several aggregation
    choices call :func:`baseline_tables` once instead.
    """
    _check_aggs(token_agg, step_agg)
    tables = baseline_tables(policy, step_ids, num_steps, vocab_size=vocab_size, reference=reference,
                             window=window, tail=tail, max_steps=max_steps)
    return {b.name: tables[b.name][b.key(token_agg, step_agg)] for b in BASELINES if b.name in tables}
