"""Qwen2.5-VL for conditional generation: the vision tower ``visual`` plus the Qwen2.5 text decoder.

Image features replace the ``<|image_pad|>`` embeddings in row-major (batch, position) order, like transformers'
``masked_scatter``, using a cumsum/gather so the merge is jit-friendly. Position ids are the 3-stream M-RoPE ids
from :func:`nexus_jax.processing.rope_index.get_rope_index` (computed on the host).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.qwen2_5_vl import Qwen25VLConfig
from nexus_jax import sharding
from nexus_jax.models.qwen2.cache import KVCache
from nexus_jax.models.qwen2.model import CausalLMOutput, Qwen2ForCausalLM
from nexus_jax.models.qwen2_5_vl.vision import Qwen25VisionTransformer
from nexus_jax.models.qwen2_5_vl.vision_layout import VisionLayout

VISION_INPUT_KEYS = (
    "patch_order", "positions", "frame_segments", "window_gather", "window_valid", "window_scatter", "merge_reverse",
)
OPTIONAL_VISION_KEYS = ("frame_gather", "frame_valid", "frame_scatter")


def merge_image_features(
    input_ids: jax.Array, inputs_embeds: jax.Array, features: jax.Array, image_token_id: int
) -> jax.Array:
    """Put ``features`` [M, hidden] (row k = k-th image token) into the image-token slots of inputs_embeds [B, L, H].

    Rows of ``features`` beyond the number of image tokens (bucket padding) are ignored. The caller must ensure the
    number of image tokens is at most M (checked on the host by :func:`check_image_token_count`).
    """
    is_image = input_ids == image_token_id
    order = jnp.cumsum(is_image.reshape(-1)) - 1
    rows = jnp.take(features, jnp.clip(order, 0, features.shape[0] - 1), axis=0).reshape(inputs_embeds.shape)
    return jnp.where(is_image[..., None], rows.astype(inputs_embeds.dtype), inputs_embeds)


def check_image_token_count(input_ids: np.ndarray, image_token_id: int, num_features: int) -> None:
    """Raise ValueError if the number of ``<|image_pad|>`` tokens differs from the number of image features."""
    count = int((np.asarray(input_ids) == image_token_id).sum())
    if count != num_features:
        raise ValueError(
            f"the prompts hold {count} <|image_pad|> tokens (id {image_token_id}) but the images give "
            f"{num_features} feature rows; expand each image placeholder to t*h*w/4 tokens of its grid_thw"
        )


class Qwen25VLForConditionalGeneration(nnx.Module):
    """``visual`` (Qwen2.5-VL ViT) + ``language_model`` (Qwen2ForCausalLM: ``model`` and ``lm_head``)."""

    def __init__(self, config: Qwen25VLConfig, *, rngs: nnx.Rngs):
        self.config = config
        text = config.text
        self.visual = Qwen25VisionTransformer(
            config.vision, param_dtype=text.jnp_param_dtype, dtype=text.jnp_dtype, rngs=rngs
        )
        self.language_model = Qwen2ForCausalLM(text, rngs=rngs)

    def image_features(self, pixel_values: jax.Array, vision_inputs: dict[str, jax.Array]) -> jax.Array:
        """pixel_values [Np, patch_dim] + layout arrays -> [Np / 4, hidden] (rows past the real count are padding)."""
        keys = VISION_INPUT_KEYS + tuple(k for k in OPTIONAL_VISION_KEYS if k in vision_inputs)
        return self.visual(pixel_values, **{k: vision_inputs[k] for k in keys})

    def embed(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        vision_inputs: dict[str, jax.Array] | None = None,
    ) -> jax.Array:
        """Token embeddings [B, L, hidden] with image features merged into the ``<|image_pad|>`` slots."""
        embeds = self.language_model.model.embed_tokens(input_ids)
        if pixel_values is None:
            return embeds
        if vision_inputs is None:
            raise ValueError("pixel_values given without the vision layout arrays (vision_inputs)")
        features = self.image_features(pixel_values, vision_inputs)
        merged = merge_image_features(input_ids, embeds, features, self.config.tokens.image_pad)
        return sharding.constrain(merged, ("batch", "length", "act_embed"))

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        pixel_values: jax.Array | None = None,
        vision_inputs: dict[str, jax.Array] | None = None,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        only_last_logits: bool = False,
    ) -> CausalLMOutput:
        """input_ids [B, L]; pixel_values [Np, patch_dim]; positions [3, B, L] (M-RoPE ids); attention_mask [B, L].

        Returns logits [B, L or 1, vocab] (fp32), final-normed hidden_states [B, L, hidden] and the cache.
        """
        embeds = self.embed(input_ids, pixel_values, vision_inputs)
        return self.language_model(
            inputs_embeds=embeds, positions=positions, attention_mask=attention_mask, cache=cache,
            only_last_logits=only_last_logits,
        )


def vision_inputs_from_layout(layout: VisionLayout, frame_groups: bool = False) -> dict[str, jax.Array]:
    """Layout numpy arrays -> device arrays keyed for :meth:`Qwen25VLForConditionalGeneration.image_features`."""
    return {k: jnp.asarray(v) for k, v in layout.arrays(frame_groups).items()}
