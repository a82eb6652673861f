"""Random-access record sources for Grain: a JSONL file, or an array_record dataset written by the TFDS builder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


class JsonlSource(Sequence):
    """Lines of a JSONL file (raw text; parsing happens in the pipeline so a bad line is skipped, not fatal)."""

    def __init__(self, path: str | Path):
        from nexus_jax.data.records import read_jsonl

        self.path = Path(path)
        self._lines = read_jsonl(self.path)

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        return self._lines[i]


def open_source(path: str | Path) -> Sequence[Any]:
    """``*.jsonl`` -> :class:`JsonlSource`; a directory -> the array_record data source of the TFDS builder."""
    p = Path(path)
    if not str(path):
        raise ValueError("no data path given (DataConfig.path / --data)")
    if p.is_file():
        return JsonlSource(p)
    if p.is_dir():
        from nexus_jax.data.tfds_builder import array_record_source

        return array_record_source(p)
    raise FileNotFoundError(f"data path {p} is neither a JSONL file nor a dataset directory")
