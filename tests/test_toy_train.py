"""Post-training algorithms on the toy MDP (issue 6): metrics vs NumPy/scipy oracles, convergence of
exact KL policy gradient to pi*, REINFORCE-with-KL correlation, determinism, the KL-free PPO fit."""
import itertools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from toy_mdp import train as T

ROOT = pathlib.Path(__file__).resolve().parents[1]
from toy_mdp.mdp import random_mdp, random_reference_policy
from toy_mdp.solve import regularized_return as np_regularized_return
from toy_mdp.solve import solve_kl_regularized, state_visitation


# ------------------------------------------------------------------------------ NumPy oracles
def np_weighted_pearson(x, y, w):
    c = np.cov(x, y, aweights=w, bias=True)
    return c[0, 1] / np.sqrt(c[0, 0] * c[1, 1])


def np_midranks(x, w):
    w = w / w.sum()
    r = np.zeros(len(x))
    for i in range(len(x)):
        for j in range(len(x)):
            if x[j] < x[i]:
                r[i] += w[j]
            elif x[j] == x[i]:
                r[i] += 0.5 * w[j]
    return r


def np_pair_agreement(lr, adv, d):
    num = 0.0
    for idx in np.ndindex(*lr.shape[:-1]):
        agree, n = 0.0, 0
        for a, b in itertools.combinations(range(lr.shape[-1]), 2):
            da = adv[idx + (a,)] - adv[idx + (b,)]
            if da == 0:
                continue
            dl = lr[idx + (a,)] - lr[idx + (b,)]
            n += 1
            agree += 0.5 if dl == 0 else float(np.sign(dl) == np.sign(da))
        num += d[idx] * (agree / n if n else 1.0)
    return num / d.sum()


def test_metric_functions_match_numpy_and_scipy():
    rng = np.random.default_rng(0)
    n = 60
    x = rng.normal(size=n)
    y = 0.7 * x + 0.5 * rng.normal(size=n)
    w = rng.random(n) * (rng.random(n) > 0.2)  # some zero weights
    with jax.enable_x64(True):
        xj, yj, wj = jnp.asarray(x), jnp.asarray(y), jnp.asarray(w)
        np.testing.assert_allclose(T.weighted_pearson(xj, yj, wj), np_weighted_pearson(x, y, w),
                                   rtol=1e-12)
        rx, ry = np_midranks(x, w), np_midranks(y, w)
        np.testing.assert_allclose(T.weighted_spearman(xj, yj, wj),
                                   np_weighted_pearson(rx, ry, w), rtol=1e-12)
        # Equal weights: scipy's Pearson and Spearman (with ties, average ranks).
        xt, yt = np.round(x, 1), np.round(y, 1)
        u = jnp.ones(n)
        np.testing.assert_allclose(T.weighted_pearson(xj, yj, u), scipy.stats.pearsonr(x, y)[0],
                                   rtol=1e-12)
        np.testing.assert_allclose(T.weighted_spearman(jnp.asarray(xt), jnp.asarray(yt), u),
                                   scipy.stats.spearmanr(xt, yt)[0], rtol=1e-12)
        # Effective beta: weighted least squares through the origin.
        sw = np.sqrt(w)
        b_np = np.linalg.lstsq((sw * x)[:, None], sw * y, rcond=None)[0][0]
        res_np = np.sqrt(np.sum(w * (y - b_np * x) ** 2) / w.sum())
        b, res = T.effective_beta(xj, yj, wj)
        np.testing.assert_allclose(b, b_np, rtol=1e-12)
        np.testing.assert_allclose(res, res_np, rtol=1e-12)
        # Constant log-ratio (pi = pi_ref): correlations and beta_eff undefined.
        assert np.isnan(T.weighted_pearson(jnp.zeros(n), yj, wj))
        assert np.isnan(T.weighted_spearman(jnp.zeros(n), yj, wj))
        assert np.isnan(T.effective_beta(jnp.zeros(n), yj, wj)[0])
        # Ranking agreement per state, with ties in both inputs.
        lr = np.round(rng.normal(size=(3, 5, 4)), 1)
        adv = np.round(rng.normal(size=(3, 5, 4)), 1)
        d = rng.random((3, 5))
        pair, top1 = T.ranking_agreement(jnp.asarray(lr), jnp.asarray(adv), jnp.asarray(d))
        np.testing.assert_allclose(pair, np_pair_agreement(lr, adv, d), rtol=1e-12)
        top1_np = np.sum(d * (lr.argmax(-1) == adv.argmax(-1))) / d.sum()
        np.testing.assert_allclose(top1, top1_np, rtol=1e-12)


@pytest.mark.parametrize("horizon", [None, 4])
def test_policy_metrics_match_numpy(horizon):
    """Metrics of a random policy against the solver, its evaluator and NumPy formulas."""
    S, A, M, beta = 5, 3, 2, 0.7
    gamma = 0.8 if horizon is None else 1.0
    mdp = random_mdp(3, S, A, gamma=gamma, horizon=horizon, num_mdps=M)
    ref = random_reference_policy(4, S, A, min_prob=0.05, num_mdps=M)
    hp = 1 if horizon is None else horizon
    logits = np.log(ref)[:, None] + np.random.default_rng(5).normal(size=(M, hp, S, A))
    with jax.enable_x64(True):
        prob = T.problem_from_mdp(mdp, ref, beta)
        out = jax.vmap(lambda lg, pr: T.policy_metrics(lg, pr, beta=beta, horizon=horizon,
                                                       min_weight=0.01))(jnp.asarray(logits), prob)
    sol = solve_kl_regularized(mdp, ref, beta)
    pi = np.exp(logits - logits.max(-1, keepdims=True))
    pi /= pi.sum(-1, keepdims=True)
    pol = pi[:, 0] if horizon is None else pi
    d = state_visitation(mdp, pol)                    # [M, S] or [M, H, S] (per-step marginals)
    d = d[:, None] if horizon is None else d / horizon
    adv = sol.advantage if horizon is not None else sol.advantage[:, None]
    lr = np.log(pi) - np.log(ref)[:, None]
    err = np.abs(beta * lr - adv)
    w = d[..., None] * pi
    np.testing.assert_allclose(w.sum((1, 2, 3)), 1.0, rtol=1e-12)
    np.testing.assert_allclose(out["mean_abs_error"], (w * err).sum((1, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(out["worst_abs_error"],
                               np.where(w >= 0.01, err, 0).max((1, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(out["worst_abs_error_all"], err.max((1, 2, 3)), rtol=1e-10)
    gap = np_regularized_return(mdp, sol.policy, ref, beta) - \
        np_regularized_return(mdp, pol, ref, beta)
    np.testing.assert_allclose(out["return_gap"], gap, rtol=1e-8, atol=1e-12)
    assert np.all(gap > 0)
    for m in range(M):
        wf, xf, af = w[m].ravel(), (beta * lr[m]).ravel(), adv[m].ravel()
        np.testing.assert_allclose(out["pearson"][m], np_weighted_pearson(xf, af, wf), rtol=1e-10)
        np.testing.assert_allclose(out["spearman"][m],
                                   np_weighted_pearson(np_midranks(xf, wf), np_midranks(af, wf), wf),
                                   rtol=1e-10)
        np.testing.assert_allclose(out["kl"][m], np.sum(w[m] * lr[m]), rtol=1e-10)


def test_sampler_matches_exact_visitation():
    """Empirical (t, s, a) frequencies of the JAX sampler vs exact marginals (5 sigma)."""
    S, A, H, N = 4, 3, 3, 20000
    mdp = random_mdp(7, S, A, gamma=1.0, horizon=H, num_mdps=1)
    ref = random_reference_policy(8, S, A, min_prob=0.1, num_mdps=1)
    with jax.enable_x64(True):
        prob = jax.tree.map(lambda x: x[0], T.problem_from_mdp(mdp, ref, 1.0))
        logits = prob.ref_log + jnp.asarray(np.random.default_rng(1).normal(size=(H, S, A)))
        ep = jax.jit(T.sample_episodes, static_argnums=(3, 4))(jax.random.key(0), logits, prob, N, H)
        pi = np.asarray(jax.nn.softmax(logits, -1))
    counts = np.zeros((H, S, A))
    np.add.at(counts, (np.arange(H)[None, :].repeat(N, 0), np.asarray(ep.states),
                       np.asarray(ep.actions)), 1.0)
    d = state_visitation(mdp[0], pi)  # [H, S]
    p = d[..., None] * pi
    sigma = np.sqrt(p * (1 - p) / N)
    assert np.all(np.abs(counts / N - p) <= 5 * sigma + 1e-12)
    np.testing.assert_array_equal(np.asarray(ep.rewards), mdp.rewards[0][np.asarray(ep.states),
                                                                         np.asarray(ep.actions)])


@pytest.mark.parametrize("horizon", [None, 4])
def test_exact_pg_converges_to_pi_star(horizon):
    env = T.EnvConfig(num_mdps=2, num_states=5, num_actions=3, horizon=horizon,
                      gamma=0.8 if horizon is None else 1.0, beta=0.5, ref_min_prob=0.1)
    cfg = T.default_algo_config("exact_pg", env.beta, steps=3000, eval_every=3000)
    _, _, prob = T.make_problem(env, seed=1)
    hist, logits = T.train_algorithm(prob, env, cfg, jax.random.key(0))
    assert np.all(hist["worst_abs_error_all"][-1] <= 1e-4), hist["worst_abs_error_all"][-1]
    logits = np.asarray(logits)
    log_pi = logits - scipy.special.logsumexp(logits, axis=-1, keepdims=True)
    np.testing.assert_allclose(log_pi, np.asarray(prob.log_pi_star), atol=2e-4)
    assert np.all(hist["return_gap"][-1] <= 1e-8)


def test_reinforce_kl_reaches_pearson_095():
    """Budget: 2 MDPs (S=5, A=3, H=4), 200 steps x 128 episodes per MDP (25,600 episodes)."""
    env = T.EnvConfig(num_mdps=2, num_states=5, num_actions=3, horizon=4, gamma=1.0, beta=0.5,
                      ref_min_prob=0.1)
    cfg = T.default_algo_config("reinforce_kl", env.beta, steps=200, episodes=128, eval_every=100)
    _, _, prob = T.make_problem(env, seed=2)
    hist, _ = T.train_algorithm(prob, env, cfg, jax.random.key(3))
    assert np.all(np.isnan(hist["pearson"][0]))  # pi = pi_ref: undefined
    assert np.all(hist["pearson"][-1] >= 0.95), hist["pearson"][-1]
    assert np.all(hist["mean_abs_error"][-1] < 0.5 * hist["mean_abs_error"][0])


def _tiny_argv(path, algo, seed=0):
    return ["--algo", algo, "--steps", "6", "--eval-every", "3", "--seed", str(seed),
            "--num-mdps", "2", "--num-states", "4", "--num-actions", "3", "--horizon", "3",
            "--episodes", "16", "--json", str(path)]


def _numbers(result):
    out = dict(result)
    out["runs"] = {a: {k: v for k, v in r.items() if k != "wall_s"} for a, r in result["runs"].items()}
    out["config"] = {k: v for k, v in result["config"].items() if k != "argv"}
    return out


def test_cli_json_deterministic_and_reports_effective_beta(tmp_path):
    p1, p2, p3 = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    assert T.main(_tiny_argv(p1, "all")) == 0
    assert T.main(_tiny_argv(p2, "ppo_clip")) == 0
    assert T.main(_tiny_argv(p3, "ppo_clip", seed=1)) == 0
    r1, r2, r3 = (json.loads(p.read_text()) for p in (p1, p2, p3))
    assert list(r1["runs"]) == list(T.ALGOS)
    # Same seed, same numbers (a run does not depend on which other algorithms ran).
    assert _numbers(r1)["runs"]["ppo_clip"] == _numbers(r2)["runs"]["ppo_clip"]
    assert r1["runs"]["ppo_clip"]["history"] != r3["runs"]["ppo_clip"]["history"]
    # Config recorded; KL-free PPO: kl_coef 0 and a finite effective-beta fit in the JSON.
    assert r1["config"]["seed"] == 0 and r1["config"]["steps"] == 6
    hp = r1["runs"]["ppo_clip"]["config"]
    assert hp["algo"] == "ppo_clip" and hp["kl_coef"] == 0.0 and hp["clip_eps"] > 0
    assert r1["runs"]["ppo_kl"]["config"]["kl_coef"] == r1["config"]["env"]["beta"]
    fin = r1["runs"]["ppo_clip"]["final"]
    assert np.isfinite(fin["beta_eff"]) and np.isfinite(fin["beta_eff_residual"])
    assert len(fin["beta_eff_per_mdp"]) == 2
    for run in r1["runs"].values():
        assert run["history"]["step"] == [0, 3, 6]
        assert all(np.isfinite(v) for v in run["history"]["mean_abs_error"])
    assert not list(tmp_path.glob(".tmp_*"))
    # The figure script reads this JSON and writes a PNG.
    import importlib.util
    spec = importlib.util.spec_from_file_location("prop1_fig", ROOT / "paper_figs" / "prop1_training.py")
    fig = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fig)
    png = tmp_path / "fig.png"
    assert fig.main([str(p1), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="runs"):
        fig.load(str(_write(tmp_path / "bad.json", {"config": {}})))


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_grpo_k3_loss_gradient_is_forward_kl_gradient():
    """On-policy, E_{a~pi}[grad_theta k3(a)] = pi - pi_ref (= grad KL(pi_ref || pi)), which differs
    from grad KL(pi || pi_ref) = pi (log(pi/pi_ref) - KL): why GRPO's fixed point is not pi*."""
    rng = np.random.default_rng(0)
    theta, ref = rng.normal(size=5), rng.dirichlet(np.ones(5))
    with jax.enable_x64(True):
        def expected_k3(t):
            logp = jax.nn.log_softmax(t)
            log_r = jnp.log(ref) - logp
            k3 = jnp.exp(log_r) - log_r - 1.0
            return jnp.sum(jax.lax.stop_gradient(jnp.exp(logp)) * k3)
        g = np.asarray(jax.grad(expected_k3)(jnp.asarray(theta)))
    pi = np.exp(theta - theta.max())
    pi /= pi.sum()
    np.testing.assert_allclose(g, pi - ref, atol=1e-12)
    kl = np.sum(pi * np.log(pi / ref))
    assert np.max(np.abs(g - pi * (np.log(pi / ref) - kl))) > 1e-3


def test_bad_input():
    with pytest.raises(ValueError, match="algo"):
        T.default_algo_config("dpo", 0.5)
    with pytest.raises(ValueError, match="steps"):
        T.default_algo_config("grpo", 0.5, steps=0)
    with pytest.raises(ValueError, match="episodes"):
        T.default_algo_config("grpo", 0.5, episodes=20, group_size=8)
    with pytest.raises(ValueError, match="beta"):
        T.EnvConfig(beta=0.0).validate()
    with pytest.raises(ValueError, match="gamma"):
        T.EnvConfig(horizon=None, gamma=1.0).validate()
    mdp = random_mdp(0, 4, 3, gamma=0.9, num_mdps=2)
    ref = random_reference_policy(1, 4, 3, num_zeros=1, num_mdps=2)
    with pytest.raises(ValueError, match="ref_policy"):
        T.problem_from_mdp(mdp, ref, 0.5)
    with pytest.raises(ValueError, match="batched"):
        T.problem_from_mdp(mdp[0], ref[0], 0.5)
