"""Down- and up-sampling layers of the VAE (diffusers ``Downsample2D`` / ``Upsample2D`` with a conv)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nexus_jax.models.vae.primitives import Conv2d


class Downsample2D(nnx.Module):
    """Zero-pad bottom/right by one, then a 3x3 stride-2 ``conv``: [B, H, W, C] -> [B, H/2, W/2, C] (H, W even)."""

    def __init__(
        self, channels: int, *, param_dtype: jnp.dtype = jnp.float32, dtype: jnp.dtype | None = None, rngs: nnx.Rngs
    ):
        self.conv = Conv2d(
            channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), param_dtype=param_dtype, dtype=dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
    """Nearest-neighbour x2: [B, H, W, C] -> [B, 2H, 2W, C]."""
    b, h, w, c = x.shape
    return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


class Upsample2D(nnx.Module):
    """Nearest x2 then a 3x3 ``conv``: [B, H, W, C] -> [B, 2H, 2W, C]."""

    def __init__(
        self, channels: int, *, param_dtype: jnp.dtype = jnp.float32, dtype: jnp.dtype | None = None, rngs: nnx.Rngs
    ):
        self.conv = Conv2d(channels, channels, 3, padding=1, param_dtype=param_dtype, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(upsample_nearest_2x(x))
