"""The generation decoder as planned: Nexus-Gen adapter + FLUX DiT, flow-matching loss and an Euler CFG sampler.

The adapter (nexus-gen.md 2.2) is ``Linear(3584 -> 4096) -> LayerNorm -> ReLU -> Linear(4096 -> 4096) -> LayerNorm``.
Latents are packed 2x2 VAE latents [B, (H/16)(W/16), 64], precomputed by the frozen VAE (not part of the step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from configs.flux import FluxDiTConfig
from configs.nexus_decoders import MergerConfig
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


class Merger(nnx.Module):
    """Editing-decoder conditioner (nexus-gen.md 2.3): one bidirectional Qwen2.5 decoder layer over [81 target; 324
    source] ViT embeddings, then RMSNorm -> Linear(3584 -> 16384) -> RMSNorm -> SiLU -> Linear(16384 -> 4096) ->
    RMSNorm. embeds [B, N, 3584], positions [3, B, N] (M-RoPE) -> context [B, N, 4096]."""

    def __init__(self, cfg: FluxDiTConfig, mcfg: MergerConfig, *, rngs: nnx.Rngs):
        from nexus_jax.layers import RMSNorm
        from nexus_jax.models.qwen2.decoder_layer import Qwen2DecoderLayer

        if mcfg.out_dim != cfg.context_dim:
            raise ValueError(f"merger out_dim {mcfg.out_dim} must equal the DiT context_dim {cfg.context_dim}")
        self.layer_cfg = mcfg.layer.replace(param_dtype=jnp.dtype(cfg.param_dtype).name,
                                            dtype=jnp.dtype(cfg.dtype or cfg.param_dtype).name)
        d, hidden = self.layer_cfg.hidden_size, mcfg.projector_dim
        kw = dict(param_dtype=cfg.param_dtype, dtype=cfg.dtype, rngs=rngs)
        self.layers = nnx.List([Qwen2DecoderLayer(self.layer_cfg, rngs=rngs)])
        self.norms = nnx.List([RMSNorm(n, eps=1e-6, param_dtype=cfg.param_dtype, rngs=rngs)
                               for n in (d, hidden, cfg.context_dim)])
        self.proj_in = Linear(d, hidden, axes=("embed", "mlp"), **kw)
        self.proj_out = Linear(hidden, cfg.context_dim, axes=("mlp", "embed"), **kw)

    def __call__(self, embeds: jax.Array, positions: jax.Array) -> jax.Array:
        from nexus_jax.models.qwen2.rope import rope_cos_sin

        c = self.layer_cfg
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, c.mrope_section)
        x, _ = self.layers[0](embeds.astype(c.jnp_dtype), cos, sin, None)
        x = self.proj_in(self.norms[0](x))
        x = jax.nn.silu(self.norms[1](x))
        return self.norms[2](self.proj_out(x))


class EditingDecoder(nnx.Module):
    """``merger`` + ``dit``; DiT blocks wrapped in :class:`Remat` when ``remat`` != "none"."""

    def __init__(self, cfg: FluxDiTConfig, mcfg: MergerConfig, *, remat: str = "none", rngs: nnx.Rngs):
        self.merger = Merger(cfg, mcfg, rngs=rngs)
        self.dit = GenerationDecoder(cfg, remat=remat, rngs=rngs).dit


def image_ids(image_size: int) -> jax.Array:
    """(0, row, col) RoPE ids of the packed latent tokens of a square image: [(S/16)^2, 3]."""
    from nexus_jax.models.flux.packing import image_ids as packed_ids

    return packed_ids(image_size // 8, image_size // 8)


def flow_matching_loss(model: GenerationDecoder, batch: dict[str, jax.Array], rng: jax.Array, *,
                       image_size: int) -> tuple[jax.Array, dict]:
    """Weighted rectified-flow MSE: x_t = (1 - s) x0 + s eps, target eps - x0.

    batch: latents / noise [B, T, 64], embeds [B, 81, 3584], pooled [B, 768], sigma [B], weight [B]; for the
    editing decoder embeds [B, 405, 3584], merger_positions [3, B, 405] and txt_ids [1, 405, 3] (DiT RoPE ids).
    """
    from nexus_jax.diffusion.flow_match import add_noise, velocity_target

    del rng
    x0, eps, sigma = batch["latents"], batch["noise"], batch["sigma"]
    xt = add_noise(x0, eps, sigma)
    if isinstance(model, EditingDecoder):
        context = model.merger(batch["embeds"], batch["merger_positions"])
        txt_ids = batch["txt_ids"][0]
    else:
        context = model.adapter(batch["embeds"])
        txt_ids = jnp.zeros((context.shape[1], 3), jnp.float32)
    b = x0.shape[0]
    v = model.dit(xt, sigma, context, batch["pooled"], txt_ids, image_ids(image_size),
                  jnp.full((b,), GUIDANCE, sigma.dtype))
    err = jnp.mean(jnp.square((v - velocity_target(x0, eps)).astype(jnp.float32)), axis=(1, 2))
    return jnp.mean(err * batch["weight"]), {}


def sample(model: GenerationDecoder, noise: jax.Array, embeds: jax.Array, pooled: jax.Array,
           neg_context: jax.Array, neg_pooled: jax.Array, *, image_size: int, steps: int, cfg_scale: float,
           unroll: bool) -> jax.Array:
    """The project sampler (nexus_jax.diffusion.sampler.denoise: Euler + CFG ``v_neg + cfg (v_pos - v_neg)``, fixed
    shift 3) on ``adapter(embeds)``. noise [B, T, 64] packed tokens -> denoised tokens [B, T, 64].

    ``unroll`` runs the loop body (velocity + Euler step) ``steps`` times in Python: a loop-free program whose cost
    XLA counts fully (used for cost extrapolation at ``steps=1``).
    """
    from nexus_jax.diffusion.flow_match import euler_step, fixed_shift_sigmas
    from nexus_jax.diffusion.sampler import TOKENS, Conditioning, denoise, velocity

    sig = jnp.asarray(fixed_shift_sigmas(steps, SHIFT))
    context = model.adapter(embeds)
    b = noise.shape[0]
    ids = image_ids(image_size)
    g = jnp.full((b,), GUIDANCE, jnp.float32)
    cond = Conditioning(context, pooled, jnp.zeros((context.shape[1], 3), jnp.float32))
    neg = Conditioning(neg_context, neg_pooled, jnp.zeros((neg_context.shape[1], 3), jnp.float32))
    neg = neg if cfg_scale != 1.0 else None
    if not unroll:
        return denoise(model.dit, noise, ids, sig, cond, neg, g, cfg_scale)
    x = sharding.constrain(noise.astype(jnp.float32), TOKENS)
    for i in range(steps):
        v = velocity(model.dit, x, sig[i], ids, cond, neg, g, cfg_scale)
        x = sharding.constrain(euler_step(x, v, sig[i], sig[i + 1]), TOKENS)
    return x
