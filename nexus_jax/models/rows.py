"""Pure row helpers shared by the models and the code above them (no model state, no host bookkeeping).

- :func:`gather_predicted` / :func:`take_rows` / :func:`put_rows`: fixed-size gather / scatter of a row subset
  (MAR / MaskGIT decoding, ``nexus_jax.diffusion.maskgit``);
- :func:`scatter_rows` / :func:`check_slot_count`: feature rows into the True cells of a slot mask (Nexus-Gen image
  slots, ``nexus_jax.nexus.slots``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def gather_predicted(to_pred: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
    """Fixed-size positions of each row's True entries, in raster order (as torch's ``nonzero``).

    to_pred bool [B, N] -> (idx int32 [B, count], valid bool [B, count]); padding points at position 0.
    ``count`` 0 gives empty [B, 0] arrays.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    b = to_pred.shape[0]
    if count == 0:
        return jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0), bool)
    idx = jax.vmap(lambda r: jnp.nonzero(r, size=count, fill_value=0)[0])(to_pred).astype(jnp.int32)
    valid = jnp.arange(count)[None, :] < jnp.sum(to_pred, axis=-1, keepdims=True)
    return idx, valid


def take_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, N, ...] at the positions idx [B, K] (from :func:`gather_predicted`) -> [B, K, ...]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def put_rows(base: jax.Array, rows: jax.Array, idx: jax.Array, valid: jax.Array) -> jax.Array:
    """``base`` [B, N, ...] with rows [B, K, ...] written at idx [B, K] where ``valid`` (padding slots dropped):
    the inverse of :func:`take_rows`."""
    where = jnp.where(valid, idx, base.shape[1])  # padding slots scatter out of range
    return base.at[jnp.arange(base.shape[0])[:, None], where].set(rows.astype(base.dtype), mode="drop")


def scatter_rows(features: jax.Array, mask: jax.Array) -> jax.Array:
    """Place feature rows into the True cells of ``mask`` [B, L] -> [B, L, D] (zeros elsewhere).

    ``features`` [T, D]: row-major over the whole batch (callers guarantee ``mask.sum() == T``, see
    :func:`check_slot_count`). ``features`` [B, R, D]: per example, row b's k-th True cell takes ``features[b, k]``
    (R is the per-example budget; rows past a row's True cells are padding and unused).
    """
    b, l = mask.shape
    if features.ndim == 3:
        if features.shape[0] != b:
            raise ValueError(f"per-example features {features.shape} do not match the batch of mask {mask.shape}")
        if features.shape[1] == 0:
            return jnp.zeros((b, l, features.shape[-1]), features.dtype)
        order = jnp.clip(jnp.cumsum(mask, axis=1) - 1, 0, features.shape[1] - 1)  # [B, L]
        rows = jnp.take_along_axis(features, order[..., None], axis=1)
        return jnp.where(mask[..., None], rows, 0)
    if features.shape[0] == 0:
        return jnp.zeros((b, l, features.shape[-1]), features.dtype)
    flat = mask.reshape(-1)
    order = jnp.cumsum(flat) - 1  # index into features for each True cell
    rows = jnp.take(features, jnp.clip(order, 0, features.shape[0] - 1), axis=0)
    return jnp.where(flat[:, None], rows, 0).reshape(b, l, features.shape[-1])


def check_slot_count(mask: np.ndarray | jax.Array, num_rows: int, what: str, per_example: bool = False) -> None:
    """Raise a clear error when a concrete ``mask`` [B, L] does not hold exactly ``num_rows`` True cells (or, with
    ``per_example``, when a row holds more than ``num_rows``)."""
    if isinstance(mask, jax.core.Tracer):
        return
    counts = np.asarray(mask).sum(axis=-1)
    if per_example:
        if counts.size and int(counts.max()) > num_rows:
            raise ValueError(f"{what}: a sequence has {int(counts.max())} slots but at most {num_rows} feature rows "
                             "per example were given")
        return
    n = int(counts.sum())
    if n != num_rows:
        raise ValueError(f"{what}: the sequence has {n} slots but {num_rows} feature rows were given")
