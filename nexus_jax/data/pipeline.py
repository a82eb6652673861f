"""Grain input pipeline: per-process sharding, deterministic shuffling, preprocessing, fixed-shape batches.

    source (random access: JSONL lines or an array_record data source)
      -> MapDataset, indexed (every element remembers its source index = record id)
      -> [process_index::process_count]   per-process shard (multi-host)
      -> shuffle(seed)                      deterministic, reshuffled every epoch
      -> repeat(num_epochs)
      -> map(encode)                        tokenisation / image preprocessing; failures become ``Skipped``
      -> IterDataset with thread prefetch  (checkpointable Grain iterator)
      -> BatchIterator                      drops and counts ``Skipped``, collates fixed-shape batches

The :class:`BatchIterator` state (Grain iterator state + skip counters) is saved with every checkpoint, so a resumed
run sees exactly the records an uninterrupted run would have seen, none twice and none missed.
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


def build_dataset(
    source: Sequence[Any],
    encode: Callable[[Any], Example],
    *,
    seed: int,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """The per-process, shuffled, repeated, encoded MapDataset (elements are examples or :class:`Skipped`)."""
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if not 0 <= pi < pc:
        raise ValueError(f"process_index {pi} must be in [0, process_count={pc})")
    if len(source) < pc:
        raise ValueError(f"{len(source)} records cannot be sharded over {pc} processes")
    ds = grain.MapDataset.source(_Indexed(source))[pi::pc]
    ds = ds.shuffle(seed).repeat(num_epochs)
    return ds.map(_safe(encode))


class BatchIterator:
    """Fixed-shape batches from a Grain dataset; skips and counts broken records; checkpointable state.

    ``collate(examples) -> batch`` must return the same shapes for every batch of a given bucket.
    State: ``{"grain": <Grain iterator state>, "skipped": int, "records": int}``.
    """

    def __init__(
        self,
        dataset: grain.MapDataset,
        batch_size: int,
        collate: Callable[[list[Example]], Batch],
        *,
        num_threads: int = 2,
        prefetch: int = 16,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.collate = collate
        opts = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        self._it = iter(dataset.to_iter_dataset(opts))
        self.skipped = 0
        self.records = 0
        self.skip_reasons: collections.Counter[str] = collections.Counter()

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        examples: list[Example] = []
        while len(examples) < self.batch_size:
            item = next(self._it)  # StopIteration at the end of the last epoch: a partial batch is dropped
            self.records += 1
            if isinstance(item, Skipped):
                self.skipped += 1
                kind = item.reason.split(":", 1)[0]
                self.skip_reasons[kind] += 1
                log.warning("skipping record %d: %s", item.record_id, item.reason)
                continue
            examples.append(item)
        return self.collate(examples)

    def get_state(self) -> dict[str, Any]:
        return {"grain": self._it.get_state(), "skipped": self.skipped, "records": self.records}

    def set_state(self, state: dict[str, Any]) -> None:
        self._it.set_state(state["grain"])
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
