"""VAE decoder: raw latents [B, h, w, latent] -> pixels [B, h*f, w*f, out]."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from configs.vae import FluxVAEConfig
from nexus_jax.models.vae.blocks import UNetMidBlock2D, UpDecoderBlock2D
from nexus_jax.models.vae.encoder import ACT_AXES
from nexus_jax.models.vae.primitives import Conv2d, GroupNorm
from nexus_jax.sharding import constrain


class Decoder(nnx.Module):
    """conv_in -> mid_block -> up_blocks (widths reversed, layers_per_block + 1 resnets) -> norm -> SiLU -> conv_out.

    ``up_blocks.i`` is encoder level ``n - 1 - i`` (LDM's ``up.{n-1-i}``)."""

    def __init__(self, config: FluxVAEConfig, *, rngs: nnx.Rngs):
        dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        ch = tuple(reversed(config.block_out_channels))
        groups, eps = config.norm_num_groups, config.norm_eps
        self.conv_in = Conv2d(config.latent_channels, ch[0], 3, padding=1, **kw)
        self.mid_block = UNetMidBlock2D(
            ch[0], groups=groups, eps=eps, add_attention=config.mid_block_add_attention, **kw
        )
        self.up_blocks = nnx.List(
            [
                UpDecoderBlock2D(
                    ch[max(i - 1, 0)],
                    ch[i],
                    num_layers=config.layers_per_block + 1,
                    groups=groups,
                    eps=eps,
                    add_upsample=i < len(ch) - 1,
                    add_attention=len(ch) - 1 - i in config.decoder_attention_levels,
                    **kw,
                )
                for i in range(len(ch))
            ]
        )
        self.conv_norm_out = GroupNorm(groups, ch[-1], eps=eps, param_dtype=param_dtype, rngs=rngs)
        self.conv_out = Conv2d(ch[-1], config.out_channels, 3, padding=1, **kw)

    def __call__(self, latents: jax.Array) -> jax.Array:
        """raw (unscaled) latents [B, h, w, latent_channels] -> pixels [B, h*f, w*f, out_channels]."""
        x = constrain(self.conv_in(latents), ACT_AXES)
        x = constrain(self.mid_block(x), ACT_AXES)
        for block in self.up_blocks:
            x = constrain(block(x), ACT_AXES)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
