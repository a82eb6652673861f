"""UniPic-1 / Harmon MAR encoder and decoder (``mar.py`` ``forward_mae_encoder`` / ``forward_mae_decoder``) in nnx.

Static shapes: the encoder runs on the full ``buffer + N`` sequence and excludes masked tokens as attention *keys*
instead of dropping them (torch ``x[(1 - mask_with_buffer).nonzero()]``). Every other op is per token, so the
outputs at buffer/visible rows equal the dropping version; rows at masked positions are don't-care. Consequently the
number of masked tokens may differ between rows (torch requires equal counts). The decoder reads the encoder output
only at buffer/visible rows and attends bidirectionally over all ``buffer + N`` tokens, as upstream.

Attribute names equal the torch ones (``z_proj``, ``encoder_blocks.{i}``, ``mask_token``, ``class_emb`` ...), so a
checkpoint maps by renaming: Linear ``weight`` -> ``kernel`` (transposed), ``class_emb.weight`` ->
``class_emb.embedding``, LayerNorm ``weight``/``bias`` and raw parameters unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from configs.mar import MARConfig
from nexus_jax.layers import REMAT_POLICIES, Embed, LayerNorm, Linear, make_param
from nexus_jax.models.rows import gather_predicted, put_rows, take_rows
from nexus_jax.models.unipic.pos_embed import Grid, resize_grid, resize_pos_embed
from nexus_jax.models.unipic.vit import ACT, Block
from nexus_jax.sharding import constrain


def _blocks(cfg: MARConfig, depth: int, rngs: nnx.Rngs) -> nnx.List:
    return nnx.List([
        Block(cfg.width, cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, eps=cfg.layer_norm_eps,
              proj_dropout=cfg.proj_dropout, param_dtype=cfg.param_dtype, dtype=cfg.dtype, rngs=rngs)
        for _ in range(depth)
    ])


def _call_block(block: Block, x: jax.Array, key_mask: jax.Array | None, key: jax.Array | None) -> jax.Array:
    return block(x, key_mask, dropout_key=key)


def _run_blocks(
    blocks: nnx.List, x: jax.Array, key_mask: jax.Array | None, dropout_key: jax.Array | None, remat: str
) -> jax.Array:
    """Apply ``blocks`` in order (each rematerialised with policy ``remat`` unless "none")."""
    run = _call_block
    if remat != "none":
        run = nnx.remat(_call_block, policy=REMAT_POLICIES[remat], prevent_cse=True)
    keys = [None] * len(blocks) if dropout_key is None else list(jax.random.split(dropout_key, len(blocks)))
    for block, key in zip(blocks, keys, strict=True):
        x = run(block, x, key_mask, key)
    return x


class MAR(nnx.Module):
    """MAR encoder/decoder (``mar_huge`` layout). ``diffloss``: the per-token diffusion head module or None.

    Raw parameters have the torch shapes: ``encoder_pos_embed_learned``/``decoder_pos_embed_learned``
    [1, buffer + seq_h*seq_w, C], ``diffusion_pos_embed_learned`` [1, seq_h*seq_w, C], ``mask_token`` [1, 1, C],
    ``fake_latent`` [1, C]; ``class_emb`` is an Embed [num_classes, C] (unused by UniPic, kept for the checkpoint).
    """

    def __init__(self, cfg: MARConfig, *, diffloss: nnx.Module | None = None, rngs: nnx.Rngs):
        self.cfg = cfg
        c, pd, n = cfg.width, cfg.param_dtype, cfg.seq_len
        kw = dict(param_dtype=pd, dtype=cfg.dtype, rngs=rngs)
        init = nnx.initializers.normal(0.02)
        self.class_emb = Embed(cfg.num_classes, c, param_dtype=pd, rngs=rngs)
        self.fake_latent = make_param(rngs, init, (1, c), (None, "embed"), pd)
        self.z_proj = Linear(cfg.token_embed_dim, c, axes=(None, "embed"), **kw)
        self.z_proj_ln = LayerNorm(c, eps=cfg.layer_norm_eps, param_dtype=pd, rngs=rngs)
        self.encoder_pos_embed_learned = make_param(rngs, init, (1, cfg.buffer_size + n, c), (None, None, "embed"), pd)
        self.encoder_blocks = _blocks(cfg, cfg.encoder_depth, rngs)
        self.encoder_norm = LayerNorm(c, eps=cfg.layer_norm_eps, param_dtype=pd, rngs=rngs)
        self.decoder_embed = Linear(c, c, axes=("embed", "mlp"), **kw)
        self.mask_token = make_param(rngs, init, (1, 1, c), (None, None, "embed"), pd)
        self.decoder_pos_embed_learned = make_param(rngs, init, (1, cfg.buffer_size + n, c), (None, None, "embed"), pd)
        self.decoder_blocks = _blocks(cfg, cfg.decoder_depth, rngs)
        self.decoder_norm = LayerNorm(c, eps=cfg.layer_norm_eps, param_dtype=pd, rngs=rngs)
        self.diffusion_pos_embed_learned = make_param(rngs, init, (1, n, c), (None, None, "embed"), pd)
        self.diffloss = diffloss

    # ------------------------------------------------------------------ helpers
    def _grid(self, n: int, grid: Grid | None) -> Grid:
        cfg = self.cfg
        h, w = (cfg.seq_h, cfg.seq_w) if grid is None else (int(grid[0]), int(grid[1]))
        if h <= 0 or w <= 0 or h * w != n:
            raise ValueError(f"grid {(h, w)} does not hold the {n} image tokens (need h * w == N)")
        return h, w

    def _mask_with_buffer(self, mask: jax.Array, b: int, n: int) -> jax.Array:
        """mask [B, N] (nonzero = masked) -> bool [B, buffer + N], buffers never masked."""
        if mask.shape != (b, n):
            raise ValueError(f"mask shape {mask.shape} != [B, N] = {(b, n)}")
        return jnp.concatenate([jnp.zeros((b, self.cfg.buffer_size), bool), mask.astype(bool)], axis=1)

    def fake_class_embedding(self, batch: int) -> jax.Array:
        """``fake_latent`` repeated to [batch, C] (UniPic's only class embedding)."""
        return jnp.broadcast_to(self.fake_latent[...], (batch, self.cfg.width))

    def encoder_pos_embed(self, grid: Grid) -> jax.Array:
        """[1, buffer + h*w, C]."""
        cfg = self.cfg
        return resize_pos_embed(self.encoder_pos_embed_learned[...], cfg.buffer_size, (cfg.seq_h, cfg.seq_w), grid)

    def decoder_pos_embed(self, grid: Grid) -> jax.Array:
        """[1, buffer + h*w, C]."""
        cfg = self.cfg
        return resize_pos_embed(self.decoder_pos_embed_learned[...], cfg.buffer_size, (cfg.seq_h, cfg.seq_w), grid)

    def diffusion_pos_embed(self, grid: Grid) -> jax.Array:
        """[1, h*w, C]."""
        return resize_grid(self.diffusion_pos_embed_learned[...], (self.cfg.seq_h, self.cfg.seq_w), grid)

    # ------------------------------------------------------------------ encoder / decoder
    def forward_mae_encoder(
        self, x: jax.Array, mask: jax.Array, class_embedding: jax.Array, grid: Grid | None = None, *,
        dropout_key: jax.Array | None = None, capacity: int | None = None,
    ) -> jax.Array:
        """x [B, N, token_embed_dim], mask [B, N] (1 = masked), class_embedding [B, C] or [1, C] -> [B, buffer + N, C].

        Buffer rows come first and all start as ``class_embedding``; rows at masked positions are don't-care.
        ``grid`` (h, w) with h * w == N (default: the trained grid) selects the positional-table resize.
        ``capacity`` (static, >= every row's visible count): the blocks run on the visible tokens gathered in raster
        order into ``capacity`` slots (padding excluded as keys), as torch's token dropping does, and the result is
        scattered back (masked rows are zero). Same numbers at the visible rows, less work while few are visible.
        """
        cfg = self.cfg
        if x.ndim != 3 or x.shape[-1] != cfg.token_embed_dim:
            raise ValueError(f"x must be [B, N, {cfg.token_embed_dim}], got shape {x.shape}")
        b, n, _ = x.shape
        grid = self._grid(n, grid)
        masked = self._mask_with_buffer(mask, b, n)
        ce_shape = class_embedding.shape
        if class_embedding.ndim != 2 or ce_shape[-1] != cfg.width or ce_shape[0] not in (1, b):
            raise ValueError(f"class_embedding must be [B, {cfg.width}] or [1, {cfg.width}], got {ce_shape}")
        if capacity is not None and not 0 <= capacity <= n:
            raise ValueError(f"capacity must be in [0, N={n}], got {capacity}")
        nb = cfg.buffer_size
        pos = jnp.broadcast_to(self.encoder_pos_embed(grid), (b, nb + n, cfg.width))
        keys = ~masked
        if capacity is not None:  # gather the visible tokens (and their positional rows)
            idx, valid = gather_predicted(~mask.astype(bool), capacity)
            x = take_rows(x, idx)
            pos = jnp.concatenate([pos[:, :nb], take_rows(pos[:, nb:], idx)], axis=1)
            keys = jnp.concatenate([jnp.ones((b, nb), bool), valid], axis=1)
        h = self.z_proj(x)
        buffers = jnp.broadcast_to(class_embedding[:, None, :].astype(h.dtype), (b, nb, cfg.width))
        h = jnp.concatenate([buffers, h], axis=1) + pos.astype(h.dtype)
        h = constrain(self.z_proj_ln(h), ACT)
        h = self.encoder_norm(_run_blocks(self.encoder_blocks, h, keys, dropout_key, cfg.remat))
        if capacity is None:
            return h
        image = put_rows(jnp.zeros((b, n, cfg.width), h.dtype), h[:, nb:], idx, valid)
        return jnp.concatenate([h[:, :nb], image], axis=1)

    def mar_encoder_unmasked(
        self, x: jax.Array, grid: Grid | None = None, class_embedding: jax.Array | None = None
    ) -> jax.Array:
        """Encoder with nothing masked (editing ``x_con``, understanding features). x [B, N, 16] -> [B, buffer + N, C].

        ``class_embedding`` defaults to ``fake_latent`` (as UniPic).
        """
        b, n = x.shape[:2]
        ce = self.fake_class_embedding(b) if class_embedding is None else class_embedding
        return self.forward_mae_encoder(x, jnp.zeros((b, n), bool), ce, grid)

    def forward_mae_decoder(
        self, x_enc: jax.Array, mask: jax.Array, grid: Grid | None = None, x_con: jax.Array | None = None, *,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """x_enc [B, buffer + N, C] (full length; masked rows ignored), mask [B, N] (1 = masked) -> z [B, N, C].

        Masked positions get ``mask_token``, or ``decoder_embed(x_con)`` when ``x_con`` [B or 1, buffer + N, C]
        (the unmasked encoder output of an editing source) is given.
        """
        cfg = self.cfg
        b, n = mask.shape if mask.ndim == 2 else (None, None)
        if b is None or x_enc.shape != (b, cfg.buffer_size + n, cfg.width):
            raise ValueError(
                f"x_enc {x_enc.shape} and mask {mask.shape} must be [B, {cfg.buffer_size} + N, {cfg.width}] and [B, N]"
            )
        grid = self._grid(n, grid)
        masked = self._mask_with_buffer(mask, b, n)
        h = self.decoder_embed(x_enc)
        if x_con is None:
            pad = self.mask_token[...].astype(h.dtype)
        else:
            if x_con.ndim != 3 or x_con.shape[0] not in (1, b) or x_con.shape[1:] != x_enc.shape[1:]:
                raise ValueError(f"x_con must be [B or 1, {x_enc.shape[1]}, {cfg.width}], got {x_con.shape}")
            pad = self.decoder_embed(x_con)
        h = jnp.where(masked[:, :, None], pad, h)
        h = constrain(h + self.decoder_pos_embed(grid).astype(h.dtype), ACT)
        h = _run_blocks(self.decoder_blocks, h, None, dropout_key, cfg.remat)
        h = self.decoder_norm(h)[:, cfg.buffer_size:]
        return h + self.diffusion_pos_embed(grid).astype(h.dtype)
