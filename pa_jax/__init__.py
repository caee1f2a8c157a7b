"""pa-jax: progress advantage in JAX."""
__version__ = "0.1.0"

from pa_jax.head import (  # noqa: E402  (re-exports: head statistics)
    HeadStats,
    head_statistics,
    head_statistics_at,
    paired_head_statistics,
    paired_head_statistics_at,
)
from pa_jax.advantage import (  # noqa: E402  (re-exports: progress advantage)
    STEP_AGGS,
    TOKEN_AGGS,
    aggregate_all,
    aggregate_trajectory,
    all_trajectory_scores,
    k_step_advantage,
    running_advantage,
    step_advantages,
    step_values,
    trajectory_scores,
)
from pa_jax.baselines import (  # noqa: E402  (re-exports: confidence baselines)
    all_baseline_scores,
    authors_deepconf_scores,
    deepconf_scores,
    negative_entropy_scores,
    policy_logprob_scores,
    reference_logprob_scores,
    self_certainty_scores,
    topk_mean_logprob_scores,
)
