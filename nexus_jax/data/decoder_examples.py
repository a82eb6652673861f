"""Decoder training examples: JSONL records ``{"image", "embed"[, "ref_embed"]}`` -> pixels + precomputed embeddings.

``embed`` is a ``.npy`` of the 81 target embeddings [81, D] (ground-truth ViT features for the generation decoder,
AR predictions for the editing decoder); ``ref_embed`` the 324 source-image embeddings [324, D] (editing only).
Images: short side resized to ``size`` (bilinear), centre-cropped to ``size x size``, scaled to [-1, 1], NHWC.
Every example has the same shapes, so batches are plain stacks.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from nexus_jax.data.pipeline import Example
from nexus_jax.data.records import RecordError, resolve_image
from nexus_jax.paths import as_path, is_remote
from nexus_jax.processing.image_processor import load_image


def center_crop_pixels(image: Image.Image, size: int) -> np.ndarray:
    """Short side -> ``size`` (bilinear), centre crop ``size x size``; [size, size, 3] float32 in [-1, 1]."""
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.convert("RGB").resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    arr = np.asarray(image.crop((left, top, left + size, top + size)), np.float32)
    return arr / 127.5 - 1.0


def _load_embed(path: Path, rows: int, dim: int, what: str) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(as_path(path).read_bytes()) if is_remote(path) else path)  # path may be gs://
    except (OSError, ValueError) as e:
        raise RecordError(f"cannot read {what} {path}: {e}") from e
    if arr.shape != (rows, dim):
        raise RecordError(f"{what} {path} has shape {arr.shape}, expected ({rows}, {dim})")
    if not np.all(np.isfinite(arr)):
        raise RecordError(f"{what} {path} contains NaN or inf")
    return arr.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class DecoderEncoder:
    """Raw JSONL line -> {"pixels" [S, S, 3], "embed" [N, D][, "ref_embed" [R, D]], "weight" [] (1; 0 for a filler)}."""

    image_size: int
    embed_rows: int
    embed_dim: int
    ref_rows: int = 0  # 0: generation decoder (no reference embeddings)
    image_root: str = ""

    def filler(self) -> Example:
        """A zero-weight stand-in for a broken record (same shapes; ``weight`` 0 so the loss ignores it)."""
        out = {"pixels": np.zeros((self.image_size, self.image_size, 3), np.float32),
               "embed": np.zeros((self.embed_rows, self.embed_dim), np.float32),
               "weight": np.asarray(0.0, np.float32)}
        if self.ref_rows:
            out["ref_embed"] = np.zeros((self.ref_rows, self.embed_dim), np.float32)
        return out

    def __call__(self, raw: str | bytes | dict) -> Example:
        rec = json.loads(raw) if isinstance(raw, str | bytes) else raw
        if not isinstance(rec, dict) or "image" not in rec or "embed" not in rec:
            raise RecordError(f"decoder record needs 'image' and 'embed', got {str(rec)[:200]}")
        try:
            image = load_image(resolve_image(rec["image"], self.image_root))
        except (ValueError, TypeError) as e:
            raise RecordError(str(e)) from e
        out = {
            "pixels": center_crop_pixels(image, self.image_size),
            "embed": _load_embed(resolve_image(rec["embed"], self.image_root), self.embed_rows, self.embed_dim,
                                 "embed"),
            "weight": np.asarray(1.0, np.float32),
        }
        if self.ref_rows:
            if "ref_embed" not in rec:
                raise RecordError("editing-decoder record has no 'ref_embed'")
            out["ref_embed"] = _load_embed(resolve_image(rec["ref_embed"], self.image_root), self.ref_rows,
                                           self.embed_dim, "ref_embed")
        return out
