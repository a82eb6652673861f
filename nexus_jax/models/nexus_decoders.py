"""Nexus-Gen decoder conditioners: generation adapter, editing embedding merger, edit text ids; decoder models.

Parameter paths follow the upstream checkpoints: ``adapter.{0,3}`` Linear, ``adapter.{1,4}`` LayerNorm (index 2 is
the ReLU); ``embedding_merger.layers.{m}`` Qwen2.5 decoder layers, ``embedding_merger.projector.{0,2,5}`` RMSNorm,
``projector.{1,4}`` Linear (index 3 is the SiLU); ``dit.*`` the FLUX DiT.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.nexus_decoders import AdapterConfig, MergerConfig, NexusDecoderConfig
from nexus_jax.layers import LayerNorm, Linear, RMSNorm
from nexus_jax.models.flux.conditioning import Conditioning
from nexus_jax.models.flux.dit import FluxDiT
from nexus_jax.models.qwen2 import Qwen2DecoderLayer, rope_cos_sin
from nexus_jax.sharding import constrain

ACT = ("batch", "length", "act_embed")


def _check_embeds(name: str, x: jax.Array, width: int, tokens: int | None = None) -> None:
    if x.ndim != 3 or x.shape[-1] != width:
        raise ValueError(f"{name} must be [B, N, {width}], got shape {tuple(x.shape)}")
    if tokens is not None and x.shape[1] != tokens:
        raise ValueError(f"{name} has {x.shape[1]} tokens, its grid needs {tokens}")


# ------------------------------------------------------------------------------------------------ generation adapter
def make_adapter(cfg: AdapterConfig, *, rngs: nnx.Rngs) -> nnx.List:
    """``[Linear(in, out), LayerNorm, None (ReLU), Linear(out, out), LayerNorm]`` as in ``adapter.*``."""
    kw = dict(param_dtype=cfg.param_dtype, rngs=rngs)
    return nnx.List([
        Linear(cfg.in_dim, cfg.out_dim, axes=("embed", "mlp"), **kw),
        LayerNorm(cfg.out_dim, eps=cfg.eps, **kw),
        None,
        Linear(cfg.out_dim, cfg.out_dim, axes=("mlp", "embed"), **kw),
        LayerNorm(cfg.out_dim, eps=cfg.eps, **kw),
    ])


def apply_adapter(adapter: nnx.List, embeds: jax.Array) -> jax.Array:
    """embeds [B, N, in_dim] (AR image embeddings) -> context [B, N, out_dim] (replaces the T5 tokens)."""
    _check_embeds("embeds", embeds, adapter[0].in_features)
    h = jax.nn.relu(adapter[1](adapter[0](embeds)))
    return constrain(adapter[4](adapter[3](h)), ACT)


# ------------------------------------------------------------------------------------------------ editing merger
def merger_positions(grid_hw: tuple[int, int], base_grid: int = 72, merge: int = 2) -> np.ndarray:
    """Fractional M-RoPE positions [3, N] float32 of a ViT patch grid (h, w): t = 0, rows/cols of the merged grid
    scaled by ``base_grid / h`` and ``base_grid / w`` (N = h/merge * w/merge, row-major)."""
    h, w = grid_hw
    rows = np.arange(h // merge, dtype=np.float32) * np.float32(base_grid / h)
    cols = np.arange(w // merge, dtype=np.float32) * np.float32(base_grid / w)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    return np.stack([np.zeros(rr.size, np.float32), rr.reshape(-1), cc.reshape(-1)])


class EmbeddingMerger(nnx.Module):
    """Target (81) + reference (324) ViT-space embeddings -> bidirectional Qwen2.5 layer(s) -> RMSNorm-MLP projector."""

    def __init__(self, cfg: MergerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        t, p, o = cfg.layer, cfg.projector_dim, cfg.out_dim
        pd = t.jnp_param_dtype
        self.layers = nnx.List([Qwen2DecoderLayer(t, rngs=rngs) for _ in range(cfg.num_layers)])
        norm = dict(eps=t.rms_norm_eps, param_dtype=pd, rngs=rngs)
        self.projector = nnx.List([
            RMSNorm(t.hidden_size, **norm),
            Linear(t.hidden_size, p, axes=("embed", "mlp"), param_dtype=pd, rngs=rngs),
            RMSNorm(p, axes=("mlp",), **norm),
            None,
            Linear(p, o, axes=("mlp", "embed"), param_dtype=pd, rngs=rngs),
            RMSNorm(o, **norm),
        ])

    def __call__(
        self,
        embeds: jax.Array,
        ref_embeds: jax.Array | None = None,
        grid: tuple[int, int] | None = None,
        ref_grid: tuple[int, int] | None = None,
    ) -> jax.Array:
        """embeds [B, N, hidden] on ViT grid ``grid`` (default cfg.target_grid); ref_embeds [B, M, hidden] on
        ``ref_grid`` (default cfg.ref_grid) or None. Returns [B, N (+ M), out_dim]."""
        c = self.cfg
        grid, ref_grid = grid or c.target_grid, ref_grid or c.ref_grid
        d, m = c.layer.hidden_size, c.spatial_merge
        _check_embeds("embeds", embeds, d, (grid[0] // m) * (grid[1] // m))
        pos = merger_positions(grid, c.base_grid, m)
        x = embeds
        if ref_embeds is not None:
            _check_embeds("ref_embeds", ref_embeds, d, (ref_grid[0] // m) * (ref_grid[1] // m))
            if ref_embeds.shape[0] != embeds.shape[0]:
                raise ValueError(f"ref_embeds batch {ref_embeds.shape[0]} != embeds batch {embeds.shape[0]}")
            pos = np.concatenate([pos, merger_positions(ref_grid, c.base_grid, m)], axis=1)
            x = jnp.concatenate([embeds, ref_embeds.astype(embeds.dtype)], axis=1)
        b = x.shape[0]
        positions = jnp.broadcast_to(jnp.asarray(pos)[:, None, :], (3, b, pos.shape[1]))
        cos, sin = rope_cos_sin(positions, c.layer.head_dim, c.layer.rope_theta, c.layer.mrope_section)
        x = constrain(x, ACT)
        for layer in self.layers:
            x, _ = layer(x, cos, sin, mask=None)  # bidirectional
        p = self.projector
        x = p[5](p[4](jax.nn.silu(p[2](p[1](p[0](x))))))
        return constrain(x, ACT)


def edit_text_ids(
    latent_hw: tuple[int, int], grid: tuple[int, int] = (18, 18), ref_grid: tuple[int, int] | None = (36, 36),
    merge: int = 2, round_to_bf16: bool = True,
) -> np.ndarray:
    """DiT RoPE ids of the merger's output tokens: target ``(0, i * Hl/gh, j * Wl/gw)``, reference
    ``(1, i * Hl/rh, j * Wl/rw)`` (i, j over the merged grids). Rounded through bf16 like the upstream latents-dtype
    cast. Returns [N (+ M), 3] float32."""

    def block(g: tuple[int, int], t: float) -> np.ndarray:
        ids = np.zeros((g[0] // merge, g[1] // merge, 3), np.float32)
        ids[..., 0] = t
        ids[..., 1] = np.arange(g[0] // merge, dtype=np.float32)[:, None] * np.float32(latent_hw[0] / g[0])
        ids[..., 2] = np.arange(g[1] // merge, dtype=np.float32)[None, :] * np.float32(latent_hw[1] / g[1])
        return ids.reshape(-1, 3)

    ids = block(grid, 0.0) if ref_grid is None else np.concatenate([block(grid, 0.0), block(ref_grid, 1.0)])
    if round_to_bf16:
        ids = ids.astype(jnp.bfloat16).astype(np.float32)  # numpy (ml_dtypes) bf16: round to nearest even
    return ids


# ------------------------------------------------------------------------------------------------ decoder models
def _pooled(pooled: jax.Array, b: int) -> jax.Array:
    if pooled.ndim != 2 or pooled.shape[0] not in (1, b):
        raise ValueError(f"pooled must be [1 or {b}, pooled_dim], got shape {tuple(pooled.shape)}")
    return jnp.broadcast_to(pooled, (b, pooled.shape[1]))


class GenerationDecoder(nnx.Module):
    """``generation_decoder.bin``: adapter + FLUX DiT. Context = adapter(embeds), text ids all zero."""

    def __init__(self, cfg: NexusDecoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dit = FluxDiT(cfg.dit, rngs=rngs)
        self.adapter = make_adapter(cfg.adapter, rngs=rngs)

    def conditioning(self, embeds: jax.Array, pooled: jax.Array) -> Conditioning:
        """embeds [B, N, 3584]; pooled [1 or B, 768] (CLIP("") pooled) -> positive Conditioning."""
        context = apply_adapter(self.adapter, embeds)
        return Conditioning(context, _pooled(pooled, embeds.shape[0]), jnp.zeros((embeds.shape[1], 3), jnp.float32))


class EditingDecoder(nnx.Module):
    """``edit_decoder.bin``: embedding merger + FLUX DiT. Context = merger(embeds, ref_embeds), positional ids."""

    def __init__(self, cfg: NexusDecoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dit = FluxDiT(cfg.dit, rngs=rngs)
        self.embedding_merger = EmbeddingMerger(cfg.merger, rngs=rngs)

    def conditioning(
        self, embeds: jax.Array, ref_embeds: jax.Array | None, pooled: jax.Array, latent_hw: tuple[int, int]
    ) -> Conditioning:
        """embeds [B, 81, 3584]; ref_embeds [B, 324, 3584] or None; pooled [1 or B, 768]; latent (H/8, W/8)."""
        m = self.cfg.merger
        context = self.embedding_merger(embeds, ref_embeds)
        ids = edit_text_ids(latent_hw, m.target_grid, m.ref_grid if ref_embeds is not None else None, m.spatial_merge)
        return Conditioning(context, _pooled(pooled, embeds.shape[0]), jnp.asarray(ids))


def negative_conditioning(t5_context: jax.Array, clip_pooled: jax.Array, batch: int) -> Conditioning:
    """Precomputed empty-prompt FLUX conditioning (T5("") [1, L, 4096], CLIP("") [1, 768]) for true CFG."""
    if t5_context.ndim != 3 or t5_context.shape[0] not in (1, batch):
        raise ValueError(f"negative context must be [1 or {batch}, L, C], got shape {tuple(t5_context.shape)}")
    context = jnp.broadcast_to(t5_context, (batch, *t5_context.shape[1:]))
    return Conditioning(context, _pooled(clip_pooled, batch), jnp.zeros((t5_context.shape[1], 3), jnp.float32))
