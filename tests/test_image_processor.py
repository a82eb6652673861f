"""Image preprocessing vs transformers' Qwen2VLImageProcessorPil: pixel arrays and grid_thw for 5 sizes."""

import io

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from nexus_jax.processing.image_processor import Qwen2VLImageProcessor, smart_resize

# (height, width): non-square, extreme aspect ratios (1:20, 15:1), tiny (upscaled to min_pixels), large (downscaled).
SIZES = [(97, 143), (30, 600), (900, 60), (20, 28), (1000, 700)]
MAX_PIXELS = 512 * 28 * 28


def random_image(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_processor_matches_transformers_pixels_and_grids():
    images = [random_image(h, w, i) for i, (h, w) in enumerate(SIZES)]
    ref = Qwen2VLImageProcessorPil(max_pixels=MAX_PIXELS)(images=images, return_tensors="np")
    ours = Qwen2VLImageProcessor(max_pixels=MAX_PIXELS)(images)
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert ours["pixel_values"].shape == ref["pixel_values"].shape
    err = np.abs(ours["pixel_values"] - ref["pixel_values"]).max()
    print(f"processor max abs error {err:.3g}")
    assert err <= 1e-6
    grids = ours["image_grid_thw"]
    assert len({g[1] / g[2] for g in grids}) == 5 and grids[:, 1:].prod(1).max() * 196 <= MAX_PIXELS


def test_processor_pil_rgba_gray_and_file_inputs(tmp_path):
    rgba = Image.fromarray(np.random.default_rng(1).integers(0, 256, (61, 90, 4), dtype=np.uint8), "RGBA")
    gray = Image.fromarray(np.random.default_rng(2).integers(0, 256, (75, 50), dtype=np.uint8), "L")
    path = tmp_path / "img.png"
    gray.save(path)
    ref = Qwen2VLImageProcessorPil()(images=[rgba, gray], return_tensors="np")
    ours = Qwen2VLImageProcessor()([rgba, str(path)])
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert np.abs(ours["pixel_values"] - ref["pixel_values"]).max() <= 1e-6


def test_smart_resize_limits():
    h, w = smart_resize(4000, 3000, max_pixels=MAX_PIXELS)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= MAX_PIXELS
    with pytest.raises(ValueError, match="aspect ratio 250.0 .* exceeds the limit 200"):
        smart_resize(10, 2500)


def test_processor_rejects_bad_images():
    proc = Qwen2VLImageProcessor()
    with pytest.raises(ValueError, match="image of 10x40 pixels is smaller than one 14x14 patch"):
        proc(random_image(10, 40, 0))
    with pytest.raises(ValueError, match="cannot decode image '<bytes>'"):
        proc(b"\x89PNG\r\n\x1a\nnot really a png")
    buf = io.BytesIO()
    Image.fromarray(random_image(40, 40, 0)).save(buf, format="PNG")
    with pytest.raises(ValueError, match="cannot decode image"):
        proc(buf.getvalue()[:60])  # truncated file
    with pytest.raises(ValueError, match="values must lie in"):
        proc(np.full((30, 30, 3), 300.0))
