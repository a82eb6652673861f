"""MAR / UniPic-1 KL-16 VAE as a token codec: pixels <-> raster-ordered latent tokens (patch size 1).

The model is :class:`FluxVAE` built from ``FluxVAEConfig.kl16()``; its ``encode`` is ``posterior.mode() * 0.2325``
and its ``decode`` is ``decoder(post_quant_conv(z / 0.2325))``, as in UniPic-1's ``SkyworkUnipic.encode/decode``.
Tokens are torch's ``rearrange(z, 'b c m n -> b m n c')`` flattened to ``[B, m*n, C]`` (our latents are NHWC).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nexus_jax.models.vae.autoencoder import FluxVAE, check_latents


def encode_tokens(vae: FluxVAE, pixels: jax.Array) -> jax.Array:
    """pixels [B, H, W, 3] in [-1, 1] (H, W multiples of 16) -> scaled posterior-mean tokens [B, (H/16)*(W/16), C],
    row-major over the latent grid."""
    latents = vae.encode(pixels)
    b, h, w, c = latents.shape
    return latents.reshape(b, h * w, c)


def decode_tokens(vae: FluxVAE, tokens: jax.Array, h: int, w: int) -> jax.Array:
    """Scaled tokens [B, h*w, C] (row-major over an h x w latent grid) -> pixels [B, 16h, 16w, 3] (not clipped)."""
    shape = tuple(tokens.shape)
    c = vae.config.latent_channels
    if len(shape) != 3 or shape[1] != h * w or shape[2] != c:
        raise ValueError(f"tokens must be [B, h*w={h * w}, {c}] for an {h}x{w} latent grid, got shape {shape}")
    latents = tokens.reshape(shape[0], h, w, c)
    check_latents(latents, vae.config)
    return vae.decode(latents)


def pixels_to_uint8_unipic(pixels: jax.Array) -> jax.Array:
    """Pixels (any shape) -> uint8 as UniPic-1 / MAR save images: ``clamp(127.5 x + 128, 0, 255)`` truncated
    (torch's ``.to(torch.uint8)``). Not FLUX's convention (:func:`~nexus_jax.models.vae.pixels_to_uint8`)."""
    x = jnp.clip(127.5 * pixels.astype(jnp.float32) + 128.0, 0.0, 255.0)
    return jnp.floor(x).astype(jnp.uint8)
