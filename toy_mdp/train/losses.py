"""The algorithms' losses and update steps, one MDP at a time (the driver ``vmap``s them):
``exact_pg``, ``reinforce_kl``, ``grpo`` (losses for one optax step) and PPO (several epochs per rollout)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from toy_mdp.train.config import AlgoConfig
from toy_mdp.train.problem import Problem, regularized_return_of_logits
from toy_mdp.train.sampling import _discount_matrix, _gather, _values, sample_episodes, sample_initial

Array = jax.Array

def exact_pg_loss(params: dict, prob: Problem, cfg: AlgoConfig, horizon: Optional[int],
                  T: int, key: Array) -> Array:
    """``-J(theta)``: the exact regularized return (linear solve / backward induction)."""
    del T, key
    return -regularized_return_of_logits(params["logits"], prob, cfg.kl_coef, horizon)


def reinforce_kl_loss(params: dict, prob: Problem, cfg: AlgoConfig, horizon: Optional[int],
                      T: int, key: Array) -> Array:
    """REINFORCE on ``r_t - beta log(pi/pi_ref)(a_t|s_t)`` (penalty stop-gradient):
    ``-mean_n sum_t log pi(a_t|s_t) (G_t - b(s_t))`` + critic ``1/2 (b(s_t) - G_t)^2``,
    ``G_t = sum_{u>=t} gamma^(u-t) r~_u``."""
    logits = jax.lax.stop_gradient(params["logits"])
    ep = sample_episodes(key, logits, prob, cfg.episodes, T)
    logp = _gather(jax.nn.log_softmax(params["logits"], -1), ep)
    lref = _gather(prob.ref_log, ep)
    r = ep.rewards - cfg.kl_coef * jax.lax.stop_gradient(logp - lref)
    G = r @ _discount_matrix(prob.gamma, T).T
    v, _ = _values(params["value"], ep, horizon)
    adv = jax.lax.stop_gradient(G - v)
    pg = -jnp.mean(jnp.sum(logp * adv, axis=1))
    vloss = 0.5 * jnp.mean(jnp.sum((v - jax.lax.stop_gradient(G)) ** 2, axis=1))
    return pg + vloss


def grpo_loss(params: dict, prob: Problem, cfg: AlgoConfig, horizon: Optional[int],
              T: int, key: Array) -> Array:
    """GRPO: ``-mean_{i,t} [rho_{i,t} Â_i - beta k3_{i,t}]``, ``rho = pi/stop_grad(pi)`` (on-policy),
    ``Â_i = (R_i - mean_g R)/(std_g R + 1e-6)`` within groups sharing ``s_0``,
    ``R_i = sum_t gamma^t r_t``, ``k3 = pi_ref/pi - log(pi_ref/pi) - 1`` (KL in the loss).

    On-policy, ``E_{a~pi}[grad k3] = pi - pi_ref`` = the gradient of the *forward* KL(pi_ref || pi),
    not of KL(pi || pi_ref). Ablations: ``grpo_kl="reward"`` puts the k1 penalty in the outcome
    instead (``R_i = sum_t gamma^t (r_t - beta log(pi/pi_ref)(a_t|s_t))``, no KL loss);
    ``grpo_std_normalize=False`` drops the std (Dr. GRPO). With both, the update is REINFORCE with
    a group-mean baseline on the regularized return, whose fixed point is ``pi*``.
    """
    del horizon
    k0, ke = jax.random.split(key)
    groups = cfg.episodes // cfg.group_size
    s0 = sample_initial(k0, prob.initial, groups)
    s0 = jnp.repeat(s0, cfg.group_size)
    ep = sample_episodes(ke, jax.lax.stop_gradient(params["logits"]), prob, cfg.episodes, T, s0=s0)
    logp = _gather(jax.nn.log_softmax(params["logits"], -1), ep)
    lref = _gather(prob.ref_log, ep)
    r = ep.rewards
    if cfg.grpo_kl == "reward":
        r = r - cfg.kl_coef * jax.lax.stop_gradient(logp - lref)
    R = (r * prob.gamma ** jnp.arange(T)).sum(1).reshape(groups, cfg.group_size)
    adv = R - R.mean(1, keepdims=True)
    if cfg.grpo_std_normalize:
        adv = adv / (R.std(1, keepdims=True) + 1e-6)
    adv = adv.reshape(-1)
    rho = jnp.exp(logp - jax.lax.stop_gradient(logp))
    log_r = lref - logp
    k3 = jnp.exp(log_r) - log_r - 1.0
    kl_loss = cfg.kl_coef * k3 if cfg.grpo_kl == "k3_loss" else 0.0
    return -jnp.mean(rho * adv[:, None] - kl_loss)


def _ppo_update(params: dict, opt_state: Any, opt: optax.GradientTransformation, prob: Problem,
                cfg: AlgoConfig, horizon: Optional[int], T: int, key: Array) -> tuple[dict, Any]:
    """One PPO iteration: roll out with pi_old, GAE on ``r_t - kl_coef log(pi_old/pi_ref)``, then
    ``epochs`` full-batch steps on ``-min(rho Â, clip(rho, 1 +- eps) Â) + 1/2 (V - R^lambda)^2``."""
    ep = sample_episodes(key, params["logits"], prob, cfg.episodes, T)
    logp_old = _gather(jax.nn.log_softmax(params["logits"], -1), ep)
    lref = _gather(prob.ref_log, ep)
    r = ep.rewards - cfg.kl_coef * (logp_old - lref)
    v, v_next = _values(params["value"], ep, horizon)
    delta = r + prob.gamma * v_next - v
    adv = delta @ _discount_matrix(prob.gamma * cfg.gae_lambda, T).T
    returns = adv + v
    if cfg.normalize_advantages:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)

    def loss_fn(p):
        logp = _gather(jax.nn.log_softmax(p["logits"], -1), ep)
        rho = jnp.exp(logp - logp_old)
        surr = jnp.minimum(rho * adv, jnp.clip(rho, 1 - cfg.clip_eps, 1 + cfg.clip_eps) * adv)
        vv, _ = _values(p["value"], ep, horizon)
        return -jnp.mean(surr) + 0.5 * jnp.mean((vv - returns) ** 2)

    def epoch(carry, _):
        p, s = carry
        g = jax.grad(loss_fn)(p)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    (params, opt_state), _ = jax.lax.scan(epoch, (params, opt_state), None, length=cfg.epochs)
    return params, opt_state


LOSSES: dict[str, Callable] = {"exact_pg": exact_pg_loss, "reinforce_kl": reinforce_kl_loss,
                               "grpo": grpo_loss}


def make_optimizer(cfg: AlgoConfig) -> optax.GradientTransformation:
    """Adam(``b2=adam_b2``) on the logits (cosine decay ``lr -> lr * lr_final_frac``),
    Adam(``value_lr``) on the critic."""
    updates = cfg.steps * (cfg.epochs if cfg.algo.startswith("ppo") else 1)
    sched = optax.cosine_decay_schedule(cfg.lr, decay_steps=updates, alpha=cfg.lr_final_frac)
    return optax.multi_transform({"policy": optax.adam(sched, b2=cfg.adam_b2),
                                  "value": optax.adam(cfg.value_lr)},
                                 {"logits": "policy", "value": "value"})


def make_step(cfg: AlgoConfig, opt: optax.GradientTransformation, horizon: Optional[int],
              T: int) -> Callable:
    """``step(params, opt_state, key, prob) -> (params, opt_state)`` for one MDP."""
    if cfg.algo.startswith("ppo"):
        def step(params, opt_state, key, prob):
            return _ppo_update(params, opt_state, opt, prob, cfg, horizon, T, key)
        return step
    loss = LOSSES[cfg.algo]

    def step(params, opt_state, key, prob):
        g = jax.grad(loss)(params, prob, cfg, horizon, T, key)
        u, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, u), opt_state
    return step
