"""The scoring engine: per-token statistics of a (policy, reference) pair on rendered trajectories.

Data flow: rendered trajectories (token ids + step ids) -> a deterministic *plan* of batches ->
for each batch, one jitted program runs both models on the same token rows, gathers the final
hidden states at the scored positions only (the positions that predict an action token) and
computes the fused head statistics there (``pa_jax.head``) -> only those per-token statistics
leave the device -> they are cached on disk per batch.

Shapes stay bounded: every row length is one of ``bucket_lengths`` and every batch has a
power-of-two number of rows (a multiple of the mesh's ``data`` axis, which splits the batch), and
the number of scored positions per row is rounded up to a power of two, so a dataset compiles a
handful of programs.

Less work than a plain forward:

* *Shared prefix*: when every trajectory starts with the same tokens (e.g. the ~2k-token airline
  policy), its keys/values are computed once per model (``return_kv``) and every row holds only
  the suffix, attending to the cached prefix (``kv_prefix``). The prefix stops before the first
  position whose hidden state is needed, so no statistic changes.
* *Packing*: without a shared prefix, short trajectories are packed into one row (segment ids:
  tokens attend only inside their own trajectory, positions restart) by first-fit decreasing.
  Models with Gated DeltaNet layers neither pack nor share prefixes.
* Head statistics (log-softmax over the full vocabulary, entropy, top-k, KL) only at the scored
  positions.

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

import dataclasses
import hashlib
import json
import os
import pathlib
import tempfile
import time
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
    ``data_parallel`` enter the cache key because they can change the floating-point result."""

    top_k: int = 20
    bucket_lengths: tuple[int, ...] = DEFAULT_BUCKETS
    max_batch_tokens: int = 16384
    pack: bool = True
    pack_length: int = 1024  # rows of packed short trajectories hold at most this many tokens
    share_prefix: bool = True
    min_prefix: int = 64
    attention_chunk: int = 1024  # rows longer than this run in query chunks against a KV buffer
    vocab_chunk: int = 8192
    token_block: int = 512


@dataclass(frozen=True)
class Batch:
    """One program call: rows of trajectory indices (several when packed), row length, positions."""

    index: int
    rows: tuple[tuple[int, ...], ...]
    length: int
    num_positions: int
    num_rows: int  # padded row count (a power of two, multiple of the data axis)
    chunked: bool = False  # single-trajectory rows run in attention chunks (see `chunked_forward`)


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
            return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
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


def make_plan(
    rendered: Sequence[Rendered], options: ScoringOptions, *, can_pack: bool, can_share_prefix: bool, data_parallel: int = 1
) -> Plan:
    """Deterministic batches: bucket by (suffix) length, pack short rows, cap tokens per batch."""
    prefix = shared_prefix_length(rendered, options.min_prefix) if (options.share_prefix and can_share_prefix) else 0
    lengths = [len(r) - prefix for r in rendered]
    npos = [len(scored_targets(r)) for r in rendered]
    order = sorted(range(len(rendered)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    if options.pack and can_pack and prefix == 0:
        cap_len = min(options.pack_length, options.attention_chunk) if can_share_prefix else options.pack_length
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
    def row_len(row):
        n = _bucket(sum(lengths[i] for i in row), options.bucket_lengths)
        c = options.attention_chunk
        return n if (n <= c or not can_share_prefix or len(row) > 1) else -(-n // c) * c

    keyed = sorted(((row_len(row), row) for row in rows), key=lambda x: (-x[0], x[1][0]))
    batches: list[Batch] = []
    k = 0
    while k < len(keyed):
        length = keyed[k][0]
        per = max(1, options.max_batch_tokens // length)
        per = max(data_parallel, (1 << (per.bit_length() - 1)) // data_parallel * data_parallel)
        group = []
        while k < len(keyed) and keyed[k][0] == length and len(group) < per:
            group.append(tuple(keyed[k][1]))
            k += 1
        nrows = min(per, max(data_parallel, _pow2(len(group))))
        nrows = -(-nrows // data_parallel) * data_parallel
        npmax = max(sum(npos[i] for i in row) for row in group)
        chunked = can_share_prefix and length > options.attention_chunk and all(len(r) == 1 for r in group)
        batches.append(Batch(len(batches), tuple(group), length, max(16, _pow2(max(npmax, 1))), nrows, chunked))
    return Plan(prefix, tuple(batches))


def _batch_arrays(rendered: Sequence[Rendered], batch: Batch, prefix: int, pad_id: int):
    """Host arrays of one batch: ids, mask, segments [R, T]; positions, targets, valid [R, N];
    and for each trajectory (row, slice into the row's positions)."""
    R, T, N = batch.num_rows, batch.length, batch.num_positions
    ids = np.full((R, T), pad_id, np.int32)
    mask = np.zeros((R, T), np.int32)
    seg = np.zeros((R, T), np.int32)
    pos = np.zeros((R, N), np.int32)
    tgt = np.zeros((R, N), np.int32)
    valid = np.zeros((R, N), bool)
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
            valid[r, n:n + m] = True
            where[i] = (r, slice(n, n + m))
            off += L
            n += m
    return ids, mask, seg, pos, tgt, valid, where


# ---------------------------------------------------------------------------------------------- device program
def supports_packing(config: Any) -> bool:
    """Packing / prefix reuse need plain attention layers (no recurrent Gated DeltaNet state)."""
    return not any("linear" in str(t) for t in getattr(config, "layer_types", ()))


_PROGRAMS: list = []  # small memo of (policy model, reference model, settings, program)


def chunked_forward(model, ids, mask, kv_prefix, chunk: int):
    """Hidden states [B, T, D] of a long row computed ``chunk`` queries at a time (``lax.scan``).

    A key/value buffer of fixed length ``P + T`` (the shared prefix, then the row) is filled chunk by
    chunk; chunk ``j`` attends to the valid buffer entries (prefix and chunks ``< j``) and causally to
    itself, so attention scores take ``[B, heads, chunk, P + T]`` instead of ``[B, heads, T, P + T]``
    and the result equals one full causal forward. ``T`` must be a multiple of ``chunk``.
    """
    from pa_jax.models.decoder import KVCache

    b, t = ids.shape
    if t % chunk:
        raise ValueError(f"row length {t} is not a multiple of attention_chunk {chunk}")
    shapes = jax.eval_shape(lambda: model(ids[:, :1], mask[:, :1], return_kv=True)[1])
    p = 0 if kv_prefix is None else kv_prefix.valid.shape[1]
    total = p + t

    def buf(sd, pre):
        z = jnp.zeros((b, total) + sd.shape[2:], sd.dtype)
        if pre is not None:
            z = z.at[:, :p].set(jnp.broadcast_to(pre.astype(sd.dtype), (b,) + pre.shape[1:]))
        return z

    pk = [None] * len(shapes.keys) if kv_prefix is None else kv_prefix.keys
    pv = [None] * len(shapes.values) if kv_prefix is None else kv_prefix.values
    keys = tuple(buf(sd, x) for sd, x in zip(shapes.keys, pk))
    values = tuple(buf(sd, x) for sd, x in zip(shapes.values, pv))
    valid = jnp.zeros((b, total), bool)
    positions = jnp.zeros((b, total), jnp.int32)
    if kv_prefix is not None:
        valid = valid.at[:, :p].set(jnp.broadcast_to(kv_prefix.valid.astype(bool), (b, p)))
        positions = positions.at[:, :p].set(jnp.broadcast_to(kv_prefix.positions.astype(jnp.int32), (b, p)))
    mask = mask.astype(bool)

    def body(carry, j):
        keys, values, valid, positions = carry
        start = j * chunk
        x = jax.lax.dynamic_slice_in_dim(ids, start, chunk, axis=1)
        mk = jax.lax.dynamic_slice_in_dim(mask, start, chunk, axis=1)
        h, new = model(x, mk, kv_prefix=KVCache(keys, values, positions, valid), return_kv=True)
        at = p + start
        keys = tuple(jax.lax.dynamic_update_slice_in_dim(a, n.astype(a.dtype), at, axis=1) for a, n in zip(keys, new.keys))
        values = tuple(jax.lax.dynamic_update_slice_in_dim(a, n.astype(a.dtype), at, axis=1)
                       for a, n in zip(values, new.values))
        valid = jax.lax.dynamic_update_slice_in_dim(valid, new.valid.astype(bool), at, axis=1)
        positions = jax.lax.dynamic_update_slice_in_dim(positions, new.positions.astype(jnp.int32), at, axis=1)
        return (keys, values, valid, positions), h

    _, hs = jax.lax.scan(body, (keys, values, valid, positions), jnp.arange(t // chunk))
    return jnp.moveaxis(hs, 0, 1).reshape(b, t, hs.shape[-1])


def build_program(policy, reference, *, top_k: int, vocab_chunk: int, token_block: int, use_seg: bool,
                  same_vocab: bool, chunk: int | None = None):
    """Memoized `_build_program`: reusing the jitted function reuses its compiled shapes."""
    settings = (top_k, vocab_chunk, token_block, use_seg, same_vocab, chunk)
    rm = None if reference is None else reference[1]
    for pm, r, st, prog in _PROGRAMS:
        if pm is policy[1] and r is rm and st == settings:
            return prog
    prog = _build_program(policy, reference, top_k=top_k, vocab_chunk=vocab_chunk, token_block=token_block,
                          use_seg=use_seg, same_vocab=same_vocab, chunk=chunk)
    _PROGRAMS.append((policy[1], rm, settings, prog))
    del _PROGRAMS[:-2]
    return prog


def _build_program(policy, reference, *, top_k: int, vocab_chunk: int, token_block: int, use_seg: bool,
                   same_vocab: bool, chunk: int | None = None):
    """A jitted function (policy_state, reference_state, ids, mask, seg, pos, tgt, kv_p, kv_r) -> stats dict.

    policy / reference: (config, model) pairs; reference may be None (policy-only statistics)."""
    from flax import nnx

    from pa_jax.head import gather_positions, head_statistics, paired_head_statistics

    pcfg, pmodel = policy
    gp, _ = nnx.split(pmodel)
    if reference is not None:
        rcfg, rmodel = reference
        gr, _ = nnx.split(rmodel)
    kw = dict(top_k=top_k, vocab_chunk=vocab_chunk, token_block=token_block)

    def hidden(g, state, ids, mask, seg, pos, kv, chunked):
        m = nnx.merge(g, state)
        if chunked:
            h = chunked_forward(m, ids, mask, kv, chunk)
        else:
            h = m(ids, mask, segment_ids=seg if use_seg else None, kv_prefix=kv)
        return gather_positions(h, pos), m.unembedding()

    def program(sp, sr, ids, mask, seg, pos, tgt, kvp, kvr, chunked):
        ph, pw = hidden(gp, sp, ids, mask, seg, pos, kvp, chunked)
        out = {}
        if reference is None:
            ps = head_statistics(ph, pw, tgt, softcap=pcfg.final_logit_softcap, **kw)
        else:
            rh, rw = hidden(gr, sr, ids, mask, seg, pos, kvr, chunked)
            if same_vocab:
                ps, rs, kl = paired_head_statistics(ph, pw, rh, rw, tgt, policy_softcap=pcfg.final_logit_softcap,
                                                    reference_softcap=rcfg.final_logit_softcap, **kw)
            else:
                ps = head_statistics(ph, pw, tgt, softcap=pcfg.final_logit_softcap, **kw)
                rs = head_statistics(rh, rw, tgt, softcap=rcfg.final_logit_softcap, **kw)
                kl = jnp.full(tgt.shape, jnp.nan, jnp.float32)
            out.update(reference_logprob=rs.target_logprob, reference_entropy=rs.entropy, kl=kl)
        out.update(policy_logprob=ps.target_logprob, policy_entropy=ps.entropy,
                   policy_mean_logprob=ps.mean_logprob, policy_topk=ps.topk_logprobs)
        return out

    return jax.jit(program, static_argnames=("chunked",))


def _prefix_kv(model, ids: np.ndarray):
    """Keys/values of the shared prefix [1, P] (computed once per model)."""
    from flax import nnx

    g, s = nnx.split(model)
    return jax.jit(lambda s, x: nnx.merge(g, s)(x, return_kv=True)[1])(s, jnp.asarray(ids[None]))


# ---------------------------------------------------------------------------------------------- cache
def _atomic_write_bytes(path: pathlib.Path, write: Callable[[Any], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
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
    _atomic_write_bytes(pathlib.Path(path), lambda f: f.write(data))


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
    _atomic_write_bytes(path, lambda f: np.savez(f, **arrays))


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
        meta = {"options": {k: v for k, v in dataclasses.asdict(options).items() if k != "max_batch_tokens"},
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
        prog = build_program(policy, reference, top_k=options.top_k, vocab_chunk=options.vocab_chunk,
                             token_block=options.token_block, use_seg=use_seg, same_vocab=same_vocab,
                             chunk=options.attention_chunk if can else None)
        sp = nnx.split(policy[1])[1]
        sr = None if reference is None else nnx.split(reference[1])[1]
        kvp = kvr = None
        if plan.prefix_length:
            pre = rendered[0].input_ids[: plan.prefix_length]
            kvp = _prefix_kv(policy[1], pre)
            kvr = None if reference is None else _prefix_kv(reference[1], pre)
        sharding = None
        if mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec as P

            sharding = NamedSharding(mesh, P("data", None))
        for b in todo:
            ids, mask, seg, pos, tgt, valid, where = _batch_arrays(rendered, b, plan.prefix_length, pad_id)
            dev = [ids, mask, seg, pos, tgt]
            dev = [jax.device_put(x, sharding) if sharding is not None else jnp.asarray(x) for x in dev]
            out = prog(sp, sr, *dev, kvp, kvr, chunked=b.chunked)
            out = {k: np.asarray(v) for k, v in out.items()}
            batch_stats = {}
            for i, (r, sl) in where.items():
                d = {k: v[r, sl] for k, v in out.items()}
                d["step_ids"] = rendered[i].step_ids[scored_targets(rendered[i])].astype(np.int32)
                batch_stats[i] = d
            results.update(batch_stats)
            computed += 1
            ntok = int(mask.sum()) + plan.prefix_length * sum(len(row) for row in b.rows)
            tokens += ntok
            if cdir is not None:
                name = f"batch_{b.index:05d}.npz"
                _save_batch(cdir / name, batch_stats)
                index["done"][str(b.index)] = name
                atomic_write_json(cdir / "index.json", index)
            if progress:
                progress(b, ntok)

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
