"""FLUX autoencoder: ``encode(pixels) -> model latents`` and ``decode(model latents) -> pixels`` (NHWC, pure, jittable).

"Model latents" are what the FLUX DiT consumes: ``(raw - shift_factor) * scaling_factor``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from configs.vae import FluxVAEConfig
from nexus_jax.models.vae.decoder import Decoder
from nexus_jax.models.vae.encoder import Encoder

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def latents_to_model(raw: jax.Array, config: FluxVAEConfig) -> jax.Array:
    """Raw VAE latents -> DiT space: ``(raw - shift) * scale``."""
    return (raw - config.shift_factor) * config.scaling_factor


def model_to_latents(latents: jax.Array, config: FluxVAEConfig) -> jax.Array:
    """DiT-space latents -> raw VAE latents: ``latents / scale + shift``."""
    return latents / config.scaling_factor + config.shift_factor


def pixels_to_uint8(pixels: jax.Array) -> jax.Array:
    """Pixels in [-1, 1] (any shape) -> uint8 in [0, 255], clipping out-of-range values (round half to even)."""
    return jnp.round((jnp.clip(pixels.astype(jnp.float32), -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)


def check_pixels(pixels: jax.Array, config: FluxVAEConfig) -> None:
    """Raise ValueError unless pixels is a float [B, H, W, in_channels] array with H, W multiples of the factor."""
    shape = tuple(pixels.shape)
    if len(shape) != 4 or shape[-1] != config.in_channels:
        raise ValueError(f"pixels must be NHWC [B, H, W, {config.in_channels}], got shape {shape}")
    _check_float("pixels", pixels)
    f = config.downsample_factor
    h, w = shape[1], shape[2]
    if h < f or w < f or h % f or w % f:
        raise ValueError(f"pixel height {h} and width {w} must be positive multiples of {f}")


def check_latents(latents: jax.Array, config: FluxVAEConfig) -> None:
    """Raise ValueError unless latents is a float [B, h, w, latent_channels] array with h, w >= 1."""
    shape = tuple(latents.shape)
    if len(shape) != 4 or shape[-1] != config.latent_channels:
        raise ValueError(f"latents must be NHWC [B, h, w, {config.latent_channels}], got shape {shape}")
    _check_float("latents", latents)
    if min(shape[:3]) < 1:
        raise ValueError(f"latents must have batch, height and width >= 1, got shape {shape}")


def _check_float(name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")


class FluxVAE(nnx.Module):
    """FLUX ``AutoencoderKL`` (no quant convs). Submodules ``encoder`` and ``decoder`` use diffusers names."""

    def __init__(self, config: FluxVAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)

    def encode_moments(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """pixels [B, H, W, 3] in [-1, 1] -> raw posterior (mean, logvar), each [B, H/8, W/8, latent]."""
        check_pixels(pixels, self.config)
        moments = self.encoder(pixels)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def encode(self, pixels: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """pixels [B, H, W, 3] in [-1, 1] -> model latents [B, H/8, W/8, latent].

        The posterior mean without ``key``; a posterior sample ``mean + exp(logvar / 2) * N(0, 1)`` with it.
        """
        mean, logvar = self.encode_moments(pixels)
        raw = mean
        if key is not None:
            raw = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        return latents_to_model(raw, self.config)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Model latents [B, h, w, latent] -> pixels [B, 8h, 8w, 3] (nominally [-1, 1], not clipped)."""
        check_latents(latents, self.config)
        return self.decoder(model_to_latents(latents, self.config))
