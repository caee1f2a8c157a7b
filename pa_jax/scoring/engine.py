"""The scoring pipeline: per-token statistics of a (policy, reference) pair on rendered trajectories.

``score_rendered`` = check the inputs -> plan (``plan.make_plan``) -> open the cache
(``cache.BatchCache``) -> run the batches not cached (``_run_batches``: both models' hidden states at
the scored positions -> the head statistics, ``pa_jax.head``) -> assemble one ``TrajectoryStats`` per
trajectory, in input order. Only the per-token statistics leave the device.

Less work than a plain forward (the plan decides which applies, ``programs.Engine`` runs it):

* *Long rows in chunks against a KV buffer*: a row longer than ``attention_chunk`` tokens (and every
  row when there is a shared prefix) runs ``attention_chunk`` tokens at a time; each chunk writes its
  keys/values into a preallocated per-row buffer in place (``model(..., cache=, cache_index=)``,
  donated) and attends to the buffer with causal block skipping. Every chunked batch of a run uses
  one buffer size (the longest row's), so one compiled step program serves every chunk, every row
  length, and both models when they share an architecture: one compilation per architecture, and rows
  padded only to a multiple of the chunk. The attention visits only the filled blocks of the buffer,
  and none for the padding queries of a row's last chunk. The final hidden states at the scored
  positions are collected chunk by chunk (no [R, T, D] array of a whole row).
* *Shared prefix*: when trajectories start with the same tokens (e.g. the ~1.3k-token airline
  policy), its keys/values are computed once per model and copied into the buffer of every row of
  those trajectories, and each such row holds only the suffix. The prefix stops before the first
  position whose hidden state is needed, so no statistic changes. Trajectories that do not start with
  it (e.g. truncated to their last tokens) run whole, in batches of their own (``plan.prefix_group``).
* *Packing*: outside the prefix group, short trajectories are packed into one row (segment ids:
  tokens attend only inside their own trajectory, positions restart) by first-fit decreasing.
  Models with Gated DeltaNet layers neither pack nor share prefixes.
* *Shared trunk*: when the policy and the reference have bit-identical embeddings and first k layers
  (a LoRA or partial fine-tune of the top layers; detected from tensor digests, or given by the caller,
  e.g. from a LoRA adapter's target layers, ``_resolve_trunk``), each chunk / row runs layers [0, k)
  once and forks into each model's layers [k, L), final norm and head: the pair costs
  (k + 2 (L - k)) / 2L of two forwards. With a shared prefix the prefix's keys/values of layers < k
  are computed and stored once too. Same operations on the same tensors as two forwards: the
  statistics are equal up to float rounding (``tests/test_scoring_trunk.py``, 1e-6 in float32), so
  the choice (``ScoringOptions.shared_trunk``) is not part of the cache key. One task per batch then
  runs trunk and both branches; the two host threads take different batches.
* Head statistics (log-softmax over the full vocabulary, entropy, top-k, KL) only at the scored
  positions, in blocks of ``head_positions`` positions gathered across batches (``HeadBlocks``): one
  compiled head program, and no padding but the last block's.
* *Both models at once*: the policy's and the reference's forwards run in two host threads
  (``concurrent_models``) while the calling thread runs the head (see ``_run_batches`` for why this
  can neither deadlock nor reorder anything); on a CPU this keeps both cores busy through the parts
  of a step that XLA runs on one thread (measured in ``experiments/bench_scoring.py``). Large host
  allocations are served by mmap (``ScoringOptions.mmap_threshold``) so freed buffers return to the
  OS; the peak resident memory then follows what is live.

Vocabularies: the tokenizers of policy and reference must be identical
(``pa_jax.data.tokenizers.check_tokenizers``). Their embedding matrices may still differ in size
(e.g. one padded to a multiple of 64): each model's distribution is then the softmax over its own
full ``V`` rows (the extra rows are padding ids no tokenizer emits, never a target, but they keep
whatever mass the model gives them), and the exact KL, which needs one support, is reported as NaN.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from pa_jax.data.render import Rendered
from pa_jax.scoring.cache import BatchCache, key_meta
from pa_jax.scoring.plan import (Batch, Plan, ScoringOptions, batch_arrays, make_plan, round_up, scored_targets,
                                 supports_packing)
from pa_jax.scoring.programs import DEFAULT_ENGINE, Engine

STAT_FIELDS = ("policy_logprob", "policy_entropy", "policy_mean_logprob", "policy_topk",
               "reference_logprob", "reference_entropy", "kl")


# ---------------------------------------------------------------------------------------------- results
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


@dataclass
class ScoreResult:
    stats: list[TrajectoryStats]
    plan: Plan
    cache_dir: str | None
    batches_computed: int
    batches_from_cache: int
    tokens_computed: int
    seconds: float
    shared_trunk: dict | None = None  # _resolve_trunk's record: layers (k used), reason, source, detect_seconds
    cache_repairs: list[dict] = field(default_factory=list)  # cache.BatchCache.repairs: what did not verify


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


# ---------------------------------------------------------------------------------------------- head
class HeadBlocks:
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
        self.size = round_up(size, dp)
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


# ---------------------------------------------------------------------------------------------- run
def _run_batches(engine: Engine, rendered: Sequence[Rendered], plan: Plan, todo: Sequence[Batch],
                 models: Sequence[tuple[Any, Any]], options: ScoringOptions, *, same_vocab: bool, mesh: Any,
                 dp: int, pad_id: int, done: Callable[[Batch, int, dict], None], trunk_layers: int = 0) -> None:
    """Run the batches ``todo`` (in plan order) and hand each finished one to ``done(batch, tokens,
    {trajectory index: {field: [n] array}})``, in the same order.

    Who does what. Per batch, each model's forward up to the hidden states at the scored positions is
    one *task*; the tasks go to ``engine.executor``: two host threads (``concurrent_models`` with a
    reference) or the calling thread (``SyncExecutor``: a task runs when its result is asked for).
    The calling thread launches at most ``engine.lookahead + 1`` batches ahead of the one it finishes,
    waits for that batch's tasks, feeds their hidden states to the head (``HeadBlocks``, on the calling
    thread) and hands finished batches to ``done``. The shared prefix's KV buffers are computed first,
    the same way (one task per model, waited for before any batch is launched). With a shared trunk
    (``trunk_layers`` = k > 0, policy and reference) a batch is one task instead: layers [0, k) of the
    policy (identical to the reference's) once, then both models' layers [k, L) (``Engine.trunk_*``);
    the threads then overlap consecutive batches.

    Why this cannot deadlock: a task waits on nothing but the device. It never waits on another task's
    future or on the calling thread, and the only locks it takes (the engine's memo lock, then, never
    inside it, its dispatch lock) are held only around work that itself takes no lock and waits for
    nothing else; so every task submitted finishes. Only the calling thread waits on futures, and it
    waits for the oldest batch's, whose tasks were submitted before every task still queued (the pool
    is FIFO): they are running or next in line. With the synchronous executor the task simply runs
    when awaited.

    Why nothing is reordered or changed: the calling thread takes the batches from a FIFO in plan order
    and ``HeadBlocks`` keeps positions in that order, so statistics reach ``done`` in plan order
    whatever order the threads finish in. A task's result depends only on its model, its batch's
    arrays and the compiled program for their shapes, not on the thread that ran it or on what ran
    beside it; and the head sees each position's own hidden state only. So one thread or two gives the
    same bits (``tests/test_scoring.py::test_concurrent_models_give_identical_statistics``).

    Memory: a thread's task ends with ``block_until_ready``, so a thread holds one batch's buffers at a
    time, and at most ``lookahead + 1`` batches' host arrays and futures exist at once. After an error
    or an interrupt (e.g. ``done`` raising), tasks not yet started are cancelled.
    """
    # packed rows only outside the prefix group (rows of the group are chunked, one trajectory each)
    use_seg = options.pack and all(supports_packing(c) for c, _ in models)
    head = engine.head_program(models[0][0], models[1][0] if len(models) > 1 else None, top_k=options.top_k,
                               vocab_chunk=options.vocab_chunk, token_block=options.token_block,
                               same_vocab=same_vocab)
    graphdefs, states = zip(*(nnx.split(m) for _, m in models))
    weights = [m.unembedding() for _, m in models]
    chunk = options.attention_chunk
    prefixes = [None] * len(models)
    chunked = [b for b in todo if b.chunked]
    prefixed = [b for b in chunked if b.prefixed]
    gather = engine.gather_program()
    executor = engine.executor(options.concurrent_models and len(models) > 1)

    fork = trunk_layers > 0 and len(models) == 2
    if fork:  # (graphdef, state, k) of the trunk (the policy's first k layers), (graphdef, state, L) per branch
        trunk = (graphdefs[0], states[0], trunk_layers)
        branches = [(g, st, c.num_layers) for g, st, (c, _) in zip(graphdefs, states, models)]
    trunk_prefix = None
    if plan.prefix_length and prefixed:  # computed once per model, in the plan's one buffer shape
        pre_ids = rendered[plan.prefix_members[0]].input_ids[: plan.prefix_length]
        if fork:
            trunk_prefix = executor.submit(lambda: engine.trunk_prefix_buffers(
                trunk, branches, pre_ids, chunk=chunk, rows=prefixed[0].num_rows, buffer=prefixed[0].buffer)).result()
        else:
            tasks = [executor.submit(lambda k=k: engine.prefix_buffer(
                graphdefs[k], states[k], pre_ids, chunk=chunk, rows=prefixed[0].num_rows, buffer=prefixed[0].buffer))
                for k in range(len(models))]
            prefixes = [t.result() for t in tasks]
    sharding = NamedSharding(mesh, PartitionSpec("data", None)) if mesh is not None else None

    def put(x):
        return jax.device_put(x, sharding) if sharding is not None else jnp.asarray(x)

    def launch(b):
        """Host arrays of batch b, and one task per model for its hidden states at the scored positions."""
        pre_len = plan.batch_prefix(b)
        ids_h, mask_h, seg, pos, tgt, where = batch_arrays(rendered, b, pre_len, pad_id)
        pos = put(pos)  # the targets stay on the host until the head's blocks are formed
        ntok = int(mask_h.sum()) + pre_len * sum(len(row) for row in b.rows)
        rows = None if b.chunked else (put(ids_h), put(mask_h), put(seg))  # chunked: moved chunk by chunk

        def hidden_of(k):
            g, st, pre = graphdefs[k], states[k], prefixes[k] if b.prefixed else None
            if b.chunked:
                return engine.chunked_hidden_at(g, st, ids_h, mask_h, pos, chunk=chunk, buffer=b.buffer, put=put,
                                                prefix=pre, prefix_len=pre_len if pre is not None else 0)
            h = engine.dispatch(engine.full_row_program(g, use_seg), st, *rows)
            return engine.dispatch(gather, h, pos)

        def forked():  # [policy, reference] hidden states at the scored positions, the trunk run once
            if b.chunked:
                return engine.trunk_chunked_hidden_at(
                    trunk, branches, ids_h, mask_h, pos, chunk=chunk, buffer=b.buffer, put=put,
                    prefixes=trunk_prefix if b.prefixed else None, prefix_len=pre_len if trunk_prefix is not None else 0)
            return engine.trunk_full_rows_at(trunk, branches, *rows, pos, use_seg=use_seg)

        if fork:
            return tgt, ntok, where, [executor.submit(forked)]
        return tgt, ntok, where, [executor.submit(lambda k=k: [hidden_of(k)]) for k in range(len(models))]

    launched: collections.deque = collections.deque()
    upcoming = iter(todo)

    def top_up():
        while len(launched) < engine.lookahead + 1 and (nb := next(upcoming, None)) is not None:
            launched.append((nb, launch(nb)))

    heads = HeadBlocks(head, weights, options.head_positions, dp, put)
    try:
        top_up()
        while launched:
            b, (tgt, ntok, where, tasks) = launched.popleft()
            top_up()
            hidden = [h for t in tasks for h in t.result()]  # policy[, reference]
            heads.add(b, ntok, where, hidden, tgt, final=b is todo[-1])
            del hidden, tasks
            for b_done, ntok_done, batch_out in heads.finished():
                done(b_done, ntok_done, batch_out)
    finally:  # after an error or an interrupt, forwards not yet started are not run
        for _, (*_, tasks) in launched:
            for t in tasks:
                t.cancel()


# ---------------------------------------------------------------------------------------------- trunk
def _comparable(config):
    """A config without its source config.json text (names, paths): what the computation depends on."""
    return dataclasses.replace(config, hf_config_json="{}")


def _resolve_trunk(policy, reference, options: ScoringOptions, given=None) -> dict:
    """How many leading layers the engine runs once for both models, and why: {"layers": k, "reason",
    "source", "detect_seconds"}. k = 0 (two separate forwards) without a reference, with
    ``options.shared_trunk`` off, for linear-attention (Gated DeltaNet) models, for configs or parameter
    dtypes that differ, or when the embeddings / first layer differ. Otherwise k comes from ``given`` (a
    ``pa_jax.models.shared.SharedTrunk`` the caller established, e.g. ``trunk_from_adapter`` for a LoRA
    policy over the reference's own base) or from the tensor digests of both models
    (``pa_jax.models.shared.shared_trunk``: every parameter hashed once, ``detect_seconds``), capped at
    L - 1 (each model runs at least its last layer)."""
    rec = {"layers": 0, "reason": "", "source": None, "detect_seconds": 0.0}
    if reference is None:
        return {**rec, "reason": "no reference model"}
    if not options.shared_trunk:
        return {**rec, "reason": "turned off (ScoringOptions.shared_trunk=False, --no-shared-trunk)"}
    (pc, pm), (rc, rm) = policy, reference
    if pc.has_linear_attention or rc.has_linear_attention:
        return {**rec, "reason": "linear-attention (Gated DeltaNet) layers: the engine does not fork them"}
    if _comparable(pc) != _comparable(rc):
        return {**rec, "reason": "configs differ"}
    if pm.embed_tokens.weight[...].dtype != rm.embed_tokens.weight[...].dtype:
        return {**rec, "reason": "parameter dtypes differ"}
    t0 = time.perf_counter()
    if given is None:
        from pa_jax.models.shared import shared_trunk

        found, source = shared_trunk(pm, rm), "parameters (tensor digests)"
    else:
        found, source = given, "given (e.g. a LoRA adapter's target layers)"
    k, n = int(found.layers), pc.num_layers
    if not 0 <= k <= n:
        raise ValueError(f"shared trunk of {k} layers: expected 0 <= k <= {n} (num_layers)")
    reason = found.reason
    if k == n:
        k, reason = n - 1, f"{reason}; capped at {n - 1}: each model runs at least its last layer"
    return {**rec, "layers": k, "reason": reason, "source": source, "detect_seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------- driver
def _checked_vocab(rendered: Sequence[Rendered], policy, reference) -> bool:
    """Refuse duplicate ids and token ids outside either model's embedding; True when both models have
    one vocabulary size (the exact KL is defined)."""
    if not rendered:
        raise ValueError("no trajectories to score")
    ids_seen = [r.trajectory_id for r in rendered]
    if len(set(ids_seen)) != len(ids_seen):
        raise ValueError("rendered trajectories must have unique ids")
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
    return same_vocab


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
    engine: Engine | None = None,
    trunk: Any = None,
    on_cache_repair: Callable[[dict], None] | None = None,
) -> ScoreResult:
    """Per-token statistics of every rendered trajectory (in input order).

    policy / reference: ``(config, model)`` from ``pa_jax.models.load`` (reference None: policy only).
    cache_dir: where to cache / resume (a subdirectory per cache key); cache_meta: what identifies the
    models and settings in the key (e.g. ``model_identity`` of each path and the dtype).
    progress(batch, tokens): called after each batch (computed or loaded from cache).
    engine: the compiled programs and threads to run on (default: ``programs.DEFAULT_ENGINE``).
    trunk: a ``pa_jax.models.shared.SharedTrunk`` the caller established (e.g. from a LoRA adapter); None:
    detected from the parameters when ``options.shared_trunk`` (see ``_resolve_trunk``; the record is
    ``ScoreResult.shared_trunk``). Detection hashes every parameter: a caller that scores the same pair
    repeatedly can detect once (``pa_jax.models.shared.shared_trunk``) and pass the result.
    on_cache_repair(record): called when a cached batch or the cache index does not verify and is
    recomputed / discarded (``cache.BatchCache``); the records are also in ``ScoreResult.cache_repairs``.
    """
    engine = DEFAULT_ENGINE if engine is None else engine
    same_vocab = _checked_vocab(rendered, policy, reference)
    models = [policy] + ([] if reference is None else [reference])
    can = all(supports_packing(c) for c, _ in models)
    dp = 1 if mesh is None else int(dict(zip(mesh.axis_names, mesh.devices.shape)).get("data", 1))
    plan = make_plan(rendered, options, can_pack=can, can_share_prefix=can, data_parallel=dp)
    cache = None
    if cache_dir is not None:
        meta = key_meta(options, plan.prefix_length, reference is not None, cache_meta)
        cache = BatchCache.open(cache_dir, rendered, meta, len(plan.batches), warn=on_cache_repair)
    reference_fields = ("reference_logprob", "reference_entropy", "kl")
    fields = ("step_ids",) + tuple(f for f in STAT_FIELDS if reference is not None or f not in reference_fields)

    t0 = time.perf_counter()
    results: dict[int, dict[str, np.ndarray]] = {}
    todo = []
    from_cache = 0
    for b in plan.batches:
        got = None
        if cache is not None:  # verified against its checksums and the plan; None: not there or recomputed
            expect = {i: rendered[i].step_ids[scored_targets(rendered[i])].astype(np.int32)
                      for row in b.rows for i in row}
            got = cache.load(b.index, expect, fields)
        if got is not None:
            results.update(got)
            from_cache += 1
            if progress:
                progress(b, 0)
        else:
            todo.append(b)

    computed = tokens = 0

    def done(b: Batch, ntok: int, batch_out: dict) -> None:
        nonlocal computed, tokens
        for i, d in batch_out.items():
            d["step_ids"] = rendered[i].step_ids[scored_targets(rendered[i])].astype(np.int32)
        results.update(batch_out)
        computed += 1
        tokens += ntok
        if cache is not None:
            cache.save(b.index, batch_out)
        if progress:
            progress(b, ntok)

    trunk_rec = (_resolve_trunk(policy, reference, options, trunk) if todo else
                 {"layers": 0, "reason": "nothing computed (every batch from the cache)", "source": None,
                  "detect_seconds": 0.0})
    if todo:
        engine.apply_allocator(options.mmap_threshold)
        _run_batches(engine, rendered, plan, todo, models, options, same_vocab=same_vocab, mesh=mesh, dp=dp,
                     pad_id=pad_id, done=done, trunk_layers=trunk_rec["layers"])

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
    return ScoreResult(stats, plan, None if cache is None else str(cache.directory), computed, from_cache, tokens,
                       time.perf_counter() - t0, trunk_rec, cache_repairs=[] if cache is None else list(cache.repairs))
