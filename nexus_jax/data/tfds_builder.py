"""A tensorflow-datasets builder turning Nexus-Gen JSONL + image files into an array_record dataset (no TensorFlow).

Each example stores the record's JSON text and the raw bytes of its images (in ``images`` order), so training reads
one self-contained file set (random access for Grain's global shuffle) instead of millions of small image files.
A missing image is stored as empty bytes: the pipeline then skips and counts the record, as with JSONL input.

    build_array_record_dataset("train.jsonl", "out_dir", image_root="images/")   # -> out_dir/nexus_records/1.0.0
    source = array_record_source("out_dir")                                       # random access, for Grain
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from nexus_jax.data.records import read_jsonl, resolve_image
from nexus_jax.paths import as_path

log = logging.getLogger(__name__)


class NexusRecords(tfds.core.GeneratorBasedBuilder):
    """Nexus-Gen messages records with embedded image bytes; one ``train`` split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "JSON record text + image bytes."}
    # tfds derives this lazily through `importlib_resources` (not installed); this module is the builder's code.
    code_path = epath.Path(__file__)

    def __init__(self, *, jsonl_path: str | None = None, image_root: str | None = None, **kwargs: Any):
        self._jsonl_path = jsonl_path
        self._image_root = image_root
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Nexus-Gen training records (messages + <image> placeholders) with their image bytes.",
            features=tfds.features.FeaturesDict({
                "record": tfds.features.Text(),
                "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
            }),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        if not self._jsonl_path:
            raise ValueError("NexusRecords needs jsonl_path to generate the dataset")
        return {"train": self._generate_examples(Path(self._jsonl_path))}

    def _generate_examples(self, path: Path):
        root = self._image_root if self._image_root is not None else str(path.parent)
        for i, line in enumerate(read_jsonl(path)):
            try:
                paths = json.loads(line).get("images") or []
            except (ValueError, AttributeError):
                paths = []  # malformed line: kept as is, skipped (and counted) by the pipeline
            blobs = []
            for p in paths:
                f = resolve_image(str(p), root)
                if f.is_file():
                    blobs.append(f.read_bytes())
                else:
                    log.warning("record %d: image %s not found; stored empty", i, f)
                    blobs.append(b"")
            yield i, {"record": line, "images": blobs}


def build_array_record_dataset(jsonl_path: str | Path, data_dir: str | Path, image_root: str | None = None) -> Path:
    """Write the array_record dataset for ``jsonl_path`` under ``data_dir``; returns the dataset version directory."""
    builder = NexusRecords(jsonl_path=str(jsonl_path), image_root=image_root, data_dir=str(data_dir),
                           file_format="array_record")
    builder.download_and_prepare()
    return Path(builder.data_dir)


def array_record_source(data_dir: str | Path, split: str = "train"):
    """Random-access source (``len`` / ``[i]``) of a dataset written by :func:`build_array_record_dataset`.

    ``data_dir`` may be the directory given to the build or the dataset version directory itself.
    """
    d = as_path(data_dir)  # a gs:// URL stays one (TFDS opens it through epath)
    if (d / "dataset_info.json").is_file():  # the version directory
        builder = tfds.builder_from_directory(str(d))
    else:
        builder = NexusRecords(data_dir=str(d), file_format="array_record")
    return builder.as_data_source(split=split)
