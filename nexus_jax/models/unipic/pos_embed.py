"""Learned positional tables resized like torch ``F.interpolate(mode='bilinear', align_corners=False)``.

``jax.image.resize(..., 'bilinear')`` antialiases when downsampling, torch does not; so the torch formula is built
here as two static interpolation matrices (host numpy, from the static grid sizes) applied with one einsum:
``src = max((dst + 0.5) * in / out - 0.5, 0)``, ``i0 = floor(src)``, ``i1 = min(i0 + 1, in - 1)``, weights
``1 - frac, frac``. Same-size resizes return the table unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Grid = tuple[int, int]


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float32 matrix of torch's 1-D bilinear (align_corners=False, no antialias) weights."""
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"bilinear resize needs positive sizes, got {in_size} -> {out_size}")
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.maximum((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0.0)
    i0 = np.floor(src).astype(np.int64)
    i0 = np.minimum(i0, in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    frac = (src - i0).astype(np.float32)
    m = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), 1.0 - frac)
    np.add.at(m, (rows, i1), frac)
    return m


def resize_grid(table: jax.Array, src: Grid, dst: Grid) -> jax.Array:
    """table [B, src_h * src_w, C] (raster order) -> [B, dst_h * dst_w, C], torch-bilinear."""
    (sh, sw), (dh, dw) = src, dst
    if table.ndim != 3 or table.shape[1] != sh * sw:
        raise ValueError(f"positional table of shape {table.shape} is not [B, {sh}*{sw}, C]")
    if (sh, sw) == (dh, dw):
        return table
    grid = table.reshape(table.shape[0], sh, sw, table.shape[2])
    wh = jnp.asarray(bilinear_matrix(sh, dh), grid.dtype)
    ww = jnp.asarray(bilinear_matrix(sw, dw), grid.dtype)
    out = jnp.einsum("ip,jq,bpqc->bijc", wh, ww, grid, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(table.shape[0], dh * dw, table.shape[2])


def resize_pos_embed(table: jax.Array, buffer_size: int, src: Grid, dst: Grid) -> jax.Array:
    """table [B, buffer + src_h * src_w, C] -> [B, buffer + dst_h * dst_w, C]; the buffer rows are kept as they are."""
    if table.ndim != 3 or table.shape[1] != buffer_size + src[0] * src[1]:
        raise ValueError(f"positional table of shape {table.shape} is not [B, {buffer_size} + {src[0]}*{src[1]}, C]")
    if tuple(src) == tuple(dst):
        return table
    return jnp.concatenate([table[:, :buffer_size], resize_grid(table[:, buffer_size:], src, dst)], axis=1)
