"""Qwen2-VL / Qwen2.5-VL image preprocessing in numpy (same arithmetic as transformers' Qwen2-VL processor).

Steps per image: convert to RGB uint8 -> ``smart_resize`` to multiples of ``patch*merge`` within
[min_pixels, max_pixels] (PIL bicubic) -> rescale by 1/255 -> normalise (CLIP mean/std) -> tile x temporal_patch
-> flatten patches in merge-block order. Output ``pixel_values`` [sum(t*h*w), C*T*P*P] float32 and
``image_grid_thw`` [num_images, 3] int64.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from configs.qwen2_5_vl import IMAGE_MEAN, IMAGE_STD
from nexus_jax.paths import as_path, is_remote

MAX_ASPECT_RATIO = 200

ImageLike = Any  # PIL.Image.Image | np.ndarray | str | os.PathLike | bytes


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, area within [min_pixels, max_pixels], aspect ~kept."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got height={height} width={width}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"image aspect ratio {ratio:.1f} ({height}x{width}) exceeds the limit {MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def load_image(image: ImageLike) -> Image.Image:
    """Open a path or bytes as a PIL image (fully decoded); raises ValueError naming a corrupt/unreadable file."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike, bytes)):
        source = io.BytesIO(image) if isinstance(image, bytes) else image
        name = "<bytes>" if isinstance(image, bytes) else os.fspath(image)
        try:
            if not isinstance(source, io.BytesIO) and is_remote(source):  # gs:// etc.: fetch the bytes via epath
                source = io.BytesIO(as_path(source).read_bytes())
            with Image.open(source) as img:
                img.load()
                return img.copy()
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise ValueError(f"cannot decode image {name!r}: {err}") from err
    raise TypeError(f"unsupported image type {type(image).__name__}; pass a PIL image, numpy array, path or bytes")


def to_rgb_uint8(image: ImageLike) -> np.ndarray:
    """Any supported image -> [H, W, 3] uint8 (alpha composited onto white, like transformers)."""
    if not isinstance(image, np.ndarray):
        img = load_image(image)
        if "A" in img.getbands() or img.info.get("transparency") is not None:
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return np.asarray(img.convert("RGB"))
    arr = image
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"image array must be [H, W], [H, W, C] or [C, H, W], got shape {image.shape}")
    if arr.shape[-1] not in (1, 3, 4) and arr.shape[0] in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image array must have 1, 3 or 4 channels, got shape {image.shape}")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.min() >= 0 and arr.max() <= 1:
            arr = arr * 255
        elif arr.min() < 0 or arr.max() > 255:
            raise ValueError(f"image values must lie in [0, 1] or [0, 255], got [{arr.min()}, {arr.max()}]")
        arr = np.round(arr).astype(np.uint8) if np.issubdtype(arr.dtype, np.floating) else arr.astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif arr.shape[-1] == 4:
        return to_rgb_uint8(Image.fromarray(arr, "RGBA"))
    return arr


def patchify(image: np.ndarray, patch: int, merge: int, temporal: int) -> np.ndarray:
    """[C, H, W] float32 -> [gh*gw, C*temporal*patch*patch] in merge-block order (still image tiled in time)."""
    c, h, w = image.shape
    gh, gw = h // patch, w // patch
    x = image.reshape(c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, P, P]
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal, patch, patch))
    return np.ascontiguousarray(x).reshape(gh * gw, c * temporal * patch * patch)


@dataclasses.dataclass(frozen=True)
class Qwen2VLImageProcessor:
    """Images -> (pixel_values [N, 1176] float32, image_grid_thw [num_images, 3] int64)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = IMAGE_MEAN
    image_std: tuple[float, float, float] = IMAGE_STD

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def preprocess_one(self, image: ImageLike) -> tuple[np.ndarray, np.ndarray]:
        """One image -> (patches [t*h*w, D], grid_thw [3])."""
        rgb = to_rgb_uint8(image)
        height, width = rgb.shape[:2]
        if height < self.patch_size or width < self.patch_size:
            raise ValueError(
                f"image of {height}x{width} pixels is smaller than one {self.patch_size}x{self.patch_size} patch"
            )
        new_h, new_w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        resized = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), resample=Image.Resampling.BICUBIC))
        scaled = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
        mean = np.asarray(self.image_mean, np.float32)
        std = np.asarray(self.image_std, np.float32)
        normed = ((scaled - mean) / std).transpose(2, 0, 1)
        patches = patchify(normed, self.patch_size, self.merge_size, self.temporal_patch_size)
        grid = np.array([1, new_h // self.patch_size, new_w // self.patch_size], np.int64)
        return patches, grid

    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> dict[str, np.ndarray]:
        """Images (one or a list) -> {"pixel_values": [N, D], "image_grid_thw": [num_images, 3]}."""
        if isinstance(images, (Image.Image, np.ndarray, str, bytes, os.PathLike)):
            images = [images]
        if len(images) == 0:
            raise ValueError("no images given")
        out = [self.preprocess_one(img) for img in images]
        return {
            "pixel_values": np.concatenate([p for p, _ in out], axis=0),
            "image_grid_thw": np.stack([g for _, g in out]),
        }

    def num_image_tokens(self, grid_thw: np.ndarray) -> np.ndarray:
        """Number of <|image_pad|> tokens per image: t*h*w / merge**2. grid_thw [num_images, 3] -> [num_images]."""
        return np.asarray(grid_thw).prod(axis=-1) // (self.merge_size**2)
