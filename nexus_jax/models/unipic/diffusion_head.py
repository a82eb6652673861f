"""UniPic-1 / MAR per-token diffusion head (``DiffLoss.net`` = ``SimpleMLPAdaLN``) in flax.nnx.

Attribute names equal the torch module's, so a checkpoint maps by renaming ``weight`` -> ``kernel`` (transposed) on
Linears: ``net.time_embed.mlp.{0,2}``, ``net.cond_embed``, ``net.input_proj``,
``net.res_blocks.{i}.{in_ln, mlp.{0,2}, adaLN_modulation.1}``, ``net.final_layer.{linear, adaLN_modulation.1}``
(``final_layer.norm_final`` has no parameters). LayerNorm parameters are ``weight``/``bias`` (nexus_jax.layers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from configs.unipic_diffusion import DiffusionHeadConfig
from nexus_jax.layers import LayerNorm, Linear
from nexus_jax.models.flux.blocks import layer_norm
from nexus_jax.models.flux.embeddings import make_silu_mlp, silu_mlp, timestep_sinusoid
from nexus_jax.sharding import constrain

ACT = ("batch", "act_embed")
_ZEROS = nnx.initializers.zeros_init()
_XAVIER = nnx.initializers.xavier_uniform()


def _adaln_modulation(width: int, chunks: int, cfg: DiffusionHeadConfig, rngs: nnx.Rngs) -> nnx.List:
    """torch ``Sequential(SiLU, Linear(width, chunks * width))``: index 1 holds the (zero-initialised) Linear."""
    return nnx.List([None, Linear(width, chunks * width, axes=("embed", "mlp"), param_dtype=cfg.param_dtype,
                                  dtype=cfg.dtype, kernel_init=_ZEROS, rngs=rngs)])


def _modulation(seq: nnx.List, y: jax.Array, chunks: int) -> list[jax.Array]:
    """``seq[1](silu(y))`` split into ``chunks`` [M, width] vectors."""
    return jnp.split(seq[1](jax.nn.silu(y)), chunks, axis=-1)


class TimestepMLP(nnx.Module):
    """DiT ``TimestepEmbedder``: ``[cos | sin]`` sinusoid (max period 1e4) -> ``mlp`` [Linear, SiLU, Linear].

    t [M] (integer or fractional timestep indices) -> [M, width].
    """

    def __init__(self, cfg: DiffusionHeadConfig, *, rngs: nnx.Rngs):
        self.freq_dim = cfg.time_dim
        self.mlp = make_silu_mlp(cfg.time_dim, cfg.width, param_dtype=cfg.param_dtype, dtype=cfg.dtype, rngs=rngs)

    def __call__(self, t: jax.Array) -> jax.Array:
        return silu_mlp(self.mlp, timestep_sinusoid(t, self.freq_dim).astype(self.mlp[0].kernel.dtype))


class ResBlock(nnx.Module):
    """``x + gate * mlp(LN(x) * (1 + scale) + shift)`` with (shift, scale, gate) from ``adaLN_modulation(y)``."""

    def __init__(self, cfg: DiffusionHeadConfig, *, rngs: nnx.Rngs):
        w, kw = cfg.width, dict(param_dtype=cfg.param_dtype, dtype=cfg.dtype, rngs=rngs)
        self.in_ln = LayerNorm(w, eps=cfg.layer_norm_eps, axes=("embed",), param_dtype=cfg.param_dtype, rngs=rngs)
        self.mlp = make_silu_mlp(w, w, in_axes=("embed", "mlp"), out_axes=("mlp", "embed"), **kw)
        for i in (0, 2):  # upstream initialises every Linear but the timestep MLP xavier-uniform
            kernel = self.mlp[i].kernel
            kernel.set_value(_XAVIER(rngs.params(), kernel.shape, kernel.dtype))
        self.adaLN_modulation = _adaln_modulation(w, 3, cfg, rngs)

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """x, y [M, width] -> [M, width]."""
        shift, scale, gate = _modulation(self.adaLN_modulation, y, 3)
        h = silu_mlp(self.mlp, self.in_ln(x) * (1 + scale) + shift)
        return constrain(x + gate * h, ACT)


class FinalLayer(nnx.Module):
    """``linear(LN_noaffine(x) * (1 + scale) + shift)``, (shift, scale) = ``adaLN_modulation(y)``; zero-init."""

    def __init__(self, cfg: DiffusionHeadConfig, *, rngs: nnx.Rngs):
        self.eps = cfg.layer_norm_eps
        self.adaLN_modulation = _adaln_modulation(cfg.width, 2, cfg, rngs)
        self.linear = Linear(cfg.width, cfg.out_channels, axes=("embed", None), param_dtype=cfg.param_dtype,
                             dtype=cfg.dtype, kernel_init=_ZEROS, rngs=rngs)

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """x, y [M, width] -> [M, out_channels]."""
        shift, scale = _modulation(self.adaLN_modulation, y, 2)
        return self.linear(layer_norm(x, self.eps) * (1 + scale) + shift)


class SimpleMLPAdaLN(nnx.Module):
    """Per-token denoiser ``net(x_t [M, in], t [M], c [M, z]) -> [M, out]`` (eps, then variance values)."""

    def __init__(self, cfg: DiffusionHeadConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(param_dtype=cfg.param_dtype, dtype=cfg.dtype, kernel_init=_XAVIER, rngs=rngs)
        self.time_embed = TimestepMLP(cfg, rngs=rngs)
        self.cond_embed = Linear(cfg.z_channels, cfg.width, axes=(None, "embed"), **kw)
        self.input_proj = Linear(cfg.in_channels, cfg.width, axes=(None, "embed"), **kw)
        self.res_blocks = nnx.List([ResBlock(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, t: jax.Array, c: jax.Array) -> jax.Array:
        cfg = self.cfg
        if x.ndim != 2 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"x must be [M, {cfg.in_channels}], got {x.shape}")
        if c.shape != (x.shape[0], cfg.z_channels):
            raise ValueError(f"condition c must be [{x.shape[0]}, {cfg.z_channels}], got {c.shape}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"timesteps t must be [{x.shape[0]}], got {t.shape}")
        h = constrain(self.input_proj(x), ACT)
        y = self.time_embed(t) + self.cond_embed(c)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)


class DiffusionHead(nnx.Module):
    """MAR ``DiffLoss``: holds ``net``; the diffusion maths lives in ``nexus_jax.diffusion.gaussian``."""

    def __init__(self, cfg: DiffusionHeadConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.net = SimpleMLPAdaLN(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, t: jax.Array, c: jax.Array) -> jax.Array:
        """x [M, in], t [M] (original 0..999 timestep indices), c [M, z] -> [M, out]."""
        return self.net(x, t, c)
