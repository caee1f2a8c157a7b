"""The scoring engine: per-token statistics of a (policy, reference) pair on rendered trajectories.

One concern a module:

* ``plan``: ``ScoringOptions``, ``Batch``, ``Plan``; bucketing, packing, the shared prefix, chunked
  rows, and each batch's host arrays. Pure (NumPy, no device).
* ``programs``: ``Engine``, the one object holding the compiled programs (memo), the dispatch lock,
  the model threads behind one executor interface, and the allocator option (``set_mmap_threshold``).
* ``cache``: the per-token cache on disk (key, batch files, index, resume), written with ``pa_jax.io``;
  every batch verified on read (SHA-256, shape and dtype of each array; the plan's rows), else recomputed.
* ``engine``: ``score_rendered`` = check -> plan -> open cache -> run -> assemble; ``TrajectoryStats``,
  ``ScoreResult``, ``dense``; the concurrency argument is ``engine._run_batches``'s docstring.

Tokenizer loading and checking live in ``pa_jax.data.tokenizers``; the atomic writer in ``pa_jax.io``.
"""
from pa_jax.scoring.cache import BatchCache, cache_key, model_identity
from pa_jax.scoring.engine import STAT_FIELDS, HeadBlocks, ScoreResult, TrajectoryStats, dense, score_rendered
from pa_jax.scoring.plan import (DEFAULT_BUCKETS, Batch, Plan, ScoringOptions, batch_arrays, make_plan,
                                 prefix_group, scored_targets, shared_prefix_length, supports_packing)
from pa_jax.scoring.programs import DEFAULT_ENGINE, Engine, SyncExecutor, ThreadExecutor, set_mmap_threshold

__all__ = [
    "DEFAULT_BUCKETS", "DEFAULT_ENGINE", "STAT_FIELDS", "Batch", "BatchCache", "Engine", "HeadBlocks", "Plan",
    "ScoreResult", "ScoringOptions", "SyncExecutor", "ThreadExecutor", "TrajectoryStats", "batch_arrays",
    "cache_key", "dense", "make_plan", "model_identity", "prefix_group", "score_rendered", "scored_targets",
    "set_mmap_threshold", "shared_prefix_length", "supports_packing",
]
