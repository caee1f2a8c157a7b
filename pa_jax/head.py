"""Fused next-token head statistics: one pass over the vocabulary, never a [tokens, V] array.

For final hidden states ``h`` (``[..., D]``) and an unembedding ``W`` (``[V, D]``, the layout of
Hugging Face's ``lm_head.weight``) the logits are ``l = h @ W.T`` (soft-capped to
``cap * tanh(l / cap)`` when a cap is given) and ``log p_v = l_v - logsumexp(l)``. Per token we
return

* ``target_logprob = l_y - logsumexp(l)``
* ``logsumexp      = log sum_v exp(l_v)``
* ``entropy        = -sum_v p_v log p_v = logsumexp(l) - sum_v p_v l_v``
* ``topk_logprobs / topk_ids``: the ``k`` largest ``log p_v`` (descending; ties -> lower id first)
* ``mean_logprob   = (1/V) sum_v log p_v = (1/V) sum_v l_v - logsumexp(l)``

and, for a pair of models, the exact ``KL(p || q) = sum_v p_v (log p_v - log q_v)``.

How: the tokens are cut into blocks (``lax.map``) and, for each block, the vocabulary is streamed
in chunks of ``vocab_chunk`` rows of ``W`` (``lax.scan`` with ``dynamic_slice``, no copy of ``W``);
``V mod vocab_chunk`` leftover rows form one static tail chunk, so nothing is padded or masked and
no pad value can enter the top-k or the means. The live working set is ``[token_block,
vocab_chunk]``. The running state per token is (all float32)::

    m     running max of the logits
    s     sum_v exp(l_v - m)
    c     sum_v exp(l_v - m) (l_v - m)                -> entropy = log s - c / s
    t     sum_v l_v                                   -> mean_logprob = t / V - (m + log s)
    a     sum_v exp(lp_v - mp) ((lp_v - mp) - (lq_v - mq))   (paired only)
                                                      -> KL = a / s_p - log s_p + log s_q
    top-k running (value, id) pairs, merged with each chunk's own top-k

When ``m`` grows to ``m'`` the sums are rescaled: ``s <- s e^{m-m'}``,
``c <- e^{m-m'} (c + s (m - m'))`` and ``a <- e^{mp-mp'} (a + s_p ((mp-mp') - (mq-mq')))``.
Accumulation is float32 whatever the input dtype (bf16 hidden states / weights are multiplied with
float32 accumulation).

Statistics only at selected positions: every function accepts any leading shape (``[B, T, D]``
with targets ``[B, T]``, or gathered rows ``[N, D]`` with targets ``[N]``), and
:func:`head_statistics_at` gathers ``positions [B, N]`` out of ``[B, T, D]`` first, so callers pay
only for the tokens they score. Each distinct leading shape compiles once: pad ``N`` to a few
bucket sizes (padding rows with target 0 are harmless and can be dropped afterwards).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

DEFAULT_VOCAB_CHUNK = 8192
DEFAULT_TOKEN_BLOCK = 512
_NEG = float(np.finfo(np.float32).min)


class HeadStats(NamedTuple):
    """Per-target-token statistics of one model's next-token distribution (float32)."""

    target_logprob: Array  # [...]      log p(target)
    logsumexp: Array  # [...]           log sum_v exp(logit_v) (after soft-cap)
    entropy: Array  # [...]             -sum_v p_v log p_v
    topk_logprobs: Array  # [..., k]    descending
    topk_ids: Array  # [..., k] int32
    mean_logprob: Array  # [...]        (1/V) sum_v log p_v


# ----------------------------------------------------------------------------------------------
# host-side validation


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_model(name_h: str, hidden, name_w: str, unembedding, targets_shape) -> None:
    if hidden.ndim < 1:
        raise ValueError(f"{name_h} must have shape [..., D], got shape {tuple(hidden.shape)}")
    if unembedding.ndim != 2:
        raise ValueError(f"{name_w} must have shape [V, D], got shape {tuple(unembedding.shape)}")
    if unembedding.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{name_w} has D={unembedding.shape[1]} but {name_h} has D={hidden.shape[-1]} "
            f"(expected {name_w} in the lm_head.weight layout [V, D])"
        )
    if tuple(hidden.shape[:-1]) != tuple(targets_shape):
        raise ValueError(
            f"{name_h} leading shape {tuple(hidden.shape[:-1])} does not match targets shape "
            f"{tuple(targets_shape)}"
        )
    for name, x in ((name_h, hidden), (name_w, unembedding)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")


def _check_common(targets, vocab: int, top_k: int, vocab_chunk: int, token_block: int, softcaps) -> None:
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integer token ids, got dtype {targets.dtype}")
    if not (isinstance(top_k, (int, np.integer)) and top_k >= 0):
        raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    if not (isinstance(vocab_chunk, (int, np.integer)) and vocab_chunk >= 1):
        raise ValueError(f"vocab_chunk must be a positive int, got {vocab_chunk!r}")
    if not (isinstance(token_block, (int, np.integer)) and token_block >= 1):
        raise ValueError(f"token_block must be a positive int, got {token_block!r}")
    for name, cap in softcaps:
        if cap is not None and not (np.isfinite(cap) and cap > 0):
            raise ValueError(f"{name} must be None or a positive finite float, got {cap!r}")
    if _is_concrete(targets) and targets.size:
        t = np.asarray(targets)
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"targets must lie in [0, V={vocab}), got values in [{lo}, {hi}]")


# ----------------------------------------------------------------------------------------------
# the streaming kernel


class _Model(NamedTuple):
    hidden: Array  # [n, D] (one token block)
    weight: Array  # [V, D]
    softcap: float | None


def _logits(h: Array, w: Array, softcap: float | None, precision) -> Array:
    """``l = h @ w.T`` accumulated in float32, then ``cap * tanh(l / cap)``."""
    dt = jnp.promote_types(h.dtype, w.dtype)
    out = jnp.einsum(
        "nd,vd->nv", h.astype(dt), w.astype(dt), precision=precision, preferred_element_type=jnp.float32
    )
    if softcap is not None:
        out = softcap * jnp.tanh(out / softcap)
    return out


def _init_state(n: int, top_k: int, paired: bool):
    one = dict(
        m=jnp.full((n,), _NEG, jnp.float32),
        s=jnp.zeros((n,), jnp.float32),
        c=jnp.zeros((n,), jnp.float32),
        t=jnp.zeros((n,), jnp.float32),
        kv=jnp.full((n, top_k), -jnp.inf, jnp.float32),
        ki=jnp.full((n, top_k), -1, jnp.int32),
    )
    states = [one, dict(one)] if paired else [one]
    kl = jnp.zeros((n,), jnp.float32) if paired else None
    return states, kl


def _update(states, kl, logits_list, start, top_k: int):
    """Fold one vocabulary chunk (``logits_list[i]``: [n, C], ids ``start + arange(C)``) in."""
    new_states, shifts = [], []
    for st, lg in zip(states, logits_list):
        m_new = jnp.maximum(st["m"], jnp.max(lg, axis=-1))
        scale = jnp.exp(st["m"] - m_new)
        d = st["m"] - m_new
        centered = lg - m_new[:, None]
        e = jnp.exp(centered)
        ns = dict(
            m=m_new,
            s=scale * st["s"] + jnp.sum(e, axis=-1),
            c=scale * (st["c"] + st["s"] * d) + jnp.sum(e * centered, axis=-1),
            t=st["t"] + jnp.sum(lg, axis=-1),
        )
        if top_k:
            cv, ci = lax.top_k(lg, min(top_k, lg.shape[-1]))
            ci = ci.astype(jnp.int32) + start
            # running entries (lower ids) first so that lax.top_k keeps lower ids on ties
            mv, mi = lax.top_k(jnp.concatenate([st["kv"], cv], axis=-1), top_k)
            ns["kv"] = mv
            ns["ki"] = jnp.take_along_axis(jnp.concatenate([st["ki"], ci], axis=-1), mi, axis=-1)
        else:
            ns["kv"], ns["ki"] = st["kv"], st["ki"]
        new_states.append(ns)
        shifts.append((d, scale, centered, e))
    if kl is not None:
        (dp, scale_p, cp, ep), (dq, _, cq, _) = shifts
        kl = scale_p * (kl + states[0]["s"] * (dp - dq)) + jnp.sum(ep * (cp - cq), axis=-1)
    return new_states, kl


def _block_stats(models: tuple[_Model, ...], targets: Array, *, top_k, vocab_chunk, precision):
    """Statistics for one token block: ``targets`` [n]; returns (list of HeadStats, kl or None)."""
    n = targets.shape[0]
    vocab = models[0].weight.shape[0]
    chunk = min(vocab_chunk, vocab)
    n_full, tail = divmod(vocab, chunk)
    paired = len(models) == 2
    states, kl = _init_state(n, top_k, paired)

    def chunk_logits(start, size):
        return [
            _logits(md.hidden, lax.dynamic_slice_in_dim(md.weight, start, size, axis=0), md.softcap, precision)
            for md in models
        ]

    def body(carry, i):
        sts, k = carry
        start = i * chunk
        sts, k = _update(sts, k, chunk_logits(start, chunk), start, top_k)
        return (sts, k), None

    (states, kl), _ = lax.scan(body, (states, kl), jnp.arange(n_full, dtype=jnp.int32))
    if tail:
        start = n_full * chunk
        states, kl = _update(states, kl, chunk_logits(start, tail), jnp.int32(start), top_k)

    out = []
    for md, st in zip(models, states):
        lse = st["m"] + jnp.log(st["s"])
        w_y = jnp.take(md.weight, targets, axis=0)  # [n, D]
        dt = jnp.promote_types(md.hidden.dtype, md.weight.dtype)
        l_y = jnp.einsum(
            "nd,nd->n", md.hidden.astype(dt), w_y.astype(dt), precision=precision,
            preferred_element_type=jnp.float32,
        )
        if md.softcap is not None:
            l_y = md.softcap * jnp.tanh(l_y / md.softcap)
        out.append(
            HeadStats(
                target_logprob=l_y - lse,
                logsumexp=lse,
                entropy=jnp.log(st["s"]) - st["c"] / st["s"],
                topk_logprobs=st["kv"] - lse[:, None],
                topk_ids=st["ki"],
                mean_logprob=st["t"] / vocab - lse,
            )
        )
    if paired:
        kl = kl / states[0]["s"] - jnp.log(states[0]["s"]) + jnp.log(states[1]["s"])
        kl = jnp.maximum(kl, 0.0)
    return out, kl


@functools.partial(
    jax.jit, static_argnames=("softcaps", "top_k", "vocab_chunk", "token_block", "precision")
)
def _fused(hiddens, weights, targets, *, softcaps, top_k, vocab_chunk, token_block, precision):
    lead = targets.shape
    n = int(np.prod(lead)) if lead else 1
    flat_t = targets.reshape(n).astype(jnp.int32)
    flat_h = [h.reshape(n, h.shape[-1]) for h in hiddens]
    block = max(1, min(token_block, n))
    n_blocks = -(-n // block)
    pad = n_blocks * block - n
    if pad:
        flat_t = jnp.pad(flat_t, (0, pad))
        flat_h = [jnp.pad(h, ((0, pad), (0, 0))) for h in flat_h]
    bt = flat_t.reshape(n_blocks, block)
    bh = [h.reshape(n_blocks, block, h.shape[-1]) for h in flat_h]

    def one_block(args):
        hs, t = args
        models = tuple(_Model(h, w, c) for h, w, c in zip(hs, weights, softcaps))
        stats, kl = _block_stats(models, t, top_k=top_k, vocab_chunk=vocab_chunk, precision=precision)
        return stats, kl

    stats, kl = lax.map(one_block, (tuple(bh), bt))

    def unblock(x):
        x = x.reshape((n_blocks * block,) + x.shape[2:])[:n]
        return x.reshape(lead + x.shape[1:])

    stats = [HeadStats(*(unblock(f) for f in s)) for s in stats]
    return stats, (None if kl is None else unblock(kl))


def _precision(precision):
    if precision is None:
        return None
    if isinstance(precision, str):
        try:
            return lax.Precision[precision.upper()]
        except KeyError as e:
            raise ValueError(f"precision must be one of default/high/highest, got {precision!r}") from e
    return precision


# ----------------------------------------------------------------------------------------------
# public API


def head_statistics(
    hidden: Array,
    unembedding: Array,
    targets: Array,
    *,
    softcap: float | None = None,
    top_k: int = 20,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    token_block: int = DEFAULT_TOKEN_BLOCK,
    precision: str | lax.Precision | None = "highest",
) -> HeadStats:
    """Next-token statistics of ``softmax(softcap(hidden @ unembedding.T))`` at ``targets``.

    Args:
      hidden: final hidden states ``[..., D]`` (e.g. ``[B, T, D]`` or gathered rows ``[N, D]``);
        any float dtype (bf16 is multiplied with float32 accumulation).
      unembedding: ``[V, D]`` (HF ``lm_head.weight`` layout, or the tied embedding).
      targets: int token ids, shape ``hidden.shape[:-1]``, each in ``[0, V)``.
      softcap: final-logit soft-cap ``cap`` (``l -> cap * tanh(l / cap)``), or None.
      top_k: how many top log-probs/ids to keep; ``k = min(top_k, V)`` columns are returned.
      vocab_chunk: rows of ``unembedding`` per streamed chunk.
      token_block: tokens per block; the working set is ``[token_block, vocab_chunk]`` float32.
      precision: matmul precision (``"highest"`` keeps float32 inputs exact on GPU/TPU).

    Returns:
      :class:`HeadStats` with leading shape ``targets.shape`` (see the module docstring for the
      equations). Never materialises a ``[..., V]`` array.
    """
    hidden, unembedding, targets = jnp.asarray(hidden), jnp.asarray(unembedding), jnp.asarray(targets)
    _check_model("hidden", hidden, "unembedding", unembedding, targets.shape)
    _check_common(targets, unembedding.shape[0], top_k, vocab_chunk, token_block, [("softcap", softcap)])
    stats, _ = _fused(
        (hidden,), (unembedding,), targets,
        softcaps=(None if softcap is None else float(softcap),),
        top_k=min(int(top_k), unembedding.shape[0]), vocab_chunk=int(vocab_chunk), token_block=int(token_block),
        precision=_precision(precision),
    )
    return stats[0]


def paired_head_statistics(
    policy_hidden: Array,
    policy_unembedding: Array,
    reference_hidden: Array,
    reference_unembedding: Array,
    targets: Array,
    *,
    policy_softcap: float | None = None,
    reference_softcap: float | None = None,
    top_k: int = 20,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    token_block: int = DEFAULT_TOKEN_BLOCK,
    precision: str | lax.Precision | None = "highest",
) -> tuple[HeadStats, HeadStats, Array]:
    """Head statistics of the policy ``p`` and the reference ``q`` plus ``KL(p || q)``, one pass.

    ``KL(p || q) = sum_v p_v (log p_v - log q_v)`` over the full vocabulary (exact, streamed; see
    the module docstring for the running sums), clipped at 0 against float round-off. Both models
    must share the vocabulary ``V``; their widths ``D`` may differ. Arguments as in
    :func:`head_statistics`.

    Returns:
      ``(policy_stats, reference_stats, kl)`` with ``kl`` of shape ``targets.shape``.
    """
    arrs = [jnp.asarray(x) for x in (policy_hidden, policy_unembedding, reference_hidden, reference_unembedding, targets)]
    ph, pw, rh, rw, targets = arrs
    _check_model("policy_hidden", ph, "policy_unembedding", pw, targets.shape)
    _check_model("reference_hidden", rh, "reference_unembedding", rw, targets.shape)
    if pw.shape[0] != rw.shape[0]:
        raise ValueError(
            f"policy_unembedding has V={pw.shape[0]} but reference_unembedding has V={rw.shape[0]}; "
            "the two models must share a vocabulary"
        )
    _check_common(
        targets, pw.shape[0], top_k, vocab_chunk, token_block,
        [("policy_softcap", policy_softcap), ("reference_softcap", reference_softcap)],
    )
    caps = tuple(None if c is None else float(c) for c in (policy_softcap, reference_softcap))
    stats, kl = _fused(
        (ph, rh), (pw, rw), targets, softcaps=caps, top_k=min(int(top_k), pw.shape[0]), vocab_chunk=int(vocab_chunk),
        token_block=int(token_block), precision=_precision(precision),
    )
    return stats[0], stats[1], kl


def gather_positions(x: Array, positions: Array) -> Array:
    """``out[b, n] = x[b, positions[b, n]]`` for ``x`` ``[B, T, ...]`` and ``positions`` ``[B, N]``."""
    idx = positions.reshape(positions.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def head_statistics_at(
    hidden: Array,
    unembedding: Array,
    targets: Array,
    positions: Array,
    **kwargs,
) -> HeadStats:
    """:func:`head_statistics` only at ``positions`` ``[B, N]`` (e.g. the scored action tokens).

    ``hidden`` is ``[B, T, D]`` and ``targets`` ``[B, T]`` (the token predicted at each position);
    the result has leading shape ``[B, N]``: ``result[b, n]`` is the statistic of position
    ``positions[b, n]``. Pad ``positions`` with any valid index (e.g. 0) and mask afterwards.
    """
    hidden, targets, positions = jnp.asarray(hidden), jnp.asarray(targets), jnp.asarray(positions)
    _check_positions(hidden, targets, positions)
    return head_statistics(gather_positions(hidden, positions), unembedding, gather_positions(targets, positions), **kwargs)


def paired_head_statistics_at(
    policy_hidden: Array,
    policy_unembedding: Array,
    reference_hidden: Array,
    reference_unembedding: Array,
    targets: Array,
    positions: Array,
    **kwargs,
) -> tuple[HeadStats, HeadStats, Array]:
    """:func:`paired_head_statistics` only at ``positions`` ``[B, N]`` (see :func:`head_statistics_at`)."""
    ph, rh = jnp.asarray(policy_hidden), jnp.asarray(reference_hidden)
    targets, positions = jnp.asarray(targets), jnp.asarray(positions)
    _check_positions(ph, targets, positions)
    if rh.shape[:-1] != ph.shape[:-1]:
        raise ValueError(
            f"reference_hidden leading shape {tuple(rh.shape[:-1])} does not match policy_hidden "
            f"{tuple(ph.shape[:-1])}"
        )
    return paired_head_statistics(
        gather_positions(ph, positions), policy_unembedding, gather_positions(rh, positions),
        reference_unembedding, gather_positions(targets, positions), **kwargs,
    )


def _check_positions(hidden, targets, positions) -> None:
    if hidden.ndim != 3 or targets.shape != hidden.shape[:2]:
        raise ValueError(
            f"hidden must be [B, T, D] with targets [B, T]; got hidden {tuple(hidden.shape)}, "
            f"targets {tuple(targets.shape)}"
        )
    if positions.ndim != 2 or positions.shape[0] != hidden.shape[0]:
        raise ValueError(f"positions must be [B={hidden.shape[0]}, N], got shape {tuple(positions.shape)}")
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"positions must be integer, got dtype {positions.dtype}")
    if _is_concrete(positions) and positions.size:
        p = np.asarray(positions)
        if p.min() < 0 or p.max() >= hidden.shape[1]:
            raise ValueError(f"positions must lie in [0, T={hidden.shape[1]}), got [{p.min()}, {p.max()}]")
