"""Jitted flow-matching sampler vs a loop driving the diffusers modules (FluxTransformer2DModel + AutoencoderKL)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from flax import nnx

from configs.flux import FluxDiTConfig
from configs.nexus_decoders import SamplerConfig
from configs.vae import FluxVAEConfig
from conversion import load
from nexus_jax import sharding
from nexus_jax.diffusion import flow_match as fm
from nexus_jax.diffusion.sampler import Conditioning, initial_noise, make_sampler
from nexus_jax.models.flux import FluxDiT, image_ids
from tests.test_flux_dit import jax_flux_from, torch_flux

DIT = FluxDiTConfig.tiny()
VAE = FluxVAEConfig.tiny()
SAMPLER = SamplerConfig(num_steps=8, height=64, width=96, guidance=3.5, cfg_scale=2.5)


@pytest.fixture(scope="module")
def refs():
    dit = torch_flux(DIT, seed=7)
    torch.manual_seed(8)
    vae = AutoencoderKL(**VAE.diffusers_kwargs()).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours_vae = load.flux_vae_diffusers(VAE, vae.state_dict())
    return dit, vae, jax_flux_from(dit, DIT), ours_vae


def conditioning(b: int, lt: int, seed: int, ids_offset: float = 0.0) -> Conditioning:
    rng = np.random.default_rng(seed)
    ids = np.zeros((lt, 3), np.float32)
    ids[:, 1:] = ids_offset + rng.uniform(0, 4, (lt, 2)).astype(np.float32)
    return Conditioning(jnp.asarray(rng.standard_normal((b, lt, DIT.context_dim)), jnp.float32),
                        jnp.asarray(rng.standard_normal((b, DIT.pooled_dim)), jnp.float32), jnp.asarray(ids))


def diffusers_sample(dit, vae, noise_nhwc: np.ndarray, cond: Conditioning, neg: Conditioning | None,
                     cfg: SamplerConfig) -> tuple[np.ndarray, np.ndarray]:
    """Reference loop: diffusers scheduler (shift 3, DiffSynth sigmas) + transformer + VAE decode, torch fp32."""
    b, h, w, c = noise_nhwc.shape
    sched = FlowMatchEulerDiscreteScheduler(shift=cfg.shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, fm.DIFFSYNTH_SIGMA_MIN, cfg.num_steps).tolist())
    lat = FluxPipeline._pack_latents(torch.from_numpy(noise_nhwc.transpose(0, 3, 1, 2).copy()), b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    guidance = torch.full((b,), cfg.guidance)

    def run(cd: Conditioning, x, t):
        return dit(hidden_states=x, timestep=t.expand(b) / 1000, guidance=guidance,
                   pooled_projections=torch.from_numpy(np.asarray(cd.pooled)),
                   encoder_hidden_states=torch.from_numpy(np.asarray(cd.context)),
                   txt_ids=torch.from_numpy(np.asarray(cd.txt_ids)), img_ids=img_ids).sample

    with torch.no_grad():
        for t in sched.timesteps:
            v = run(cond, lat, t)
            if neg is not None:
                v_neg = run(neg, lat, t)
                v = v_neg + cfg.cfg_scale * (v - v_neg)
            lat = sched.step(v, t, lat).prev_sample
        z = FluxPipeline._unpack_latents(lat, cfg.height, cfg.width, 8)
        image = vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample
    return z.numpy().transpose(0, 2, 3, 1), image.numpy().transpose(0, 2, 3, 1)


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 2.0) -> float:
    return float(10 * np.log10(data_range**2 / np.mean((a.astype(np.float64) - b) ** 2)))


def test_full_sample_matches_diffusers_loop(refs):
    """8 steps, true CFG (negative context of another length), embedded guidance, batch 2, 64x96 px."""
    dit_t, vae_t, dit_j, vae_j = refs
    cond, neg = conditioning(2, 9, seed=1), conditioning(2, 20, seed=2, ids_offset=1.0)
    key = jax.random.key(42)
    out = make_sampler(dit_j, vae_j, SAMPLER)(key, cond, neg)
    noise = np.asarray(initial_noise(key, 2, 8, 12, DIT.latent_channels))
    z_ref, img_ref = diffusers_sample(dit_t, vae_t, noise, cond, neg, SAMPLER)
    lat_err = np.abs(np.asarray(out.latents) - z_ref).max()
    p = psnr(np.asarray(out.images), img_ref)
    print(f"8-step sample: latent max abs err {lat_err:.2e}, image PSNR {p:.1f} dB "
          f"(image range {img_ref.min():.2f}..{img_ref.max():.2f})")
    assert out.images.shape == (2, 64, 96, 3)
    assert p >= 45.0
    assert lat_err <= 1e-4


def test_one_program_deterministic_and_batch_independent(refs):
    _, _, dit_j, vae_j = refs
    cfg = SAMPLER.replace(num_steps=3, cfg_scale=1.0, height=32, width=48)
    cond = conditioning(2, 5, seed=3)
    # one program: the denoising while loop and the VAE decoder's convolutions are lowered together
    hlo = make_sampler(dit_j, vae_j, cfg).lower(jax.random.key(0), cond).as_text()
    assert "stablehlo.while" in hlo and "stablehlo.convolution" in hlo
    fn = make_sampler(dit_j, None, cfg)
    a = fn(jax.random.key(0), cond)
    b = fn(jax.random.key(0), cond)
    c = fn(jax.random.key(1), cond)
    np.testing.assert_array_equal(np.asarray(a.latents), np.asarray(b.latents))
    assert np.abs(np.asarray(a.latents) - np.asarray(c.latents)).max() > 0.1
    single = fn(jax.random.key(0), Conditioning(cond.context[:1], cond.pooled[:1], cond.txt_ids))
    assert np.abs(np.asarray(single.latents[0]) - np.asarray(a.latents[0])).max() <= 1e-5


def test_same_length_cfg_batches_branches(refs):
    """cond and neg of one length run as one 2B batch: equal to the two-pass reference."""
    dit_t, vae_t, dit_j, _ = refs
    cfg = SAMPLER.replace(num_steps=4, height=32, width=32)
    cond, neg = conditioning(1, 7, seed=4), conditioning(1, 7, seed=5, ids_offset=2.0)
    key = jax.random.key(3)
    out = make_sampler(dit_j, None, cfg)(key, cond, neg)
    assert out.images is None
    noise = np.asarray(initial_noise(key, 1, 4, 4, DIT.latent_channels))
    z_ref, _ = diffusers_sample(dit_t, vae_t, noise, cond, neg, cfg)
    err = np.abs(np.asarray(out.latents) - z_ref).max()
    print(f"batched-CFG 4-step latent max abs err {err:.2e}")
    assert err <= 1e-4


@pytest.mark.parametrize("with_vae", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["dit", "dit+vae"])
def test_sharded_sampler_equals_unsharded(refs, with_vae):
    _, vae_t, dit_j, vae_j = refs
    cfg = SAMPLER.replace(num_steps=2, height=32, width=48, cfg_scale=1.0 if not with_vae else 2.5)
    cond, neg = conditioning(2, 6, seed=6), conditioning(2, 10, seed=7)
    key = jax.random.key(5)
    expected = make_sampler(dit_j, vae_j if with_vae else None, cfg)(key, cond, neg)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    rules = sharding.TRAIN_RULES
    dit_s = sharding.create_sharded(lambda: FluxDiT(DIT, rngs=nnx.Rngs(0)), mesh, rules)
    nnx.update(dit_s, jax.device_put(nnx.state(dit_j), sharding.state_shardings(nnx.state(dit_s), mesh, rules)))
    vae_s = None
    if with_vae:
        vae_s = load.flux_vae_diffusers(VAE, vae_t.state_dict(), mesh=mesh, rules=rules)
    assert dit_s.blocks[0].ff_a[0].kernel[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    with sharding.sharding_context(mesh, rules):
        got = make_sampler(dit_s, vae_s, cfg)(key, cond, neg)
    assert not got.latents.sharding.is_fully_replicated
    err = np.abs(np.asarray(got.latents) - np.asarray(expected.latents)).max()
    if with_vae:
        err = max(err, np.abs(np.asarray(got.images) - np.asarray(expected.images)).max())
    print(f"sharded vs unsharded sampler max abs err {err:.2e}")
    assert err <= 1e-5


def test_bad_resolution_raises(refs):
    _, _, dit_j, _ = refs
    with pytest.raises(ValueError, match="height=40 must be a positive multiple of 16"):
        make_sampler(dit_j, None, SAMPLER.replace(height=40))
    with pytest.raises(ValueError, match="negative conditioning batch 1 != positive batch 2"):
        make_sampler(dit_j, None, SAMPLER.replace(height=32, width=32))(
            jax.random.key(0), conditioning(2, 4, 0), conditioning(1, 4, 1))
    assert image_ids(4, 6).shape == (6, 3)
