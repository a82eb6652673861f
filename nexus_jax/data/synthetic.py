"""Synthetic Nexus-Gen datasets (JSONL + PNG files) for tests, benchmarks and smoke runs.

Records cycle through understanding, generation and editing; image sizes are non-square and vary. Decoder records
pair an image with random "precomputed" embeddings saved as ``.npy``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = ("red", "blue", "cat", "dog", "house", "tree", "river", "sky", "small", "large", "under", "over", "a", "the")


def _sentence(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, size=n))


def _png(path: Path, rng: np.random.Generator, height: int, width: int, noise: int = 32) -> None:
    base = rng.integers(0, 255, size=(1, 1, 3))
    grad = np.linspace(0, 1, width)[None, :, None] * rng.integers(0, 128, size=(1, 1, 3))
    img = np.clip(base + grad + rng.integers(0, noise + 1, size=(height, width, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path)


def write_ar_dataset(directory: str | Path, num_records: int, seed: int = 0, text_words: int = 12,
                     image_sizes: tuple[tuple[int, int], ...] = ((56, 84), (84, 56), (70, 98))) -> Path:
    """``records.jsonl`` + ``img_*.png`` under ``directory``; returns the JSONL path (image paths are relative)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(num_records):
        kind = ("understanding", "generation", "editing")[i % 3]
        h, w = image_sizes[i % len(image_sizes)]
        images = []
        if kind in ("understanding", "editing"):
            images.append(f"img_{i}_in.png")
            _png(d / images[-1], rng, h, w)
        if kind in ("generation", "editing"):
            images.append(f"img_{i}_out.png")
            _png(d / images[-1], rng, w, h)
        if kind == "understanding":
            msgs = [{"role": "user", "content": "<image>\nDescribe the image."},
                    {"role": "assistant", "content": _sentence(rng, text_words)}]
        elif kind == "generation":
            msgs = [{"role": "user", "content": "Generate an image according to the following description: "
                     + _sentence(rng, text_words)},
                    {"role": "assistant", "content": "Here is an image based on the description: <image>"}]
        else:
            msgs = [{"role": "user", "content": "<image> " + _sentence(rng, text_words // 2)},
                    {"role": "assistant", "content": "Here is the image: <image>"}]
        lines.append(json.dumps({"id": f"syn{i}", "source": f"synthetic_{kind}", "images": images, "messages": msgs}))
    path = d / "records.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_decoder_dataset(directory: str | Path, num_records: int, embed_shape: tuple[int, int],
                          ref_shape: tuple[int, int] | None = None, seed: int = 0,
                          image_size: tuple[int, int] = (40, 56), pixel_noise: int = 32) -> Path:
    """``records.jsonl`` with {"image", "embed"[, "ref_embed"]} + PNG/NPY files; returns the JSONL path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(num_records):
        rec = {"id": f"dec{i}", "image": f"dec_{i}.png", "embed": f"dec_{i}_embed.npy"}
        _png(d / rec["image"], rng, *image_size, noise=pixel_noise)
        np.save(d / rec["embed"], rng.standard_normal(embed_shape).astype(np.float32))
        if ref_shape is not None:
            rec["ref_embed"] = f"dec_{i}_ref.npy"
            np.save(d / rec["ref_embed"], rng.standard_normal(ref_shape).astype(np.float32))
        lines.append(json.dumps(rec))
    path = d / "records.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
