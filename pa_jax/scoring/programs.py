"""The compiled programs of the scoring engine and what runs them, held in one ``Engine`` object.

An ``Engine`` owns:

* the memo of jitted programs (a model's chunk step, the KV buffer maker, the whole-row forward, the
  scored-position gather/collect and the head; the step and whole-row forward also for a range of
  layers, for a shared trunk), keyed by the settings each closes over (jit then caches by shape);
  least recently used programs are dropped past ``max_programs``;
* the shared-trunk runs (``trunk_chunked_hidden_at``, ``trunk_prefix_buffers``, ``trunk_full_rows_at``):
  layers [0, k) of two models with identical embeddings and first k layers once, then each model's
  layers [k, L) from that residual stream, each with its own KV buffer of its layers;
* the dispatch lock: one dispatch (trace, compile, enqueue) at a time, so each new shape compiles
  once and no two compilations (the largest transient memory) overlap, while the computations
  themselves still run at the same time;
* the two host threads that run the policy's and the reference's forwards (created on first use),
  behind one executor interface (``executor``): a ``ThreadExecutor`` or, for one thread, a
  ``SyncExecutor`` that runs each task in the calling thread when its result is asked for;
* ``lookahead``: how many batches' forwards may be queued beyond the one being finished;
* the allocator option (``apply_allocator``).

``score_rendered`` uses ``DEFAULT_ENGINE`` unless given one; an engine of your own is closed with
``close()`` (or ``with Engine() as e:``), which stops its threads.

Shapes: hidden [R, T, D] per row; positions / targets [R, N]; a KV buffer holds [R, buffer] entries
per layer (``pa_jax.models.decoder.KVCache``).
"""
from __future__ import annotations

import collections
import ctypes
import ctypes.util
import threading
from concurrent.futures import CancelledError, ThreadPoolExecutor
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pa_jax.head import gather_positions, head_statistics, paired_head_statistics
from pa_jax.models.decoder import KVCache
from pa_jax.scoring.plan import round_up


def set_mmap_threshold(nbytes: int) -> bool:
    """Have glibc's malloc serve every allocation of at least ``nbytes`` with its own mmap
    (``mallopt(M_MMAP_THRESHOLD, nbytes)``), so that a freed KV buffer or temporary goes back to the
    OS at once instead of staying in the heap. Without it, glibc raises the threshold as large blocks
    are freed and keeps them, and the resident memory of a scoring run grows well past what is live
    (``experiments/bench_scoring.py`` on 10 airline trajectories, both models in threads: peak 3.34
    GiB by default, 2.00 GiB with 1 MiB). Process-wide. Returns False where there is no glibc (left
    alone then)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    M_MMAP_THRESHOLD = -3  # malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, int(nbytes)))


# ---------------------------------------------------------------------------------------------- executors
class _Deferred:
    """A task of the ``SyncExecutor``: run in the calling thread by the first ``result()``."""

    def __init__(self, fn: Callable[[], Any]):
        self._fn: Callable[[], Any] | None = fn
        self._ran = self._cancelled = False
        self._value: Any = None

    def result(self) -> Any:
        if self._cancelled:
            raise CancelledError()
        if not self._ran:
            fn, self._fn = self._fn, None
            self._value = fn()
            self._ran = True
        return self._value

    def cancel(self) -> bool:
        """Drop a task not yet run (it never will be; ``result`` then raises ``CancelledError``, as a
        cancelled future does). False if it has run already."""
        if self._ran:
            return False
        self._fn, self._cancelled = None, True
        return True


class SyncExecutor:
    """The one-thread path: ``submit`` returns a handle whose ``result()`` runs the task then and there,
    so the tasks run in the order their results are asked for, one at a time."""

    def submit(self, fn: Callable[[], Any]) -> _Deferred:
        return _Deferred(fn)


class ThreadExecutor:
    """Tasks on the engine's model threads (FIFO); each task waits for its arrays to be computed
    (``block_until_ready``) before it ends, so a thread holds one task's buffers at a time."""

    def __init__(self, pool: ThreadPoolExecutor):
        self._pool = pool

    def submit(self, fn: Callable[[], Any]):
        return self._pool.submit(lambda: jax.block_until_ready(fn()))


# ---------------------------------------------------------------------------------------------- engine
class Engine:
    """Compiled programs (memo), the dispatch lock, the model threads and the allocator option."""

    def __init__(self, *, max_programs: int = 32, lookahead: int = 2, model_threads: int = 2):
        if max_programs < 1 or lookahead < 0 or model_threads < 1:
            raise ValueError(f"Engine: expected max_programs >= 1, lookahead >= 0, model_threads >= 1, got "
                             f"{max_programs}, {lookahead}, {model_threads}")
        self.max_programs = max_programs
        self.lookahead = lookahead  # batches whose forwards are queued beyond the one being finished
        self.model_threads = model_threads
        self.mmap_threshold: int | None = None  # the allocator option this engine applied last
        self._programs: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()  # the memo and the pool (the model threads ask for the same programs)
        self._dispatch_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._graphdefs: dict = {}  # graphdef -> token (equal graphdefs, one token: one hash per new object)
        self._graphdef_ids: dict[int, tuple[Any, int]] = {}  # id(graphdef) -> (graphdef, token)

    def graph_token(self, graphdef) -> int:
        """A small int standing for ``graphdef`` in program keys, the same for equal graphdefs (a policy and
        a reference of one architecture share compiled programs). Hashing an nnx GraphDef walks the whole
        module tree (about 2 ms for a 16-layer model), and a long row asks for its programs once per chunk:
        the object is hashed once, then found by its id (the object is kept, so its id is not reused)."""
        hit = self._graphdef_ids.get(id(graphdef))
        if hit is not None and hit[0] is graphdef:
            return hit[1]
        with self._lock:
            token = self._graphdefs.setdefault(graphdef, len(self._graphdefs))
            if len(self._graphdef_ids) >= 256:  # graphdef objects of earlier calls: let them go
                self._graphdef_ids.clear()
            self._graphdef_ids[id(graphdef)] = (graphdef, token)
            return token

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the model threads (after their running tasks) and drop the compiled programs."""
        with self._lock:
            pool, self._pool = self._pool, None
            self._programs.clear()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    # ----------------------------------------------------------------------------------- resources
    def apply_allocator(self, mmap_threshold: int | None) -> None:
        """Apply ``ScoringOptions.mmap_threshold`` (``set_mmap_threshold``; process-wide, so it is a
        named step of a run, taken before the first batch, and None leaves the allocator alone)."""
        if mmap_threshold is not None and mmap_threshold != self.mmap_threshold:
            set_mmap_threshold(mmap_threshold)
            self.mmap_threshold = mmap_threshold

    def executor(self, concurrent: bool) -> ThreadExecutor | SyncExecutor:
        """The model threads (created on first use, kept for later runs) or the calling thread."""
        if not concurrent:
            return SyncExecutor()
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.model_threads, thread_name_prefix="pa-jax-model")
            return ThreadExecutor(self._pool)

    def memo(self, key, make: Callable[[], Any]):
        """``make()`` once per ``key`` (thread-safe), least recently used dropped past ``max_programs``."""
        with self._lock:
            if key in self._programs:
                self._programs.move_to_end(key)
            else:
                self._programs[key] = make()
                while len(self._programs) > self.max_programs:
                    self._programs.popitem(last=False)
            return self._programs[key]

    def dispatch(self, program, *args):
        """``program(*args)`` with one dispatch at a time. Dispatch traces and compiles a new shape and
        only enqueues the computation, so the two models' threads still execute at the same time, but
        each new shape is compiled once and no two compilations (the largest transient memory) overlap."""
        with self._dispatch_lock:
            return program(*args)

    # ----------------------------------------------------------------------------------- programs
    def step_program(self, graphdef, layers: tuple[int, int] | None = None):
        """jit(state, ids [R, C], mask [R, C], cache, index, hidden=None) -> (hidden [R, C, D], cache): one chunk
        of rows, written into the KV buffer ``cache`` at ``index`` (donated: updated in place). ``layers``: run
        only layers [a, b) (``Decoder``'s ``layer_range``; ``hidden`` is then the residual stream after layer
        a - 1 when a > 0, and the cache holds layers [a, b) only). Memoized per graphdef and range, so a policy
        and reference of one architecture share every compiled shape."""

        def step(state, ids, mask, cache, index, hidden=None):
            return nnx.merge(graphdef, state)(ids, mask, cache=cache, cache_index=index, layer_range=layers,
                                              hidden_states=hidden)

        g = self.graph_token(graphdef)
        key = ("step", g) if layers is None else ("step", g, layers)
        return self.memo(key, lambda: jax.jit(step, donate_argnames=("cache",)))

    def empty_buffer(self, graphdef, state, rows: int, length: int, prefix=None, prefix_len: int = 0,
                     layers: tuple[int, int] | None = None):
        """An all-invalid KV buffer [rows, length] for the model (its layers [a, b) only with ``layers``),
        holding ``prefix[:, :prefix_len]`` in front."""
        g = self.graph_token(graphdef)
        full = self.memo(("kv_shapes", g), lambda: jax.eval_shape(
            lambda s: nnx.merge(graphdef, s)(jnp.zeros((1, 1), jnp.int32), return_kv=True)[1], state))
        a, b = (0, len(full.keys)) if layers is None else layers
        shapes = full._replace(keys=full.keys[a:b], values=full.values[a:b])

        def make(pre):
            buf = KVCache.empty(shapes, rows, length)
            if pre is None:
                return buf
            put = lambda z, a: z.at[:, :prefix_len].set(jnp.broadcast_to(a[:, :prefix_len], (rows, prefix_len) + a.shape[2:]))  # noqa: E731
            return jax.tree.map(put, buf, pre)

        return self.dispatch(self.memo(("buffer", g, rows, length, prefix_len, prefix is None, (a, b)),
                                       lambda: jax.jit(make)), prefix)

    def run_chunks(self, graphdef, state, ids: np.ndarray, mask: np.ndarray, cache, *, chunk: int, start: int,
                   put: Callable = jnp.asarray, on_hidden: Callable | None = None):
        """Rows ``ids`` [R, T] (host arrays, T a multiple of ``chunk``) through the step program chunk by chunk,
        written into the KV buffer ``cache`` from entry ``start`` on; ``put`` moves each host chunk to the
        device (sliced on the host: no slicing program per row length), ``on_hidden(j, hidden)`` receives the
        hidden states of the chunk starting at row index j. Returns the updated cache."""
        step = self.step_program(graphdef)
        for j in range(0, ids.shape[1], chunk):
            h, cache = self.dispatch(step, state, put(ids[:, j:j + chunk]), put(mask[:, j:j + chunk]), cache,
                                     np.int32(start + j))
            if on_hidden is not None:
                on_hidden(j, h)
        return cache

    def collect_program(self):
        """jit(acc [R, N, D], hidden [R, C, D], pos [R, N], start) -> acc with acc[r, n] = hidden[r, pos[r, n] - start]
        wherever that index lies in [0, C): the states at the scored positions, picked up chunk by chunk (one
        compiled shape per number of positions, whatever the row length; ``acc`` is donated)."""

        def collect(acc, hidden, pos, start):
            rel = pos - start
            inside = (rel >= 0) & (rel < hidden.shape[1])
            got = gather_positions(hidden, jnp.clip(rel, 0, hidden.shape[1] - 1))
            return jnp.where(inside[..., None], got, acc)

        return self.memo(("collect",), lambda: jax.jit(collect, donate_argnums=0))

    def chunked_hidden_at(self, graphdef, state, ids: np.ndarray, mask: np.ndarray, pos, *, chunk: int,
                          buffer: int, put: Callable = jnp.asarray, prefix=None, prefix_len: int = 0):
        """Final hidden states [R, N, D] at positions ``pos`` [R, N] of rows ``ids`` [R, T] (host arrays, T a
        multiple of ``chunk``), run chunk by chunk against a KV buffer of ``buffer`` entries that starts with
        ``prefix[:, :prefix_len]`` (a shared prefix). No [R, T, D] array of the whole rows is formed."""
        cache = self.empty_buffer(graphdef, state, ids.shape[0], buffer, prefix, prefix_len)
        collect = self.collect_program()
        acc = None  # [R, N, D], made with the first chunk's dtype and sharding

        def on_hidden(j, h):
            nonlocal acc
            if acc is None:
                acc = jnp.zeros(pos.shape + h.shape[2:], h.dtype, device=h.sharding)
            acc = self.dispatch(collect, acc, h, pos, np.int32(j))

        cache = self.run_chunks(graphdef, state, ids, mask, cache, chunk=chunk, start=prefix_len, put=put,
                                on_hidden=on_hidden)
        del cache
        return acc

    def prefix_buffer(self, graphdef, state, ids: np.ndarray, *, chunk: int, rows: int, buffer: int):
        """KV cache [rows, n] of the shared prefix ``ids`` padded to n = a multiple of ``chunk`` (computed in a
        buffer of ``buffer`` entries, the shape the rows' step program is compiled for, then cut to n)."""
        n = round_up(len(ids), chunk)
        x = np.zeros((rows, n), np.int32)
        m = np.zeros((rows, n), np.int32)
        x[:, :len(ids)] = ids
        m[:, :len(ids)] = 1
        cache = self.empty_buffer(graphdef, state, rows, buffer)
        cache = self.run_chunks(graphdef, state, x, m, cache, chunk=chunk, start=0)
        return jax.tree.map(lambda a: a[:, :n], cache)  # keep only the prefix entries

    def head_program(self, policy_cfg, reference_cfg, *, top_k: int, vocab_chunk: int, token_block: int,
                     same_vocab: bool):
        """jit(ph [R, N, D], pw [V, D], rh, rw, tgt [R, N]) -> statistics of the hidden states at the scored
        positions (reference arguments None: policy only). Memoized per settings; the engine calls it on
        blocks of one shape ([data-parallel size, head_positions / that], see ``engine.HeadBlocks``)."""
        kw = dict(top_k=top_k, vocab_chunk=vocab_chunk, token_block=token_block)
        pcap = policy_cfg.final_logit_softcap
        rcap = None if reference_cfg is None else reference_cfg.final_logit_softcap

        def head(ph, pw, rh, rw, tgt):
            out = {}
            if rh is None:
                ps = head_statistics(ph, pw, tgt, softcap=pcap, **kw)
            else:
                if same_vocab:
                    ps, rs, kl = paired_head_statistics(ph, pw, rh, rw, tgt, policy_softcap=pcap,
                                                        reference_softcap=rcap, **kw)
                else:
                    ps = head_statistics(ph, pw, tgt, softcap=pcap, **kw)
                    rs = head_statistics(rh, rw, tgt, softcap=rcap, **kw)
                    kl = jnp.full(tgt.shape, jnp.nan, jnp.float32)
                out.update(reference_logprob=rs.target_logprob, reference_entropy=rs.entropy, kl=kl)
            out.update(policy_logprob=ps.target_logprob, policy_entropy=ps.entropy,
                       policy_mean_logprob=ps.mean_logprob, policy_topk=ps.topk_logprobs)
            return out

        key = ("head", pcap, rcap, reference_cfg is None, top_k, vocab_chunk, token_block, same_vocab)
        return self.memo(key, lambda: jax.jit(head))

    def gather_program(self):
        """jit(hidden [R, T, D], pos [R, N]) -> hidden[r, pos[r, n]] [R, N, D]."""
        return self.memo(("gather",), lambda: jax.jit(gather_positions))

    def full_row_program(self, graphdef, use_seg: bool, layers: tuple[int, int] | None = None):
        """jit(state, ids, mask, seg, hidden=None) -> hidden [R, T, D]: one forward of whole (possibly packed)
        rows; with ``layers`` = (a, b) only layers [a, b) (``hidden``: the residual stream after layer a - 1)."""

        def fwd(state, ids, mask, seg, hidden=None):
            return nnx.merge(graphdef, state)(ids, mask, segment_ids=seg if use_seg else None, layer_range=layers,
                                              hidden_states=hidden)

        g = self.graph_token(graphdef)
        key = ("full", g, use_seg) if layers is None else ("full", g, use_seg, layers)
        return self.memo(key, lambda: jax.jit(fwd))

    # ----------------------------------------------------------------------------------- shared trunk
    def trunk_chunked_hidden_at(self, trunk, branches, ids: np.ndarray, mask: np.ndarray, pos, *, chunk: int,
                                buffer: int, put: Callable = jnp.asarray, prefixes=None, prefix_len: int = 0):
        """``chunked_hidden_at`` of several models that share their embeddings and first k layers: per chunk,
        the trunk ``trunk = (graphdef, state, k)`` runs layers [0, k) once (its own KV buffer of k layers), and
        each branch ``(graphdef, state, L)`` runs layers [k, L) + final norm from the trunk's residual stream (a
        buffer of L - k layers each). ``prefixes``: (trunk prefix cache, [branch prefix caches]) of a shared
        prefix (``trunk_prefix_buffers``), or None. Returns [R, N, D] per branch, in order."""
        g0, s0, k = trunk
        tstep = self.step_program(g0, (0, k))
        pre_t, pre_b = (None, [None] * len(branches)) if prefixes is None else prefixes
        tcache = self.empty_buffer(g0, s0, ids.shape[0], buffer, pre_t, prefix_len, layers=(0, k))
        bsteps, bcaches = [], []
        for (g, s, top), pre in zip(branches, pre_b):
            bsteps.append(self.step_program(g, (k, top)))
            bcaches.append(self.empty_buffer(g, s, ids.shape[0], buffer, pre, prefix_len, layers=(k, top)))
        collect = self.collect_program()
        accs = [None] * len(branches)
        for j in range(0, ids.shape[1], chunk):
            x, m, idx = put(ids[:, j:j + chunk]), put(mask[:, j:j + chunk]), np.int32(prefix_len + j)
            h, tcache = self.dispatch(tstep, s0, x, m, tcache, idx)
            for b, ((g, s, _), step) in enumerate(zip(branches, bsteps)):
                hb, bcaches[b] = self.dispatch(step, s, x, m, bcaches[b], idx, h)
                if accs[b] is None:
                    accs[b] = jnp.zeros(pos.shape + hb.shape[2:], hb.dtype, device=hb.sharding)
                accs[b] = self.dispatch(collect, accs[b], hb, pos, np.int32(j))
        del tcache, bcaches
        return accs

    def trunk_prefix_buffers(self, trunk, branches, ids: np.ndarray, *, chunk: int, rows: int, buffer: int):
        """``prefix_buffer`` with a shared trunk (see ``trunk_chunked_hidden_at``): the prefix's keys/values of
        layers [0, k) computed once, and of layers [k, L) per branch. Returns (trunk cache [rows, n] of k layers,
        [branch cache [rows, n] of L - k layers]), n = len(ids) rounded up to a multiple of ``chunk``."""
        g0, s0, k = trunk
        n = round_up(len(ids), chunk)
        x = np.zeros((rows, n), np.int32)
        m = np.zeros((rows, n), np.int32)
        x[:, :len(ids)] = ids
        m[:, :len(ids)] = 1
        tstep = self.step_program(g0, (0, k))
        tcache = self.empty_buffer(g0, s0, rows, buffer, layers=(0, k))
        bsteps = [self.step_program(g, (k, top)) for g, _, top in branches]
        bcaches = [self.empty_buffer(g, s, rows, buffer, layers=(k, top)) for g, s, top in branches]
        for j in range(0, n, chunk):
            xc, mc, idx = jnp.asarray(x[:, j:j + chunk]), jnp.asarray(m[:, j:j + chunk]), np.int32(j)
            h, tcache = self.dispatch(tstep, s0, xc, mc, tcache, idx)
            for b, ((_, s, _), step) in enumerate(zip(branches, bsteps)):
                _, bcaches[b] = self.dispatch(step, s, xc, mc, bcaches[b], idx, h)
        cut = lambda c: jax.tree.map(lambda a: a[:, :n], c)  # noqa: E731  (only the prefix entries)
        return cut(tcache), [cut(c) for c in bcaches]

    def trunk_full_rows_at(self, trunk, branches, ids, mask, seg, pos, *, use_seg: bool):
        """Whole (possibly packed) rows with a shared trunk: layers [0, k) once, then each branch's layers
        [k, L) + final norm; returns each branch's hidden states at ``pos`` [R, N, D], in order."""
        g0, s0, k = trunk
        h = self.dispatch(self.full_row_program(g0, use_seg, (0, k)), s0, ids, mask, seg)
        gather = self.gather_program()
        out = []
        for g, s, top in branches:
            hb = self.dispatch(self.full_row_program(g, use_seg, (k, top)), s, ids, mask, seg, h)
            out.append(self.dispatch(gather, hb, pos))
        return out


DEFAULT_ENGINE = Engine()  # what score_rendered runs on unless given an engine (no thread until first used)
