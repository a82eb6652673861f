"""Rectified-flow (flow-matching) schedules, Euler updates and training helpers.

Convention: ``x_sigma = (1 - sigma) x0 + sigma * noise``; the model predicts the velocity ``noise - x0``; sampling
walks sigma from ~1 down to 0 with ``x <- x + (sigma_next - sigma) * v``. Schedules are numpy float32 arrays
``[N + 1]`` ending in 0 (the terminal value), like diffusers' ``FlowMatchEulerDiscreteScheduler.sigmas``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
DIFFSYNTH_SIGMA_MIN = 0.003 / 1.002


def _check_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int | np.integer) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} must be an integer >= 1")


def shift_sigmas(s: np.ndarray, shift: float) -> np.ndarray:
    """Constant (SD3 / DiffSynth) shift: ``shift * s / (1 + (shift - 1) * s)``."""
    return shift * s / (1 + (shift - 1) * s)


def fixed_shift_sigmas(
    num_steps: int, shift: float = 3.0, sigma_min: float = DIFFSYNTH_SIGMA_MIN, sigma_max: float = 1.0
) -> np.ndarray:
    """DiffSynth ``FlowMatchScheduler``: ``s = linspace(sigma_max, sigma_min, N)``, shifted, then a terminal 0.

    Returns [N + 1] float32.
    """
    _check_steps(num_steps)
    s = np.linspace(sigma_max, sigma_min, num_steps).astype(np.float32)
    return np.append(shift_sigmas(s, np.float32(shift)), np.float32(0.0)).astype(np.float32)


def flux_mu(
    image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's resolution-dependent shift exponent: linear in the packed image token count."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def flux_dynamic_sigmas(num_steps: int, image_seq_len: int, **mu_kwargs: float) -> np.ndarray:
    """FLUX pipeline schedule: ``s = linspace(1, 1/N, N)``, ``sigma = e^mu / (e^mu + 1/s - 1)``, terminal 0. [N + 1]."""
    _check_steps(num_steps)
    s = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    mu = flux_mu(image_seq_len, **mu_kwargs)
    sig = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    return np.append(sig.astype(np.float32), np.float32(0.0))


def timesteps_from_sigmas(sigmas: np.ndarray) -> np.ndarray:
    """Model-facing timesteps ``1000 * sigma`` for the N steps (terminal dropped). [N]."""
    return (sigmas[:-1] * NUM_TRAIN_TIMESTEPS).astype(np.float32)


def euler_step(x: jax.Array, v: jax.Array, sigma: jax.Array, sigma_next: jax.Array) -> jax.Array:
    """One Euler update in fp32: ``x + (sigma_next - sigma) * v``, returned in x's dtype."""
    out = x.astype(jnp.float32) + (sigma_next - sigma).astype(jnp.float32) * v.astype(jnp.float32)
    return out.astype(x.dtype)


def add_noise(x0: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
    """``(1 - sigma) x0 + sigma noise``; sigma [B] broadcasts over x0's trailing axes."""
    s = sigma.reshape(sigma.shape + (1,) * (x0.ndim - sigma.ndim)).astype(x0.dtype)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    """Flow-matching regression target ``noise - x0``."""
    return noise - x0


def training_schedule(
    shift: float = 3.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, sigma_min: float = DIFFSYNTH_SIGMA_MIN
) -> tuple[np.ndarray, np.ndarray]:
    """DiffSynth training mode: (sigmas [T], weights [T]).

    Weights are the Gaussian ``exp(-2 ((t - T/2) / T)^2)`` over ``t = 1000 sigma``, shifted to min 0, mean 1.
    """
    sig = fixed_shift_sigmas(num_train_timesteps, shift, sigma_min)[:-1].astype(np.float64)
    t = sig * NUM_TRAIN_TIMESTEPS
    y = np.exp(-2 * ((t - num_train_timesteps / 2) / num_train_timesteps) ** 2)
    y = y - y.min()
    return sig.astype(np.float32), (y * (num_train_timesteps / y.sum())).astype(np.float32)


def sample_training_sigmas(key: jax.Array, batch: int, sigmas: np.ndarray, weights: np.ndarray
                           ) -> tuple[jax.Array, jax.Array]:
    """Uniform index into the training schedule: (sigma [B], weight [B])."""
    idx = jax.random.randint(key, (batch,), 0, sigmas.shape[0])
    return jnp.asarray(sigmas)[idx], jnp.asarray(weights)[idx]
