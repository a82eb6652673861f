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
from nexus_jax.nexus.batch import NexusBatch, VisionInputs, assemble_batch, vision_inputs

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
    grids = []
    for p in rows:
        user = iter(p.grid)
        grids += [np.asarray(cfg.slot_grid_thw) if s.is_output else next(user) for s in p.chat.images]
    with_pixels = [p for p in rows if p.pixels is not None]
    inputs = None
    if with_pixels:
        inputs = vision_inputs(np.concatenate([p.pixels for p in with_pixels]),
                               np.concatenate([p.grid for p in with_pixels]), cfg, pad_patches_to)
    return assemble_batch([p.chat for p in rows], grids, cfg, length=batch.length, inputs=inputs, targets=None)


def collate_references(batch: Batch, cfg: NexusGenConfig, pad_patches_to: int = 1) -> VisionInputs | None:
    """Editing: the reference (source) pixels of all ``batch.size`` rows packed for the ViT, or None."""
    rows = batch.rows()
    if any(p.ref_pixels is None for p in rows):
        return None
    return vision_inputs(np.concatenate([p.ref_pixels for p in rows]), np.concatenate([p.ref_grid for p in rows]),
                         cfg, pad_patches_to)
