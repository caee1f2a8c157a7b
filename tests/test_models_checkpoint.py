"""orbax save/restore of converted decoder parameters: exact round trip, dtype cast, sharded restore."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("orbax.checkpoint")

import jax  # noqa: E402
from flax import nnx  # noqa: E402

import pa_jax.models as M  # noqa: E402
from pa_jax.models import sharding as S  # noqa: E402
from pa_jax.models.checkpoint import restore_params, save_params  # noqa: E402
from pa_jax.models.config import ModelConfig  # noqa: E402

HF = {
    "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": 96, "hidden_size": 32,
    "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 8, "rms_norm_eps": 1e-6, "max_position_embeddings": 64, "tie_word_embeddings": False,
    "rope_theta": 10000.0,
}


def _params(model) -> dict[str, np.ndarray]:
    _, state = nnx.split(model)
    return {".".join(map(str, p)): np.asarray(v.get_value(), np.float32) for p, v in nnx.to_flat_state(state)}


def test_orbax_round_trip_exact_and_sharded(tmp_path):
    config = ModelConfig.from_hf_dict(HF)
    model = M.Decoder(config, rngs=nnx.Rngs(7), dtype="float32")
    ids = np.random.default_rng(0).integers(0, 96, size=(2, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    want = np.asarray(M.forward(model, ids, mask))

    save_params(config, model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="already exists"):
        save_params(config, model, tmp_path / "ckpt")

    cfg2, restored = restore_params(tmp_path / "ckpt")
    assert cfg2.model_type == "qwen3" and cfg2.num_layers == 2
    a, b = _params(model), _params(restored)
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    np.testing.assert_array_equal(np.asarray(M.forward(restored, ids, mask)), want)

    _, bf16 = restore_params(tmp_path / "ckpt", dtype="bfloat16")
    assert bf16.layers[0].mlp.up_proj.weight[...].dtype == jax.numpy.bfloat16

    mesh = S.make_mesh(data=1, model=1)
    _, sharded = restore_params(tmp_path / "ckpt", mesh=mesh)
    w = sharded.layers[1].self_attn.q_proj.weight[...]
    assert isinstance(w.sharding, jax.sharding.NamedSharding) and w.sharding.mesh.axis_names == ("data", "model")
    with jax.set_mesh(mesh):
        got = np.asarray(M.forward(sharded, ids, mask))
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_restore_rejects_non_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not a pa-jax orbax checkpoint"):
        restore_params(tmp_path)
