"""ResnetBlock2D (diffusers names: norm1, conv1, norm2, conv2, conv_shortcut) without time embedding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nexus_jax.models.vae.primitives import Conv2d, GroupNorm


class ResnetBlock2D(nnx.Module):
    """x + conv2(silu(norm2(conv1(silu(norm1(x)))))); a 1x1 ``conv_shortcut`` maps x when channels change."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        groups: int,
        eps: float = 1e-6,
        param_dtype: jnp.dtype = jnp.float32,
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.norm1 = GroupNorm(groups, in_channels, eps=eps, **kw)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, dtype=dtype, **kw)
        self.norm2 = GroupNorm(groups, out_channels, eps=eps, **kw)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, dtype=dtype, **kw)
        self.conv_shortcut = (
            Conv2d(in_channels, out_channels, 1, dtype=dtype, **kw) if in_channels != out_channels else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, in] -> [B, H, W, out]."""
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h
