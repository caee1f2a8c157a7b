"""pa_jax.rl: split LoRA policy parity, REINFORCE estimator (unbiased vs the exact gradient), training steps."""
import numpy as np
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from pa_jax.models import Decoder, token_logprobs
from pa_jax.models.config import ModelConfig
from pa_jax.rl import policy as P
from pa_jax.rl import reinforce as R


def tiny_model():
    hf = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
              rms_norm_eps=1e-5, rope_theta=10000.0)
    c = ModelConfig.from_hf_dict(hf)
    return c, Decoder(c, rngs=nnx.Rngs(0), dtype="float32")


def tiny_rows(seed=0):
    rng = np.random.default_rng(seed)
    prefixes = [[1, 7] + list(rng.integers(3, 64, size=n)) for n in (3, 7, 5, 4)]
    cmds = [list(rng.integers(3, 64, size=k)) for k in (2, 3, 2)]
    return prefixes, cmds


def random_lora(spec, model, scale=0.1):
    lora = P.init_lora(spec, model, 0)
    leaves, tdef = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    return jax.tree.unflatten(tdef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def test_split_lora_logprobs_match_merged_full_model(tmp_path):
    config, model = tiny_model()
    prefixes, cmds = tiny_rows()
    spec = P.LoraSpec(split=1, num_layers=3, rank=2)
    sp = P.SplitPolicy(model, spec, P.command_rows(prefixes, cmds), batch=3)
    lora = random_lora(spec, model)
    got = sp.all_logprobs(lora, batch=3)
    # oracle: NumPy merge W + (alpha/r) B A into a copy, then the library's full-row token_logprobs
    gd, st = nnx.split(model)
    pure = nnx.to_pure_dict(st)
    for k, ab in lora.items():
        _, _, li, par, t = k.split(".")
        w = np.asarray(pure["layers"][int(li)][par][t]["weight"])
        pure["layers"][int(li)][par][t]["weight"] = w + (spec.alpha / spec.rank) * np.asarray(ab["B"]) @ np.asarray(ab["A"])
    nnx.replace_by_pure_dict(st, pure)
    merged = nnx.merge(gd, st)
    want = np.zeros(got.shape)
    for i, p in enumerate(prefixes):
        for a, c in enumerate(cmds):
            lp = np.asarray(token_logprobs(config, merged, np.array([p + c], np.int32)))[0]
            want[i, a] = lp[len(p) - 1:].sum()
    np.testing.assert_allclose(got, want, atol=2e-5)
    # B = 0 at init: the policy is the base model
    base = sp.all_logprobs(P.init_lora(spec, model, 0), batch=3)
    np.testing.assert_allclose(base, sp.all_logprobs(None, batch=3), atol=1e-6)
    # PEFT round trip
    P.save_peft(tmp_path / "a", lora, spec)
    cfg, arrays = P.load_peft_arrays(tmp_path / "a")
    assert cfg["r"] == 2 and cfg["layers_to_transform"] == [1, 2]
    for k in lora:
        np.testing.assert_array_equal(arrays[k]["A"], np.asarray(lora[k]["A"]))
        assert arrays[k]["B"].shape == lora[k]["B"].shape


def test_reinforce_estimator_is_unbiased_on_a_bandit():
    """One decision: 2 commands (ending with reward 1 w.p. 0.8 / 0.3) + invalid (reward 0). The mean of
    sum_a W[a] d log pi(a)/dz over many batches equals dJ/dz, J(z) = E_pi[r] - beta KL(pi || pi_ref),
    pi = softmax(z) over 3 actions (numerical derivative)."""
    beta = 0.2
    ref = np.array([0.2, 0.3, 0.5])
    z = np.log(np.array([0.5, 0.2, 0.3]))
    r = np.array([0.8, 0.3, 0.0])

    def J(z):
        p = np.exp(z - np.log(np.exp(z).sum()))
        return np.sum(p * (r - beta * np.log(p / ref)))

    eps = 1e-6
    exact = np.array([(J(z + eps * e) - J(z - eps * e)) / (2 * eps) for e in np.eye(3)])
    pi = np.exp(z - np.log(np.exp(z).sum()))
    prob = np.array([[[0.8, 0.2], [0.3, 0.7]]])
    child = np.full((1, 2, 2), -1)
    reward = np.array([[[1.0, 0.0], [1.0, 0.0]]])
    rng = np.random.default_rng(0)
    est = np.zeros(3)
    n = 3000
    for _ in range(n):
        ep = R.sample_episodes(prob, child, reward, np.log(pi[None, :2]), np.log(ref[None, :2]), 8, 1, rng)
        nodes, W, _ = R.reinforce_weights(ep, beta, 2)
        g = np.zeros(3)
        for a in range(3):
            g += W[0, a] * (np.eye(3)[a] - pi)  # d log softmax(z)_a / dz
        est += g / n
    np.testing.assert_allclose(est, exact, atol=0.01)


def test_two_training_steps_decrease_the_loss_on_a_fixed_batch():
    config, model = tiny_model()
    prefixes, cmds = tiny_rows(1)
    spec = P.LoraSpec(split=1, num_layers=3, rank=4)
    sp = P.SplitPolicy(model, spec, P.command_rows(prefixes, cmds), batch=4)
    lora = P.init_lora(spec, model, 0)
    opt = optax.adam(1e-2)
    opt_state = opt.init(lora)
    step = R.train_step_fn(sp.logprobs_fn(), opt)
    nodes = np.array([0, 2, 3])
    W = np.array([[0.5, -0.2, 0.0, -0.3], [0.0, 0.4, -0.1, 0.0], [-0.2, 0.0, 0.3, 0.1]])
    nodes, W = R.pad_nodes(nodes, W, 4)
    inputs = sp.inputs(nodes)
    losses = []
    for _ in range(3):
        lora, opt_state, loss = step(lora, opt_state, sp.state, inputs, jnp.asarray(W))
        losses.append(float(loss))
    assert losses[1] < losses[0] and losses[2] < losses[1]
    # the loss really is -sum W log pi at the updated adapter
    lp = R.with_invalid(sp.all_logprobs(lora, batch=4))[nodes]
    f = jax.jit(sp.logprobs_fn())
    direct = float(R.surrogate_loss(f(sp.state, lora, *inputs), jnp.asarray(W)))
    assert direct == pytest.approx(-np.sum(W * lp), abs=1e-4)


def test_kv_cache_sampler_logprobs_match_teacher_forcing():
    """Sampled tokens' log-probs (KV buffer, one token per call, right-padded prompts of different lengths)
    equal the full forward's token_logprobs of prompt + generated tokens; a merged LoRA changes them."""
    from pa_jax.rl import sampler as S

    config, model = tiny_model()
    spec = P.LoraSpec(split=1, num_layers=3, rank=2)
    policy = S.merge_lora(model, random_lora(spec, model, 0.3), spec)
    prompts = [[5, 9, 11, 3, 7], [4, 8, 2]]
    ids = np.zeros((2, 5), np.int32)
    mask = np.zeros((2, 5), np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)], mask[i, : len(p)] = p, 1
    for m in (model, policy):
        out, lps, done = S.sample(m, ids, mask, jax.random.PRNGKey(3), max_new_tokens=6, stop_id=2)
        for i, p in enumerate(prompts):
            gen = [int(t) for t in out[i] if t >= 0]
            assert len(gen) == 6 or gen[-1] == 2
            full = np.array([p + gen], np.int32)
            want = np.asarray(token_logprobs(config, m, full))[0, len(p) - 1:]
            np.testing.assert_allclose(lps[i, : len(gen)], want, atol=2e-5)
