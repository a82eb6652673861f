"""FLUX DiT parity with diffusers FluxTransformer2DModel (fp32, tiny random config), packing, sharding, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from flax import nnx

from configs.flux import FluxDiTConfig
from conversion import load
from nexus_jax import sharding
from nexus_jax.models.flux import FluxDiT, image_ids, latent_size, pack_latents, unpack_latents

CFG = FluxDiTConfig.tiny()


def torch_flux(cfg: FluxDiTConfig, seed: int = 0) -> FluxTransformer2DModel:
    """diffusers reference from the same tiny config, every weight re-drawn (non-trivial norms and AdaLN)."""
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=cfg.in_channels, num_layers=cfg.num_double_blocks,
        num_single_layers=cfg.num_single_blocks, attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_dim, pooled_projection_dim=cfg.pooled_dim, guidance_embeds=cfg.guidance_embed,
        axes_dims_rope=cfg.rope_axes_dim,
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm_q" in name or "norm_k" in name or "norm_added" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.6 / max(p.shape[-1], 1) ** 0.5 if p.ndim == 2 else 0.05))
    return model


def jax_flux_from(model: FluxTransformer2DModel, cfg: FluxDiTConfig) -> FluxDiT:
    ours = FluxDiT(cfg, rngs=nnx.Rngs(1))
    return load.flux_dit_diffusers(ours, model.state_dict())


def make_inputs(cfg: FluxDiTConfig, b: int, h: int, w: int, lt: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Non-square latent, fractional (bf16-like) text ids, per-sample sigma and guidance."""
    rng = np.random.default_rng(seed)
    li = (h // 2) * (w // 2)
    txt_ids = np.stack([np.ones(lt), rng.uniform(0, 30, lt), rng.uniform(0, 30, lt)], -1).astype(np.float32)
    return dict(
        tokens=rng.standard_normal((b, li, cfg.in_channels)).astype(np.float32),
        sigma=np.linspace(0.93, 0.21, b).astype(np.float32),
        context=rng.standard_normal((b, lt, cfg.context_dim)).astype(np.float32),
        pooled=rng.standard_normal((b, cfg.pooled_dim)).astype(np.float32),
        txt_ids=txt_ids,
        img_ids=np.asarray(image_ids(h, w)),
        guidance=np.linspace(3.5, 1.0, b).astype(np.float32),
    )


def torch_forward(model: FluxTransformer2DModel, x: dict[str, np.ndarray]) -> np.ndarray:
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    with torch.no_grad():
        out = model(hidden_states=t["tokens"], encoder_hidden_states=t["context"], pooled_projections=t["pooled"],
                    timestep=t["sigma"], img_ids=t["img_ids"], txt_ids=t["txt_ids"], guidance=t["guidance"])
    return out.sample.numpy()


@pytest.fixture(scope="module")
def models():
    ref = torch_flux(CFG)
    return ref, jax_flux_from(ref, CFG)


@pytest.mark.parametrize("h,w,lt", [(8, 12, 7), (6, 4, 520)])
def test_dit_matches_diffusers(models, h, w, lt):
    ref, ours = models
    x = make_inputs(CFG, 2, h, w, lt)
    expected = torch_forward(ref, x)
    got = np.asarray(jax.jit(lambda m, a: m(**a))(ours, {k: jnp.asarray(v) for k, v in x.items()}))
    err = np.abs(got - expected).max()
    print(f"DiT max abs err (latent {h}x{w}, {lt} text tokens): {err:.2e} (output scale {np.abs(expected).max():.2f})")
    assert err <= 1e-4


def test_pack_unpack_and_ids_match_diffusers():
    rng = np.random.default_rng(3)
    z = rng.standard_normal((2, 16, 6, 10)).astype(np.float32)  # NCHW, non-square
    expected = FluxPipeline._pack_latents(torch.from_numpy(z), 2, 16, 6, 10).numpy()
    packed = pack_latents(jnp.asarray(z.transpose(0, 2, 3, 1)))
    np.testing.assert_array_equal(np.asarray(packed), expected)
    np.testing.assert_array_equal(np.asarray(unpack_latents(packed, 6, 10)), z.transpose(0, 2, 3, 1))
    ids = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32).numpy()
    np.testing.assert_array_equal(np.asarray(image_ids(6, 10)), ids)


def test_sharded_equals_unsharded(models):
    _, ours = models
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = sharding.create_sharded(lambda: FluxDiT(CFG, rngs=nnx.Rngs(5)), mesh, sharding.TRAIN_RULES)
    shardings = sharding.state_shardings(nnx.state(sharded), mesh, sharding.TRAIN_RULES)
    nnx.update(sharded, jax.device_put(nnx.state(ours), shardings))
    spec = sharded.blocks[0].attn.a_to_qkv.kernel[...].sharding.spec
    assert spec == jax.sharding.PartitionSpec("fsdp", "tensor"), spec
    assert sharded.single_blocks[1].proj_out.kernel[...].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    x = {k: jnp.asarray(v) for k, v in make_inputs(CFG, 4, 8, 12, 9, seed=1).items()}
    expected = np.asarray(jax.jit(lambda m, a: m(**a))(ours, x))
    with sharding.sharding_context(mesh, sharding.TRAIN_RULES):
        xs = dict(x, tokens=jax.device_put(x["tokens"], sharding.data_sharding(mesh, 3)))
        got = jax.jit(lambda m, a: m(**a))(sharded, xs)
    assert not got.sharding.is_fully_replicated
    err = np.abs(np.asarray(got) - expected).max()
    print(f"sharded vs unsharded DiT max abs err: {err:.2e}")
    assert err <= 1e-5


def test_bad_inputs_raise(models):
    _, ours = models
    x = {k: jnp.asarray(v) for k, v in make_inputs(CFG, 2, 4, 4, 5).items()}
    with pytest.raises(ValueError, match=r"context must be \[2, Lt, 32\]"):
        ours(**dict(x, context=jnp.zeros((2, 5, 31))))
    with pytest.raises(ValueError, match="latent tokens must be"):
        ours(**dict(x, tokens=jnp.zeros((2, 4, 60))))
    with pytest.raises(ValueError, match="img_ids must be"):
        ours(**dict(x, img_ids=jnp.zeros((3, 3))))
    with pytest.raises(ValueError, match="pass guidance"):
        ours(**dict(x, guidance=None))
    with pytest.raises(ValueError, match="width=520 must be a positive multiple of 16"):
        latent_size(512, 520)
    with pytest.raises(ValueError, match="rope_axes_dim"):
        FluxDiTConfig.tiny(rope_axes_dim=(4, 6, 8))


@pytest.mark.slow
def test_remat_same_loss_and_grads(models):
    """remat="full" gives the same loss and gradients."""
    _, ours = models
    x = {k: jnp.asarray(v) for k, v in make_inputs(CFG, 2, 4, 6, 5, seed=2).items()}

    def loss(m):
        return jnp.mean(m(**x) ** 2)

    remat = FluxDiT(FluxDiTConfig.tiny(remat="full"), rngs=nnx.Rngs(0))
    nnx.update(remat, nnx.state(ours))
    (l0, g0), (l1, g1) = (jax.jit(nnx.value_and_grad(loss))(m) for m in (ours, remat))
    g_err = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))
    assert abs(float(l0 - l1)) <= 1e-6 and g_err <= 1e-6, (l0, l1, g_err)


def test_bf16_close_to_fp32(models):
    """bf16 params + compute (fp32 softmax / norm statistics) stay within 5% of the fp32 output range."""
    _, ours = models
    x = {k: jnp.asarray(v) for k, v in make_inputs(CFG, 2, 4, 6, 5, seed=2).items()}
    bf = FluxDiT(FluxDiTConfig.tiny(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
    nnx.update(bf, jax.tree.map(lambda a: a.astype(jnp.bfloat16), nnx.state(ours)))
    ref = np.asarray(jax.jit(lambda m: m(**x))(ours))
    out = jax.jit(lambda m: m(**x))(bf)
    assert out.dtype == jnp.bfloat16
    rel = np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max()
    print(f"bf16 DiT relative max err vs fp32: {rel:.2e}")
    assert rel <= 5e-2


def test_full_config_shapes():
    """FLUX.1-dev sizes without building 12B parameters: embedders + 19 double + 38 single blocks."""
    cfg = FluxDiTConfig.full()

    def count(n_double: int, n_single: int) -> tuple[int, FluxDiT]:
        c = FluxDiTConfig.full(num_double_blocks=n_double, num_single_blocks=n_single)
        abstract = nnx.eval_shape(lambda: FluxDiT(c, rngs=nnx.Rngs(0)))
        flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
        return sum(int(np.prod(v.get_value().shape)) for _, v in flat), abstract

    base, _ = count(0, 0)
    one_double, _ = count(1, 0)
    one_single, abstract = count(0, 1)
    total = base + cfg.num_double_blocks * (one_double - base) + cfg.num_single_blocks * (one_single - base)
    with torch.device("meta"):
        reference = FluxTransformer2DModel(guidance_embeds=True)  # diffusers defaults = FLUX.1-dev
    assert total == sum(p.numel() for p in reference.parameters()) == 11_901_408_320, total
    assert abstract.single_blocks[0].to_qkv_mlp.kernel.shape == (3072, 21504)
    assert abstract.final_norm_out.linear.kernel.shape == (3072, 6144)
    assert (cfg.num_double_blocks, cfg.num_single_blocks, cfg.num_heads, cfg.head_dim) == (19, 38, 24, 128)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_interleaved_rope_matches_diffusers(dtype):
    """layers.apply_rotary_interleaved against diffusers' FLUX RoPE (``apply_rotary_emb``, real pairs, unbind -1).
    fp32: values and input gradients to 1e-5. bf16 (pairs split in bf16, arithmetic in fp32, as diffusers does):
    values to diffusers' bf16 values, and the input gradient within one bf16 rounding of diffusers' fp32 gradient
    at the same (bf16-representable) input and cotangent; diffusers' own bf16 backward sums the two paths in bf16,
    which is not the reference for that."""
    from diffusers.models.embeddings import apply_rotary_emb

    from nexus_jax.layers import apply_rotary_interleaved

    rng = np.random.default_rng(0)
    tdt, jdt = getattr(torch, dtype), getattr(jnp, dtype)

    def representable(a):  # in the tested dtype (the cotangent of a bf16 output is bf16 too)
        return np.asarray(jnp.asarray(a, jdt).astype(jnp.float32))

    x = representable(rng.standard_normal((2, 77, 3, 16)))  # [B, S, H, D]
    ang = rng.uniform(0, 50, (77, 8)).astype(np.float32)
    w = representable(rng.standard_normal(x.shape))
    cos_t, sin_t = (torch.tensor(f(ang)).repeat_interleave(2, dim=-1) for f in (np.cos, np.sin))

    def reference(t):
        return apply_rotary_emb(t, (cos_t, sin_t), use_real=True, use_real_unbind_dim=-1, sequence_dim=1)

    want = reference(torch.tensor(x).to(tdt)).float().numpy()
    x32 = torch.tensor(x).requires_grad_(True)
    (reference(x32) * torch.tensor(w)).sum().backward()
    want_grad = x32.grad.numpy()
    cos, sin = jnp.cos(ang)[None, :, None], jnp.sin(ang)[None, :, None]

    def f(a):
        return apply_rotary_interleaved(a, cos, sin)

    got = f(jnp.asarray(x, jdt))
    grad = jax.grad(lambda a: jnp.sum(f(a).astype(jnp.float32) * w))(jnp.asarray(x, jdt))
    assert got.dtype == jdt and grad.dtype == jdt
    diff, grad_diff = np.abs(np.asarray(got, np.float32) - want), np.abs(np.asarray(grad, np.float32) - want_grad)
    print(f"{dtype} RoPE vs diffusers: max abs err {diff.max():.1e}, grad {grad_diff.max():.1e}")
    if dtype == "float32":
        assert diff.max() <= 1e-5 and grad_diff.max() <= 1e-5
    else:
        assert np.all(diff <= 2.0**-8 * np.abs(want) + 1e-6)
        assert np.all(grad_diff <= 2.0**-8 * np.abs(want_grad) + 1e-6)


def test_interleaved_rope_splits_pairs_in_the_input_dtype():
    """The [..., D/2, 2] pair views (which XLA:TPU materialises) stay bf16 for a bf16 input, forward and backward:
    no fp32 value in the jaxpr has a trailing axis of 2 (docs/launch.md, "Decoder training: 0.36 -> 0.48")."""
    from nexus_jax.layers import apply_rotary_interleaved

    x = jnp.zeros((1, 5, 2, 8), jnp.bfloat16)
    cos = sin = jnp.zeros((1, 5, 1, 4), jnp.float32)
    jaxpr = jax.make_jaxpr(jax.grad(lambda a: jnp.sum(apply_rotary_interleaved(a, cos, sin).astype(jnp.float32))))(x)
    shapes = [v.aval for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars]
    assert any(a.shape[-1:] == (2,) and a.dtype == jnp.bfloat16 for a in shapes)
    assert not [a for a in shapes if a.shape[-1:] == (2,) and a.dtype == jnp.float32]
