"""Fixed-size KV cache pytrees, so prefill and every decode step reuse one compiled shape.

Layout per layer: keys / values [B, S, Hkv, D] where S is the fixed capacity. All rows write at the same slot
``index`` (prompts are left-padded); ``valid`` [B, S] marks slots that hold real (non-padding) tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nexus_jax import sharding

CACHE_AXES = ("batch", "length", "act_kv_heads", None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerKVCache:
    """One layer's keys and values, each [B, S, Hkv, D]."""

    key: jax.Array
    value: jax.Array

    def write(self, k: jax.Array, v: jax.Array, index: jax.Array | int) -> LayerKVCache:
        """Store k, v [B, L, Hkv, D] at slots ``index .. index + L - 1``."""
        start = (0, index, 0, 0)
        key = jax.lax.dynamic_update_slice(self.key, k.astype(self.key.dtype), start)
        value = jax.lax.dynamic_update_slice(self.value, v.astype(self.value.dtype), start)
        return LayerKVCache(sharding.constrain(key, CACHE_AXES), sharding.constrain(value, CACHE_AXES))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Whole-model cache: per-layer keys/values, a [B, S] validity mask and the next write slot (int32 scalar)."""

    layers: tuple[LayerKVCache, ...]
    valid: jax.Array
    index: jax.Array

    @property
    def capacity(self) -> int:
        """S, the fixed number of slots."""
        return self.valid.shape[1]

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def truncated(self, capacity: int) -> KVCache:
        """The first ``capacity`` slots (static): a cache whose later slots are unused, so attention over it scans
        fewer keys. ``index`` is kept; it must stay <= ``capacity`` for later writes to land."""
        if not 1 <= capacity <= self.capacity:
            raise ValueError(f"truncated capacity must be in [1, {self.capacity}], got {capacity}")
        if capacity == self.capacity:
            return self
        layers = tuple(LayerKVCache(layer.key[:, :capacity], layer.value[:, :capacity]) for layer in self.layers)
        return KVCache(layers, self.valid[:, :capacity], self.index)


def init_cache(
    num_layers: int,
    batch_size: int,
    capacity: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: jnp.dtype = jnp.float32,
) -> KVCache:
    """An empty cache of ``capacity`` slots (all invalid, index 0)."""
    if capacity < 1 or batch_size < 1:
        raise ValueError(f"cache needs capacity >= 1 and batch_size >= 1, got capacity={capacity} batch={batch_size}")
    shape = (batch_size, capacity, num_kv_heads, head_dim)

    def zeros() -> jax.Array:
        return sharding.constrain(jnp.zeros(shape, dtype), CACHE_AXES)

    layers = tuple(LayerKVCache(zeros(), zeros()) for _ in range(num_layers))
    return KVCache(layers, jnp.zeros((batch_size, capacity), bool), jnp.zeros((), jnp.int32))


def init_cache_for(config, batch_size: int, capacity: int, dtype: jnp.dtype | None = None) -> KVCache:
    """An empty cache shaped for a :class:`configs.qwen2_5.Qwen2TextConfig` (compute dtype by default)."""
    dtype = config.jnp_dtype if dtype is None else dtype
    return init_cache(config.num_layers, batch_size, capacity, config.num_kv_heads, config.head_dim, dtype)
