"""Next-token selection: greedy (temperature 0) or temperature + nucleus (top-p) sampling. Pure, jit-friendly."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def suppress_tokens(logits: jax.Array, token_ids: tuple[int, ...]) -> jax.Array:
    """logits [B, V] with the columns ``token_ids`` set to -inf (never sampled); unchanged for ``()``."""
    if not token_ids:
        return logits
    return logits.at[:, jnp.asarray(token_ids, jnp.int32)].set(-jnp.inf)


def suppress_per_row(logits: jax.Array, token_ids: jax.Array | None) -> jax.Array:
    """logits [B, V] with ``logits[b, token_ids[b, k]]`` set to -inf; ``token_ids`` [B, K] int, -1 = none; unchanged
    for None. For bans that differ per row (e.g. ``<|vision_start|>`` once a row has used its image budget)."""
    if token_ids is None:
        return logits
    vocab = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    banned = (vocab[None, None, :] == token_ids[:, :, None]).any(axis=1)
    return jnp.where(banned, -jnp.inf, logits)


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


def argmax_first(logits: jax.Array) -> jax.Array:
    """``jnp.argmax(logits, -1)`` (first index of the maximum) for logits [B, V] without NaNs -> [B] int32.

    Two single-operand reductions (max, then the smallest index holding it) instead of XLA's variadic (value, index)
    reduce, which XLA:CPU runs ~10x slower: 2.3 ms of a 29 ms batch-16 decode step over a 32000-word vocabulary.
    """
    vocab = logits.shape[-1]
    hit = logits == jnp.max(logits, axis=-1, keepdims=True)
    first = jnp.min(jnp.where(hit, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)
    return jnp.minimum(first, vocab - 1)  # an all-NaN row (no hit) gives the last id instead of an out-of-range one


def sample_next(
    logits: jax.Array,
    key: jax.Array,
    temperature: jax.Array | float = 0.0,
    top_p: jax.Array | float = 1.0,
) -> jax.Array:
    """logits [B, V] (float32) -> token ids [B] int32. temperature == 0 means greedy (argmax).

    ``lax.cond`` skips the sampling work (and the vocabulary sort unless top_p < 1) when it is not needed.
    """
    logits = logits.astype(jnp.float32)
    temperature = jnp.asarray(temperature, jnp.float32)
    top_p = jnp.asarray(top_p, jnp.float32)

    def greedy(logits):
        return argmax_first(logits)

    def sample(logits):
        scaled = logits / temperature
        filtered = jax.lax.cond(top_p < 1.0, lambda x: top_p_filter(x, top_p), lambda x: x, scaled)
        return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sample, greedy, logits)
