"""Checkpoints split over a directory and sub-directories, e.g. a Nexus-Gen decoder in diffusers layout::

    OUT/transformer/diffusion_pytorch_model*.safetensors + config.json   (FluxTransformer2DModel.from_pretrained)
    OUT/generation_decoder.safetensors                                  (adapter.*; edit_decoder: embedding_merger.*)

A table names the sub-directory's tensors ``transformer/<name>``: :class:`SplitReader` reads such a directory under
those names, :class:`SplitWriter` writes each ``<sub>/`` group into its own folder (HF shards + index)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils.epath import Path  # local paths and gs:// URLs alike

from conversion import io
from conversion.errors import ConversionError

SEP = "/"


def split_subdirs(source: str | os.PathLike, subdirs: Sequence[str]) -> list[str]:
    """The names in ``subdirs`` that are folders of ``source`` (a directory); [] for a file."""
    p = Path(source)
    return [s for s in subdirs if p.is_dir() and (p / s).is_dir()] if subdirs else []


KNOWN_SUBDIRS = ("transformer",)  # the folders of the split layouts the families write


def _has_own_weights(p: Path) -> bool:
    return any(f.is_file() and (f.suffix in (".safetensors", ".bin", ".pt") or f.name.endswith(".index.json"))
               for f in p.iterdir())


def open_any(source: str | os.PathLike) -> io.TensorReader:
    """:class:`SplitReader` for a directory with its own weights and known sub-folders, else ``open_checkpoint``."""
    p = Path(source)
    subdirs = split_subdirs(p, KNOWN_SUBDIRS)
    return SplitReader(p, subdirs) if subdirs and _has_own_weights(p) else io.open_checkpoint(p)


class SplitReader(io.TensorReader):
    """The top-level checkpoint of ``source`` plus each ``source/<sub>`` checkpoint under ``<sub>/<name>``."""

    def __init__(self, source: str | os.PathLike, subdirs: Sequence[str]):
        p = Path(source)
        self.where = str(p)
        self._readers: dict[str, io.TensorReader] = {}
        try:
            for sub in subdirs:
                self._readers[sub + SEP] = io.open_checkpoint(p / sub)
            if _has_own_weights(p):
                self._readers[""] = io.open_checkpoint(p)
        except BaseException:
            self.close()
            raise
        self.shapes, self.dtypes, self._owner = {}, {}, {}
        for prefix, r in self._readers.items():
            for n in r.shapes:
                self.shapes[prefix + n], self.dtypes[prefix + n] = r.shapes[n], r.dtypes[n]
                self._owner[prefix + n] = (prefix, n)

    def read(self, name: str) -> np.ndarray:
        prefix, n = self._owner[name]
        return self._readers[prefix].read(n)

    def close(self) -> None:
        for r in self._readers.values():
            r.close()


class SplitWriter:
    """``write(name, array)`` for entries declared up front: ``<sub>/<name>`` go to ``directory/<sub>/`` as
    ``{sub_prefix}*.safetensors``, the rest to ``directory`` as ``{prefix}*.safetensors``."""

    def __init__(self, directory: Path, entries: Sequence[tuple[str, Any, Any]], max_shard_bytes: int,
                 prefix: str, sub_prefix: str = "diffusion_pytorch_model"):
        groups: dict[str, list] = {}
        for name, shape, dtype in entries:
            sub, _, rest = name.rpartition(SEP)
            groups.setdefault(sub, []).append((rest, shape, dtype))
        self.subdirs = sorted(s for s in groups if s)
        self._writers: dict[str, io.SafetensorsWriter] = {}
        for sub, items in groups.items():
            where = directory / sub if sub else directory
            where.mkdir(parents=True, exist_ok=True)
            self._writers[sub] = io.SafetensorsWriter(where, items, max_shard_bytes, prefix=sub_prefix if sub
                                                      else prefix)

    def write(self, name: str, array: np.ndarray) -> None:
        sub, _, rest = name.rpartition(SEP)
        if sub not in self._writers:
            raise ConversionError(f"{name}: not declared to the writer")
        self._writers[sub].write(rest, array)

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
