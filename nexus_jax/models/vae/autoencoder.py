"""LDM autoencoder (FLUX AE, MAR KL-16): ``encode(pixels) -> model latents``, ``decode(model latents) -> pixels``
(NHWC, pure, jittable).

"Model latents" are what the generator consumes: ``(raw - shift_factor) * scaling_factor``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from configs.vae import FluxVAEConfig
from nexus_jax.models.vae.decoder import Decoder
from nexus_jax.models.vae.encoder import Encoder
from nexus_jax.models.vae.primitives import Conv2d

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
    """LDM ``AutoencoderKL``: FLUX's (no quant convs) or KL-16's (``FluxVAEConfig.kl16()``). Submodules
    ``encoder``, ``decoder`` and, with ``use_quant_conv``, 1x1 ``quant_conv`` / ``post_quant_conv`` use diffusers
    names."""

    def __init__(self, config: FluxVAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)
        kw = dict(param_dtype=jnp.dtype(config.param_dtype), dtype=jnp.dtype(config.dtype), rngs=rngs)
        latent, quant = config.latent_channels, config.use_quant_conv
        self.quant_conv = Conv2d(2 * latent, 2 * latent, 1, **kw) if quant else None
        self.post_quant_conv = Conv2d(latent, latent, 1, **kw) if quant else None

    def encode_moments(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """pixels [B, H, W, 3] in [-1, 1] -> raw posterior (mean, logvar), each [B, H/f, W/f, latent]."""
        check_pixels(pixels, self.config)
        moments = self.encoder(pixels)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def encode(self, pixels: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """pixels [B, H, W, 3] in [-1, 1] -> model latents [B, H/f, W/f, latent] (f = downsample_factor).

        The posterior mean without ``key``; a posterior sample ``mean + exp(logvar / 2) * N(0, 1)`` with it.
        """
        mean, logvar = self.encode_moments(pixels)
        raw = mean
        if key is not None:
            raw = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        return latents_to_model(raw, self.config)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Model latents [B, h, w, latent] -> pixels [B, f*h, f*w, 3] (nominally [-1, 1], not clipped)."""
        check_latents(latents, self.config)
        raw = model_to_latents(latents, self.config)
        if self.post_quant_conv is not None:
            raw = self.post_quant_conv(raw)
        return self.decoder(raw)
