"""The generation decoder as planned: Nexus-Gen adapter + FLUX DiT, flow-matching loss and an Euler CFG sampler.

The adapter (nexus-gen.md 2.2) is ``Linear(3584 -> 4096) -> LayerNorm -> ReLU -> Linear(4096 -> 4096) -> LayerNorm``.
Latents are packed 2x2 VAE latents [B, (H/16)(W/16), 64], precomputed by the frozen VAE (not part of the step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.flux import FluxDiTConfig
from launch.remat import Remat
from nexus_jax import sharding
from nexus_jax.layers import LayerNorm, Linear
from nexus_jax.models.flux.dit import FluxDiT

ADAPTER_IN = 3584
GUIDANCE = 3.5
SHIFT = 3.0


class Adapter(nnx.Module):
    """embeds [B, 81, 3584] -> context [B, 81, context_dim]."""

    def __init__(self, cfg: FluxDiTConfig, *, rngs: nnx.Rngs):
        kw = dict(param_dtype=cfg.param_dtype, dtype=cfg.dtype, rngs=rngs)
        self.layers = nnx.List([
            Linear(ADAPTER_IN, cfg.context_dim, axes=("embed", "mlp"), **kw),
            LayerNorm(cfg.context_dim, param_dtype=cfg.param_dtype, rngs=rngs),
            Linear(cfg.context_dim, cfg.context_dim, axes=("mlp", "embed"), **kw),
            LayerNorm(cfg.context_dim, param_dtype=cfg.param_dtype, rngs=rngs),
        ])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.layers[1](self.layers[0](x))
        x = jax.nn.relu(x)
        return self.layers[3](self.layers[2](x))


class GenerationDecoder(nnx.Module):
    """``adapter`` + ``dit``; with ``remat`` != "none" every DiT block is wrapped in :class:`Remat`."""

    def __init__(self, cfg: FluxDiTConfig, *, remat: str = "none", rngs: nnx.Rngs):
        self.adapter = Adapter(cfg, rngs=rngs)
        self.dit = FluxDiT(cfg, rngs=rngs)
        if remat != "none":
            self.dit.blocks = nnx.List([Remat(b, remat) for b in self.dit.blocks])
            self.dit.single_blocks = nnx.List([Remat(b, remat) for b in self.dit.single_blocks])


def image_ids(image_size: int) -> jax.Array:
    """(0, row, col) position ids of the packed latent grid: [(S/16)^2, 3]."""
    n = image_size // 16
    rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return jnp.asarray(np.stack([np.zeros_like(rows), rows, cols], -1).reshape(-1, 3), jnp.float32)


def flow_matching_loss(model: GenerationDecoder, batch: dict[str, jax.Array], rng: jax.Array, *,
                       image_size: int) -> tuple[jax.Array, dict]:
    """Weighted rectified-flow MSE: x_t = (1 - s) x0 + s eps, target eps - x0.

    batch: latents / noise [B, T, 64], embeds [B, 81, 3584], pooled [B, 768], sigma [B], weight [B].
    """
    del rng
    x0, eps, sigma = batch["latents"], batch["noise"], batch["sigma"]
    s = sigma[:, None, None].astype(x0.dtype)
    xt = (1 - s) * x0 + s * eps
    context = model.adapter(batch["embeds"])
    b = x0.shape[0]
    txt_ids = jnp.zeros((context.shape[1], 3), jnp.float32)
    v = model.dit(xt, sigma, context, batch["pooled"], txt_ids, image_ids(image_size),
                  jnp.full((b,), GUIDANCE, sigma.dtype))
    err = jnp.mean(jnp.square((v - (eps - x0)).astype(jnp.float32)), axis=(1, 2))
    return jnp.mean(err * batch["weight"]), {}


def shifted_sigmas(steps: int, shift: float = SHIFT) -> np.ndarray:
    """DiffSynth FlowMatch schedule: s = linspace(1, 0.003/1.002, steps), sigma = shift s / (1 + (shift-1) s), + 0."""
    s = np.linspace(1.0, 0.003 / 1.002, steps)
    return np.append(shift * s / (1 + (shift - 1) * s), 0.0).astype(np.float32)


def sample(model: GenerationDecoder, noise: jax.Array, embeds: jax.Array, pooled: jax.Array,
           neg_context: jax.Array, neg_pooled: jax.Array, *, image_size: int, steps: int, cfg_scale: float,
           unroll: bool) -> jax.Array:
    """Euler sampling with CFG: v = v_neg + cfg (v_pos - v_neg). noise [B, T, 64] -> latents [B, T, 64].

    ``unroll`` uses a Python loop (loop-free HLO, for cost extrapolation) instead of ``fori_loop``.
    """
    sig = jnp.asarray(shifted_sigmas(steps))
    context = model.adapter(embeds)
    b = noise.shape[0]
    ids = image_ids(image_size)
    g = jnp.full((b,), GUIDANCE, noise.dtype)
    pos_ids = jnp.zeros((context.shape[1], 3), jnp.float32)
    neg_ids = jnp.zeros((neg_context.shape[1], 3), jnp.float32)

    def step(i, x):
        s = jnp.full((b,), sig[i], noise.dtype)
        v = model.dit(x, s, context, pooled, pos_ids, ids, g)
        if cfg_scale != 1.0:
            v_neg = model.dit(x, s, neg_context, neg_pooled, neg_ids, ids, g)
            v = v_neg + cfg_scale * (v - v_neg)
        x = x + v * (sig[i + 1] - sig[i])
        return sharding.constrain(x, ("batch", "length", None))

    if unroll:
        x = noise
        for i in range(steps):
            x = step(i, x)
        return x
    return jax.lax.fori_loop(0, steps, step, noise)
