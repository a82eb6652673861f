"""Logical-axis rules, mesh construction and sharded init (8 fake CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from nexus_jax import layers
from nexus_jax import sharding as S


def test_eight_fake_devices():
    assert jax.device_count() == 8


def test_make_mesh_fills_minus_one_and_rejects_bad_sizes():
    mesh = S.make_mesh(data=2, fsdp=-1, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="3 devices|do not divide"):
        S.make_mesh(data=3, fsdp=-1, tensor=1)
    with pytest.raises(ValueError, match="at most one"):
        S.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="needs 16 devices"):
        S.make_mesh(data=4, fsdp=2, tensor=2)


def test_logical_to_spec_drops_indivisible_axes():
    mesh = S.make_mesh(data=1, fsdp=4, tensor=2)
    assert S.logical_to_spec(("embed", "mlp"), S.TRAIN_RULES, (16, 6), mesh) == P("fsdp", "tensor")
    # 6 is not divisible by fsdp=4: replicate that dim instead of failing.
    assert S.logical_to_spec(("embed", "mlp"), S.TRAIN_RULES, (6, 7), mesh) == P(None, None)
    assert S.logical_to_spec(("batch", None), S.TRAIN_RULES, (8, 3), mesh) == P(("data", "fsdp"), None)
    with pytest.raises(KeyError, match="no_such_axis"):
        S.logical_to_spec(("no_such_axis",), S.TRAIN_RULES)


def test_validate_rules_rejects_duplicates_and_unknown_mesh_axes():
    with pytest.raises(ValueError, match="twice"):
        S.validate_rules((("embed", "fsdp"), ("embed", None)))
    with pytest.raises(ValueError, match="unknown mesh axis"):
        S.validate_rules((("embed", "model"),))


def test_create_sharded_places_params_and_matches_unsharded():
    mesh = S.make_mesh(data=2, fsdp=2, tensor=2)

    def ctor():
        return layers.Linear(16, 8, axes=("embed", "mlp"), rngs=nnx.Rngs(0))

    sharded = S.create_sharded(ctor, mesh, S.TRAIN_RULES)
    plain = ctor()
    assert sharded.kernel[...].sharding.spec == P("fsdp", "tensor")
    assert sharded.bias[...].sharding.spec == P("tensor")
    # jitted vs eager initialisers differ only by float rounding.
    np.testing.assert_allclose(np.asarray(sharded.kernel[...]), np.asarray(plain.kernel[...]), atol=1e-7)
    x = jax.random.normal(jax.random.key(1), (4, 5, 16))
    with S.sharding_context(mesh, S.TRAIN_RULES):
        y = jax.jit(lambda m, x: S.constrain(m(x), ("batch", "length", "act_mlp")))(sharded, x)
    assert y.sharding.spec == P(("data", "fsdp"), None, "tensor")
    np.testing.assert_allclose(np.asarray(y), np.asarray(plain(x)), atol=1e-5)


def test_constrain_is_identity_without_context_and_checks_rank():
    x = jnp.ones((2, 3))
    assert S.constrain(x, ("batch", "act_embed")) is x
    mesh = S.make_mesh(fsdp=8)
    with S.sharding_context(mesh, S.TRAIN_RULES), pytest.raises(ValueError, match="2 logical axes"):
        S.constrain(jnp.ones((2, 3, 4)), ("batch", "act_embed"))


def test_rms_and_layer_norm_match_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=(3, 5, 12)).astype(np.float32)
    rms = layers.RMSNorm(12, eps=1e-6)
    rms.weight[...] = jnp.asarray(np.linspace(0.5, 1.5, 12, dtype=np.float32))
    xt = torch.from_numpy(x)
    ref = xt * torch.rsqrt(xt.pow(2).mean(-1, keepdim=True) + 1e-6) * torch.linspace(0.5, 1.5, 12)
    np.testing.assert_allclose(np.asarray(rms(jnp.asarray(x))), ref.numpy(), atol=1e-5)
    ln = layers.LayerNorm(12, eps=1e-5)
    ref_ln = torch.nn.functional.layer_norm(xt, (12,), eps=1e-5)
    np.testing.assert_allclose(np.asarray(ln(jnp.asarray(x))), ref_ln.numpy(), atol=1e-5)


def test_gqa_attention_matches_torch_sdpa():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 7, 6, 8)).astype(np.float32)
    k = rng.normal(size=(2, 9, 3, 8)).astype(np.float32)
    v = rng.normal(size=(2, 9, 3, 8)).astype(np.float32)
    mask = np.tril(np.ones((7, 9), bool), k=2)[None, None]
    out = layers.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=jnp.asarray(mask))
    tq, tk, tv = (torch.from_numpy(a).transpose(1, 2) for a in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(
        tq, tk.repeat_interleave(2, 1), tv.repeat_interleave(2, 1), attn_mask=torch.from_numpy(mask)
    ).transpose(1, 2)
    np.testing.assert_allclose(np.asarray(out), ref.numpy(), atol=1e-5)


def test_one_mesh_spec_parser_for_every_cli():
    from nexus_jax.sharding import parse_mesh_spec

    assert parse_mesh_spec("1,16,4") == parse_mesh_spec("1x16x4") == (1, 16, 4)
    assert parse_mesh_spec(" 2,-1,1 ") == (2, -1, 1)
    for bad, msg in (("2,4", "has 2 entries"), ("a,b,c", "cannot parse mesh"), ("-1,-1,2", "at most one -1"),
                     ("0,1,1", "sizes must be >= 1")):
        with pytest.raises(ValueError, match=msg):
            parse_mesh_spec(bad)
