"""Nexus-Gen AR training examples: record -> tokens + preprocessed images; examples -> fixed-shape micro-batches.

Per record (in Grain's threaded ``map``): parse, load and preprocess input images (smart resize, Qwen2-VL patches) and
target images (resized to ``slot_grid_thw``: 252x252 -> 81 slots at full size), tokenise with the chat template
(:func:`nexus_jax.nexus.templates.encode_chat`). Missing/corrupt images, too many images and sequences longer than
the largest length bucket raise, so the pipeline skips and counts the record.

Per batch (:class:`ARCollator`): pick the smallest length bucket holding the longest sequence (per-batch
bucketing: a handful of static shapes, no cross-example state, so resuming is exact), split into ``grad_accum``
micro-batches, right-pad tokens, compute M-RoPE positions and slot indices, and pack each *example's* input and
target images into ViT inputs padded to fixed per-example patch / window budgets. Every array gets a leading
``[grad_accum]`` axis, then the example axis, so the ViT inputs are batch-sharded like the tokens: each process
loads only its own records and each device encodes only its own examples' images.

Micro-batch ``a`` takes the examples ``a::grad_accum`` of the batch, so a process holding the contiguous rows
``[p*B/P, (p+1)*B/P)`` of a global batch holds exactly its shard of every micro-batch, and the global micro-batches
are the same whatever the number of processes P.

Multi-process: the length bucket is the one thing a batch's rows share. Each process sees only its rows, so the
trainer passes ``agree_length`` (the maximum over processes) and every process pads to the same bucket.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

from configs.nexus_gen import NexusGenConfig
from configs.training import DataConfig
from nexus_jax.data.pipeline import Batch, Example, pick_bucket
from nexus_jax.data.records import RecordError, record_with_images
from nexus_jax.models.qwen2_5_vl.vision_layout import vision_layout
from nexus_jax.nexus import templates
from nexus_jax.nexus.batch import process_input_images, process_target_images
from nexus_jax.nexus.slots import input_image_mask, slot_index
from nexus_jax.processing.rope_index import get_rope_index

TOKEN_KEYS = ("input_ids", "labels", "attention_mask", "slot_index", "input_mask")
LAYOUT_KEYS = ("patch_order", "positions", "frame_segments", "window_gather", "window_valid", "window_scatter",
               "merge_reverse")


@dataclasses.dataclass(frozen=True)
class AREncoder:
    """Raw JSONL line (or dict) -> example dict of variable-size numpy arrays (see module docstring)."""

    model: NexusGenConfig
    data: DataConfig
    encode_text: Callable[[str], Sequence[int]]
    image_root: str = ""
    system_prompt: str | None = templates.SYSTEM_PROMPT

    def __call__(self, raw: str | bytes | dict) -> Example:
        """``raw``: a JSONL line, a record dict, or an array_record example {"record", "images" (bytes)}."""
        rec, inputs, outputs = record_with_images(raw, self.image_root)
        if len(inputs) > self.data.max_input_images:
            raise RecordError(f"{len(inputs)} input images exceed max_input_images={self.data.max_input_images}")
        if len(outputs) > self.data.max_output_images:
            raise RecordError(f"{len(outputs)} output images exceed max_output_images={self.data.max_output_images}")
        patch_dim = self.model.vl.vision.patch_dim
        none = (np.zeros((0, patch_dim), np.float32), np.zeros((0, 3), np.int64))
        in_pix, in_grid = process_input_images(inputs, self.model) if inputs else none
        tgt_pix, tgt_grid = process_target_images(outputs, self.model) if outputs else none
        merge = self.model.vl.vision.spatial_merge_size
        counts = [int(c) for c in np.prod(in_grid, axis=1) // merge**2]
        messages = [templates.Message(m.role, m.content) for m in rec.messages]
        chat = templates.encode_chat(messages, self.encode_text, self.model.tokens, input_image_tokens=counts,
                                     num_slots=self.model.num_slots, system=self.system_prompt)
        limit = self.data.length_buckets[-1]
        if len(chat.input_ids) > limit:
            raise RecordError(
                f"over-long record: {len(chat.input_ids)} tokens exceed the largest length bucket {limit}"
            )
        return {
            "input_ids": chat.input_ids,
            "labels": chat.labels,
            "image_is_output": np.asarray([s.is_output for s in chat.images], bool),
            "input_pixels": in_pix.astype(np.float32),
            "input_grid": in_grid.astype(np.int64),
            "target_pixels": tgt_pix.astype(np.float32),
            "target_grid": tgt_grid.astype(np.int64),
        }


def max_windows_per_image(max_merged: int, merged_window: int) -> int:
    """Worst-case attention windows of one image with at most ``max_merged`` merged tokens (any aspect ratio)."""
    best = 0
    for mh in range(1, max_merged + 1):
        mw = max_merged // mh
        best = max(best, math.ceil(mh / merged_window) * math.ceil(mw / merged_window))
    return best


@dataclasses.dataclass(frozen=True)
class VisionBudget:
    """Fixed ViT input size of one micro-batch: padded patches and windows."""

    patches: int
    windows: int


class ARCollator:
    """Examples -> micro-batched fixed-shape arrays (leading axes ``[grad_accum, micro_batch]``). See module
    docstring. ``input_budget`` / ``target_budget`` are per example; ``agree_length(n) -> n'`` (multi-process runs)
    turns this process's longest sequence into the longest over all processes."""

    def __init__(self, model: NexusGenConfig, data: DataConfig, grad_accum: int, micro_batch: int,
                 agree_length: Callable[[int], int] | None = None):
        self.model, self.data = model, data
        self.accum, self.micro = grad_accum, micro_batch
        self.agree_length = agree_length
        v = model.vl.vision
        unit, win = v.spatial_merge_size**2, v.merged_window
        self.patch_dim = v.patch_dim
        max_in_patches = model.input_max_pixels // v.patch_size**2 // unit * unit
        n_in = data.max_input_images
        self.input_budget = VisionBudget(
            max(n_in * max_in_patches, unit), max(n_in * max_windows_per_image(max_in_patches // unit, win), 1)
        )
        t, h, w = model.slot_grid_thw
        n_out = data.max_output_images
        self.target_budget = VisionBudget(
            max(n_out * t * h * w, unit),
            max(n_out * math.ceil(h // v.spatial_merge_size / win) * math.ceil(w // v.spatial_merge_size / win), 1),
        )

    def filler(self) -> Example:
        """A zero-weight stand-in for a broken record: one padding token, every label ignored, no images."""
        tok = self.model.tokens
        return {
            "input_ids": np.asarray([tok.endoftext], np.int32),
            "labels": np.asarray([templates.IGNORE_INDEX], np.int32),
            "image_is_output": np.zeros((0,), bool),
            "input_pixels": np.zeros((0, self.patch_dim), np.float32),
            "input_grid": np.zeros((0, 3), np.int64),
            "target_pixels": np.zeros((0, self.patch_dim), np.float32),
            "target_grid": np.zeros((0, 3), np.int64),
        }

    def _vision(self, pixels: list[np.ndarray], grids: list[np.ndarray], budget: VisionBudget, prefix: str
                ) -> dict[str, np.ndarray]:
        merge = self.model.vl.vision.spatial_merge_size
        grid = np.concatenate(grids) if grids else np.zeros((0, 3), np.int64)
        pix = np.concatenate(pixels) if pixels else np.zeros((0, self.patch_dim), np.float32)
        if grid.shape[0] == 0:  # no image of this kind: one dummy merge unit keeps shapes fixed (never scattered)
            grid = np.asarray([[1, merge, merge]], np.int64)
            pix = np.zeros((merge * merge, self.patch_dim), np.float32)
        layout = vision_layout(grid, self.model.vl.vision, pad_patches_to=budget.patches,
                               pad_windows_to=budget.windows)
        if layout.patch_order.shape[0] != budget.patches or layout.window_gather.shape[0] != budget.windows:
            raise ValueError(
                f"{prefix} images need {layout.num_patches} patches / {layout.window_gather.shape[0]} windows, over "
                f"the micro-batch budget {budget.patches} / {budget.windows}"
            )
        padded = np.zeros((budget.patches, self.patch_dim), np.float32)
        padded[: pix.shape[0]] = pix
        out = {f"{prefix}_pixels": padded}
        out.update({f"{prefix}_layout.{k}": v for k, v in layout.arrays().items()})
        return out

    def _micro(self, examples: list[Example], length: int) -> dict[str, np.ndarray]:
        tok = self.model.tokens
        chats = [templates.EncodedChat(e["input_ids"], e["labels"], ()) for e in examples]
        padded = templates.pad_batch(chats, tok.endoftext, length=length, side="right")
        grids: list[np.ndarray] = []
        for e in examples:
            ins, outs = iter(e["input_grid"]), iter(e["target_grid"])
            grids += [next(outs) if is_out else next(ins) for is_out in e["image_is_output"]]
        positions, _ = get_rope_index(
            padded.input_ids, np.stack(grids) if grids else None, padded.attention_mask,
            image_token_id=tok.image_pad, spatial_merge_size=self.model.vl.vision.spatial_merge_size,
        )
        out = {
            "input_ids": padded.input_ids,
            "labels": padded.labels,
            "attention_mask": padded.attention_mask,
            "positions": positions.astype(np.int32),
            "slot_index": slot_index(padded.labels, tok.image_pad, self.model.num_slots),
            "input_mask": input_image_mask(padded.input_ids, padded.labels, tok.image_pad),
        }
        for kind, budget in (("input", self.input_budget), ("target", self.target_budget)):
            per_example = [self._vision([e[f"{kind}_pixels"]], [e[f"{kind}_grid"]], budget, kind) for e in examples]
            out.update({k: np.stack([v[k] for v in per_example]) for k in per_example[0]})
        return out

    def __call__(self, examples: list[Example]) -> Batch:
        if len(examples) != self.accum * self.micro:
            raise ValueError(f"expected {self.accum} x {self.micro} examples, got {len(examples)}")
        longest = max(len(e["input_ids"]) for e in examples)
        if self.agree_length is not None:
            longest = self.agree_length(longest)
        length = pick_bucket(longest, self.data.length_buckets)
        micros = [self._micro(examples[a::self.accum], length) for a in range(self.accum)]
        batch = {k: np.stack([m[k] for m in micros]) for k in micros[0]}
        batch["record_id"] = np.asarray([int(e["record_id"]) for e in examples], np.int64)
        return batch


def ar_batch_axes(name: str, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of micro-batched AR inputs [grad_accum, batch, ...] (positions [grad_accum, 3, batch, L]):
    tokens and the per-example ViT inputs alike are sharded over the batch."""
    if name == "positions":
        return (None, None, "batch", None)
    return (None, "batch") + (None,) * (ndim - 2)


def count_tokens(batch: Batch) -> int:
    """Real (non-padding) tokens in a batch."""
    return int(np.asarray(batch["attention_mask"]).sum())
