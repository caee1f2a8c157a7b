"""Training configuration: the random-MDP environment (:class:`EnvConfig`), one algorithm's
hyperparameters (:class:`AlgoConfig`) and their per-algorithm defaults (:data:`DEFAULTS`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

ALGOS: tuple[str, ...] = ("exact_pg", "reinforce_kl", "grpo", "ppo_clip", "ppo_kl")
METRICS: tuple[str, ...] = (
    "worst_abs_error", "worst_abs_error_all", "mean_abs_error", "pearson", "spearman",
    "pair_agreement", "top1_agreement", "beta_eff", "beta_eff_residual", "return_gap", "kl")


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EnvConfig:
    """The batch of random MDPs and the KL coefficient ``beta`` that defines ``A*``.

    ``horizon=None`` gives discounted MDPs (``gamma < 1``); sampled algorithms then truncate episodes
    at ``rollout_len`` steps (bias ``<= gamma^rollout_len * max|r| / (1 - gamma)``).
    """

    num_mdps: int = 8
    num_states: int = 8
    num_actions: int = 4
    horizon: Optional[int] = 5
    gamma: float = 1.0
    beta: float = 0.5
    reward_scale: float = 1.0
    ref_min_prob: float = 0.05
    deterministic: bool = False
    rollout_len: int = 50
    min_weight: float = 1e-3

    def validate(self) -> None:
        for name in ("num_mdps", "num_states", "num_actions", "rollout_len"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {getattr(self, name)!r}")
        if self.num_actions < 2:
            raise ValueError(f"num_actions: expected >= 2, got {self.num_actions}")
        if self.horizon is not None and int(self.horizon) < 1:
            raise ValueError(f"horizon: expected None or >= 1, got {self.horizon!r}")
        if self.horizon is None and not 0 <= self.gamma < 1:
            raise ValueError(f"gamma: expected 0 <= gamma < 1 without a horizon, got {self.gamma}")
        if self.horizon is not None and not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma: expected 0 <= gamma <= 1 with a horizon, got {self.gamma}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta: expected a finite beta > 0, got {self.beta}")
        if not 0 < self.ref_min_prob <= 1:
            raise ValueError(f"ref_min_prob: expected 0 < ref_min_prob <= 1, got {self.ref_min_prob}")
        if not 0 <= self.min_weight < 1:
            raise ValueError(f"min_weight: expected 0 <= min_weight < 1, got {self.min_weight}")


@dataclasses.dataclass(frozen=True)
class AlgoConfig:
    """Hyperparameters of one training run (recorded in the JSON).

    ``kl_coef`` is the KL coefficient used *in training* (``beta`` of the env for KL algorithms,
    0 for ``ppo_clip``); ``episodes`` is per MDP per step; ``lr`` decays by a cosine schedule to
    ``lr * lr_final_frac`` over all updates.
    """

    algo: str
    steps: int
    lr: float
    kl_coef: float
    lr_final_frac: float = 0.05
    adam_b2: float = 0.999
    episodes: int = 256
    group_size: int = 8
    value_lr: float = 0.1
    clip_eps: float = 0.2
    epochs: int = 4
    gae_lambda: float = 0.95
    normalize_advantages: bool = True
    grpo_kl: str = "k3_loss"          # "k3_loss" (GRPO) or "reward" (k1 penalty in the outcome)
    grpo_std_normalize: bool = True   # divide by the group std (GRPO) or not (Dr. GRPO)
    eval_every: int = 0  # 0: steps // 50

    def validate(self) -> None:
        if self.algo not in ALGOS:
            raise ValueError(f"algo: expected one of {ALGOS}, got {self.algo!r}")
        for name in ("steps", "episodes", "group_size", "epochs"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {getattr(self, name)!r}")
        if self.algo == "grpo" and (self.episodes % self.group_size or self.group_size < 2):
            raise ValueError(f"episodes: expected a multiple of group_size >= 2 for grpo, got "
                             f"episodes={self.episodes}, group_size={self.group_size}")
        for name in ("lr", "value_lr", "clip_eps"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name}: expected a finite value > 0, got {v}")
        if not (math.isfinite(self.kl_coef) and self.kl_coef >= 0):
            raise ValueError(f"kl_coef: expected a finite value >= 0, got {self.kl_coef}")
        if not 0 < self.lr_final_frac <= 1:
            raise ValueError(f"lr_final_frac: expected 0 < lr_final_frac <= 1, got {self.lr_final_frac}")
        if not 0 < self.adam_b2 < 1:
            raise ValueError(f"adam_b2: expected 0 < adam_b2 < 1, got {self.adam_b2}")
        if not 0 <= self.gae_lambda <= 1:
            raise ValueError(f"gae_lambda: expected 0 <= gae_lambda <= 1, got {self.gae_lambda}")
        if self.grpo_kl not in ("k3_loss", "reward"):
            raise ValueError(f"grpo_kl: expected 'k3_loss' or 'reward', got {self.grpo_kl!r}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every: expected >= 0, got {self.eval_every}")


# Default hyperparameters per algorithm (steps, lr, ...); ``kl_coef`` is filled from the env.
DEFAULTS: dict[str, dict[str, Any]] = {
    "exact_pg": dict(steps=3000, lr=0.3, lr_final_frac=0.001, adam_b2=0.99),
    "reinforce_kl": dict(steps=2000, lr=0.05),
    "grpo": dict(steps=2000, lr=0.05, group_size=8),
    "ppo_clip": dict(steps=2000, lr=0.02),
    "ppo_kl": dict(steps=2000, lr=0.02),
}


def default_algo_config(algo: str, beta: float, **overrides: Any) -> AlgoConfig:
    """The default :class:`AlgoConfig` of ``algo`` (``kl_coef = beta``, 0 for ``ppo_clip``)."""
    if algo not in ALGOS:
        raise ValueError(f"algo: expected one of {ALGOS}, got {algo!r}")
    kw = dict(DEFAULTS[algo])
    kw["kl_coef"] = 0.0 if algo == "ppo_clip" else float(beta)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    cfg = AlgoConfig(algo=algo, **kw)
    cfg.validate()
    return cfg
