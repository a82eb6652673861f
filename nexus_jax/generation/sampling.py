"""Next-token selection: greedy (temperature 0) or temperature + nucleus (top-p) sampling. Pure, jit-friendly."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def top_p_filter(logits: jax.Array, top_p: jax.Array | float) -> jax.Array:
    """logits [B, V] -> logits with everything outside the smallest set of mass >= top_p set to -inf.

    The most likely token is always kept, so top_p <= 0 degenerates to greedy.
    """
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p
    keep_sorted = keep_sorted.at[:, 0].set(True)
    # threshold = smallest kept logit per row; ties at the threshold are kept
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample_next(
    logits: jax.Array,
    key: jax.Array,
    temperature: jax.Array | float = 0.0,
    top_p: jax.Array | float = 1.0,
) -> jax.Array:
    """logits [B, V] (float32) -> token ids [B] int32. temperature == 0 means greedy (argmax)."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    safe_t = jnp.where(temperature > 0, temperature, 1.0)
    filtered = top_p_filter(logits / safe_t, top_p)
    sampled = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)
