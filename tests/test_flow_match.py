"""Flow-matching schedules and updates vs diffusers FlowMatchEulerDiscreteScheduler (<= 1e-6)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from nexus_jax.diffusion import flow_match as fm


@pytest.mark.parametrize("steps", [1, 8, 50])
def test_fixed_shift_sigmas_match_diffusers(steps):
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=np.linspace(1.0, fm.DIFFSYNTH_SIGMA_MIN, steps).tolist())
    ours = fm.fixed_shift_sigmas(steps, 3.0)
    err = np.abs(ours - sched.sigmas.numpy()).max()
    assert ours.shape == (steps + 1,) and ours[-1] == 0.0 and err <= 1e-6, err
    t_err = np.abs(fm.timesteps_from_sigmas(ours) - sched.timesteps.numpy()).max()
    assert t_err <= 1e-3, t_err  # timesteps are 1000 x sigma: 1e-6 relative
    # DiffSynth's documented first/last values: sigma_0 = 1, sigma_{N-1} = 3 s / (1 + 2 s), s = 0.003 / 1.002
    s = 0.003 / 1.002
    assert abs(ours[0] - 1.0) <= 1e-7
    if steps > 1:
        assert abs(ours[-2] - 3 * s / (1 + 2 * s)) <= 1e-6


@pytest.mark.parametrize("steps,height,width", [(8, 512, 512), (28, 1024, 768), (4, 256, 1024)])
def test_flux_dynamic_sigmas_match_diffusers(steps, height, width):
    seq = (height // 16) * (width // 16)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    mu = calculate_shift(seq, 256, 4096, 0.5, 1.15)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps).tolist(), mu=mu)
    assert abs(fm.flux_mu(seq) - mu) <= 1e-12
    err = np.abs(fm.flux_dynamic_sigmas(steps, seq) - sched.sigmas.numpy()).max()
    assert err <= 1e-6, err


def test_euler_steps_match_diffusers():
    steps = 8
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=np.linspace(1.0, fm.DIFFSYNTH_SIGMA_MIN, steps).tolist())
    sigmas = fm.fixed_shift_sigmas(steps)
    rng = np.random.default_rng(0)
    x_t = torch.from_numpy(rng.standard_normal((2, 24, 64)).astype(np.float32))
    x_j = jnp.asarray(x_t.numpy())
    worst = 0.0
    for i, t in enumerate(sched.timesteps):
        v = rng.standard_normal((2, 24, 64)).astype(np.float32)
        x_t = sched.step(torch.from_numpy(v), t, x_t).prev_sample
        x_j = fm.euler_step(x_j, jnp.asarray(v), jnp.float32(sigmas[i]), jnp.float32(sigmas[i + 1]))
        worst = max(worst, float(np.abs(np.asarray(x_j) - x_t.numpy()).max()))
    assert worst <= 1e-6, worst


def test_add_noise_and_target_match_diffusers():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((3, 4, 6, 16)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    idx = np.array([0, 500, 999])
    t = sched.timesteps[idx]
    expected = sched.scale_noise(torch.from_numpy(x0), t, torch.from_numpy(noise)).numpy()
    got = fm.add_noise(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(sched.sigmas[idx].numpy()))
    assert np.abs(np.asarray(got) - expected).max() <= 1e-6
    np.testing.assert_allclose(np.asarray(fm.velocity_target(jnp.asarray(x0), jnp.asarray(noise))), noise - x0)


def test_training_schedule_is_diffsynth_weighting():
    sigmas, weights = fm.training_schedule()
    # DiffSynth training mode in torch: linspace(1, sigma_min, 1000), shift 3, Gaussian weights, min 0, mean 1
    s = torch.linspace(1.0, fm.DIFFSYNTH_SIGMA_MIN, 1000)
    ref_sig = 3 * s / (1 + 2 * s)
    y = torch.exp(-2 * ((ref_sig * 1000 - 500) / 1000) ** 2)
    y = y - y.min()
    ref_w = y * (1000 / y.sum())
    assert np.abs(sigmas - ref_sig.numpy()).max() <= 1e-6
    assert np.abs(weights - ref_w.numpy()).max() <= 1e-5
    assert abs(weights.mean() - 1.0) <= 1e-5 and weights.min() == 0.0
    sig, w = fm.sample_training_sigmas(jax.random.key(0), 64, sigmas, weights)
    assert sig.shape == (64,) and bool(jnp.all((sig > 0) & (sig <= 1)))
    assert bool(jnp.all(jnp.isin(w, jnp.asarray(weights))))


def test_bad_step_counts_raise():
    with pytest.raises(ValueError, match="num_steps=0 must be an integer >= 1"):
        fm.fixed_shift_sigmas(0)
    with pytest.raises(ValueError, match="num_steps=2.5"):
        fm.flux_dynamic_sigmas(2.5, 1024)
