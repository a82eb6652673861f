"""Image understanding with Qwen2.5-VL: chat messages with images in, generated text out (batched).

Host side: render the chat template, preprocess images, expand ``<|image_pad|>``, tokenise, left-pad, compute the
M-RoPE ids and the ViT window layout (bucketed so jit shapes repeat). Device side: one jitted prefill (ViT + merge +
text decoder into a fixed-size KV cache) followed by the text decoder's jitted ``while_loop`` decode.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nexus_jax.generation.generate import GenerationConfig, GenerationOutput, _validate, decode, next_positions
from nexus_jax.generation.sampling import sample_next
from nexus_jax.models.qwen2.cache import init_cache_for
from nexus_jax.models.qwen2_5_vl.model import Qwen25VLForConditionalGeneration, check_image_token_count
from nexus_jax.models.qwen2_5_vl.vision import pad_pixels
from nexus_jax.models.qwen2_5_vl.vision_layout import vision_layout
from nexus_jax.processing.chat import Message, encode_text, expand_image_pads, left_pad, render_chat
from nexus_jax.processing.image_processor import Qwen2VLImageProcessor
from nexus_jax.processing.rope_index import get_rope_index


@dataclasses.dataclass(frozen=True)
class PreparedBatch:
    """Model inputs for a batch: input_ids / attention_mask [B, L], positions [3, B, L], and (if any image)
    pixel_values [Np, patch_dim] plus the ViT layout arrays ``vision_inputs``."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    positions: np.ndarray
    pixel_values: np.ndarray | None
    vision_inputs: dict[str, np.ndarray] | None


@functools.partial(jax.jit, static_argnames=("graphdef", "capacity"))
def vl_prefill(graphdef, state, input_ids, attention_mask, positions, pixel_values, vision_inputs, key, temperature,
               top_p, *, capacity: int):
    """ViT + merge + prompt into a fresh cache. Returns (first token [B], cache, next positions [B])."""
    model = nnx.merge(graphdef, state)
    cache = init_cache_for(model.config.text, input_ids.shape[0], capacity)
    out = model(
        input_ids, pixel_values=pixel_values, vision_inputs=vision_inputs, positions=positions,
        attention_mask=attention_mask, cache=cache, only_last_logits=True,
    )
    token = sample_next(out.logits[:, 0], key, temperature, top_p)
    return token, out.cache, next_positions(positions, attention_mask)


class UnderstandingPipeline:
    """``pipeline(conversations) -> list[str]``; one conversation is a list of chat messages (see processing.chat).

    ``pad_length_to`` and the ``pad_*_to`` vision multiples (see ``vision_layout``) bucket the prompt length and the
    ViT shapes so that batches of similar size reuse one compiled prefill.
    """

    def __init__(
        self,
        model: Qwen25VLForConditionalGeneration,
        tokenizer: Any,
        processor: Qwen2VLImageProcessor | None = None,
        *,
        pad_length_to: int = 64,
        pad_patches_to: int = 256,
        pad_windows_to: int = 8,
        pad_frames_to: int = 4,
        pad_frame_slots_to: int = 256,
    ):
        self.model, self.tokenizer = model, tokenizer
        vision = model.config.vision
        self.processor = processor or Qwen2VLImageProcessor(
            patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
            merge_size=vision.spatial_merge_size,
        )
        if self.processor.patch_size != vision.patch_size or self.processor.merge_size != vision.spatial_merge_size:
            raise ValueError(
                f"processor patch/merge {self.processor.patch_size}/{self.processor.merge_size} do not match the "
                f"vision tower's {vision.patch_size}/{vision.spatial_merge_size}"
            )
        self.pad_length_to = pad_length_to
        self.vision_buckets = dict(
            pad_patches_to=pad_patches_to, pad_windows_to=pad_windows_to, pad_frames_to=pad_frames_to,
            pad_frame_slots_to=pad_frame_slots_to,
        )

    def prepare(self, conversations: Sequence[Sequence[Message]]) -> PreparedBatch:
        """Host-side preprocessing of a batch of conversations (see :class:`PreparedBatch`)."""
        if not conversations:
            raise ValueError("no conversations given")
        tokens = self.model.config.tokens
        sequences, all_images = [], []
        for messages in conversations:
            text, images = render_chat(messages)
            processed = [self.processor.preprocess_one(img) for img in images]
            counts = [int(np.prod(grid)) // self.processor.merge_size**2 for _, grid in processed]
            sequences.append(encode_text(self.tokenizer, expand_image_pads(text, counts)))
            all_images.extend(processed)
        batch = left_pad(sequences, tokens.endoftext, self.pad_length_to)
        grids = np.stack([g for _, g in all_images]) if all_images else None
        positions, _ = get_rope_index(
            batch.input_ids, grids, batch.attention_mask, image_token_id=tokens.image_pad,
            spatial_merge_size=self.processor.merge_size,
        )
        if not all_images:
            check_image_token_count(batch.input_ids, tokens.image_pad, 0)
            return PreparedBatch(batch.input_ids, batch.attention_mask, positions, None, None)
        layout = vision_layout(grids, self.model.config.vision, **self.vision_buckets)
        check_image_token_count(batch.input_ids, tokens.image_pad, layout.num_merged)
        pixels = np.asarray(pad_pixels(np.concatenate([p for p, _ in all_images]), layout))
        return PreparedBatch(batch.input_ids, batch.attention_mask, positions, pixels, layout.arrays(frame_groups=True))

    def generate_ids(
        self, prepared: PreparedBatch, config: GenerationConfig, rng: jax.Array | None = None
    ) -> GenerationOutput:
        """Token ids [B, max_new_tokens] for a prepared batch."""
        capacity = _validate(self.model.language_model, prepared.input_ids, prepared.attention_mask, config)
        rng = jax.random.key(0) if rng is None else rng
        key_prefill, key_decode = jax.random.split(rng)
        temperature, top_p = jnp.float32(config.temperature), jnp.float32(config.top_p)
        graphdef, state = nnx.split(self.model)
        vision = None if prepared.vision_inputs is None else {k: jnp.asarray(v) for k, v in
                                                              prepared.vision_inputs.items()}
        pixels = None if prepared.pixel_values is None else jnp.asarray(prepared.pixel_values)
        first, cache, position = vl_prefill(
            graphdef, state, jnp.asarray(prepared.input_ids), jnp.asarray(prepared.attention_mask),
            jnp.asarray(prepared.positions, jnp.int32), pixels, vision, key_prefill, temperature, top_p,
            capacity=capacity,
        )
        lm_graphdef, lm_state = nnx.split(self.model.language_model)
        return decode(
            lm_graphdef, lm_state, cache, first, position, key_decode, temperature, top_p,
            max_new_tokens=config.max_new_tokens, eos_token_ids=tuple(config.eos_token_ids),
            pad_token_id=config.pad_token_id,
        )

    def default_generation_config(self, max_new_tokens: int = 128) -> GenerationConfig:
        """Greedy, stopping at <|im_end|> or <|endoftext|>."""
        tok = self.model.config.tokens
        return GenerationConfig(
            max_new_tokens=max_new_tokens, eos_token_ids=(tok.im_end, tok.endoftext), pad_token_id=tok.endoftext
        )

    def __call__(
        self, conversations: Sequence[Sequence[Message]], *, config: GenerationConfig | None = None
    ) -> list[str]:
        """Answer each conversation; returns the decoded assistant replies (special tokens removed)."""
        config = config or self.default_generation_config()
        out = self.generate_ids(self.prepare(conversations), config)
        tokens, counts = np.asarray(out.tokens), np.asarray(out.num_generated)
        stop = set(config.eos_token_ids)
        replies = []
        for row, n in zip(tokens, counts):
            ids = [int(t) for t in row[:n] if int(t) not in stop]
            replies.append(self.tokenizer.decode(ids, skip_special_tokens=True))
        return replies
