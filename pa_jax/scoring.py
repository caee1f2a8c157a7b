"""The scoring engine: per-token statistics of a (policy, reference) pair on rendered trajectories.

Data flow: rendered trajectories (token ids + step ids) -> a deterministic *plan* of batches ->
for each batch, one jitted program runs both models on the same token rows, gathers the final
hidden states at the scored positions only (the positions that predict an action token) and
computes the fused head statistics there (``pa_jax.head``) -> only those per-token statistics
leave the device -> they are cached on disk per batch.

Shapes stay bounded: every row length is one of ``bucket_lengths`` and every batch has a
power-of-two number of rows (a multiple of the mesh's ``data`` axis, which splits the batch and the
head's blocks), and the number of scored positions per row is rounded up to a power of two, so a
dataset compiles a handful of programs.

Less work than a plain forward:

* *Long rows in chunks against a KV buffer*: a row longer than ``attention_chunk`` tokens (and every
  row when there is a shared prefix) runs ``attention_chunk`` tokens at a time; each chunk writes its
  keys/values into a preallocated per-row buffer in place (``model(..., cache=, cache_index=)``,
  donated) and attends to the buffer with causal block skipping. Every chunked batch of a run uses
  one buffer size (the longest row's), so one compiled step program serves every chunk, every row
  length, and both models when they share an architecture: one compilation per architecture, and rows
  padded only to a multiple of the chunk. The attention visits only the filled blocks of the buffer,
  and none for the padding queries of a row's last chunk. The final hidden states at the scored
  positions are collected chunk by chunk (no [R, T, D] array of a whole row).
* *Shared prefix*: when every trajectory starts with the same tokens (e.g. the ~1.3k-token airline
  policy), its keys/values are computed once per model and copied into every row's buffer, and every
  row holds only the suffix. The prefix stops before the first position whose hidden state is needed,
  so no statistic changes.
* *Packing*: without a shared prefix, short trajectories are packed into one row (segment ids:
  tokens attend only inside their own trajectory, positions restart) by first-fit decreasing.
  Models with Gated DeltaNet layers neither pack nor share prefixes.
* Head statistics (log-softmax over the full vocabulary, entropy, top-k, KL) only at the scored
  positions, in blocks of ``head_positions`` positions gathered across batches (`_HeadBlocks`): one
  compiled head program, and no padding but the last block's.
* *Both models at once*: the policy's and the reference's forwards are independent, so each runs in
  its own host thread (``concurrent_models``), and the threads take the batches in order without
  waiting for each other or for the head, which the calling thread runs on the batches already
  done; on a CPU this keeps both cores busy through the parts of a step that XLA runs on one thread
  (measured in ``experiments/bench_scoring.py``). Each model's programs and results are the same
  either way.
  Large host allocations are served by mmap (``set_mmap_threshold``) so freed buffers return to the
  OS; the peak resident memory then follows what is live.

Vocabularies: the tokenizers of policy and reference must be identical (`check_tokenizers`).
Their embedding matrices may still differ in size (e.g. one padded to a multiple of 64): each
model's distribution is then the softmax over its own full ``V`` rows (the extra rows are padding
ids no tokenizer emits, never a target, but they keep whatever mass the model gives them), and the
exact KL, which needs one support, is reported as NaN.

Cache and resume: statistics are written per batch to ``<cache>/<key>/batch_<i>.npz`` and an
``index.json`` (both atomically: temp file + ``os.replace``); ``key`` hashes the models, the
rendered tokens and every option that changes the numbers. A rerun skips the batches already on
disk. The plan is a pure function of the inputs and batches always hold the same rows, so an
interrupted-and-resumed run gives bit-identical statistics to an uninterrupted one.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pa_jax.data.render import Rendered

DEFAULT_BUCKETS = (128, 256, 512, 768, 1024, 2048, 3072, 4096, 5120, 6144, 8192, 10240, 12288, 16384, 20480,
                   24576, 32768)
STAT_FIELDS = ("policy_logprob", "policy_entropy", "policy_mean_logprob", "policy_topk",
               "reference_logprob", "reference_entropy", "kl")


# ---------------------------------------------------------------------------------------------- types
@dataclass(frozen=True)
class TrajectoryStats:
    """Statistics of one trajectory at its N scored target tokens (in token order).

    step_ids [N]: the action step of each token (0..num_steps-1); policy_logprob [N]: log pi(a_t|s_t);
    policy_entropy [N]; policy_mean_logprob [N]: (1/V) sum_v log pi_v; policy_topk [N, k]: the k largest
    log-probs; reference_logprob / reference_entropy [N] (None without a reference); kl [N]: exact
    KL(pi || pi_ref) (NaN when the vocabularies differ in size; None without a reference).
    """

    id: str
    num_steps: int
    step_ids: np.ndarray
    policy_logprob: np.ndarray
    policy_entropy: np.ndarray
    policy_mean_logprob: np.ndarray
    policy_topk: np.ndarray
    reference_logprob: np.ndarray | None = None
    reference_entropy: np.ndarray | None = None
    kl: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.step_ids.shape[0])


@dataclass(frozen=True)
class ScoringOptions:
    """Options that change how (not what) the engine computes; all but ``max_batch_tokens`` and
    ``concurrent_models`` and ``mmap_threshold`` enter the cache key because they can change the
    floating-point result."""

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

    def __post_init__(self):
        at_least = dict(top_k=0, max_batch_tokens=1, pack_length=1, min_prefix=0, attention_chunk=1, vocab_chunk=1,
                        token_block=1, head_positions=1)
        for name, low in at_least.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                raise ValueError(f"ScoringOptions.{name} must be an integer >= {low}, got {v!r}")


@dataclass(frozen=True)
class Batch:
    """One program call: rows of trajectory indices (several when packed), row length, positions."""

    index: int
    rows: tuple[tuple[int, ...], ...]
    length: int
    num_positions: int
    num_rows: int  # padded row count (a power of two, multiple of the data axis)
    chunked: bool = False  # single-trajectory rows run in chunks against a KV buffer (`_chunked_hidden_at`)
    buffer: int = 0  # chunked: KV buffer entries per row (the longest padded prefix + row of the plan, bucketed)


@dataclass(frozen=True)
class Plan:
    prefix_length: int  # shared prefix tokens computed once (0 = none)
    batches: tuple[Batch, ...]


# ---------------------------------------------------------------------------------------------- tokenizers
def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer of a checkpoint directory (tokenizer.json / tokenizer_config.json) or a .gguf file."""
    from transformers import AutoTokenizer

    p = pathlib.Path(path)
    try:
        if p.suffix == ".gguf":
            try:
                return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
            except ImportError:
                # transformers 5.23 resolves the config of most GGUF architectures through a loader that
                # requires torch (not a pa-jax dependency); the tokenizer itself is built from the GGUF
                # metadata without it. With torch present both give the same tokenizer (tested).
                from transformers import PreTrainedTokenizerFast

                return PreTrainedTokenizerFast.from_pretrained(str(p.parent), gguf_file=p.name)
        return AutoTokenizer.from_pretrained(str(p))
    except Exception as e:  # noqa: BLE001 - re-raised with the path
        raise ValueError(f"{p}: cannot load a tokenizer ({type(e).__name__}: {e})") from e


def _special(tok: Any) -> dict:
    return {k: getattr(tok, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")} | {
        "all_special_tokens": sorted(getattr(tok, "all_special_tokens", []) or [])}


def check_tokenizers(policy_tok: Any, reference_tok: Any, *, names: tuple[str, str] = ("policy", "reference")) -> None:
    """Refuse a pair whose tokenizers differ in vocabulary (token -> id) or special tokens: the log-ratio
    log pi(a|s) - log pi_ref(a|s) compares the probabilities of the same ids, so both must mean the same."""
    va, vb = policy_tok.get_vocab(), reference_tok.get_vocab()
    if va != vb:
        only_a = sorted(set(va.items()) - set(vb.items()), key=lambda x: x[1])[:3]
        only_b = sorted(set(vb.items()) - set(va.items()), key=lambda x: x[1])[:3]
        raise ValueError(
            f"{names[0]} and {names[1]} tokenizers differ ({len(va)} vs {len(vb)} entries; e.g. "
            f"{names[0]} has {only_a}, {names[1]} has {only_b}): the log-ratio is meaningless across vocabularies"
        )
    sa, sb = _special(policy_tok), _special(reference_tok)
    if sa != sb:
        diff = {k: (sa[k], sb[k]) for k in sa if sa[k] != sb[k]}
        raise ValueError(f"{names[0]} and {names[1]} tokenizers have different special tokens: {diff}")


# ---------------------------------------------------------------------------------------------- planning
def scored_targets(r: Rendered) -> np.ndarray:
    """Token indices q >= 1 whose token is an action target (predicted from position q - 1)."""
    q = np.flatnonzero(r.step_ids >= 0)
    return q[q >= 1]


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


def _pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def _bucket(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    return int(-(-n // buckets[-1]) * buckets[-1])  # beyond the table: multiples of the largest bucket


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def make_plan(
    rendered: Sequence[Rendered], options: ScoringOptions, *, can_pack: bool, can_share_prefix: bool, data_parallel: int = 1
) -> Plan:
    """Deterministic batches.

    Rows are formed first: with a shared prefix (or without packing) one trajectory per row, else short
    trajectories packed first-fit decreasing into rows of at most ``pack_length`` tokens. A single-trajectory
    row of an attention-only model that is longer than ``attention_chunk`` (every row, with a shared prefix)
    is *chunked*: its length is rounded up to a multiple of the chunk, and batches hold ``data_parallel``
    such rows of similar length; all chunked batches share one KV buffer size, the longest padded prefix +
    row rounded up to a bucket. Other rows are rounded up to a
    bucket and batched up to ``max_batch_tokens`` tokens, a power-of-two number of rows.
    """
    prefix = shared_prefix_length(rendered, options.min_prefix) if (options.share_prefix and can_share_prefix) else 0
    c = options.attention_chunk
    pre_pad = _round_up(prefix, c)
    lengths = [len(r) - prefix for r in rendered]
    npos = [len(scored_targets(r)) for r in rendered]
    order = sorted(range(len(rendered)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    if options.pack and can_pack and prefix == 0:
        cap_len = min(options.pack_length, c) if can_share_prefix else options.pack_length
        fill: list[int] = []
        for i in order:
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
        rows = [[i] for i in order]

    def is_chunked(row):
        return can_share_prefix and len(row) == 1 and (prefix > 0 or lengths[row[0]] > c)

    chunked_rows = sorted((r for r in rows if is_chunked(r)), key=lambda r: (-lengths[r[0]], r[0]))
    plain = sorted(((_bucket(sum(lengths[i] for i in row), options.bucket_lengths), row) for row in rows
                    if not is_chunked(row)), key=lambda x: (-x[0], x[1][0]))
    batches: list[Batch] = []

    def npos_of(group):
        return max(16, _pow2(max(max(sum(npos[i] for i in row) for row in group), 1)))

    groups = [tuple(tuple(r) for r in chunked_rows[k:k + data_parallel])
              for k in range(0, len(chunked_rows), data_parallel)]
    glens = [_round_up(max(lengths[r[0]] for r in group), c) for group in groups]
    # one KV buffer size for every chunked batch (that of the longest): one compiled step program per
    # model architecture; the blocked attention visits only the filled blocks, so shorter rows pay nothing
    buffer = max((_bucket(pre_pad + n, options.bucket_lengths) for n in glens), default=0)
    for group, length in zip(groups, glens):
        batches.append(Batch(len(batches), group, length, npos_of(group), data_parallel, True, buffer))
    k = 0
    while k < len(plain):
        length = plain[k][0]
        per = max(1, options.max_batch_tokens // length)
        per = max(data_parallel, (1 << (per.bit_length() - 1)) // data_parallel * data_parallel)
        group = []
        while k < len(plain) and plain[k][0] == length and len(group) < per:
            group.append(tuple(plain[k][1]))
            k += 1
        nrows = min(per, max(data_parallel, _pow2(len(group))))
        nrows = -(-nrows // data_parallel) * data_parallel
        batches.append(Batch(len(batches), tuple(group), length, npos_of(group), nrows))
    return Plan(prefix, tuple(batches))


def _batch_arrays(rendered: Sequence[Rendered], batch: Batch, prefix: int, pad_id: int):
    """Host arrays of one batch: ids, mask, segments [R, T]; positions, targets [R, N] (zero past each
    row's scored positions); and for each trajectory (row, slice into the row's positions)."""
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


# ---------------------------------------------------------------------------------------------- device program
def supports_packing(config: Any) -> bool:
    """Packing / prefix reuse need plain attention layers (no recurrent Gated DeltaNet state)."""
    return not any("linear" in str(t) for t in getattr(config, "layer_types", ()))


_PROGRAMS: dict = {}  # memo: settings -> jitted head / full-row programs (jit then caches by shape)
_PROGRAMS_LOCK = threading.Lock()  # the two models' threads ask for the same programs


def _memo(key, make):
    with _PROGRAMS_LOCK:
        if key not in _PROGRAMS:
            if len(_PROGRAMS) > 16:
                _PROGRAMS.clear()
            _PROGRAMS[key] = make()
        return _PROGRAMS[key]


def set_mmap_threshold(nbytes: int) -> bool:
    """Have glibc's malloc serve every allocation of at least ``nbytes`` with its own mmap
    (``mallopt(M_MMAP_THRESHOLD, nbytes)``), so that a freed KV buffer or temporary goes back to the
    OS at once instead of staying in the heap. Without it, glibc raises the threshold as large blocks
    are freed and keeps them, and the resident memory of a scoring run grows well past what is live
    (``experiments/bench_scoring.py`` on 10 airline trajectories, both models in threads: peak 3.34
    GiB by default, 2.00 GiB with 1 MiB). Returns False where there is no glibc (left alone then)."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    M_MMAP_THRESHOLD = -3  # malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, int(nbytes)))


_POOL: list = []
_LOOKAHEAD = 2  # batches whose forwards are queued beyond the one the calling thread waits for


def _model_pool() -> ThreadPoolExecutor:
    """The two threads that run the policy's and the reference's forwards: one pool for the process,
    created on first use, rather than new threads for every ``score_rendered`` call."""
    with _PROGRAMS_LOCK:
        if not _POOL:
            _POOL.append(ThreadPoolExecutor(2, thread_name_prefix="pa-jax-model"))
        return _POOL[0]


_DISPATCH_LOCK = threading.Lock()


def _dispatch(program, *args):
    """``program(*args)`` with one dispatch at a time. Dispatch traces and compiles a new shape and
    only enqueues the computation, so the two models' threads still execute at the same time, but
    each new shape is compiled once and no two compilations (the largest transient memory) overlap."""
    with _DISPATCH_LOCK:
        return program(*args)


def step_program(graphdef):
    """jit(state, ids [R, C], mask [R, C], cache, index) -> (hidden [R, C, D], cache): one chunk of rows,
    written into the KV buffer ``cache`` at ``index`` (donated: updated in place). Memoized per graphdef,
    so a policy and reference of one architecture share every compiled shape."""
    from flax import nnx

    def step(state, ids, mask, cache, index):
        return nnx.merge(graphdef, state)(ids, mask, cache=cache, cache_index=index)

    return _memo(("step", graphdef), lambda: jax.jit(step, donate_argnames=("cache",)))


def _empty_buffer(graphdef, state, rows: int, length: int, prefix=None, prefix_len: int = 0):
    """An all-invalid KV buffer [rows, length] for the model, holding ``prefix[:, :prefix_len]`` in front."""
    from flax import nnx

    from pa_jax.models.decoder import KVCache

    shapes = _memo(("kv_shapes", graphdef), lambda: jax.eval_shape(
        lambda s: nnx.merge(graphdef, s)(jnp.zeros((1, 1), jnp.int32), return_kv=True)[1], state))

    def make(pre):
        buf = KVCache.empty(shapes, rows, length)
        if pre is None:
            return buf
        put = lambda z, a: z.at[:, :prefix_len].set(jnp.broadcast_to(a[:, :prefix_len], (rows, prefix_len) + a.shape[2:]))  # noqa: E731
        return jax.tree.map(put, buf, pre)

    return _dispatch(_memo(("buffer", graphdef, rows, length, prefix_len, prefix is None), lambda: jax.jit(make)), prefix)


def _run_chunks(graphdef, state, ids: np.ndarray, mask: np.ndarray, cache, *, chunk: int, start: int,
                put: Callable = jnp.asarray, on_hidden: Callable | None = None):
    """Rows ``ids`` [R, T] (host arrays, T a multiple of ``chunk``) through the step program chunk by chunk,
    written into the KV buffer ``cache`` from entry ``start`` on; ``put`` moves each host chunk to the
    device (sliced on the host: no slicing program per row length), ``on_hidden(j, hidden)`` receives the
    hidden states of the chunk starting at row index j. Returns the updated cache."""
    step = step_program(graphdef)
    for j in range(0, ids.shape[1], chunk):
        h, cache = _dispatch(step, state, put(ids[:, j:j + chunk]), put(mask[:, j:j + chunk]), cache,
                             np.int32(start + j))
        if on_hidden is not None:
            on_hidden(j, h)
    return cache


def collect_program():
    """jit(acc [R, N, D], hidden [R, C, D], pos [R, N], start) -> acc with acc[r, n] = hidden[r, pos[r, n] - start]
    wherever that index lies in [0, C): the states at the scored positions, picked up chunk by chunk (one
    compiled shape per number of positions, whatever the row length; ``acc`` is donated)."""

    from pa_jax.head import gather_positions

    def collect(acc, hidden, pos, start):
        rel = pos - start
        inside = (rel >= 0) & (rel < hidden.shape[1])
        got = gather_positions(hidden, jnp.clip(rel, 0, hidden.shape[1] - 1))
        return jnp.where(inside[..., None], got, acc)

    return _memo(("collect",), lambda: jax.jit(collect, donate_argnums=0))


def _chunked_hidden_at(graphdef, state, ids: np.ndarray, mask: np.ndarray, pos, *, chunk: int, buffer: int,
                       put: Callable = jnp.asarray, prefix=None, prefix_len: int = 0):
    """Final hidden states [R, N, D] at positions ``pos`` [R, N] of rows ``ids`` [R, T] (host arrays, T a
    multiple of ``chunk``), run chunk by chunk against a KV buffer of ``buffer`` entries that starts with
    ``prefix[:, :prefix_len]`` (a shared prefix). No [R, T, D] array of the whole rows is formed."""
    cache = _empty_buffer(graphdef, state, ids.shape[0], buffer, prefix, prefix_len)
    collect = collect_program()
    acc = None  # [R, N, D], made with the first chunk's dtype and sharding

    def on_hidden(j, h):
        nonlocal acc
        if acc is None:
            acc = jnp.zeros(pos.shape + h.shape[2:], h.dtype, device=h.sharding)
        acc = _dispatch(collect, acc, h, pos, np.int32(j))

    cache = _run_chunks(graphdef, state, ids, mask, cache, chunk=chunk, start=prefix_len, put=put,
                        on_hidden=on_hidden)
    del cache
    return acc


def _prefix_buffer(graphdef, state, ids: np.ndarray, *, chunk: int, rows: int, buffer: int):
    """KV cache [rows, n] of the shared prefix ``ids`` padded to n = a multiple of ``chunk`` (computed in a
    buffer of ``buffer`` entries, the shape the rows' step program is compiled for, then cut to n)."""
    n = _round_up(len(ids), chunk)
    x = np.zeros((rows, n), np.int32)
    m = np.zeros((rows, n), np.int32)
    x[:, :len(ids)] = ids
    m[:, :len(ids)] = 1
    cache = _empty_buffer(graphdef, state, rows, buffer)
    cache = _run_chunks(graphdef, state, x, m, cache, chunk=chunk, start=0)
    return jax.tree.map(lambda a: a[:, :n], cache)  # keep only the prefix entries


def head_program(policy_cfg, reference_cfg, *, top_k: int, vocab_chunk: int, token_block: int, same_vocab: bool):
    """jit(ph [R, N, D], pw [V, D], rh, rw, tgt [R, N]) -> statistics of the hidden states at the scored
    positions (reference arguments None: policy only). Memoized per settings; `score_rendered` calls it
    on blocks of one shape ([data-parallel size, head_positions / that], see `_HeadBlocks`)."""
    from pa_jax.head import head_statistics, paired_head_statistics

    kw = dict(top_k=top_k, vocab_chunk=vocab_chunk, token_block=token_block)
    pcap = policy_cfg.final_logit_softcap
    rcap = None if reference_cfg is None else reference_cfg.final_logit_softcap

    def head(ph, pw, rh, rw, tgt):
        out = {}
        if rh is None:
            ps = head_statistics(ph, pw, tgt, softcap=pcap, **kw)
        else:
            if same_vocab:
                ps, rs, kl = paired_head_statistics(ph, pw, rh, rw, tgt, policy_softcap=pcap, reference_softcap=rcap, **kw)
            else:
                ps = head_statistics(ph, pw, tgt, softcap=pcap, **kw)
                rs = head_statistics(rh, rw, tgt, softcap=rcap, **kw)
                kl = jnp.full(tgt.shape, jnp.nan, jnp.float32)
            out.update(reference_logprob=rs.target_logprob, reference_entropy=rs.entropy, kl=kl)
        out.update(policy_logprob=ps.target_logprob, policy_entropy=ps.entropy,
                   policy_mean_logprob=ps.mean_logprob, policy_topk=ps.topk_logprobs)
        return out

    key = ("head", pcap, rcap, reference_cfg is None, top_k, vocab_chunk, token_block, same_vocab)
    return _memo(key, lambda: jax.jit(head))


def gather_program():
    """jit(hidden [R, T, D], pos [R, N]) -> hidden[r, pos[r, n]] [R, N, D]."""
    from pa_jax.head import gather_positions

    return _memo(("gather",), lambda: jax.jit(gather_positions))


def full_row_program(graphdef, use_seg: bool):
    """jit(state, ids, mask, seg) -> hidden [R, T, D]: one forward of whole (possibly packed) rows."""
    from flax import nnx

    def fwd(state, ids, mask, seg):
        return nnx.merge(graphdef, state)(ids, mask, segment_ids=seg if use_seg else None)

    return _memo(("full", graphdef, use_seg), lambda: jax.jit(fwd))


# ---------------------------------------------------------------------------------------------- cache
@functools.cache
def _umask() -> int:
    """The process umask, read once (reading it means setting it, so not on every write, where another
    thread could create a file in between)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Write a file atomically: ``write(f)`` fills a temp file (binary) in the same directory, which then
    replaces ``path`` (``os.replace``); on any error the temp file is removed and ``path`` is untouched."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to ``path`` atomically (temp file in the same directory + os.replace)."""
    data = json.dumps(obj, indent=2, default=_json_default).encode()
    atomic_write_bytes(pathlib.Path(path), lambda f: f.write(data))


def _json_default(o: Any):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, pathlib.Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def model_identity(path: str | os.PathLike | None) -> dict | None:
    """Path, and size + mtime of every file of a checkpoint (cheap identity for the cache key)."""
    if path is None:
        return None
    p = pathlib.Path(path).resolve()
    files = [p] if p.is_file() else sorted(x for x in p.iterdir() if x.is_file())
    return {"path": str(p), "files": [[x.name, x.stat().st_size, x.stat().st_mtime_ns] for x in files]}


def cache_key(rendered: Sequence[Rendered], meta: dict) -> str:
    """SHA-256 of the rendered tokens (ids + step ids) and ``meta`` (models, dtype, options)."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, default=_json_default).encode())
    for r in rendered:
        h.update(r.trajectory_id.encode())
        h.update(np.ascontiguousarray(r.input_ids, np.int32).tobytes())
        h.update(np.ascontiguousarray(r.step_ids, np.int32).tobytes())
    return h.hexdigest()[:24]


def _save_batch(path: pathlib.Path, stats: dict[int, dict[str, np.ndarray]]) -> None:
    arrays = {f"{i}/{k}": v for i, d in stats.items() for k, v in d.items()}
    atomic_write_bytes(path, lambda f: np.savez(f, **arrays))


def _load_batch(path: pathlib.Path) -> dict[int, dict[str, np.ndarray]]:
    out: dict[int, dict[str, np.ndarray]] = {}
    with np.load(path) as z:
        for name in z.files:
            i, k = name.split("/", 1)
            out.setdefault(int(i), {})[k] = z[name]
    return out


# ---------------------------------------------------------------------------------------------- driver
@dataclass
class ScoreResult:
    stats: list[TrajectoryStats]
    plan: Plan
    cache_dir: str | None
    batches_computed: int
    batches_from_cache: int
    tokens_computed: int
    seconds: float


class _HeadBlocks:
    """The head statistics of consecutive batches, computed in blocks of ``size`` scored positions.

    ``add`` takes a batch's hidden states at its scored positions ([R, N, D] per model, N a power of two,
    rows' positions first) and keeps only the real positions, in batch order; whenever ``size`` of them
    are waiting (or at the ``final`` batch, padded), one head call on [dp, size / dp] positions computes
    them. So the head compiles for one shape whatever the batches' position counts, and pays for no
    power-of-two padding. A position's statistics depend on its own hidden state only (the head works row
    by row), so batches grouped differently (a resumed run) give the same bits. ``finished`` yields each
    batch, in order, once all its positions are computed: (batch, tokens, {trajectory: statistics}).
    """

    def __init__(self, head, weights, size: int, dp: int, put):
        self.head, self.weights, self.put = head, weights, put
        self.size = _round_up(size, dp)
        self.dp = dp
        self.waiting: list = []  # (hidden [n, D] per model, targets [n]) not yet computed
        self.n_waiting = 0
        self.done: dict[str, list] = {}  # computed statistics, in position order, not yet handed out
        self.n_done = 0
        self.batches: list = []  # (batch, tokens, [(trajectory, n)], n) not yet handed out

    def add(self, batch, ntok: int, where, hidden, tgt, *, final: bool) -> None:
        hs = [np.asarray(h) for h in hidden]
        tg = np.asarray(tgt)
        items = sorted(where.items(), key=lambda x: (x[1][0], x[1][1].start))
        for i, (r, sl) in items:
            self.waiting.append(([h[r, sl] for h in hs], tg[r, sl]))
        counts = [(i, sl.stop - sl.start) for i, (_, sl) in items]
        total = sum(m for _, m in counts)
        self.n_waiting += total
        self.batches.append((batch, ntok, counts, total))
        while self.n_waiting >= self.size or (final and self.n_waiting):
            self._run()

    def _run(self) -> None:
        hs = [np.concatenate([w[0][k] for w in self.waiting]) for k in range(len(self.weights))]
        tg = np.concatenate([w[1] for w in self.waiting])
        n = min(self.size, len(tg))
        rows = (self.dp, self.size // self.dp)

        def block(x):
            pad = np.zeros((self.size - n,) + x.shape[1:], x.dtype)
            return self.put(np.concatenate([x[:n], pad]).reshape(rows + x.shape[1:]))

        args = [block(hs[0]), self.weights[0], None, None]
        if len(hs) > 1:
            args[2:] = [block(hs[1]), self.weights[1]]
        out = self.head(*args, block(tg))
        for key, v in out.items():
            v = np.asarray(v).reshape((self.size,) + v.shape[2:])[:n]
            self.done.setdefault(key, []).append(v)
        self.n_done += n
        rest = ([h[n:] for h in hs], tg[n:])
        self.waiting = [rest] if len(tg) > n else []
        self.n_waiting = len(tg) - n

    def finished(self):
        while self.batches and self.batches[0][3] <= self.n_done:
            batch, ntok, items, total = self.batches.pop(0)
            cat = {k: np.concatenate(v) for k, v in self.done.items()}
            out, at = {}, 0
            for i, m in items:
                out[i] = {k: v[at:at + m] for k, v in cat.items()}
                at += m
            self.done = {k: [v[total:]] for k, v in cat.items()}
            self.n_done -= total
            yield batch, ntok, out


def score_rendered(
    rendered: Sequence[Rendered],
    policy: tuple[Any, Any],
    reference: tuple[Any, Any] | None = None,
    *,
    options: ScoringOptions = ScoringOptions(),
    cache_dir: str | os.PathLike | None = None,
    cache_meta: dict | None = None,
    mesh: Any = None,
    pad_id: int = 0,
    progress: Callable[[Batch, int], None] | None = None,
) -> ScoreResult:
    """Per-token statistics of every rendered trajectory (in input order).

    policy / reference: ``(config, model)`` from ``pa_jax.models.load`` (reference None: policy only).
    cache_dir: where to cache / resume (a subdirectory per cache key); cache_meta: what identifies the
    models and settings in the key (e.g. ``model_identity`` of each path and the dtype).
    progress(batch, tokens): called after each batch (computed or loaded from cache).
    """
    if not rendered:
        raise ValueError("no trajectories to score")
    ids_seen = [r.trajectory_id for r in rendered]
    if len(set(ids_seen)) != len(ids_seen):
        raise ValueError("rendered trajectories must have unique ids")
    pcfg = policy[0]
    vp = int(policy[1].unembedding().shape[0])
    same_vocab = True
    if reference is not None:
        vr = int(reference[1].unembedding().shape[0])
        same_vocab = vp == vr
        vmin = min(vp, vr)
    else:
        vmin = vp
    for r in rendered:
        if r.input_ids.size and (r.input_ids.max() >= vmin or r.input_ids.min() < 0):
            raise ValueError(f"trajectory {r.trajectory_id}: token id {int(r.input_ids.max())} outside the "
                             f"model vocabulary [0, {vmin})")
    cfgs = [pcfg] + ([reference[0]] if reference is not None else [])
    can = all(supports_packing(c) for c in cfgs)
    dp = 1
    if mesh is not None:
        dp = int(dict(zip(mesh.axis_names, mesh.devices.shape)).get("data", 1))
    plan = make_plan(rendered, options, can_pack=can, can_share_prefix=can, data_parallel=dp)

    cdir = None
    index: dict = {}
    if cache_dir is not None:
        meta = {"options": {k: v for k, v in dataclasses.asdict(options).items()
                            if k not in ("max_batch_tokens", "concurrent_models", "mmap_threshold")},
                "prefix": plan.prefix_length, "reference": reference is not None, **(cache_meta or {})}
        key = cache_key(rendered, meta)
        cdir = pathlib.Path(cache_dir) / key
        idx_file = cdir / "index.json"
        if idx_file.exists():
            index = json.loads(idx_file.read_text())
            if index.get("num_batches") != len(plan.batches):
                index = {}
        if not index:
            index = {"key": key, "meta": meta, "num_batches": len(plan.batches), "done": {},
                     "trajectory_ids": ids_seen}
            atomic_write_json(idx_file, index)

    t0 = time.perf_counter()
    results: dict[int, dict[str, np.ndarray]] = {}
    todo = []
    from_cache = 0
    for b in plan.batches:
        f = None if cdir is None else index["done"].get(str(b.index))
        if f is not None and (cdir / f).exists():
            results.update(_load_batch(cdir / f))
            from_cache += 1
            if progress:
                progress(b, 0)
        else:
            todo.append(b)

    computed = tokens = 0
    if todo:
        from flax import nnx

        use_seg = plan.prefix_length == 0 and options.pack and can
        head = head_program(pcfg, None if reference is None else reference[0], top_k=options.top_k,
                            vocab_chunk=options.vocab_chunk, token_block=options.token_block, same_vocab=same_vocab)
        models = [policy[1]] + ([] if reference is None else [reference[1]])
        graphdefs, states = zip(*(nnx.split(m) for m in models))
        weights = [m.unembedding() for m in models]
        chunk = options.attention_chunk
        prefixes = [None] * len(models)
        chunked = [b for b in todo if b.chunked]
        gather = gather_program()
        pool = _model_pool() if options.concurrent_models and len(models) > 1 else None
        if options.mmap_threshold is not None:
            set_mmap_threshold(options.mmap_threshold)

        def per_model(fn):  # [fn(k) for each model k], each in its own thread with ``pool``
            if pool is None:
                return [fn(k) for k in range(len(models))]
            return list(pool.map(lambda k: jax.block_until_ready(fn(k)), range(len(models))))

        if plan.prefix_length and chunked:  # computed once per model, in the plan's one buffer shape
            pre_ids = rendered[0].input_ids[: plan.prefix_length]
            prefixes = per_model(lambda k: _prefix_buffer(graphdefs[k], states[k], pre_ids, chunk=chunk,
                                                          rows=chunked[0].num_rows, buffer=chunked[0].buffer))
        sharding = None
        if mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec as P

            sharding = NamedSharding(mesh, P("data", None))

        def put(x):
            return jax.device_put(x, sharding) if sharding is not None else jnp.asarray(x)

        def launch(b):
            """Host arrays of batch b, and its hidden states at the scored positions: per model, a future
            (the pool's threads run the batches' forwards in order, each as soon as a thread is free: no
            wait for the other model or for the head of the previous batch) or, without a pool, a thunk."""
            ids_h, mask_h, seg, pos, tgt, where = _batch_arrays(rendered, b, plan.prefix_length, pad_id)
            pos = put(pos)  # the targets stay on the host until the head's blocks are formed
            ntok = int(mask_h.sum()) + plan.prefix_length * sum(len(row) for row in b.rows)
            rows = None if b.chunked else (put(ids_h), put(mask_h), put(seg))  # chunked: moved chunk by chunk

            def hidden_of(k):
                g, st, pre = graphdefs[k], states[k], prefixes[k]
                if b.chunked:
                    return _chunked_hidden_at(g, st, ids_h, mask_h, pos, chunk=chunk, buffer=b.buffer, put=put,
                                              prefix=pre, prefix_len=plan.prefix_length if pre is not None else 0)
                h = _dispatch(full_row_program(g, use_seg), st, *rows)
                return _dispatch(gather, h, pos)

            if pool is None:
                hidden = [functools.partial(hidden_of, k) for k in range(len(models))]
            else:  # block_until_ready: a thread holds one batch's buffers at a time
                hidden = [pool.submit(lambda k=k: jax.block_until_ready(hidden_of(k))) for k in range(len(models))]
            return tgt, ntok, where, hidden

        # batches launched ahead of the one being finished: enough to keep both threads busy while the
        # calling thread waits, without holding every batch's arrays and futures at once
        launched: collections.deque = collections.deque()
        upcoming = iter(todo)

        def top_up():
            while len(launched) < _LOOKAHEAD + 1 and (nb := next(upcoming, None)) is not None:
                launched.append((nb, launch(nb)))

        heads = _HeadBlocks(head, weights, options.head_positions, dp, put)
        try:
            top_up()
            while launched:
                b, (tgt, ntok, where, hidden) = launched.popleft()
                top_up()
                hidden = [h.result() if pool is not None else h() for h in hidden]
                heads.add(b, ntok, where, hidden, tgt, final=b is todo[-1])
                del hidden
                for b_done, ntok_done, batch_out in heads.finished():
                    batch_stats = {}
                    for i, d in batch_out.items():
                        d["step_ids"] = rendered[i].step_ids[scored_targets(rendered[i])].astype(np.int32)
                        batch_stats[i] = d
                    results.update(batch_stats)
                    computed += 1
                    tokens += ntok_done
                    if cdir is not None:
                        name = f"batch_{b_done.index:05d}.npz"
                        _save_batch(cdir / name, batch_stats)
                        index["done"][str(b_done.index)] = name
                        atomic_write_json(cdir / "index.json", index)
                    if progress:
                        progress(b_done, ntok_done)
        finally:  # after an error or an interrupt, forwards not yet started are not run
            if pool is not None:
                for _, (*_, hidden) in launched:
                    for h in hidden:
                        h.cancel()

    stats = []
    for i, r in enumerate(rendered):
        d = results[i]
        stats.append(TrajectoryStats(
            id=r.trajectory_id, num_steps=r.num_steps, step_ids=d["step_ids"],
            policy_logprob=d["policy_logprob"], policy_entropy=d["policy_entropy"],
            policy_mean_logprob=d["policy_mean_logprob"], policy_topk=d["policy_topk"],
            reference_logprob=d.get("reference_logprob"), reference_entropy=d.get("reference_entropy"),
            kl=d.get("kl"),
        ))
    return ScoreResult(stats, plan, None if cdir is None else str(cdir), computed, from_cache, tokens,
                       time.perf_counter() - t0)


def dense(stats: Sequence[TrajectoryStats], field: str, *, fill: float = 0.0) -> np.ndarray:
    """[B, N_max] array of one per-token field (padded with ``fill``); step ids pad with -1."""
    n = max((s.num_tokens for s in stats), default=0)
    n = max(n, 1)
    first = getattr(stats[0], field)
    if first is None:
        raise ValueError(f"field {field!r} is not available (no reference model?)")
    shape = (len(stats), n) + first.shape[1:]
    out = np.full(shape, -1 if field == "step_ids" else fill, first.dtype)
    for b, s in enumerate(stats):
        v = getattr(s, field)
        out[b, : v.shape[0]] = v
    return out
