"""Image-slot bookkeeping shared by the model, the loss and the batch builder.

Output-image slots are the positions whose *label* is ``<|image_pad|>``; input-image slots are ``<|image_pad|>``
tokens that are not output slots. ``slot_index`` [B, L] numbers the slots of each output image 0..N-1 (-1 elsewhere).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nexus_jax.processing.rope_index import image_runs


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


def input_image_mask(input_ids: np.ndarray, labels: np.ndarray, image_token_id: int) -> np.ndarray:
    """Input-image slots (ViT features go in): image_pad tokens that are not output slots. [B, L] bool."""
    return (np.asarray(input_ids) == image_token_id) & (np.asarray(labels) != image_token_id)


def slot_index(labels: np.ndarray, image_token_id: int, num_slots: int, *, allow_partial_last: bool = False
               ) -> np.ndarray:
    """[B, L] int32: k at the k-th slot of each output image (runs of ``image_pad`` labels), -1 elsewhere.

    Every run must hold exactly ``num_slots`` slots (``allow_partial_last`` accepts a shorter run that ends the row,
    as in a sequence cut inside its last image). Raises otherwise.
    """
    labels = np.asarray(labels)
    out = np.full(labels.shape, -1, np.int32)
    for b, row in enumerate(labels):
        for start, end in image_runs(row, image_token_id):
            n = end - start
            while n > 0:
                take = min(n, num_slots)
                partial_ok = allow_partial_last and start + take == row.size
                if take != num_slots and not partial_ok:
                    raise ValueError(
                        f"row {b}: an output image at position {start} has {n} slots; Nexus-Gen output images take "
                        f"exactly num_slots={num_slots}"
                    )
                out[b, start : start + take] = np.arange(take)
                start, n = start + take, n - take
    return out
