"""Flow-matching Euler sampler: N DiT steps (lax.fori_loop) + VAE decode, compiled as one jitted function.

Embedded (distilled) guidance goes into the DiT's guidance embedder; true classifier-free guidance runs the negative
conditioning too and mixes ``v = v_neg + cfg * (v_pos - v_neg)``. Initial noise for sample ``i`` is drawn from
``fold_in(key, i)``, so a sample does not depend on the batch it was generated in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.nexus_decoders import SamplerConfig
from nexus_jax.diffusion.flow_match import euler_step, fixed_shift_sigmas, flux_dynamic_sigmas
from nexus_jax.models.flux.conditioning import Conditioning  # noqa: F401  (re-exported)
from nexus_jax.models.flux.packing import image_ids, latent_size, pack_latents, unpack_latents
from nexus_jax.sharding import constrain

TOKENS = ("batch", "length", None)


class SampleOutput(NamedTuple):
    images: jax.Array | None  # [B, H, W, 3] in ~[-1, 1] (None without a VAE)
    latents: jax.Array  # [B, H/8, W/8, C] model-space latents


def schedule_sigmas(cfg: SamplerConfig, height: int, width: int) -> np.ndarray:
    """[N + 1] float32 sigmas (terminal 0) for ``cfg.schedule`` at this resolution."""
    h, w = latent_size(height, width)
    if cfg.schedule == "fixed":
        return fixed_shift_sigmas(cfg.num_steps, cfg.shift)
    return flux_dynamic_sigmas(cfg.num_steps, (h // 2) * (w // 2))


def initial_noise(key: jax.Array, batch: int, h: int, w: int, channels: int) -> jax.Array:
    """Standard normal latents [B, h, w, C] float32; row i from ``fold_in(key, i)``."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))
    return jax.vmap(lambda k: jax.random.normal(k, (h, w, channels), jnp.float32))(keys)


def _stack_branches(cond: Conditioning, neg: Conditioning) -> Conditioning:
    """[pos; neg] along the batch (same context length), ids made per-sample."""
    b = cond.context.shape[0]

    def ids(c: Conditioning) -> jax.Array:
        return jnp.broadcast_to(c.txt_ids, (b, *c.txt_ids.shape[-2:]))

    return Conditioning(jnp.concatenate([cond.context, neg.context]), jnp.concatenate([cond.pooled, neg.pooled]),
                        jnp.concatenate([ids(cond), ids(neg)]))


def velocity(
    dit: nnx.Module, tokens: jax.Array, sigma: jax.Array, img_ids: jax.Array, cond: Conditioning,
    neg: Conditioning | None, guidance: jax.Array | None, cfg_scale: jax.Array | float,
) -> jax.Array:
    """Guided velocity. tokens [B, Li, 64]; sigma scalar; guidance [B] or None. neg=None: no true CFG."""
    b = tokens.shape[0]
    sig = jnp.full((b,), sigma, jnp.float32)
    if neg is None:
        return dit(tokens, sig, cond.context, cond.pooled, cond.txt_ids, img_ids, guidance)
    if cond.context.shape == neg.context.shape and cond.txt_ids.shape[-2] == neg.txt_ids.shape[-2]:
        both = _stack_branches(cond, neg)
        g2 = None if guidance is None else jnp.concatenate([guidance, guidance])
        v = dit(jnp.concatenate([tokens, tokens]), jnp.concatenate([sig, sig]), both.context, both.pooled,
                both.txt_ids, img_ids, g2)
        v_pos, v_neg = v[:b], v[b:]
    else:
        v_pos = dit(tokens, sig, cond.context, cond.pooled, cond.txt_ids, img_ids, guidance)
        v_neg = dit(tokens, sig, neg.context, neg.pooled, neg.txt_ids, img_ids, guidance)
    return v_neg + cfg_scale * (v_pos - v_neg)


def denoise(
    dit: nnx.Module, tokens: jax.Array, img_ids: jax.Array, sigmas: jax.Array, cond: Conditioning,
    neg: Conditioning | None = None, guidance: jax.Array | None = None, cfg_scale: jax.Array | float = 1.0,
) -> jax.Array:
    """Euler-integrate packed tokens [B, Li, 64] along ``sigmas`` [N + 1] (fp32 state) with lax.fori_loop."""

    def body(i: jax.Array, x: jax.Array) -> jax.Array:
        v = velocity(dit, x, sigmas[i], img_ids, cond, neg, guidance, cfg_scale)
        return constrain(euler_step(x, v, sigmas[i], sigmas[i + 1]), TOKENS)

    return jax.lax.fori_loop(0, sigmas.shape[0] - 1, body, constrain(tokens.astype(jnp.float32), TOKENS))


def sample(
    dit: nnx.Module, vae: nnx.Module | None, key: jax.Array, cond: Conditioning, neg: Conditioning | None,
    sigmas: jax.Array, guidance: float | jax.Array | None, cfg_scale: float | jax.Array, *, height: int, width: int,
) -> SampleOutput:
    """Noise -> latents -> pixels (pure; call under jit). neg=None or cfg_scale==1 (static) skips the negative pass."""
    h, w = latent_size(height, width)
    b = cond.context.shape[0]
    if neg is not None and neg.context.shape[0] != b:
        raise ValueError(f"negative conditioning batch {neg.context.shape[0]} != positive batch {b}")
    channels = dit.cfg.latent_channels
    z = initial_noise(key, b, h, w, channels)
    g = None if guidance is None or not dit.cfg.guidance_embed else jnp.full((b,), guidance, jnp.float32)
    tokens = denoise(dit, pack_latents(z), image_ids(h, w), sigmas, cond, neg, g, cfg_scale)
    latents = unpack_latents(tokens, h, w)
    return SampleOutput(None if vae is None else vae.decode(latents), latents)


def make_sampler(
    dit: nnx.Module, vae: nnx.Module | None, cfg: SamplerConfig
) -> Callable[[jax.Array, Conditioning, Conditioning | None], SampleOutput]:
    """``fn(key, cond, neg=None) -> SampleOutput``: one compiled program per (batch, lengths) for ``cfg``.

    The modules' current parameters are read at call time (not baked into the executable).
    """
    dit_graph, dit_state = nnx.split(dit)
    vae_graph, vae_state = nnx.split(vae) if vae is not None else (None, None)
    sigmas = jnp.asarray(schedule_sigmas(cfg, cfg.height, cfg.width))

    @jax.jit
    def run(dit_state, vae_state, key, cond, neg):
        d = nnx.merge(dit_graph, dit_state)
        v = nnx.merge(vae_graph, vae_state) if vae_graph is not None else None
        return sample(d, v, key, cond, neg, sigmas, cfg.guidance, cfg.cfg_scale, height=cfg.height, width=cfg.width)

    def args(key: jax.Array, cond: Conditioning, neg: Conditioning | None) -> tuple:
        return (nnx.state(dit), nnx.state(vae) if vae is not None else None, key, cond,
                neg if cfg.cfg_scale != 1.0 else None)

    def fn(key: jax.Array, cond: Conditioning, neg: Conditioning | None = None) -> SampleOutput:
        return run(*args(key, cond, neg))

    fn.lower = lambda key, cond, neg=None: run.lower(*args(key, cond, neg))  # for inspection / AOT
    del dit_state, vae_state
    return fn
