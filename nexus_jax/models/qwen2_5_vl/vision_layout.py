"""Host-side (numpy) index arrays that make the jitted Qwen2.5-VL ViT shape-stable.

For a packed batch of images (``grid_thw`` rows ``[t, h, w]`` in patches) this computes, once per batch on the host:

- ``patch_order`` [Np]: permutation of the processor's patch order into *window order* (all patches of window 0 of
  image 0, then window 1, ...; inside a window, 2x2 merge units in raster order). Padding rows map to themselves.
- ``positions`` [Np, 2]: (row, col) patch coordinates in window order (for the 2-D rotary embedding).
- ``frame_segments`` [Np]: frame id per token in window order (padding: -1); the dense full-attention mask is
  ``segments[:, None] == segments[None, :]``.
- ``window_gather`` [Wn, S] / ``window_valid`` [Wn, S]: token indices (window order) of each window, padded to
  ``S = merged_window**2 * merge_unit`` slots; ``window_scatter`` [Np]: flat slot of each token in ``[Wn * S]``.
- ``frame_gather`` [F, Sf] / ``frame_valid`` / ``frame_scatter``: the same for whole frames (full-attention
  blocks, optional), ``Sf`` = the largest frame's patch count (bucketed): attention cost F * Sf**2 instead of the
  dense segment mask's (total patches)**2.
- ``merge_reverse`` [Mp]: inverse of the window permutation over merged tokens (Mp = Np / merge_unit).

``num_patches`` / ``num_merged`` are the real (unpadded) counts; padding exists only to bucket shapes for jit.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from configs.qwen2_5_vl import Qwen25VisionConfig


@dataclasses.dataclass(frozen=True)
class VisionLayout:
    """Index arrays for one packed batch of images (see module docstring for shapes)."""

    patch_order: np.ndarray
    positions: np.ndarray
    frame_segments: np.ndarray
    window_gather: np.ndarray
    window_valid: np.ndarray
    window_scatter: np.ndarray
    frame_gather: np.ndarray
    frame_valid: np.ndarray
    frame_scatter: np.ndarray
    merge_reverse: np.ndarray
    num_patches: int
    num_merged: int

    def arrays(self, frame_groups: bool = False) -> dict[str, np.ndarray]:
        """The array fields, as keyword arguments for the ViT forward.

        Without ``frame_groups`` full-attention blocks use the dense ``frame_segments`` mask and every shape is fixed
        by ``pad_patches_to`` / ``pad_windows_to``; with it they use the padded frame groups (cheaper for many
        images; shapes also depend on ``pad_frames_to`` / ``pad_frame_slots_to``).
        """
        out = {
            "patch_order": self.patch_order,
            "positions": self.positions,
            "frame_segments": self.frame_segments,
            "window_gather": self.window_gather,
            "window_valid": self.window_valid,
            "window_scatter": self.window_scatter,
            "merge_reverse": self.merge_reverse,
        }
        if frame_groups:
            out.update(frame_gather=self.frame_gather, frame_valid=self.frame_valid, frame_scatter=self.frame_scatter)
        return out


def _check_grid(grid_thw: np.ndarray, merge: int) -> np.ndarray:
    grid = np.asarray(grid_thw, dtype=np.int64)
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise ValueError(f"grid_thw must have shape [num_images, 3], got {grid.shape}")
    for i, (t, h, w) in enumerate(grid.tolist()):
        if t < 1 or h < merge or w < merge:
            raise ValueError(f"image {i}: grid_thw {[t, h, w]} is smaller than one {merge}x{merge} merge unit")
        if h % merge or w % merge:
            raise ValueError(f"image {i}: grid h={h}, w={w} must be multiples of spatial_merge_size {merge}")
    return grid


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _merged_window_order(t: int, mh: int, mw: int, win: int) -> tuple[np.ndarray, np.ndarray]:
    """Merged-token indices of one image in window order, and the window sizes (in merged tokens, empty dropped)."""
    nwh, nww = -(-mh // win), -(-mw // win)
    grid = np.full((t, nwh * win, nww * win), -1, dtype=np.int64)
    grid[:, :mh, :mw] = np.arange(t * mh * mw).reshape(t, mh, mw)
    tiles = grid.reshape(t, nwh, win, nww, win).transpose(0, 1, 3, 2, 4).reshape(t * nwh * nww, win * win)
    sizes = (tiles >= 0).sum(axis=1)
    order = tiles[tiles >= 0]
    return order, sizes[sizes > 0]


def _patch_positions(t: int, h: int, w: int, merge: int) -> np.ndarray:
    """(row, col) of each patch in the processor's merge-block order: [t*h*w, 2]."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    rows = rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    cols = cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([rows, cols], axis=-1), (t, 1))


def _groups(sizes: np.ndarray, slots: int, pad_groups_to: int, padded: int):
    """Gather [G, slots], valid [G, slots] and scatter [padded] indices for consecutive token runs of ``sizes``.

    Padding tokens (past ``sizes.sum()``) scatter from slot 0 of group 0; their outputs are never used.
    """
    count, total = int(sizes.size), int(sizes.sum())
    groups = _round_up(count, pad_groups_to)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    slot = np.arange(slots)
    gather = np.zeros((groups, slots), np.int32)
    valid = np.zeros((groups, slots), bool)
    valid[:count] = slot < sizes[:, None]
    gather[:count] = np.where(valid[:count], starts[:, None] + slot, 0)
    owner = np.repeat(np.arange(count), sizes)
    scatter = np.zeros(padded, np.int32)
    scatter[:total] = owner * slots + (np.arange(total) - starts[owner])
    return gather, valid, scatter


def vision_layout(
    grid_thw: np.ndarray,
    config: Qwen25VisionConfig,
    *,
    pad_patches_to: int = 1,
    pad_windows_to: int = 1,
    pad_frames_to: int = 1,
    pad_frame_slots_to: int = 1,
) -> VisionLayout:
    """Index arrays for images with patch grids ``grid_thw`` [num_images, 3].

    ``pad_*_to`` round the token, window, frame and per-frame slot counts up to a multiple (jit shape buckets).
    The padded patch count is also a multiple of the merge unit.
    """
    merge, unit, win = config.spatial_merge_size, config.merge_unit, config.merged_window
    pads = dict(pad_patches_to=pad_patches_to, pad_windows_to=pad_windows_to, pad_frames_to=pad_frames_to,
                pad_frame_slots_to=pad_frame_slots_to)
    if min(pads.values()) < 1:
        raise ValueError(f"padding multiples must be >= 1, got {pads}")
    grid = _check_grid(grid_thw, merge)

    merged_orders, window_sizes, positions, frame_sizes, segments = [], [], [], [], []
    merged_offset = 0
    for t, h, w in grid.tolist():
        order, sizes = _merged_window_order(t, h // merge, w // merge, win)
        merged_orders.append(order + merged_offset)
        window_sizes.append(sizes * unit)
        positions.append(_patch_positions(t, h, w, merge))
        frame_sizes.append(np.full(t, h * w))
        segments.append(np.repeat(np.arange(t) + sum(len(f) for f in frame_sizes[:-1]), h * w))
        merged_offset += t * (h // merge) * (w // merge)

    merged_order = np.concatenate(merged_orders)
    num_merged = int(merged_order.size)
    num_patches = num_merged * unit
    padded = _round_up(num_patches, math.lcm(pad_patches_to, unit))
    merged_padded = padded // unit

    # Window permutation at merge-unit level, padding units appended in place.
    merged_order = np.concatenate([merged_order, np.arange(num_merged, merged_padded)])
    patch_order = (merged_order[:, None] * unit + np.arange(unit)).reshape(-1)
    merge_reverse = np.argsort(merged_order)

    pos = np.concatenate(positions + [np.zeros((padded - num_patches, 2), np.int64)])[patch_order]
    frame_segments = np.concatenate(segments + [np.full(padded - num_patches, -1)])[patch_order]

    # Windows and frames are contiguous runs of tokens in window order, each padded to a fixed slot count.
    window_slots = win * win * unit
    window_gather, window_valid, window_scatter = _groups(
        np.concatenate(window_sizes), window_slots, pad_windows_to, padded
    )
    frame_sizes = np.concatenate(frame_sizes)
    frame_slots = _round_up(int(frame_sizes.max()), pad_frame_slots_to)
    frame_gather, frame_valid, frame_scatter = _groups(frame_sizes, frame_slots, pad_frames_to, padded)

    i32 = np.int32
    return VisionLayout(
        patch_order=patch_order.astype(i32),
        positions=pos.astype(i32),
        frame_segments=frame_segments.astype(i32),
        window_gather=window_gather,
        window_valid=window_valid,
        window_scatter=window_scatter,
        frame_gather=frame_gather,
        frame_valid=frame_valid,
        frame_scatter=frame_scatter,
        merge_reverse=merge_reverse.astype(i32),
        num_patches=num_patches,
        num_merged=num_merged,
    )
