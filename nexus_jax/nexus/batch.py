"""Host-side batch building: chats + images -> padded token arrays, M-RoPE positions, slot indices, ViT inputs.

A :class:`Sample` is one conversation with its images: ``input_images`` fill the user ``<image>`` tags in order,
``target_images`` the assistant ones (only needed for training: they are the regression targets).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from configs.nexus_gen import NexusGenConfig
from nexus_jax.models.qwen2_5_vl.vision_layout import VisionLayout, vision_layout
from nexus_jax.nexus import templates
from nexus_jax.nexus.slots import input_image_mask, slot_index
from nexus_jax.processing.image_processor import Qwen2VLImageProcessor, to_rgb_uint8
from nexus_jax.processing.rope_index import get_rope_index

ImageLike = Any


@dataclasses.dataclass(frozen=True)
class Sample:
    """One conversation; images in the order of their ``<image>`` tags (user side / assistant side)."""

    messages: Sequence[templates.Message]
    input_images: Sequence[ImageLike] = ()
    target_images: Sequence[ImageLike] = ()


@dataclasses.dataclass(frozen=True)
class VisionInputs:
    """Pixels of a packed group of images and their host layout. pixels [Np_padded, patch_dim]."""

    pixels: np.ndarray
    layout: VisionLayout
    grid_thw: np.ndarray

    @property
    def num_merged(self) -> int:
        return self.layout.num_merged

    def arrays(self) -> dict[str, np.ndarray]:
        return self.layout.arrays()


@dataclasses.dataclass(frozen=True)
class NexusBatch:
    """Left-padded batch. [B, L] arrays: input_ids, labels, attention_mask (bool), slot_index (-1 = not a slot),
    input_mask (input-image pads); positions [3, B, L]; ViT inputs for input and target images (None if absent);
    ``grid_thw`` [num_images, 3] of every image (input and output) in sequence order, as ``get_rope_index`` takes it."""

    input_ids: np.ndarray
    labels: np.ndarray
    attention_mask: np.ndarray
    positions: np.ndarray
    slot_index: np.ndarray
    input_mask: np.ndarray
    inputs: VisionInputs | None
    targets: VisionInputs | None
    grid_thw: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.input_ids.shape


def _processor(cfg: NexusGenConfig, min_pixels: int, max_pixels: int) -> Qwen2VLImageProcessor:
    v = cfg.vl.vision
    return Qwen2VLImageProcessor(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=v.patch_size,
        temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size,
    )


def process_input_images(images: Sequence[ImageLike], cfg: NexusGenConfig) -> tuple[np.ndarray, np.ndarray]:
    """Understanding / edit-source images: smart resize within ``cfg.input_max_pixels`` -> (pixels, grid_thw)."""
    out = _processor(cfg, 56 * 56, cfg.input_max_pixels)(list(images))
    return out["pixel_values"], out["image_grid_thw"]


def process_target_images(images: Sequence[ImageLike], cfg: NexusGenConfig) -> tuple[np.ndarray, np.ndarray]:
    """Output (target) images: resized to ``cfg.target_image_size`` (252x252, bicubic) -> grid ``slot_grid_thw``."""
    h, w = cfg.target_image_size
    resized = [Image.fromarray(to_rgb_uint8(img)).resize((w, h), Image.Resampling.BICUBIC) for img in images]
    out = _processor(cfg, h * w, h * w)(resized)
    grid = out["image_grid_thw"]
    if not np.all(grid == np.asarray(cfg.slot_grid_thw)):
        raise AssertionError(f"target grid {grid.tolist()} != slot grid {cfg.slot_grid_thw}")
    return out["pixel_values"], grid


def vision_inputs(pixels: np.ndarray, grid: np.ndarray, cfg: NexusGenConfig, pad_patches_to: int = 1) -> VisionInputs:
    """Pack pixels [Np, D] with their layout, zero-padding to the layout's patch count."""
    layout = vision_layout(grid, cfg.vl.vision, pad_patches_to=pad_patches_to)
    padded = np.zeros((layout.patch_order.shape[0], pixels.shape[1]), np.float32)
    padded[: pixels.shape[0]] = pixels
    return VisionInputs(padded, layout, np.asarray(grid))


def _tag_counts(messages: Sequence[templates.Message]) -> tuple[int, int]:
    user = sum(m.content.count(templates.IMAGE_TAG) for m in messages if m.role != "assistant")
    assistant = sum(m.content.count(templates.IMAGE_TAG) for m in messages if m.role == "assistant")
    return user, assistant


def make_batch(
    samples: Sequence[Sample],
    encode: templates.Encode,
    cfg: NexusGenConfig,
    *,
    training: bool = True,
    stop_after_slots: bool = False,
    length: int | None = None,
    pad_patches_to: int = 1,
) -> NexusBatch:
    """Tokenize, pad (left), compute positions and slot indices, and preprocess images.

    ``training`` requires a target image for every assistant ``<image>``; ``stop_after_slots`` ends each sequence at
    its first output image's last slot (the slot-filling forward). Raises on missing images or over-long prompts.
    """
    if not samples:
        raise ValueError("make_batch needs at least one sample")
    tok = cfg.tokens
    chats, grids_in_order, in_pixels, in_grids, tgt_images = [], [], [], [], []
    for i, s in enumerate(samples):
        n_user, n_out = _tag_counts(s.messages)
        if len(s.input_images) != n_user:
            raise ValueError(f"sample {i}: {n_user} input <image> tags but {len(s.input_images)} input images")
        if training and len(s.target_images) != n_out:
            raise ValueError(
                f"sample {i}: the assistant turn has {n_out} output <image> tags but {len(s.target_images)} target "
                f"images were given; training needs the target image of every output slot block"
            )
        if stop_after_slots and n_out < 1:
            raise ValueError(f"sample {i}: no assistant <image> tag, so there are no image slots to fill")
        pix, grid = process_input_images(s.input_images, cfg) if n_user else (None, np.zeros((0, 3), np.int64))
        if pix is not None:
            in_pixels.append(pix)
            in_grids.append(grid)
        counts = [int(c) for c in np.prod(grid, axis=1) // cfg.vl.vision.spatial_merge_size**2]
        chat = templates.encode_chat(
            s.messages, encode, tok, input_image_tokens=counts, num_slots=cfg.num_slots,
            stop_after_slots=stop_after_slots,
        )
        if len(chat.input_ids) > cfg.max_length:
            raise ValueError(
                f"sample {i}: the prompt needs {len(chat.input_ids)} positions including its "
                f"{len(chat.output_images) * cfg.num_slots} image slots, more than the context length "
                f"max_length={cfg.max_length}"
            )
        chats.append(chat)
        user_grids = iter(grid)
        grids_in_order += [np.asarray(cfg.slot_grid_thw) if sp.is_output else next(user_grids) for sp in chat.images]
        if training:
            tgt_images += list(s.target_images)
    inputs = (
        vision_inputs(np.concatenate(in_pixels), np.concatenate(in_grids), cfg, pad_patches_to) if in_pixels else None
    )
    targets = None
    if training and tgt_images:
        targets = vision_inputs(*process_target_images(tgt_images, cfg), cfg, pad_patches_to)
    return assemble_batch(chats, grids_in_order, cfg, length=length, inputs=inputs, targets=targets)


def assemble_batch(
    chats: Sequence[templates.EncodedChat],
    image_grids: Sequence[np.ndarray],
    cfg: NexusGenConfig,
    *,
    length: int | None,
    inputs: VisionInputs | None,
    targets: VisionInputs | None,
) -> NexusBatch:
    """Left-pad encoded chats into a :class:`NexusBatch`: M-RoPE positions from ``get_rope_index`` over
    ``image_grids`` (one [3] grid per image block, in sequence order, output slot blocks included), output-slot
    indices and input-image masks. ``inputs`` / ``targets`` are the already packed ViT inputs."""
    tok = cfg.tokens
    padded = templates.pad_batch(chats, tok.endoftext, length=length, side="left")
    grids = np.stack(image_grids).astype(np.int64) if len(image_grids) else None
    positions, _ = get_rope_index(
        padded.input_ids, grids, padded.attention_mask, image_token_id=tok.image_pad,
        spatial_merge_size=cfg.vl.vision.spatial_merge_size,
    )
    return NexusBatch(
        input_ids=padded.input_ids,
        labels=padded.labels,
        attention_mask=padded.attention_mask,
        positions=positions.astype(np.int32),
        slot_index=slot_index(padded.labels, tok.image_pad, cfg.num_slots),
        input_mask=input_image_mask(padded.input_ids, padded.labels, tok.image_pad),
        inputs=inputs,
        targets=targets,
        grid_thw=np.zeros((0, 3), np.int64) if grids is None else grids,
    )


def device_arrays(batch: NexusBatch) -> tuple[dict[str, Any], dict[str, int]]:
    """(arrays for :func:`nexus_jax.nexus.loss.model_loss`, static counts ``num_input_rows`` / ``num_target_rows``)."""
    arrays: dict[str, Any] = {
        "input_ids": batch.input_ids,
        "labels": batch.labels,
        "attention_mask": batch.attention_mask,
        "positions": batch.positions,
        "slot_index": batch.slot_index,
        "input_mask": batch.input_mask,
    }
    static = {"num_input_rows": 0, "num_target_rows": 0}
    if batch.inputs is not None:
        arrays["input_pixels"], arrays["input_layout"] = batch.inputs.pixels, batch.inputs.arrays()
        static["num_input_rows"] = batch.inputs.num_merged
    if batch.targets is not None:
        arrays["target_pixels"], arrays["target_layout"] = batch.targets.pixels, batch.targets.arrays()
        static["num_target_rows"] = batch.targets.num_merged
    return arrays, static
