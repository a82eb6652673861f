"""Typed config of the Nexus-Gen autoregressive model (Qwen2.5-VL + vision_head + V2 prefill embeddings).

Presets: :func:`nexus_gen_v1`, :func:`nexus_gen_v2` (full size, Qwen2.5-VL-7B) and :func:`tiny` (tests, benchmarks).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from configs import qwen2_5
from configs.qwen2_5_vl import QWEN25_VISION_TINY, Qwen25VisionConfig, Qwen25VLConfig, Qwen25VLTokens

Version = Literal["v1", "v2"]
VERSIONS: tuple[str, ...] = ("v1", "v2")

# (token CE weight, image loss weight) of the released training scripts (nexus-gen.md 1.7).
LOSS_WEIGHTS: dict[str, tuple[float, float]] = {"v1": (0.1, 1.0), "v2": (3.0, 3.0)}


@dataclasses.dataclass(frozen=True)
class TrainablePolicy:
    """Which parameter groups train (the rest get no optimizer state). Released recipe: ViT and merger frozen."""

    vision_tower: bool = False  # ViT patch embedding + blocks
    vision_merger: bool = False  # ViT 2x2 merger (ms-swift ``freeze_aligner``)
    llm: bool = True  # token embeddings, decoder layers, final norm
    lm_head: bool = True
    vision_head: bool = True
    prefill_embeds: bool = True  # V2 only


@dataclasses.dataclass(frozen=True)
class NexusGenConfig:
    """Nexus-Gen AR model.

    ``slot_grid_thw`` is the ViT patch grid of an output image (1, 18, 18 = 252x252 px); it gives
    ``num_slots = t*h*w / merge**2`` slots (81). V1 fills the slots with the ``<|image_pad|>`` embedding, V2 with the
    learned ``image_prefill_embeds`` [num_slots, hidden]. ``max_length`` is the context length prompts must fit in,
    slots included. Input images (understanding, the source of an edit) are smart-resized to at most
    ``input_max_pixels`` (262640: a 512x512 source becomes 504x504 -> 324 tokens).
    """

    vl: Qwen25VLConfig
    version: Version = "v2"
    num_slots: int = 81
    slot_grid_thw: tuple[int, int, int] = (1, 18, 18)
    token_loss_weight: float = 3.0
    image_loss_weight: float = 3.0
    trainable: TrainablePolicy = TrainablePolicy()
    max_length: int = 4096
    input_max_pixels: int = 262_640

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}, got {self.version!r}")
        merge = self.vl.vision.spatial_merge_size
        t, h, w = self.slot_grid_thw
        if t != 1 or h % merge or w % merge or h < merge or w < merge:
            raise ValueError(
                f"slot_grid_thw {self.slot_grid_thw} must be (1, h, w) with h, w positive multiples of the "
                f"spatial merge size {merge}"
            )
        if self.num_slots != self.grid_slots:
            raise ValueError(
                f"num_slots={self.num_slots} but slot_grid_thw {self.slot_grid_thw} gives "
                f"{t}*{h}*{w}/{merge}^2 = {self.grid_slots} slots"
            )
        if self.token_loss_weight < 0 or self.image_loss_weight < 0:
            raise ValueError(
                f"loss weights must be >= 0, got token={self.token_loss_weight} image={self.image_loss_weight}"
            )
        if self.max_length < self.num_slots + 2:
            raise ValueError(f"max_length={self.max_length} cannot hold {self.num_slots} slots plus their markers")
        unit = self.vl.vision.patch_size * merge
        if self.input_max_pixels < unit * unit:
            raise ValueError(f"input_max_pixels={self.input_max_pixels} is below one {unit}x{unit} merge unit")

    @property
    def grid_slots(self) -> int:
        """Merged tokens of ``slot_grid_thw``."""
        return math.prod(self.slot_grid_thw) // self.vl.vision.spatial_merge_size**2

    @property
    def hidden_size(self) -> int:
        return self.vl.text.hidden_size

    @property
    def tokens(self) -> Qwen25VLTokens:
        return self.vl.tokens

    @property
    def target_image_size(self) -> tuple[int, int]:
        """(height, width) in pixels that an output (target) image is resized to: 252x252 at full size."""
        p = self.vl.vision.patch_size
        return self.slot_grid_thw[1] * p, self.slot_grid_thw[2] * p

    @property
    def merged_slot_grid(self) -> tuple[int, int]:
        """(rows, cols) of the slots on the merged grid (9, 9)."""
        m = self.vl.vision.spatial_merge_size
        return self.slot_grid_thw[1] // m, self.slot_grid_thw[2] // m

    @property
    def uses_prefill_embeds(self) -> bool:
        return self.version == "v2"

    def replace(self, **changes) -> NexusGenConfig:
        return dataclasses.replace(self, **changes)


def _with_version(cfg: NexusGenConfig, version: Version) -> NexusGenConfig:
    token_w, image_w = LOSS_WEIGHTS[version]
    return cfg.replace(version=version, token_loss_weight=token_w, image_loss_weight=image_w)


def nexus_gen_v2(**overrides) -> NexusGenConfig:
    """Nexus-GenV2 at full size (Qwen2.5-VL-7B; CE 3.0 / image 3.0; learned prefill embeddings)."""
    base = _with_version(NexusGenConfig(vl=Qwen25VLConfig(text=qwen2_5.qwen2_5_vl_7b())), "v2")
    return base.replace(**overrides)


def nexus_gen_v1(**overrides) -> NexusGenConfig:
    """Nexus-Gen V1 at full size (slots hold the ``<|image_pad|>`` embedding; CE 0.1 / image 1.0)."""
    return _with_version(nexus_gen_v2(), "v1").replace(**overrides)


# Tiny special-token ids: above a 256-entry byte vocabulary (see nexus_jax.nexus.tiny.ByteTokenizer).
TINY_TOKENS = Qwen25VLTokens(
    endoftext=256,
    im_start=257,
    im_end=258,
    vision_start=259,
    vision_end=260,
    vision_pad=261,
    image_pad=262,
    video_pad=263,
)
TINY_VOCAB = 264


def tiny_vl(**text_overrides) -> Qwen25VLConfig:
    """Tiny Qwen2.5-VL: 2-layer decoder (hidden 48, 3 query / 1 KV heads of 16), 4-block ViT (3 heads of 12)."""
    text = qwen2_5.tiny(
        vocab_size=TINY_VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_heads=3,
        num_kv_heads=1,
        head_dim=16,
        mrope_section=(2, 3, 3),
        **text_overrides,
    )
    vision: Qwen25VisionConfig = dataclasses.replace(QWEN25_VISION_TINY, out_hidden_size=text.hidden_size)
    return Qwen25VLConfig(text=text, vision=vision, tokens=TINY_TOKENS)


def tiny(version: Version = "v2", *, slot_grid_thw: tuple[int, int, int] = (1, 6, 6), **overrides) -> NexusGenConfig:
    """Test-sized Nexus-Gen: tiny VL model, 9 slots from a 84x84 target by default (81 with grid (1, 18, 18))."""
    merge = QWEN25_VISION_TINY.spatial_merge_size
    n = math.prod(slot_grid_thw) // merge**2
    base = NexusGenConfig(vl=tiny_vl(), num_slots=n, slot_grid_thw=slot_grid_thw, max_length=2048,
                          input_max_pixels=112 * 112)
    return _with_version(base, version).replace(**overrides)


def bench(version: Version = "v2", **overrides) -> NexusGenConfig:
    """Benchmark size: the text decoder of ``qwen2_5.bench`` (hidden 512, 8 layers, 8/2 heads), tiny ViT, 81 slots."""
    text = qwen2_5.bench(vocab_size=32000)
    vision = dataclasses.replace(QWEN25_VISION_TINY, out_hidden_size=text.hidden_size)
    vl = Qwen25VLConfig(text=text, vision=vision, tokens=TINY_TOKENS)
    base = NexusGenConfig(vl=vl, max_length=4096, input_max_pixels=112 * 112)
    return _with_version(base, version).replace(**overrides)
