"""Sharded Qwen2.5 decoder on 8 fake CPU devices equals the single-device model; parameters are really sharded."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs.qwen2_5 import tiny
from nexus_jax import sharding
from nexus_jax.generation import GenerationConfig, generate
from nexus_jax.models.qwen2.build import check_mesh, create_model

CFG = tiny()


@nnx.jit
def _forward(model, ids, positions, mask):
    return model(ids, positions=positions, attention_mask=mask)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    b, length = 8, 48
    ids = rng.integers(0, CFG.vocab_size, (b, length))
    mask = np.ones((b, length), np.int32)
    for i in range(b):
        mask[i, : int(rng.integers(0, 20))] = 0
    pos = np.stack([np.maximum(np.cumsum(mask, -1) - 1, 0) + k for k in (0, 3, 7)])
    return jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask)


@pytest.fixture(scope="module")
def reference(inputs):
    model = create_model(CFG, seed=3)
    return np.asarray(_forward(model, *inputs).logits)


def _shard_count(arr: jax.Array) -> int:
    """How many distinct pieces the array is split into (1 = replicated)."""
    return int(np.prod(arr.shape)) // int(np.prod(arr.sharding.shard_shape(arr.shape)))


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (1, 2, 4)])
def test_sharded_logits_equal_single_device(inputs, reference, mesh_shape):
    mesh = sharding.make_mesh(*mesh_shape)
    rules = sharding.TRAIN_RULES
    model = create_model(CFG, seed=3, mesh=mesh, rules=rules)
    data, fsdp, tensor = mesh_shape
    k_proj = model.model.layers[0].self_attn.k_proj.kernel[...]
    gate = model.model.layers[1].mlp.gate_proj.kernel[...]
    embed = model.model.embed_tokens.embedding[...]
    for arr in (k_proj, gate, embed):
        assert arr.sharding.mesh.shape == mesh.shape
    # expected split factors under TRAIN_RULES: embed -> fsdp, kv_heads / mlp / vocab -> tensor
    assert _shard_count(k_proj) == fsdp * tensor, k_proj.sharding
    assert _shard_count(gate) == fsdp * tensor, gate.sharding
    expected_spec = P("fsdp" if fsdp > 1 else None, "tensor" if tensor > 1 else None)
    assert k_proj.sharding.is_equivalent_to(NamedSharding(mesh, expected_spec), 2), k_proj.sharding
    ids, pos, mask = inputs
    ids = jax.device_put(ids, sharding.data_sharding(mesh, 2, rules))
    mask = jax.device_put(mask, sharding.data_sharding(mesh, 2, rules))
    pos = jax.device_put(pos, NamedSharding(mesh, P(None, ("data", "fsdp"))))
    assert _shard_count(ids) == data * fsdp
    with sharding.sharding_context(mesh, rules):
        out = _forward(model, ids, pos, mask)
    logits = out.logits
    if tensor > 1:
        assert _shard_count(logits) > 1, logits.sharding  # vocab 384 splits over tensor
    err = np.abs(np.asarray(logits) - reference).max()
    print(f"\nmesh {mesh_shape}: sharded vs single-device logits max abs error {err:.3g}")
    assert err <= 1e-5, f"mesh {mesh_shape}: sharded vs single-device max abs error {err:.3g}"


def test_sharded_greedy_generation_equals_single_device(inputs):
    ids, _, mask = (np.asarray(x)[:4] for x in inputs)
    cfg, gen = tiny(num_layers=1), GenerationConfig(max_new_tokens=6)
    ref = generate(create_model(cfg, seed=3), ids, mask, config=gen)
    mesh = sharding.make_mesh(2, 1, 4)
    model = create_model(cfg, seed=3, mesh=mesh, rules=sharding.INFERENCE_RULES)
    assert _shard_count(model.model.layers[0].self_attn.q_proj.kernel[...]) == 4
    with sharding.sharding_context(mesh, sharding.INFERENCE_RULES):
        out = generate(model, ids, mask, config=gen)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))


def test_mesh_that_does_not_divide_heads_raises():
    cfg = tiny(head_dim=6, mrope_section=(1, 1, 1), hidden_size=54)  # kv width 3 * 6 = 18
    with pytest.raises(ValueError, match=r"size 4\) do not divide num_kv_heads \* head_dim = 18"):
        create_model(cfg, mesh=sharding.make_mesh(1, 2, 4))
    with pytest.raises(ValueError, match=r"size 4\) do not divide hidden_size = 54"):
        check_mesh(cfg, sharding.make_mesh(2, 4, 1), sharding.TRAIN_RULES)
    check_mesh(cfg, sharding.make_mesh(2, 4, 1), sharding.INFERENCE_RULES)  # embed is not sharded at inference
