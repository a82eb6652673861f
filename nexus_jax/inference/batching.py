"""Group prepared requests by task and shape into fixed-size, padded batches (so every batch of a group reuses
one compiled program), and collate a batch into model arrays.

Shape key: ``(task, padded length, input-image grids)``. The length is rounded up to a multiple of
``length_multiple``; requests with the same key produce arrays of identical shapes. A group emits a batch when it
holds ``batch_size`` requests; :meth:`Batcher.flush` emits the rest, padded to ``batch_size`` with copies of the
batch's first request (their outputs are dropped). ``batch_size`` should be a multiple of the number of
data-parallel devices so the batch splits evenly over them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from configs.nexus_gen import NexusGenConfig
from nexus_jax.inference.reader import Prepared
from nexus_jax.nexus import templates
from nexus_jax.nexus.batch import NexusBatch, VisionInputs, vision_inputs
from nexus_jax.nexus.slots import input_image_mask, slot_index
from nexus_jax.processing.rope_index import get_rope_index

ShapeKey = tuple


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def shape_key(p: Prepared, length_multiple: int) -> ShapeKey:
    """Requests with equal keys have equal array shapes."""
    return (p.request.task, round_up(p.length, length_multiple), tuple(map(tuple, p.grid.tolist())))


@dataclasses.dataclass(frozen=True)
class Batch:
    """``items``: the real requests (1..size); rows ``len(items)..size-1`` are padding copies of ``items[0]``."""

    task: str
    length: int
    size: int
    items: tuple[Prepared, ...]

    @property
    def num_real(self) -> int:
        return len(self.items)

    def rows(self) -> list[Prepared]:
        """All ``size`` rows: the real requests, then padding copies of the first one."""
        return list(self.items) + [self.items[0]] * (self.size - len(self.items))


class Batcher:
    """Streaming grouper: ``add`` returns the batches that became full, ``flush`` the partial ones."""

    def __init__(self, batch_size: int, length_multiple: int = 64):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if length_multiple < 1:
            raise ValueError(f"length_multiple={length_multiple} must be >= 1")
        self.batch_size, self.length_multiple = batch_size, length_multiple
        self.groups: dict[ShapeKey, list[Prepared]] = {}

    def add(self, p: Prepared) -> list[Batch]:
        key = shape_key(p, self.length_multiple)
        group = self.groups.setdefault(key, [])
        group.append(p)
        if len(group) < self.batch_size:
            return []
        del self.groups[key]
        return [Batch(key[0], key[1], self.batch_size, tuple(group))]

    def flush(self) -> list[Batch]:
        out = [Batch(k[0], k[1], self.batch_size, tuple(g)) for k, g in self.groups.items()]
        self.groups = {}
        return out


def group_batches(items: Sequence[Prepared], batch_size: int, length_multiple: int = 64) -> list[Batch]:
    """All batches for ``items`` (full ones as they fill, then the padded rest)."""
    b = Batcher(batch_size, length_multiple)
    out = [batch for p in items for batch in b.add(p)]
    return out + b.flush()


def collate(batch: Batch, cfg: NexusGenConfig, pad_patches_to: int = 1) -> NexusBatch:
    """Left-padded model inputs for all ``batch.size`` rows (positions from ``get_rope_index``; output slots
    indexed; input-image pads marked; ViT pixels of every row's input images packed in row order)."""
    rows = batch.rows()
    tok = cfg.tokens
    padded = templates.pad_batch([p.chat for p in rows], tok.endoftext, length=batch.length, side="left")
    grids = []
    for p in rows:
        user = iter(p.grid)
        grids += [np.asarray(cfg.slot_grid_thw) if s.is_output else next(user) for s in p.chat.images]
    grid_thw = np.stack(grids).astype(np.int64) if grids else np.zeros((0, 3), np.int64)
    positions, _ = get_rope_index(
        padded.input_ids, grid_thw if grids else None, padded.attention_mask, image_token_id=tok.image_pad,
        spatial_merge_size=cfg.vl.vision.spatial_merge_size,
    )
    with_pixels = [p for p in rows if p.pixels is not None]
    inputs = None
    if with_pixels:
        inputs = vision_inputs(np.concatenate([p.pixels for p in with_pixels]),
                               np.concatenate([p.grid for p in with_pixels]), cfg, pad_patches_to)
    return NexusBatch(
        input_ids=padded.input_ids,
        labels=padded.labels,
        attention_mask=padded.attention_mask,
        positions=positions.astype(np.int32),
        slot_index=slot_index(padded.labels, tok.image_pad, cfg.num_slots),
        input_mask=input_image_mask(padded.input_ids, padded.labels, tok.image_pad),
        inputs=inputs,
        targets=None,
        grid_thw=grid_thw,
    )


def collate_references(batch: Batch, cfg: NexusGenConfig, pad_patches_to: int = 1) -> VisionInputs | None:
    """Editing: the reference (source) pixels of all ``batch.size`` rows packed for the ViT, or None."""
    rows = batch.rows()
    if any(p.ref_pixels is None for p in rows):
        return None
    return vision_inputs(np.concatenate([p.ref_pixels for p in rows]), np.concatenate([p.ref_grid for p in rows]),
                         cfg, pad_patches_to)
