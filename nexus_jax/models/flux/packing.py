"""2x2 latent packing (FLUX / diffusers channel order (c, ph, pw)) and RoPE position ids for image tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

VAE_DOWNSAMPLE = 8
PIXEL_MULTIPLE = 16  # VAE x8 times the 2x2 patch


def latent_size(height: int, width: int) -> tuple[int, int]:
    """Pixel (H, W) -> latent (H/8, W/8); both must be positive multiples of 16."""
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int | np.integer) or v <= 0 or v % PIXEL_MULTIPLE:
            raise ValueError(f"{name}={v!r} must be a positive multiple of {PIXEL_MULTIPLE} pixels")
    return height // VAE_DOWNSAMPLE, width // VAE_DOWNSAMPLE


def pack_latents(z: jax.Array) -> jax.Array:
    """z [B, h, w, C] (NHWC, h and w even) -> tokens [B, h/2 * w/2, 4C], token features ordered (c, ph, pw)."""
    if z.ndim != 4:
        raise ValueError(f"latents must be [B, h, w, C], got shape {z.shape}")
    b, h, w, c = z.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height {h} and width {w} must be even for 2x2 packing")
    return z.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens: jax.Array, h: int, w: int) -> jax.Array:
    """tokens [B, h/2 * w/2, 4C] -> z [B, h, w, C] (inverse of :func:`pack_latents`)."""
    b, n, f = tokens.shape
    if n != (h // 2) * (w // 2) or f % 4:
        raise ValueError(f"{n} tokens of width {f} do not unpack to a {h}x{w} latent")
    c = f // 4
    return tokens.reshape(b, h // 2, w // 2, c, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(b, h, w, c)


def image_ids(h: int, w: int) -> jax.Array:
    """RoPE ids (0, row, col) for the packed tokens of an [h, w] latent: [h/2 * w/2, 3] float32, row-major."""
    rows, cols = np.meshgrid(np.arange(h // 2), np.arange(w // 2), indexing="ij")
    ids = np.stack([np.zeros_like(rows), rows, cols], axis=-1).reshape(-1, 3)
    return jnp.asarray(ids, dtype=jnp.float32)
