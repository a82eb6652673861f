"""Attention masks (True = may attend) for full-sequence and KV-cache calls."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_padding_mask(attention_mask: jax.Array | None, length: int, batch: int) -> jax.Array:
    """[B, 1, L, L]: query q sees key k iff k <= q and key k is not padding (attention_mask [B, L], 1 = token)."""
    causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if attention_mask is None:
        return jnp.broadcast_to(causal, (batch, 1, length, length))
    return causal & attention_mask.astype(bool)[:, None, None, :]


def cache_mask(valid: jax.Array, index: jax.Array | int, length: int) -> jax.Array:
    """[B, 1, L, S] for L new tokens written at slots ``index ..``: key slot s is visible to new token q iff
    s <= index + q and slot s is valid (``valid`` [B, S] already includes the new tokens)."""
    slots = jnp.arange(valid.shape[1])
    query_slots = index + jnp.arange(length)
    causal = slots[None, :] <= query_slots[:, None]  # [L, S]
    return causal[None, None] & valid[:, None, None, :]


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """[B, L] positions that count only real tokens (left padding gets position 0): cumsum(mask) - 1, >= 0."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
