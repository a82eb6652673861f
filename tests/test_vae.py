"""FLUX VAE: parity with diffusers AutoencoderKL (FLUX layout, fp32), sharding, jit, input validation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs.vae import FluxVAEConfig
from conversion.errors import ConversionError
from conversion.load import flux_vae_diffusers as vae_from_diffusers
from conversion.tables.vae import diffusers_mapping
from nexus_jax import sharding
from nexus_jax.models.vae import FluxVAE, latents_to_model, model_to_latents, pixels_to_uint8

CFG = FluxVAEConfig.tiny()
BATCH, HEIGHT, WIDTH = 2, 40, 56  # non-square; latent 5 x 7


def nchw_to_nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


def perturbed_reference(config: FluxVAEConfig, seed: int = 0) -> tuple[AutoencoderKL, dict[str, np.ndarray]]:
    """A diffusers AutoencoderKL in FLUX's layout with every parameter perturbed, and its state dict as numpy."""
    torch.manual_seed(seed)
    ref = AutoencoderKL(**config.diffusers_kwargs()).eval()
    with torch.no_grad():
        for p in ref.parameters():  # non-trivial GroupNorm affines and biases
            p.add_(0.05 * torch.randn_like(p))
    return ref, {k: v.numpy() for k, v in ref.state_dict().items()}


@pytest.fixture(scope="module")
def models() -> tuple[AutoencoderKL, FluxVAE]:
    """The tiny reference and our copy of it."""
    ref, state = perturbed_reference(CFG)
    return ref, vae_from_diffusers(CFG, state)


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(BATCH, 3, HEIGHT, WIDTH, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def model_latents() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randn(BATCH, CFG.latent_channels, HEIGHT // 8, WIDTH // 8, generator=g)


@pytest.fixture(scope="module")
def jit_decode(models):
    """One jitted decode of the tiny model, shared so that tests reuse its compilations."""
    return jax.jit(models[1].decode)


@pytest.fixture(scope="module")
def encoded(models, pixels) -> dict[str, np.ndarray]:
    """One compiled encoder pass: raw moments, scaled mean latents, and a scaled posterior sample (key 3)."""
    _, vae = models

    def run(x, key):
        mean, logvar = vae.encode_moments(x)
        return dict(mean=mean, logvar=logvar, z=vae.encode(x), z_sample=vae.encode(x, key))

    out = jax.jit(run)(jnp.asarray(nchw_to_nhwc(pixels)), jax.random.key(3))
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize("latent_hw", [(HEIGHT // 8, WIDTH // 8), (3, 3)])
def test_decode_matches_diffusers(models, jit_decode, model_latents, latent_hw):
    ref, _ = models
    z = model_latents[:, :, : latent_hw[0], : latent_hw[1]]
    raw = z / CFG.scaling_factor + CFG.shift_factor  # what FluxPipeline feeds vae.decode
    with torch.no_grad():
        expected = nchw_to_nhwc(ref.decode(raw).sample)
    got = np.asarray(jit_decode(jnp.asarray(nchw_to_nhwc(z))))
    err = np.abs(got - expected).max()
    print(f"decode {latent_hw}: max abs err {err:.3e} (output max {np.abs(expected).max():.2f})")
    assert got.shape == (BATCH, 8 * latent_hw[0], 8 * latent_hw[1], 3)
    assert err <= 1e-4


def test_encode_matches_diffusers(models, pixels, encoded):
    ref, _ = models
    with torch.no_grad():
        post = ref.encode(pixels).latent_dist
    err_mean = np.abs(encoded["mean"] - nchw_to_nhwc(post.mean)).max()
    err_logvar = np.abs(encoded["logvar"] - nchw_to_nhwc(post.logvar)).max()
    expected_z = (nchw_to_nhwc(post.mean) - CFG.shift_factor) * CFG.scaling_factor
    err_z = np.abs(encoded["z"] - expected_z).max()
    print(f"encode max abs err: mean {err_mean:.3e} logvar {err_logvar:.3e} scaled latents {err_z:.3e}")
    assert encoded["mean"].shape == (BATCH, HEIGHT // 8, WIDTH // 8, CFG.latent_channels)
    assert max(err_mean, err_logvar, err_z) <= 1e-4


def test_encode_sample_uses_posterior_std(models, pixels, encoded):
    ref, _ = models
    with torch.no_grad():
        post = ref.encode(pixels).latent_dist
    noise = np.asarray(jax.random.normal(jax.random.key(3), encoded["z"].shape, jnp.float32))
    expected = (nchw_to_nhwc(post.mean) + nchw_to_nhwc(post.std) * noise - CFG.shift_factor) * CFG.scaling_factor
    err = np.abs(encoded["z_sample"] - expected).max()
    print(f"encode sample max abs err {err:.3e}")
    assert err <= 1e-4
    assert np.abs(encoded["z_sample"] - encoded["z"]).max() > 1e-3  # the sample really differs from the mean


def test_bfloat16_compute_follows_config(models, jit_decode, model_latents):
    """dtype="bfloat16" really computes in bf16 (output dtype, visible rounding) and stays near the fp32 result."""
    ref, _ = models
    vae16 = vae_from_diffusers(
        dataclasses.replace(CFG, dtype="bfloat16"), {k: v.numpy() for k, v in ref.state_dict().items()}
    )
    assert vae16.decoder.conv_in.kernel[...].dtype == jnp.float32  # storage follows param_dtype
    z = jnp.asarray(nchw_to_nhwc(model_latents))
    x32 = np.asarray(jit_decode(z))
    x16 = jax.jit(vae16.decode)(z)
    assert x16.dtype == jnp.bfloat16
    rel = np.abs(np.asarray(x16, np.float32) - x32).max() / np.abs(x32).max()
    print(f"bf16 vs fp32 decode: max abs err / max |x| = {rel:.2e}")
    assert 1e-4 < rel < 5e-2


def test_latent_scale_shift_helpers():
    full = FluxVAEConfig.full()
    raw = jnp.linspace(-3.0, 3.0, 7)
    np.testing.assert_allclose(latents_to_model(raw, full), (np.asarray(raw) - 0.1159) * 0.3611, rtol=1e-6)
    np.testing.assert_allclose(model_to_latents(latents_to_model(raw, full), full), raw, atol=1e-6)
    u8 = pixels_to_uint8(jnp.array([-2.0, -1.0, 0.0, 1.0, 5.0]))
    np.testing.assert_array_equal(np.asarray(u8), [0, 0, 128, 255, 255])


def test_full_config_matches_flux_ae_layout():
    """The full preset builds (abstractly) exactly the parameter set of diffusers' FLUX AutoencoderKL."""
    full = FluxVAEConfig.full()
    assert (full.block_out_channels, full.layers_per_block, full.latent_channels) == ((128, 256, 512, 512), 2, 16)
    assert (full.norm_num_groups, full.scaling_factor, full.shift_factor) == (32, 0.3611, 0.1159)
    assert full.downsample_factor == 8
    abstract = nnx.eval_shape(lambda: FluxVAE(full, rngs=nnx.Rngs(0)))
    shapes = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        shapes[".".join(str(p) for p in path)] = var.get_value().shape
    ours = {}  # back to torch names and layout through the import table
    for r in diffusers_mapping(full).rules:
        ours[r.torch[0]] = tuple(r.transform.torch_shapes([shapes[r.jax[0]]])[0])
    with torch.device("meta"):
        ref = AutoencoderKL(**full.diffusers_kwargs())
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours == theirs
    assert sum(int(np.prod(s)) for s in ours.values()) == sum(p.numel() for p in ref.parameters())


def run_encode_decode(vae: FluxVAE, x: jax.Array, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    return vae.encode(x), vae.decode(z)


@pytest.mark.parametrize(
    "mesh_shape", [(2, 2, 2), pytest.param((1, 1, 8), marks=pytest.mark.slow)], ids=["2x2x2", "1x1x8"]
)
def test_sharded_equals_unsharded(mesh_shape):
    data, fsdp, tensor = mesh_shape
    mesh = sharding.make_mesh(data, fsdp, tensor)
    rules = sharding.INFERENCE_RULES
    # two levels (x2) keep compile time down and still hold every module kind: resnets with and without shortcut,
    # down/upsampler, mid attention
    small = FluxVAEConfig.tiny(block_out_channels=(16, 24), layers_per_block=1)
    _, state = perturbed_reference(small, seed=5)
    plain = vae_from_diffusers(small, state)
    sharded = vae_from_diffusers(small, state, mesh=mesh, rules=rules)
    kernel = sharded.decoder.up_blocks[1].resnets[0].conv1.kernel[...]  # [3, 3, 24, 16]
    assert kernel.sharding.spec == P(None, None, None, "tensor")
    assert kernel.addressable_shards[0].data.shape == (3, 3, 24, 16 // tensor)
    assert sharded.encoder.mid_block.attentions[0].to_q.kernel[...].sharding.spec == P(None, "tensor")

    x = jax.random.uniform(jax.random.key(0), (4, 16, 24, 3), minval=-1, maxval=1)
    z = jax.random.normal(jax.random.key(1), (4, 4, 6, small.latent_channels))
    want = nnx.jit(run_encode_decode)(plain, x, z)
    with sharding.sharding_context(mesh, rules):
        batch = sharding.data_sharding(mesh, 4, rules)
        got = nnx.jit(run_encode_decode)(sharded, jax.device_put(x, batch), jax.device_put(z, batch))
    for name, g, w in zip(("encode", "decode"), got, want, strict=True):
        err = np.abs(np.asarray(g) - np.asarray(w)).max()
        print(f"mesh {mesh_shape}: sharded vs unsharded {name} max abs err {err:.3e}")
        assert err <= 1e-5


@pytest.mark.slow
def test_create_sharded_builds_the_same_model():
    """Random init straight into shardings (sharding.create_sharded) equals eager init (to the last ulp or so)."""
    mesh = sharding.make_mesh(2, 2, 2)
    small = FluxVAEConfig.tiny(layers_per_block=1)

    def ctor():
        return FluxVAE(small, rngs=nnx.Rngs(7))

    sharded = sharding.create_sharded(ctor, mesh, sharding.INFERENCE_RULES)
    assert sharded.encoder.conv_out.kernel[...].sharding.spec == P(None, None, None, "tensor")
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), nnx.state(ctor()), nnx.state(sharded)
    )


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((1, 3, 40, 56), r"NHWC \[B, H, W, 3\], got shape \(1, 3, 40, 56\)"),
        ((1, 44, 56, 3), "pixel height 44 and width 56 must be positive multiples of 8"),
        ((1, 40, 4, 3), "pixel height 40 and width 4 must be positive multiples of 8"),
        ((40, 56, 3), r"got shape \(40, 56, 3\)"),
    ],
)
def test_bad_pixels_raise(models, shape, match):
    _, vae = models
    with pytest.raises(ValueError, match=match):
        vae.encode(jnp.zeros(shape))


def test_bad_latents_raise(models):
    _, vae = models
    with pytest.raises(ValueError, match=r"NHWC \[B, h, w, 16\], got shape \(1, 5, 7, 4\)"):
        vae.decode(jnp.zeros((1, 5, 7, 4)))
    with pytest.raises(ValueError, match="latents must be a floating-point array, got dtype int32"):
        vae.decode(jnp.zeros((1, 5, 7, 16), jnp.int32))


def test_bad_config_raises():
    with pytest.raises(ValueError, match="entry 20 must be a positive multiple of norm_num_groups=8"):
        FluxVAEConfig(block_out_channels=(16, 20), norm_num_groups=8)
    with pytest.raises(ValueError, match="layers_per_block must be >= 1, got 0"):
        dataclasses.replace(CFG, layers_per_block=0)


def test_load_rejects_mismatched_state_dict(models):
    ref, _ = models
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    extra = {**state, "encoder.quant_conv.weight": np.zeros((1,))}
    with pytest.raises(ConversionError, match="unexpected tensors.*encoder.quant_conv.weight"):
        vae_from_diffusers(CFG, extra)
    state["decoder.conv_in.weight"] = state["decoder.conv_in.weight"][:, :4]
    with pytest.raises(ConversionError, match=r"conv_in.weight has shape \(24, 4, 3, 3\), expected \(24, 16, 3, 3\)"):
        vae_from_diffusers(CFG, state)


@pytest.mark.parametrize("hw", [(7, 11), (1, 1)])
def test_upsampler_matches_diffusers(hw):
    """The folded 2x2-phase conv (``upsample_conv3x3``) equals diffusers' nearest x2 + 3x3 conv: odd sizes, 1x1."""
    from diffusers.models.upsampling import Upsample2D as TorchUpsample2D

    from nexus_jax.models.vae.sampling import Upsample2D, upsample_conv3x3, upsample_nearest_2x

    torch.manual_seed(0)
    ref = TorchUpsample2D(12, use_conv=True).eval()
    ours = Upsample2D(12, rngs=nnx.Rngs(0))
    ours.conv.kernel[...] = jnp.asarray(ref.conv.weight.detach().numpy().transpose(2, 3, 1, 0))
    ours.conv.bias[...] = jnp.asarray(ref.conv.bias.detach().numpy())
    x = torch.randn(2, 12, *hw)
    with torch.no_grad():
        expected = nchw_to_nhwc(ref(x))
    got = np.asarray(jax.jit(lambda m, v: m(v))(ours, jnp.asarray(nchw_to_nhwc(x))))
    err = np.abs(got - expected).max()
    print(f"upsampler {hw}: max abs err {err:.3e}")
    assert got.shape == (2, 2 * hw[0], 2 * hw[1], 12) and err <= 1e-5

    # channels in != out: the same as the plain conv of the nearest-upsampled input
    xs = jnp.asarray(np.random.default_rng(1).standard_normal((2, *hw, 5)), jnp.float32)
    kernel = jnp.asarray(np.random.default_rng(2).standard_normal((3, 3, 5, 3)), jnp.float32)
    plain = jax.lax.conv_general_dilated(
        upsample_nearest_2x(xs), kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    assert np.abs(np.asarray(upsample_conv3x3(xs, kernel)) - np.asarray(plain)).max() <= 1e-5
