"""Random-access record sources for Grain: a JSONL file, or an array_record dataset written by the TFDS builder.

Paths may be local or object-store URLs (``gs://bucket/records.jsonl``; see :mod:`nexus_jax.paths`). A remote JSONL
file is read once, whole, into host memory (as a local one is). A remote array_record directory is handed to TFDS /
array_record, which open ``gs://`` with their own GCS client (not exercised by the tests: no fake for it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from nexus_jax.paths import as_path


class JsonlSource(Sequence):
    """Lines of a JSONL file (raw text; parsing happens in the pipeline so a bad line is skipped, not fatal)."""

    def __init__(self, path: str | os.PathLike):
        from nexus_jax.data.records import read_jsonl

        self.path = as_path(path)
        self._lines = read_jsonl(self.path)

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        return self._lines[i]


def open_source(path: str | os.PathLike) -> Sequence[Any]:
    """``*.jsonl`` -> :class:`JsonlSource`; a directory -> the array_record data source of the TFDS builder."""
    if not os.fspath(path):
        raise ValueError("no data path given (DataConfig.path / --data)")
    p = as_path(path)
    if p.is_file():
        return JsonlSource(p)
    if p.is_dir():
        from nexus_jax.data.tfds_builder import array_record_source

        return array_record_source(p)
    raise FileNotFoundError(f"data path {p} is neither a JSONL file nor a dataset directory")
