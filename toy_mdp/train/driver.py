"""The training driver: compiled chunks of update steps over the batch of MDPs, metrics at every
evaluation step, and the JSON-ready result of several algorithms on the same MDPs."""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from toy_mdp.train.config import ALGOS, METRICS, AlgoConfig, EnvConfig, default_algo_config
from toy_mdp.train.losses import make_optimizer, make_step
from toy_mdp.train.metrics import policy_metrics
from toy_mdp.train.problem import Problem, make_problem

Array = jax.Array

def _eval_steps(steps: int, eval_every: int) -> list[int]:
    every = eval_every or max(1, steps // 50)
    return sorted(set([0] + list(range(every, steps, every)) + [steps]))


@functools.lru_cache(maxsize=64)
def _compiled_chunk(cfg: AlgoConfig, horizon: Optional[int], T: int):
    """``(optimizer, chunk)``; ``chunk(params, opt_state, key, steps [n], prob)`` runs ``n`` training
    steps on every MDP (``lax.scan`` over steps, ``vmap`` over MDPs; step ``i`` uses key
    ``fold_in(key, i)`` split over MDPs). Cached so equal configs reuse the compilation."""
    opt = make_optimizer(cfg)
    step = jax.vmap(make_step(cfg, opt, horizon, T))

    @jax.jit
    def chunk(params, opt_state, key, idx, prob):
        M = prob.initial.shape[0]

        def body(carry, i):
            p, s = carry
            keys = jax.random.split(jax.random.fold_in(key, i), M)
            return step(p, s, keys, prob), None
        (params, opt_state), _ = jax.lax.scan(body, (params, opt_state), idx)
        return params, opt_state
    return opt, chunk


@functools.lru_cache(maxsize=64)
def _compiled_metrics(beta: float, horizon: Optional[int], min_weight: float) -> Callable:
    return jax.jit(jax.vmap(lambda lg, pr: policy_metrics(
        lg, pr, beta=beta, horizon=horizon, min_weight=min_weight)))


def train_algorithm(problem: Problem, env: EnvConfig, cfg: AlgoConfig, key: Array,
                    ) -> tuple[dict[str, Any], Array]:
    """Train ``cfg.algo`` on every MDP of ``problem`` (``vmap``) from ``pi_ref``.

    Returns ``(history, final_logits [M, Hp, S, A])``; ``history`` holds ``step`` and, per metric of
    :func:`policy_metrics`, an ``[E, M]`` NumPy array (E evaluations). Runs in float64
    (``jax.enable_x64(True)`` scoped to the call).
    """
    cfg.validate()
    env.validate()
    with jax.enable_x64(True):
        return _train(problem, env, cfg, key)


def _train(problem: Problem, env: EnvConfig, cfg: AlgoConfig, key: Array,
           ) -> tuple[dict[str, Any], Array]:
    M, hp, S, _ = problem.ref_log.shape
    T = int(env.horizon) if env.horizon is not None else int(env.rollout_len)
    opt, chunk = _compiled_chunk(cfg, env.horizon, T)
    params = {"logits": problem.ref_log, "value": jnp.zeros((M, hp, S), problem.ref_log.dtype)}
    opt_state = jax.vmap(opt.init)(params)
    metrics = _compiled_metrics(float(env.beta), env.horizon, float(env.min_weight))
    steps_at = _eval_steps(cfg.steps, cfg.eval_every)
    rows = [jax.device_get(metrics(params["logits"], problem))]
    for lo, hi in zip(steps_at[:-1], steps_at[1:]):
        params, opt_state = chunk(params, opt_state, key, jnp.arange(lo, hi), problem)
        rows.append(jax.device_get(metrics(params["logits"], problem)))
    history = {"step": steps_at}
    for m in METRICS:
        history[m] = np.stack([np.asarray(r[m], np.float64) for r in rows])
    return history, params["logits"]


def _clean(x: Any) -> Any:
    """JSON-safe: NumPy -> Python, non-finite floats -> None."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _summarise(history: dict[str, Any]) -> dict[str, Any]:
    """History (mean over MDPs per evaluation; worst errors also max over MDPs) and final values."""
    out_hist: dict[str, Any] = {"step": list(history["step"])}
    final: dict[str, Any] = {}
    for m in METRICS:
        a = history[m]  # [E, M]
        with np.errstate(all="ignore"):
            mean = np.where(np.isfinite(a).all(1), a.mean(1), np.nan)
        out_hist[m] = mean
        final[m] = mean[-1]
        final[m + "_per_mdp"] = a[-1]
        if m.startswith("worst"):
            out_hist[m + "_max"] = a.max(1)
            final[m + "_max"] = a[-1].max()
        if m in ("pearson", "spearman"):
            final[m + "_min"] = a[-1].min()
    return {"history": out_hist, "final": final}


def run(env: EnvConfig, algos: Sequence[str], seed: int, steps: Optional[int] = None,
        overrides: Optional[dict[str, Any]] = None, log: Callable[[str], None] = lambda s: None,
        ) -> dict[str, Any]:
    """Train every algorithm of ``algos`` (default hyperparameters, ``steps``/``overrides`` applied
    to all) on the same MDPs from ``seed``; JSON-ready result dict (see :func:`run_configs`)."""
    env.validate()
    for a in algos:
        if a not in ALGOS:
            raise ValueError(f"algo: expected one of {ALGOS} or 'all', got {a!r}")
    overrides = dict(overrides or {})
    cfgs = [(a, default_algo_config(a, env.beta, steps=steps, **overrides)) for a in algos]
    result = run_configs(env, cfgs, seed, log=log)
    result["config"]["steps"] = steps
    return result


def run_configs(env: EnvConfig, configs: Sequence[tuple[str, AlgoConfig]], seed: int,
                log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Train each ``(label, config)`` on the MDPs of ``seed`` (all runs see the same MDPs; runs of
    one algorithm share their sampling keys). Returns ``{"config": ..., "runs": {label: {"config",
    "history", "final", "wall_s"}}}`` with NaN/inf as None."""
    env.validate()
    labels = [lab for lab, _ in configs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"configs: expected unique labels, got {labels}")
    for _, c in configs:
        c.validate()
    _, _, problem = make_problem(env, seed)
    result: dict[str, Any] = {
        "config": {"algos": labels, "seed": int(seed), "env": dataclasses.asdict(env),
                   "hyperparameters": {lab: dataclasses.asdict(c) for lab, c in configs},
                   "versions": {"jax": jax.__version__, "optax": optax.__version__}},
        "runs": {},
    }
    root = jax.random.key(int(seed))
    for label, cfg in configs:
        t0 = time.perf_counter()
        key = jax.random.fold_in(jax.random.fold_in(root, 2), ALGOS.index(cfg.algo))
        history, _ = train_algorithm(problem, env, cfg, key)
        run_out = _summarise(history)
        run_out["config"] = dataclasses.asdict(cfg)
        run_out["wall_s"] = time.perf_counter() - t0
        result["runs"][label] = run_out
        f = run_out["final"]
        log(f"{label:>13s}  steps={cfg.steps}  worst|err|={f['worst_abs_error']:.3g}  "
            f"mean|err|={f['mean_abs_error']:.3g}  pearson={f['pearson']:.4f}  "
            f"spearman={f['spearman']:.4f}  beta_eff={f['beta_eff']:.3g}  "
            f"resid={f['beta_eff_residual']:.3g}  ({run_out['wall_s']:.1f}s)")
    return _clean(result)
