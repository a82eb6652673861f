"""Grain input pipeline over a requests file: parse, skip completed, decode images, preprocess and tokenise.

    lines of requests.jsonl
      -> MapDataset.source                  random access, one element per request line
      -> [process_index::process_count]     per-host shard (multi-host runs split the requests), or the
                                            line indices the job's plan gave this process (``indices``)
      -> map_with_index(parse)              Request | Failure | Done (already complete: nothing decoded)
      -> map(prepare)                       images decoded and preprocessed exactly as in training
                                            (nexus.batch.process_input_images), chat tokenised, length checked
      -> to_iter_dataset(ReadOptions)       prefetch on worker threads, so the devices never wait on the host

Every failure of one request becomes a :class:`~nexus_jax.inference.requests.Failure`; the pipeline never raises
for a bad request.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import grain
import jax
import numpy as np
from PIL import Image

from configs.nexus_gen import NexusGenConfig
from nexus_jax import paths
from nexus_jax.inference.requests import Failure, Request, parse_or_fail
from nexus_jax.nexus import templates
from nexus_jax.nexus.batch import process_input_images
from nexus_jax.processing.image_processor import Qwen2VLImageProcessor, to_rgb_uint8


@dataclasses.dataclass(frozen=True)
class Done:
    """A request whose outputs already exist (resume): not decoded, not recomputed."""

    id: str
    index: int


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A request ready for batching. chat: the tokenised prompt (generation / editing: it ends with the output
    image's slots; understanding: it ends with the assistant generation prompt). pixels [Np, patch_dim] and
    grid [n_images, 3] of the input images (None / empty without images)."""

    request: Request
    chat: templates.EncodedChat
    pixels: np.ndarray | None
    grid: np.ndarray
    ref_pixels: np.ndarray | None = None
    ref_grid: np.ndarray | None = None

    @property
    def length(self) -> int:
        return len(self.chat.input_ids)


def chat_messages(req: Request) -> list[templates.Message]:
    """The conversation the model sees: Nexus-Gen's trained templates for generation / editing, the request's own
    messages for understanding."""
    if req.task == "generation":
        return templates.generation_messages(req.prompt)
    if req.task == "editing":
        return templates.editing_messages(req.prompt)
    return list(req.messages)


def reference_pixels(image: np.ndarray, cfg: NexusGenConfig, grid_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Edit source for the editing decoder's merger: resized (bilinear, as the Nexus-Gen repo does: 504x504 = grid
    36x36 at full size) to the merger's reference ViT grid ``grid_hw`` -> (pixels [Np, patch_dim], grid [1, 3])."""
    v = cfg.vl.vision
    h, w = grid_hw[0] * v.patch_size, grid_hw[1] * v.patch_size
    resized = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
    proc = Qwen2VLImageProcessor(min_pixels=h * w, max_pixels=h * w, patch_size=v.patch_size,
                                 temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size)
    out = proc([resized])
    if tuple(out["image_grid_thw"][0][1:]) != tuple(grid_hw):
        raise AssertionError(f"reference grid {out['image_grid_thw'][0].tolist()} != merger grid {grid_hw}")
    return out["pixel_values"], np.asarray(out["image_grid_thw"], np.int64)


def prepare_request(
    req: Request, cfg: NexusGenConfig, encode: templates.Encode, max_new_tokens: int,
    ref_grid: tuple[int, int] | None = None,
) -> Prepared:
    """Decode + preprocess images, tokenise the chat; raises ValueError for an over-long prompt or a bad image.
    ``ref_grid``: the editing merger's reference ViT grid (edit requests then also carry reference pixels)."""
    images = [to_rgb_uint8(paths.read_bytes(p) if paths.is_remote(p) else p) for p in req.images]
    if images:
        pixels, grid = process_input_images(images, cfg)
    else:
        pixels, grid = None, np.zeros((0, 3), np.int64)
    merge2 = cfg.vl.vision.spatial_merge_size ** 2
    counts = [int(np.prod(g)) // merge2 for g in grid]
    understanding = req.task in ("understanding", "chat")  # prompt only: the model writes the answer
    chat = templates.encode_chat(
        chat_messages(req), encode, cfg.tokens, input_image_tokens=counts, num_slots=cfg.num_slots,
        add_generation_prompt=understanding, stop_after_slots=not understanding,
    )
    # room for the images the answer may contain (max_images None: 1)
    slots = cfg.num_slots * (1 if req.max_images is None else req.max_images) if req.task == "chat" else 0
    budget = cfg.max_length - (max_new_tokens + slots if understanding else 0)
    if len(chat.input_ids) > budget:
        what = f"max_length={cfg.max_length} minus max_new_tokens={max_new_tokens}" if understanding else (
            f"max_length={cfg.max_length}")
        what += f" minus {slots} image slots" if slots else ""
        raise ValueError(
            f"over-long prompt: {len(chat.input_ids)} tokens (image tokens and slots included) exceed the limit "
            f"{budget} ({what})"
        )
    ref_pixels = ref = None
    if req.task == "editing" and ref_grid is not None:
        ref_pixels, ref = reference_pixels(images[0], cfg, ref_grid)
    return Prepared(req, chat, pixels, np.asarray(grid, np.int64), ref_pixels, ref)


def request_dataset(
    lines: Sequence[str],
    base_dir: str,
    prepare: Callable[[Request], Prepared],
    is_complete: Callable[[str], bool] = lambda _id: False,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    indices: Sequence[int] | None = None,
) -> grain.MapDataset:
    """MapDataset of this host's share of the requests -> Prepared | Failure | Done (in line order).

    The share is ``indices`` (line numbers) when given, else every ``process_count``-th line from ``process_index``."""
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if not 0 <= pi < pc:
        raise ValueError(f"process_index {pi} must be in [0, process_count={pc})")
    if indices is not None:
        bad = [i for i in indices if not 0 <= i < len(lines)]
        if bad:
            raise ValueError(f"line indices {bad[:5]} are outside the {len(lines)} request lines")
        ds = grain.MapDataset.source([(i, lines[i]) for i in indices])
    else:
        ds = grain.MapDataset.source([(i, line) for i, line in enumerate(lines)])[pi::pc]

    def parse(item: tuple[int, str]) -> Request | Failure | Done:
        index, line = item
        parsed = parse_or_fail(line, index, base_dir)
        if isinstance(parsed, Request) and is_complete(parsed.id):
            return Done(parsed.id, index)
        return parsed

    def prep(item: Request | Failure | Done) -> Prepared | Failure | Done:
        if not isinstance(item, Request):
            return item
        try:
            return prepare(item)
        except Exception as e:  # noqa: BLE001 - a bad request is recorded, never fatal
            return Failure(item.id, item.index, item.task, f"{type(e).__name__}: {e}")

    return ds.map(parse).map(prep)


def iterate(ds: grain.MapDataset, num_threads: int = 2, prefetch: int = 16) -> Iterator[Prepared | Failure | Done]:
    """Iterate with ``num_threads`` prefetch threads (0: in the calling thread)."""
    if num_threads <= 0:
        yield from (ds[i] for i in range(len(ds)))
        return
    yield from ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
