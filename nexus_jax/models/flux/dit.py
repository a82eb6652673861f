"""FLUX.1 DiT (rectified-flow MM-DiT) in flax.nnx, DiffSynth ``FluxDiT`` parameter names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from configs.flux import FluxDiTConfig
from nexus_jax.layers import REMAT_POLICIES, Linear
from nexus_jax.models.flux.blocks import ACT, AdaLNModulation, DoubleStreamBlock, SingleStreamBlock, layer_norm
from nexus_jax.models.flux.embeddings import TimestepEmbedder, make_silu_mlp, rope_tables, silu_mlp
from nexus_jax.sharding import constrain


def _call_block(block: nnx.Module, *args: jax.Array):
    return block(*args)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


class FluxDiT(nnx.Module):
    """Velocity model ``v(x_t, sigma | context, pooled, guidance)`` over packed latent tokens.

    Submodules: ``x_embedder``, ``context_embedder``, ``time_embedder``, ``guidance_embedder``,
    ``pooled_text_embedder``, ``blocks[i]``, ``single_blocks[j]``, ``final_norm_out`` ((scale, shift) order),
    ``final_proj_out``.
    """

    def __init__(self, cfg: FluxDiTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, kw = cfg.hidden_size, dict(param_dtype=cfg.param_dtype, dtype=cfg.dtype, rngs=rngs)
        self.x_embedder = Linear(cfg.in_channels, d, axes=(None, "embed"), **kw)
        self.context_embedder = Linear(cfg.context_dim, d, axes=("mlp", "embed"), **kw)
        self.time_embedder = TimestepEmbedder(cfg.timestep_dim, d, **kw)
        self.guidance_embedder = TimestepEmbedder(cfg.timestep_dim, d, **kw) if cfg.guidance_embed else None
        self.pooled_text_embedder = make_silu_mlp(cfg.pooled_dim, d, **kw)
        self.blocks = nnx.List([DoubleStreamBlock(cfg, rngs=rngs) for _ in range(cfg.num_double_blocks)])
        self.single_blocks = nnx.List([SingleStreamBlock(cfg, rngs=rngs) for _ in range(cfg.num_single_blocks)])
        self.final_norm_out = AdaLNModulation(d, 2, cfg=cfg, rngs=rngs)
        self.final_proj_out = Linear(d, cfg.in_channels, axes=("embed", None), **kw)

    def conditioning(self, sigma: jax.Array, pooled: jax.Array, guidance: jax.Array | None) -> jax.Array:
        """temb [B, D] = time(1000 sigma) + guidance(1000 g) + pooled MLP."""
        temb = self.time_embedder(sigma * 1000.0)
        if self.guidance_embedder is not None:
            _check(guidance is not None, "this DiT has a guidance embedder: pass guidance [B] (e.g. 3.5)")
            temb = temb + self.guidance_embedder(guidance * 1000.0)
        return temb + silu_mlp(self.pooled_text_embedder, pooled)

    def validate(self, tokens: jax.Array, sigma: jax.Array, context: jax.Array, pooled: jax.Array,
                 txt_ids: jax.Array, img_ids: jax.Array, guidance: jax.Array | None) -> None:
        """Shape checks (trace time); raise ValueError naming the offending value and the expected size."""
        c = self.cfg
        _check(tokens.ndim == 3 and tokens.shape[-1] == c.in_channels,
               f"latent tokens must be [B, L, {c.in_channels}], got {tokens.shape}")
        b, li = tokens.shape[:2]
        _check(context.ndim == 3 and context.shape[0] == b and context.shape[-1] == c.context_dim,
               f"context must be [{b}, Lt, {c.context_dim}], got {context.shape}")
        _check(pooled.shape == (b, c.pooled_dim), f"pooled must be [{b}, {c.pooled_dim}], got {pooled.shape}")
        _check(sigma.shape == (b,), f"sigma must be [{b}], got {sigma.shape}")
        if guidance is not None:
            _check(guidance.shape == (b,), f"guidance must be [{b}], got {guidance.shape}")
        lt = context.shape[1]
        for name, ids, n in (("txt_ids", txt_ids, lt), ("img_ids", img_ids, li)):
            _check(ids.shape[-1] == len(c.rope_axes_dim) and ids.shape[-2] == n and ids.ndim in (2, 3),
                   f"{name} must be [{n}, {len(c.rope_axes_dim)}] or [B, {n}, {len(c.rope_axes_dim)}], got {ids.shape}")

    def __call__(
        self,
        tokens: jax.Array,
        sigma: jax.Array,
        context: jax.Array,
        pooled: jax.Array,
        txt_ids: jax.Array,
        img_ids: jax.Array,
        guidance: jax.Array | None = None,
    ) -> jax.Array:
        """Predict the flow velocity (noise - x0).

        tokens [B, Li, in_channels] packed latents; sigma [B] in [0, 1]; context [B, Lt, context_dim];
        pooled [B, pooled_dim]; txt_ids [Lt, 3] or [B, Lt, 3]; img_ids [Li, 3] or [B, Li, 3]; guidance [B].
        Returns [B, Li, in_channels].
        """
        self.validate(tokens, sigma, context, pooled, txt_ids, img_ids, guidance)
        temb = self.conditioning(sigma, pooled, guidance)
        img = constrain(self.x_embedder(tokens), ACT)
        txt = constrain(self.context_embedder(context), ACT)
        if txt_ids.ndim != img_ids.ndim:
            b = tokens.shape[0]
            txt_ids = jnp.broadcast_to(txt_ids, (b, *txt_ids.shape[-2:]))
            img_ids = jnp.broadcast_to(img_ids, (b, *img_ids.shape[-2:]))
        cos, sin = rope_tables(jnp.concatenate([txt_ids, img_ids], axis=-2), self.cfg.rope_axes_dim,
                               self.cfg.rope_theta)
        cos, sin = cos[..., None, :], sin[..., None, :]  # [(B,) L, 1, hd/2]: broadcast over heads
        run = _call_block
        if self.cfg.remat != "none":
            run = nnx.remat(_call_block, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=True)
        for block in self.blocks:
            img, txt = run(block, img, txt, temb, cos, sin)
        lt = txt.shape[1]
        x = jnp.concatenate([txt, img], axis=1)
        for block in self.single_blocks:
            x = run(block, x, temb, cos, sin)
        img = x[:, lt:]
        scale, shift = self.final_norm_out(temb)
        img = layer_norm(img, self.cfg.eps) * (1 + scale[:, None]) + shift[:, None]
        return self.final_proj_out(img)
