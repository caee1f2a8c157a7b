"""The scoring plan: which trajectories share a program call, in which row, at which length.

Pure host code (NumPy only, nothing runs on a device): a deterministic function of the rendered
trajectories and the options, so a resumed run forms exactly the batches of an uninterrupted one.

Shapes stay bounded: every row length is one of ``bucket_lengths`` (or, for rows run in chunks, a
multiple of ``attention_chunk``), every batch has a power-of-two number of rows (a multiple of the
mesh's ``data`` axis), and the number of scored positions per row is rounded up to a power of two,
so a dataset compiles a handful of programs.

* *Shared prefix*: when trajectories start with the same S tokens, S is computed once per model and
  their rows hold only the suffix; S stops before the first position whose hidden state is needed.
  The prefix is that of the largest group of trajectories sharing their first ``min_prefix`` tokens
  (all of them, typically; trajectories truncated to their last tokens start elsewhere and are
  planned as without a prefix, so that they do not cost the others theirs).
* *Packing*: trajectories outside the prefix group that are short are packed into one row
  (first-fit decreasing; segment ids keep them apart).
* *Chunking*: a single-trajectory row longer than ``attention_chunk`` (every row of the prefix
  group) runs chunk by chunk against one KV buffer size shared by the whole plan.

A scored position is a token index q >= 1 with ``step_ids[q] >= 0``: the hidden state at q - 1
predicts it. ``batch_arrays`` lays a batch out on the host: ids / mask / segments [R, T], and for
each row the positions q - 1 (in row coordinates) and targets of its trajectories, in order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pa_jax.data.render import Rendered

DEFAULT_BUCKETS = (128, 256, 512, 768, 1024, 2048, 3072, 4096, 5120, 6144, 8192, 10240, 12288, 16384, 20480,
                   24576, 32768)
# options that change how fast or in which threads the engine works, never a number it computes:
# left out of the cache key
# (shared_trunk: the trunk runs the same operations on the same tensors; its statistics equal the two-forward
# path's up to float rounding, tests/test_scoring_trunk.py, as max_batch_tokens' other batch shapes do)
RUNTIME_FIELDS = ("max_batch_tokens", "concurrent_models", "mmap_threshold", "shared_trunk")


@dataclass(frozen=True)
class ScoringOptions:
    """Options that change how (not what) the engine computes; all but ``RUNTIME_FIELDS`` enter the
    cache key because they can change the floating-point result.

    Three are settings of the run rather than of the plan: ``concurrent_models`` (the policy's and the
    reference's forwards in two host threads, see ``engine``), ``mmap_threshold``, the
    process-wide glibc allocator option the engine applies before it runs a batch
    (``programs.Engine.apply_allocator``; None leaves the allocator as it is), and ``shared_trunk``
    (embeddings and leading layers identical in both models run once per batch, see ``engine``).
    """

    top_k: int = 20
    bucket_lengths: tuple[int, ...] = DEFAULT_BUCKETS
    max_batch_tokens: int = 16384
    pack: bool = True
    pack_length: int = 1024  # rows of packed short trajectories hold at most this many tokens
    share_prefix: bool = True
    min_prefix: int = 64
    attention_chunk: int = 512  # rows longer than this (all rows with a shared prefix) run in chunks of this size
    vocab_chunk: int = 8192
    token_block: int = 512
    head_positions: int = 2048  # the head runs on blocks of this many scored positions, across batches
    concurrent_models: bool = True  # policy and reference forwards in two host threads
    mmap_threshold: int | None = 1 << 20  # glibc: allocations of at least this many bytes via mmap (None: leave)
    shared_trunk: bool = True  # identical leading layers of policy and reference run once (engine._resolve_trunk)

    def __post_init__(self):
        at_least = dict(top_k=0, max_batch_tokens=1, pack_length=1, min_prefix=0, attention_chunk=1, vocab_chunk=1,
                        token_block=1, head_positions=1)
        for name, low in at_least.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                raise ValueError(f"ScoringOptions.{name} must be an integer >= {low}, got {v!r}")
        if not isinstance(self.shared_trunk, (bool, np.bool_)):
            raise ValueError(f"ScoringOptions.shared_trunk must be a bool, got {self.shared_trunk!r}")


@dataclass(frozen=True)
class Batch:
    """One program call: rows of trajectory indices (several when packed), row length, positions."""

    index: int
    rows: tuple[tuple[int, ...], ...]
    length: int
    num_positions: int
    num_rows: int  # padded row count (a power of two, multiple of the data axis)
    chunked: bool = False  # single-trajectory rows run in chunks against a KV buffer
    buffer: int = 0  # chunked: KV buffer entries per row (the longest padded prefix + row of the plan, bucketed)
    prefixed: bool = False  # its rows hold only the suffix after the plan's shared prefix (chunked batches only)


@dataclass(frozen=True)
class Plan:
    prefix_length: int  # shared prefix tokens computed once (0 = none)
    batches: tuple[Batch, ...]
    prefix_members: tuple[int, ...] = ()  # trajectories whose rows start after the prefix (sorted)

    def batch_prefix(self, batch: Batch) -> int:
        """Tokens of each trajectory that the batch's rows leave out: the prefix, or 0."""
        return self.prefix_length if batch.prefixed else 0


def supports_packing(config: Any) -> bool:
    """Packing / prefix reuse need plain attention layers (no recurrent Gated DeltaNet state)."""
    return not any("linear" in str(t) for t in getattr(config, "layer_types", ()))


def scored_targets(r: Rendered) -> np.ndarray:
    """Token indices q >= 1 whose token is an action target (predicted from position q - 1)."""
    q = np.flatnonzero(r.step_ids >= 0)
    return q[q >= 1]


def prefix_group(rendered: Sequence[Rendered], min_prefix: int) -> tuple[int, tuple[int, ...]]:
    """(S, members): the trajectories that share a prefix, and its length S (``shared_prefix_length`` of
    the members), or (0, ()).

    Candidates are the groups of trajectories with equal first ``min_prefix`` tokens (at least two, each
    longer than that); the one whose prefix saves the most tokens, (members - 1) * S, wins (ties: the
    group of the lowest trajectory index). When every trajectory shares one prefix this is all of them
    and ``shared_prefix_length`` of all."""
    groups: dict[bytes, list[int]] = {}
    for i, r in enumerate(rendered):
        if len(r.input_ids) > min_prefix:
            groups.setdefault(np.ascontiguousarray(r.input_ids[:min_prefix], np.int64).tobytes(), []).append(i)
    best = (0, 0, ())
    for members in groups.values():
        if len(members) < 2:
            continue
        s = shared_prefix_length([rendered[i] for i in members], min_prefix)
        saved = (len(members) - 1) * s
        if saved > best[0]:  # groups come in order of their lowest index: the first wins ties
            best = (saved, s, tuple(members))
    return (best[1], best[2]) if best[1] else (0, ())


def shared_prefix_length(rendered: Sequence[Rendered], min_prefix: int) -> int:
    """S = min(longest common prefix, first scored target - 1) over all trajectories, or 0 if < min_prefix.

    Every hidden state needed (positions q - 1 for scored q) then lies at or after S."""
    if len(rendered) < 2:
        return 0
    ids = [r.input_ids for r in rendered]
    n = min(len(x) for x in ids)
    first = ids[0][:n]
    lcp = n
    for x in ids[1:]:
        neq = np.flatnonzero(x[:lcp] != first[:lcp])
        if neq.size:
            lcp = int(neq[0])
    firsts = [scored_targets(r) for r in rendered]
    need = min((int(f[0]) - 1 for f in firsts if f.size), default=lcp)
    s = min(lcp, need, n - 1)
    return s if s >= min_prefix else 0


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n - 1).bit_length())


def bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n; beyond the table, n rounded up to a multiple of the largest bucket."""
    for b in buckets:
        if n <= b:
            return b
    return int(-(-n // buckets[-1]) * buckets[-1])


def round_up(n: int, m: int) -> int:
    """n rounded up to a multiple of m."""
    return -(-n // m) * m


def make_plan(
    rendered: Sequence[Rendered], options: ScoringOptions, *, can_pack: bool, can_share_prefix: bool, data_parallel: int = 1
) -> Plan:
    """Deterministic batches.

    Rows are formed first: one trajectory per row for the prefix group (``prefix_group``) or without
    packing, else short trajectories packed first-fit decreasing into rows of at most ``pack_length``
    tokens. A single-trajectory row of an attention-only model that is longer than ``attention_chunk``
    (every row of the prefix group) is *chunked*: its length is rounded up to a multiple of the chunk, and
    batches hold ``data_parallel`` such rows of similar length, all of the prefix group or none
    (``Batch.prefixed``); all chunked batches share one KV buffer size, the longest (padded prefix +) row
    rounded up to a bucket. Other rows are rounded up to a
    bucket and batched up to ``max_batch_tokens`` tokens, a power-of-two number of rows.
    """
    share = options.share_prefix and can_share_prefix
    prefix, members = prefix_group(rendered, options.min_prefix) if share else (0, ())
    member = set(members)
    c = options.attention_chunk
    pre_pad = round_up(prefix, c)
    lengths = [len(r) - (prefix if i in member else 0) for i, r in enumerate(rendered)]
    npos = [len(scored_targets(r)) for r in rendered]
    order = sorted(range(len(rendered)), key=lambda i: (-lengths[i], i))
    others = [i for i in order if i not in member]  # the prefix group: one trajectory per row
    rows: list[list[int]] = []
    if options.pack and can_pack:
        cap_len = min(options.pack_length, c) if can_share_prefix else options.pack_length
        fill: list[int] = []
        for i in others:
            if lengths[i] > cap_len // 2:
                rows.append([i])
                fill.append(cap_len + 1)
                continue
            for j, f in enumerate(fill):
                if f + lengths[i] <= cap_len:
                    rows[j].append(i)
                    fill[j] += lengths[i]
                    break
            else:
                rows.append([i])
                fill.append(lengths[i])
    else:
        rows = [[i] for i in others]
    rows = [[i] for i in order if i in member] + rows

    def is_chunked(row):
        return can_share_prefix and len(row) == 1 and (row[0] in member or lengths[row[0]] > c)

    chunked_rows = sorted((r for r in rows if is_chunked(r)), key=lambda r: (-lengths[r[0]], r[0]))
    plain = sorted(((bucket(sum(lengths[i] for i in row), options.bucket_lengths), row) for row in rows
                    if not is_chunked(row)), key=lambda x: (-x[0], x[1][0]))
    batches: list[Batch] = []

    def npos_of(group):
        return max(16, pow2(max(max(sum(npos[i] for i in row) for row in group), 1)))

    # chunked rows of the prefix group first, then the others; a batch never mixes the two
    groups = []
    for in_group in (True, False):
        part = [r for r in chunked_rows if (r[0] in member) == in_group]
        groups += [(tuple(tuple(r) for r in part[k:k + data_parallel]), in_group)
                   for k in range(0, len(part), data_parallel)]
    glens = [round_up(max(lengths[r[0]] for r in group), c) for group, _ in groups]
    # one KV buffer size for every chunked batch (that of the longest): one compiled step program per
    # model architecture; the blocked attention visits only the filled blocks, so shorter rows pay nothing
    buffer = max((bucket((pre_pad if pre else 0) + n, options.bucket_lengths) for (_, pre), n in zip(groups, glens)),
                 default=0)
    for (group, pre), length in zip(groups, glens):
        batches.append(Batch(len(batches), group, length, npos_of(group), data_parallel, True, buffer, pre))
    k = 0
    while k < len(plain):
        length = plain[k][0]
        per = max(1, options.max_batch_tokens // length)
        per = max(data_parallel, (1 << (per.bit_length() - 1)) // data_parallel * data_parallel)
        group = []
        while k < len(plain) and plain[k][0] == length and len(group) < per:
            group.append(tuple(plain[k][1]))
            k += 1
        nrows = min(per, max(data_parallel, pow2(len(group))))
        nrows = -(-nrows // data_parallel) * data_parallel
        batches.append(Batch(len(batches), tuple(group), length, npos_of(group), nrows))
    return Plan(prefix, tuple(batches), tuple(sorted(members)))


def batch_arrays(rendered: Sequence[Rendered], batch: Batch, prefix: int, pad_id: int):
    """Host arrays of one batch: ids, mask, segments [R, T]; positions, targets [R, N] (zero past each
    row's scored positions); and for each trajectory (row, slice into the row's positions).

    Trajectory i of a row starting at row offset ``off`` puts its suffix ``input_ids[prefix:]`` at
    ``off..off+L``; its scored targets q (suffix coordinates) are read at positions ``off + q - 1``."""
    R, T, N = batch.num_rows, batch.length, batch.num_positions
    ids = np.full((R, T), pad_id, np.int32)
    mask = np.zeros((R, T), np.int32)
    seg = np.zeros((R, T), np.int32)
    pos = np.zeros((R, N), np.int32)
    tgt = np.zeros((R, N), np.int32)
    where: dict[int, tuple[int, slice]] = {}
    for r, row in enumerate(batch.rows):
        off, n = 0, 0
        for s, i in enumerate(row):
            x = rendered[i].input_ids[prefix:]
            L = len(x)
            ids[r, off:off + L] = x
            mask[r, off:off + L] = 1
            seg[r, off:off + L] = s + 1
            q = scored_targets(rendered[i]) - prefix  # targets in suffix coordinates (>= 1)
            m = len(q)
            pos[r, n:n + m] = off + q - 1
            tgt[r, n:n + m] = x[q]
            where[i] = (r, slice(n, n + m))
            off += L
            n += m
    return ids, mask, seg, pos, tgt, where
