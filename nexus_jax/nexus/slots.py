"""Image-slot bookkeeping shared by the model, the loss and the batch builder.

Output-image slots are the positions whose *label* is ``<|image_pad|>``; input-image slots are ``<|image_pad|>``
tokens that are not output slots. ``slot_index`` [B, L] numbers the slots of each output image 0..N-1 (-1 elsewhere).
"""

from __future__ import annotations

import numpy as np

from nexus_jax.models.rows import check_slot_count, scatter_rows  # noqa: F401  (pure row helpers)
from nexus_jax.processing.rope_index import image_runs


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
