"""The Nexus-Gen decoders as planned: the library's own modules (``nexus_jax.models.nexus_decoders``
``GenerationDecoder`` = adapter + FLUX DiT, ``EditingDecoder`` = embedding merger + FLUX DiT, per-block remat from
``FluxDiTConfig.remat``), the flow-matching loss on precomputed latents and the project's Euler CFG sampler.

The planner builds these modules abstractly (``nnx.eval_shape`` in ``launch.train_program`` / the sampling workload):
no weights are allocated. Latents are packed 2x2 VAE latents [B, (H/16)(W/16), 64], precomputed by the frozen VAE
(not part of the step).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from configs.flux import FluxDiTConfig
from configs.nexus_decoders import AdapterConfig, MergerConfig, NexusDecoderConfig
from nexus_jax import sharding
from nexus_jax.models.nexus_decoders import EditingDecoder, GenerationDecoder, negative_conditioning

ADAPTER_IN = AdapterConfig.in_dim  # AR hidden size (3584) the adapter reads
EDIT_GRIDS = ((18, 18), (36, 36))  # merger ViT grids: 81 target + 324 source tokens, as upstream
GUIDANCE = 3.5
SHIFT = 3.0


def decoder_config(dit: FluxDiTConfig, merger: MergerConfig | None = None, *, remat: str = "none"
                   ) -> NexusDecoderConfig:
    """The decoder config of a plan: its DiT (``remat`` per block), the adapter reading ``ADAPTER_IN`` features, and
    (editing) ``merger`` computing in the DiT's dtypes on the upstream grids."""
    dit = dataclasses.replace(dit, remat=remat)
    adapter = AdapterConfig(in_dim=ADAPTER_IN, out_dim=dit.context_dim, param_dtype=dit.param_dtype)
    mcfg = merger or MergerConfig(out_dim=dit.context_dim)  # a generation decoder does not build the merger
    if mcfg.out_dim != dit.context_dim:
        raise ValueError(f"merger out_dim {mcfg.out_dim} must equal the DiT context_dim {dit.context_dim}")
    layer = mcfg.layer.replace(param_dtype=jnp.dtype(dit.param_dtype).name,
                               dtype=jnp.dtype(dit.dtype or dit.param_dtype).name)
    mcfg = dataclasses.replace(mcfg, layer=layer, target_grid=EDIT_GRIDS[0], ref_grid=EDIT_GRIDS[1])
    return NexusDecoderConfig(dit=dit, adapter=adapter, merger=mcfg)


def generation_decoder(dit: FluxDiTConfig, *, remat: str = "none", rngs: nnx.Rngs) -> GenerationDecoder:
    return GenerationDecoder(decoder_config(dit, remat=remat), rngs=rngs)


def editing_decoder(dit: FluxDiTConfig, merger: MergerConfig, *, remat: str = "none",
                    rngs: nnx.Rngs) -> EditingDecoder:
    return EditingDecoder(decoder_config(dit, merger, remat=remat), rngs=rngs)


def image_ids(image_size: int) -> jax.Array:
    """(0, row, col) RoPE ids of the packed latent tokens of a square image: [(S/16)^2, 3]."""
    from nexus_jax.models.flux.packing import image_ids as packed_ids

    return packed_ids(image_size // 8, image_size // 8)


def flow_matching_loss(model: GenerationDecoder | EditingDecoder, batch: dict[str, jax.Array], rng: jax.Array, *,
                       image_size: int) -> tuple[jax.Array, dict]:
    """Weighted rectified-flow MSE: x_t = (1 - s) x0 + s eps, target eps - x0.

    batch: latents / noise [B, T, 64], embeds [B, 81, 3584] (editing: [B, 81 + 324, hidden], target rows first),
    pooled [B, 768], sigma [B], weight [B]. The conditioning is the model's own (``model.conditioning``).
    """
    from nexus_jax.diffusion.flow_match import add_noise, velocity_target

    del rng
    x0, eps, sigma = batch["latents"], batch["noise"], batch["sigma"]
    xt = add_noise(x0, eps, sigma)
    if isinstance(model, EditingDecoder):
        g, m = model.cfg.merger.target_grid, model.cfg.merger.spatial_merge
        n = (g[0] // m) * (g[1] // m)
        latent = image_size // 8
        cond = model.conditioning(batch["embeds"][:, :n], batch["embeds"][:, n:], batch["pooled"], (latent, latent))
    else:
        cond = model.conditioning(batch["embeds"], batch["pooled"])
    b = x0.shape[0]
    v = model.dit(xt, sigma, cond.context, cond.pooled, cond.txt_ids, image_ids(image_size),
                  jnp.full((b,), GUIDANCE, sigma.dtype))
    err = jnp.mean(jnp.square((v - velocity_target(x0, eps)).astype(jnp.float32)), axis=(1, 2))
    return jnp.mean(err * batch["weight"]), {}


def sample(model: GenerationDecoder, noise: jax.Array, embeds: jax.Array, pooled: jax.Array,
           neg_context: jax.Array, neg_pooled: jax.Array, *, image_size: int, steps: int, cfg_scale: float,
           unroll: bool) -> jax.Array:
    """The project sampler (nexus_jax.diffusion.sampler.denoise: Euler + CFG ``v_neg + cfg (v_pos - v_neg)``, fixed
    shift 3) on ``model.conditioning(embeds)``. noise [B, T, 64] packed tokens -> denoised tokens [B, T, 64].

    ``unroll`` runs the loop body (velocity + Euler step) ``steps`` times in Python: a loop-free program whose cost
    XLA counts fully (used for cost extrapolation at ``steps=1``).
    """
    from nexus_jax.diffusion.flow_match import euler_step, fixed_shift_sigmas
    from nexus_jax.diffusion.sampler import TOKENS, denoise, velocity

    sig = jnp.asarray(fixed_shift_sigmas(steps, SHIFT))
    b = noise.shape[0]
    cond = model.conditioning(embeds, pooled)
    neg = negative_conditioning(neg_context, neg_pooled, b) if cfg_scale != 1.0 else None
    ids = image_ids(image_size)
    g = jnp.full((b,), GUIDANCE, jnp.float32)
    if not unroll:
        return denoise(model.dit, noise, ids, sig, cond, neg, g, cfg_scale)
    x = sharding.constrain(noise.astype(jnp.float32), TOKENS)
    for i in range(steps):
        v = velocity(model.dit, x, sig[i], ids, cond, neg, g, cfg_scale)
        x = sharding.constrain(euler_step(x, v, sig[i], sig[i + 1]), TOKENS)
    return x
