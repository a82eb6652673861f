"""The VAE's stage blocks: (Attn)DownEncoderBlock2D, (Attn)UpDecoderBlock2D and UNetMidBlock2D (diffusers names)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nexus_jax.models.vae.attention import VAEAttention
from nexus_jax.models.vae.resnet import ResnetBlock2D
from nexus_jax.models.vae.sampling import Downsample2D, Upsample2D


def resnet_stack(in_channels: int, out_channels: int, num_layers: int, **kw) -> nnx.List:
    """``num_layers`` ResnetBlock2D, the first mapping ``in_channels`` -> ``out_channels``, the rest at ``out``."""
    return nnx.List(
        [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, **kw) for i in range(num_layers)]
    )


def attention_stack(channels: int, num_layers: int, add_attention: bool, **kw) -> nnx.List:
    """``num_layers`` VAEAttention at ``channels`` (one after each resnet) if ``add_attention``, else empty."""
    return nnx.List([VAEAttention(channels, **kw) for _ in range(num_layers)] if add_attention else [])


def run_stack(resnets: nnx.List, attentions: nnx.List, x: jax.Array) -> jax.Array:
    """resnet 0 -> attention 0 (if any) -> resnet 1 -> ...: [B, H, W, in] -> [B, H, W, out]."""
    for i, resnet in enumerate(resnets):
        x = resnet(x)
        if attentions:
            x = attentions[i](x)
    return x


class DownEncoderBlock2D(nnx.Module):
    """``num_layers`` resnets (first in -> out), each followed by an attention if ``add_attention``
    (``AttnDownEncoderBlock2D``), then an optional ``downsamplers.0`` halving H and W."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        groups: int,
        eps: float,
        add_downsample: bool,
        add_attention: bool = False,
        param_dtype: jnp.dtype = jnp.float32,
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.resnets = resnet_stack(in_channels, out_channels, num_layers, groups=groups, eps=eps, **kw)
        self.attentions = attention_stack(out_channels, num_layers, add_attention, groups=groups, eps=eps, **kw)
        self.downsamplers = nnx.List([Downsample2D(out_channels, **kw)] if add_downsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, in] -> [B, H/2, W/2, out] (or [B, H, W, out] without downsampler)."""
        x = run_stack(self.resnets, self.attentions, x)
        for down in self.downsamplers:
            x = down(x)
        return x


class UpDecoderBlock2D(nnx.Module):
    """``num_layers`` resnets (first in -> out), each followed by an attention if ``add_attention``
    (``AttnUpDecoderBlock2D``), then an optional ``upsamplers.0`` doubling H and W."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        groups: int,
        eps: float,
        add_upsample: bool,
        add_attention: bool = False,
        param_dtype: jnp.dtype = jnp.float32,
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.resnets = resnet_stack(in_channels, out_channels, num_layers, groups=groups, eps=eps, **kw)
        self.attentions = attention_stack(out_channels, num_layers, add_attention, groups=groups, eps=eps, **kw)
        self.upsamplers = nnx.List([Upsample2D(out_channels, **kw)] if add_upsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, in] -> [B, 2H, 2W, out] (or [B, H, W, out] without upsampler)."""
        x = run_stack(self.resnets, self.attentions, x)
        for up in self.upsamplers:
            x = up(x)
        return x


class UNetMidBlock2D(nnx.Module):
    """resnets.0 -> attentions.0 (optional) -> resnets.1, all at width ``channels``."""

    def __init__(
        self,
        channels: int,
        *,
        groups: int,
        eps: float,
        add_attention: bool,
        param_dtype: jnp.dtype = jnp.float32,
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        kw = dict(groups=groups, eps=eps, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, **kw), ResnetBlock2D(channels, channels, **kw)])
        self.attentions = nnx.List([VAEAttention(channels, **kw)] if add_attention else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, C] -> same shape."""
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)
