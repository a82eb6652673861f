"""VAE encoder: pixels [B, H, W, in] -> posterior moments [B, H/f, W/f, 2 * latent] (mean ; logvar)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from configs.vae import FluxVAEConfig
from nexus_jax.models.vae.blocks import DownEncoderBlock2D, UNetMidBlock2D
from nexus_jax.models.vae.primitives import Conv2d, GroupNorm
from nexus_jax.sharding import constrain

ACT_AXES = ("batch", None, None, "act_embed")


class Encoder(nnx.Module):
    """conv_in -> down_blocks -> mid_block -> conv_norm_out -> SiLU -> conv_out (2 * latent_channels)."""

    def __init__(self, config: FluxVAEConfig, *, rngs: nnx.Rngs):
        dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        ch = config.block_out_channels
        groups, eps = config.norm_num_groups, config.norm_eps
        self.conv_in = Conv2d(config.in_channels, ch[0], 3, padding=1, **kw)
        self.down_blocks = nnx.List(
            [
                DownEncoderBlock2D(
                    ch[max(i - 1, 0)],
                    ch[i],
                    num_layers=config.layers_per_block,
                    groups=groups,
                    eps=eps,
                    add_downsample=i < len(ch) - 1,
                    add_attention=i in config.encoder_attention_levels,
                    **kw,
                )
                for i in range(len(ch))
            ]
        )
        self.mid_block = UNetMidBlock2D(
            ch[-1], groups=groups, eps=eps, add_attention=config.mid_block_add_attention, **kw
        )
        self.conv_norm_out = GroupNorm(groups, ch[-1], eps=eps, param_dtype=param_dtype, rngs=rngs)
        self.conv_out = Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1, **kw)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels [B, H, W, in] -> moments [B, H/f, W/f, 2 * latent_channels]."""
        x = constrain(self.conv_in(pixels), ACT_AXES)
        for block in self.down_blocks:
            x = constrain(block(x), ACT_AXES)
        x = constrain(self.mid_block(x), ACT_AXES)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
