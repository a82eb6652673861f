"""M-RoPE position ids for mixed text / image token sequences (Qwen2.5-VL ``get_rope_index``), in numpy.

Text tokens advance all three streams (t, h, w) together by 1. An image of merged grid (t, gh, gw) starting at
running position ``p`` gets t-index ``p + frame``, h-index ``p + row`` and w-index ``p + col``; the text after it
resumes at ``p + max(gh, gw)``. Padding (attention_mask == 0) gets position 0 and is skipped, as in transformers 5.
"""

from __future__ import annotations

import numpy as np


def image_runs(ids: np.ndarray, image_token_id: int) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of ``image_token_id`` in a 1-D id array."""
    is_img = np.concatenate([[False], ids == image_token_id, [False]])
    edges = np.flatnonzero(is_img[1:] != is_img[:-1])
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def _vision_positions(start: int, grid: np.ndarray, merge: int) -> np.ndarray:
    t, gh, gw = int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
    return np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + start


def sequence_positions(
    ids: np.ndarray, grids: np.ndarray, image_token_id: int, merge: int
) -> tuple[np.ndarray, int]:
    """Positions [3, L] for one unpadded sequence whose image runs use ``grids`` [n, 3] in order.

    Returns (positions, number of grids consumed). Adjacent images may share one run of image tokens.
    """
    pieces, pos, cursor, used = [], 0, 0, 0
    for start, end in image_runs(ids, image_token_id):
        pieces.append(np.broadcast_to(np.arange(start - cursor) + pos, (3, start - cursor)))
        pos += start - cursor
        cursor = start
        while cursor < end:
            if used >= len(grids):
                raise ValueError(
                    f"{end - cursor} <|image_pad|> tokens at position {cursor} have no image left in image_grid_thw "
                    f"({len(grids)} given); the prompt's image tokens do not match the image features"
                )
            grid = grids[used]
            count = int(np.prod(grid)) // (merge * merge)
            if cursor + count > end:
                raise ValueError(
                    f"image {used} with grid_thw {grid.tolist()} needs {count} <|image_pad|> tokens but its run "
                    f"has only {end - cursor}; the prompt's image tokens do not match the image features"
                )
            pieces.append(_vision_positions(pos, grid, merge))
            pos += max(int(grid[1]), int(grid[2])) // merge
            cursor += count
            used += 1
    pieces.append(np.broadcast_to(np.arange(len(ids) - cursor) + pos, (3, len(ids) - cursor)))
    return np.concatenate(pieces, axis=1), used


def get_rope_index(
    input_ids: np.ndarray,
    image_grid_thw: np.ndarray | None,
    attention_mask: np.ndarray | None = None,
    *,
    image_token_id: int = 151655,
    spatial_merge_size: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """input_ids [B, L], image_grid_thw [num_images, 3] (all images of the batch, in order), attention_mask [B, L].

    Returns (position_ids [3, B, L] int64, rope_deltas [B, 1] int64) where ``rope_deltas = max position + 1 -
    number of real tokens`` (decode step positions are ``cache position + delta``).
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
    mask = np.ones_like(ids, dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw, np.int64)
    positions = np.zeros((3, *ids.shape), np.int64)
    deltas = np.zeros((ids.shape[0], 1), np.int64)
    used = 0
    for b in range(ids.shape[0]):
        real = ids[b][mask[b]]
        pos, n = sequence_positions(real, grids[used:], image_token_id, spatial_merge_size)
        used += n
        positions[:, b, mask[b]] = pos
        deltas[b, 0] = (pos.max() + 1 if pos.size else 0) - real.size
    if used != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} images but the prompts contain only {used}")
    return positions, deltas
