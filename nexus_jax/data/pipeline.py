"""Grain input pipeline: per-process sharding, deterministic shuffling, preprocessing, fixed-shape batches.

Training (``global_batch`` given; what the trainers use, on one process or many):

    source (random access: JSONL lines or an array_record data source)
      -> MapDataset, indexed (every element remembers its source index = record id)
      -> shuffle(seed)                      one global order, deterministic, reshuffled every epoch
      -> repeat(num_epochs)
      -> host rows                          process p of P reads rows [p*B/P, (p+1)*B/P) of every global batch of B
      -> map(encode)                        tokenisation / image preprocessing; failures become ``Skipped``
      -> IterDataset with thread prefetch
      -> BatchIterator(filler=...)          a ``Skipped`` record becomes a zero-weight filler row (counted, logged)

The global batch of step k is the same records in the same rows whatever the number of processes, and every process
consumes exactly B/P positions per step. The iterator state is therefore process-count independent (``batches``
done), so a checkpoint written by P processes resumes on any P' that divides B, at the same record.

Without ``global_batch`` (other callers) the source is sharded ``[process_index::process_count]`` and shuffled per
process, and a ``Skipped`` record is dropped and the next record pulled in its place.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import numpy as np

log = logging.getLogger(__name__)

Example = dict[str, np.ndarray]
Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Marker for a record the encoder rejected (missing/corrupt image, over-long text, malformed JSON...)."""

    record_id: int
    reason: str


class _Indexed:
    """Random-access source yielding ``(source_index, item)``."""

    def __init__(self, source: Sequence[Any]):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return int(i), self._source[i]


def _safe(encode: Callable[[Any], Example]) -> Callable[[tuple[int, Any]], Example | Skipped]:
    def run(item: tuple[int, Any]) -> Example | Skipped:
        index, raw = item
        try:
            example = encode(raw)
        except Exception as e:  # noqa: BLE001 - every failure of one record is a skip, never a crash
            return Skipped(index, f"{type(e).__name__}: {e}")
        example["record_id"] = np.asarray(index, np.int64)
        return example

    return run


class _HostRows(grain.MapDataset):
    """Process ``pi``'s rows of every global batch of a global stream: local i -> global
    ``(i // L) * B + pi * L + i % L`` with ``L = B / P``; only full global batches (every process steps equally)."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int, process_count: int):
        super().__init__(parent)
        self._b, self._l = global_batch, global_batch // process_count
        self._offset = process_index * self._l
        self._length = len(parent) // global_batch * self._l

    def __len__(self) -> int:
        return self._length

    def _global(self, index: int) -> int:
        return index // self._l * self._b + self._offset + index % self._l

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} is outside the {self._length} rows of this process")
        return self._parent[self._global(index)]

    def __str__(self) -> str:
        return f"_HostRows(B={self._b}, L={self._l}, offset={self._offset})"


def build_dataset(
    source: Sequence[Any],
    encode: Callable[[Any], Example],
    *,
    seed: int,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    global_batch: int | None = None,
) -> grain.MapDataset:
    """The per-process, shuffled, repeated, encoded MapDataset (elements are examples or :class:`Skipped`).

    ``global_batch``: records per optimiser step over all processes; this process then reads its contiguous rows of
    each global batch of one global order (see the module docstring). None: the source is sharded per process.
    """
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if not 0 <= pi < pc:
        raise ValueError(f"process_index {pi} must be in [0, process_count={pc})")
    if global_batch is None:
        if len(source) < pc:
            raise ValueError(f"{len(source)} records cannot be sharded over {pc} processes")
        ds = grain.MapDataset.source(_Indexed(source))[pi::pc]
        return ds.shuffle(seed).repeat(num_epochs).map(_safe(encode))
    if global_batch < 1 or global_batch % pc:
        raise ValueError(f"global batch {global_batch} does not split evenly over {pc} processes; "
                         f"use a multiple of {pc}")
    if num_epochs is not None and len(source) * num_epochs < global_batch:
        raise ValueError(f"{len(source)} records x {num_epochs} epoch(s) do not fill one global batch of "
                         f"{global_batch}")
    ds = grain.MapDataset.source(_Indexed(source)).shuffle(seed).repeat(num_epochs)
    return _HostRows(ds, global_batch, pi, pc).map(_safe(encode))


FILLER_RECORD_ID = -1  # record_id of a filler row (a skipped record's place in a fixed global batch)


class BatchIterator:
    """Fixed-shape batches from a Grain dataset; skips and counts broken records; checkpointable state.

    ``collate(examples) -> batch`` must return the same shapes for every batch of a given bucket.
    ``filler() -> example``: when given, a broken record keeps its row as a zero-weight filler example (record_id
    -1; the task's loss ignores it), so every batch consumes exactly ``batch_size`` positions (multi-process
    training); without it the record is dropped and the next one pulled in.
    State: ``{"position": positions consumed, "batches": int, "skipped": int, "records": int}`` (JSON-serialisable).
    """

    def __init__(
        self,
        dataset: grain.MapDataset,
        batch_size: int,
        collate: Callable[[list[Example]], Batch],
        *,
        num_threads: int = 2,
        prefetch: int = 16,
        filler: Callable[[], Example] | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.collate = collate
        self.filler = filler
        self._dataset = dataset
        self._opts = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        self._it = iter(dataset.to_iter_dataset(self._opts))
        self.position = 0
        self.batches = 0
        self.skipped = 0
        self.records = 0
        self.skip_reasons: collections.Counter[str] = collections.Counter()

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        examples: list[Example] = []
        while len(examples) < self.batch_size:
            item = next(self._it)  # StopIteration at the end of the last epoch: a partial batch is dropped
            self.position += 1
            self.records += 1
            if isinstance(item, Skipped):
                self.skipped += 1
                kind = item.reason.split(":", 1)[0]
                self.skip_reasons[kind] += 1
                log.warning("skipping record %d: %s", item.record_id, item.reason)
                if self.filler is None:
                    continue
                item = dict(self.filler())
                item["record_id"] = np.asarray(FILLER_RECORD_ID, np.int64)
            examples.append(item)
        self.batches += 1
        return self.collate(examples)

    def get_state(self) -> dict[str, Any]:
        return {"position": self.position, "batches": self.batches, "skipped": self.skipped, "records": self.records}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue after the saved position. With a filler, ``batches`` alone places the iterator, so a state
        saved by another number of processes (another ``batch_size`` per process) resumes at the same global step."""
        batches = int(state.get("batches", 0))
        position = batches * self.batch_size if self.filler is not None else int(state["position"])
        self._it = iter(self._dataset[position:].to_iter_dataset(self._opts))
        self.position, self.batches = position, batches
        self.skipped = int(state["skipped"])
        self.records = int(state["records"])


def stack(examples: list[Example], keys: Sequence[str] | None = None) -> Batch:
    """Stack same-shaped example fields into a batch (``record_id`` included)."""
    keys = list(examples[0]) if keys is None else list(keys)
    out = {}
    for k in keys:
        shapes = {np.shape(e[k]) for e in examples}
        if len(shapes) != 1:
            raise ValueError(f"field {k!r} has different shapes across the batch: {sorted(shapes)}")
        out[k] = np.stack([np.asarray(e[k]) for e in examples])
    return out


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= length; raises naming the length and the largest bucket."""
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"sequence of {length} tokens exceeds the largest length bucket {buckets[-1]}")


def pad_to(x: np.ndarray, length: int, value: int | float) -> np.ndarray:
    """Right-pad axis 0 of ``x`` to ``length``."""
    if x.shape[0] > length:
        raise ValueError(f"cannot pad {x.shape[0]} rows down to {length}")
    pad = [(0, length - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    return np.pad(x, pad, constant_values=value)
