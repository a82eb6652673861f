"""Typed configs for the Qwen2.5-VL vision tower and the full vision-language model (full-size and tiny presets)."""

from __future__ import annotations

import dataclasses
from typing import Any

from configs.qwen2_5 import ATTENTION_IMPLS

# Qwen2.5-VL special token ids (Qwen2 tokenizer).
ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
VISION_START_ID = 151652
VISION_END_ID = 151653
VISION_PAD_ID = 151654
IMAGE_PAD_ID = 151655
VIDEO_PAD_ID = 151656

IMAGE_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class Qwen25VisionConfig:
    """Qwen2.5-VL ViT: patch embed, `depth` RMSNorm/SwiGLU blocks (window attention except `fullatt_block_indexes`),
    2-D rotary, and a 2x2 patch merger to `out_hidden_size`."""

    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    out_hidden_size: int = 3584
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    attention_impl: str = "auto"  # one of configs.qwen2_5.ATTENTION_IMPLS (auto = splash on TPU, else jax_nn)

    def __post_init__(self):
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim {self.head_dim} must be divisible by 4 for the 2-D rotary embedding")
        if self.window_size % (self.patch_size * self.spatial_merge_size):
            raise ValueError(
                f"window_size {self.window_size} must be a multiple of patch_size*spatial_merge_size "
                f"= {self.patch_size * self.spatial_merge_size}"
            )
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"fullatt_block_indexes {bad} outside [0, depth={self.depth})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch vector: C * T * P * P (1176 at full size)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        """Patches per merged token (4)."""
        return self.spatial_merge_size**2

    @property
    def merged_window(self) -> int:
        """Window side in merged-token units (112 / 14 / 2 = 4)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    def to_hf_dict(self) -> dict[str, Any]:
        """Keyword arguments for transformers' ``Qwen2_5_VLVisionConfig``."""
        return dict(
            depth=self.depth,
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            in_channels=self.in_channels,
            patch_size=self.patch_size,
            temporal_patch_size=self.temporal_patch_size,
            spatial_merge_size=self.spatial_merge_size,
            window_size=self.window_size,
            fullatt_block_indexes=list(self.fullatt_block_indexes),
            out_hidden_size=self.out_hidden_size,
            hidden_act="silu",
        )


QWEN25_VISION_7B = Qwen25VisionConfig()

# Tiny: head_dim 12 (odd head count 3), window 56 px = 2x2 merged tokens, so a 112x168 image has 6 windows.
QWEN25_VISION_TINY = Qwen25VisionConfig(
    depth=4,
    hidden_size=36,
    num_heads=3,
    intermediate_size=52,
    window_size=56,
    fullatt_block_indexes=(1, 3),
    out_hidden_size=48,
)


@dataclasses.dataclass(frozen=True)
class Qwen25VLTokens:
    """Special token ids used by the VL model and the chat template."""

    image_pad: int = IMAGE_PAD_ID
    video_pad: int = VIDEO_PAD_ID
    vision_start: int = VISION_START_ID
    vision_end: int = VISION_END_ID
    vision_pad: int = VISION_PAD_ID
    im_start: int = IM_START_ID
    im_end: int = IM_END_ID
    endoftext: int = ENDOFTEXT_ID


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
    """Qwen2.5-VL: a Qwen2.5 text decoder (``text``, a configs.qwen2_5 config) plus the vision tower."""

    text: Any
    vision: Qwen25VisionConfig = QWEN25_VISION_7B
    tokens: Qwen25VLTokens = Qwen25VLTokens()
    tokens_per_second: int = 2

    def __post_init__(self):
        hidden = getattr(self.text, "hidden_size", None)
        if hidden is not None and hidden != self.vision.out_hidden_size:
            raise ValueError(
                f"vision out_hidden_size {self.vision.out_hidden_size} must equal the text hidden_size {hidden}"
            )


# Tiny special-token ids that fit the tiny text vocabulary (384).
TINY_TOKENS = Qwen25VLTokens(
    endoftext=370, im_start=371, im_end=372, vision_start=373, vision_end=374, vision_pad=375, image_pad=376,
    video_pad=377,
)


def qwen2_5_vl_7b() -> Qwen25VLConfig:
    """Qwen2.5-VL-7B (Nexus-Gen's AR backbone): 28-layer text decoder + 32-block ViT."""
    from configs.qwen2_5 import qwen2_5_vl_7b as text_7b

    return Qwen25VLConfig(text=text_7b(), vision=QWEN25_VISION_7B)


def tiny() -> Qwen25VLConfig:
    """Test size: the tiny text decoder (hidden 144, 9/3 heads) + the tiny ViT projecting to 144."""
    from configs.qwen2_5 import tiny as text_tiny

    text = text_tiny()
    vision = dataclasses.replace(QWEN25_VISION_TINY, out_hidden_size=text.hidden_size)
    return Qwen25VLConfig(text=text, vision=vision, tokens=TINY_TOKENS)
