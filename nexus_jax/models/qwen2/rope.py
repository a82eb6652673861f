"""Rotary position embeddings for Qwen2.5: 1-D RoPE and 3-axis M-RoPE (Qwen2.5-VL).

Positions may be integer or float (fractional M-RoPE positions are allowed). cos / sin are computed in float32 and
use the rotate-half layout: the ``head_dim // 2`` frequencies are duplicated to ``head_dim``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def inverse_frequencies(head_dim: int, theta: float) -> jax.Array:
    """[head_dim // 2] float32: ``1 / theta ** (2i / head_dim)``."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (theta**exponents)


def normalize_positions(positions: jax.Array, mrope_section: Sequence[int] | None) -> jax.Array:
    """[B, L] or [3, B, L] -> [3, B, L] (M-RoPE) or [B, L] (1-D RoPE); 1-D positions feed all three streams."""
    if positions.ndim not in (2, 3) or (positions.ndim == 3 and positions.shape[0] != 3):
        raise ValueError(f"positions must have shape [B, L] or [3, B, L], got {positions.shape}")
    if mrope_section is None:
        if positions.ndim == 3:
            raise ValueError(f"1-D RoPE model got 3-axis positions of shape {positions.shape}; pass [B, L]")
        return positions
    if positions.ndim == 2:
        return jnp.broadcast_to(positions[None], (3, *positions.shape))
    return positions


def rope_cos_sin(
    positions: jax.Array,
    head_dim: int,
    theta: float,
    mrope_section: Sequence[int] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [B, L, head_dim] (float32) for positions [B, L] or [3, B, L].

    With ``mrope_section`` = (t, h, w) the first t frequencies take the temporal stream, the next h the height
    stream and the last w the width stream (the same split is repeated in the duplicated half).
    """
    positions = normalize_positions(positions, mrope_section).astype(jnp.float32)
    inv_freq = inverse_frequencies(head_dim, theta)
    angles = positions[..., None] * inv_freq  # [B, L, F] or [3, B, L, F]
    if mrope_section is not None:
        if sum(mrope_section) != head_dim // 2:
            raise ValueError(f"mrope_section {tuple(mrope_section)} must sum to head_dim // 2 = {head_dim // 2}")
        stream = jnp.repeat(jnp.arange(3), jnp.asarray(mrope_section), total_repeat_length=head_dim // 2)
        angles = jnp.take_along_axis(angles, stream[None, None, None, :], axis=0)[0]  # pick stream per freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)
