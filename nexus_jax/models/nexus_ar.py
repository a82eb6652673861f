"""Nexus-Gen autoregressive model: Qwen2.5-VL (ViT + text decoder) + ``vision_head`` + V2 ``image_prefill_embeds``.

Module tree (checkpoint names in brackets, transformers 4.49 layout):

* ``visual``: the Qwen2.5-VL ViT [``visual.*``], frozen in the released recipe;
* ``language_model``: ``Qwen2ForCausalLM`` [``model.*`` and ``lm_head``]
  (both built by :class:`~nexus_jax.models.qwen2_5_vl.model.Qwen25VLForConditionalGeneration`, the base class);
* ``vision_head``: Linear(hidden -> hidden, no bias) [``vision_head.weight``, stored here as kernel [in, out]];
* ``image_prefill_embeds``: Param [num_slots, hidden], axes ("slots", "embed") [``image_prefill_embeds.weight``];
  V2 only (None for V1, whose slots keep the ``<|image_pad|>`` token embedding).

The forward takes token ids, M-RoPE positions [3, B, L], a padding mask, ``slot_index`` [B, L] (k for the k-th slot of
an output image, -1 elsewhere) and optionally ViT features for the input images (placed at the ``<|image_pad|>``
tokens that are not output slots). It returns logits and ``vision_head`` embeddings for every position.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from configs.nexus_gen import NexusGenConfig
from nexus_jax import layers, sharding
from nexus_jax.models.qwen2 import KVCache, check_token_ids
from nexus_jax.models.qwen2_5_vl.model import Qwen25VLForConditionalGeneration
from nexus_jax.models.rows import check_slot_count, scatter_rows

HIDDEN_AXES = ("batch", "length", "act_embed")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NexusOutput:
    """logits [B, L, V] float32 (None when not requested), image_embeds [B, L, hidden] (vision_head outputs),
    hidden_states [B, L, hidden] (after the final norm), cache (None without one)."""

    logits: jax.Array | None
    image_embeds: jax.Array
    hidden_states: jax.Array
    cache: KVCache | None


class NexusGenAR(Qwen25VLForConditionalGeneration):
    """The Nexus-Gen AR model: the Qwen2.5-VL model (``visual``, ``language_model``) plus the Nexus-Gen heads."""

    def __init__(self, config: NexusGenConfig, *, rngs: nnx.Rngs):
        super().__init__(config.vl, rngs=rngs)
        self.config = config
        text = config.vl.text
        self.vision_head = layers.Linear(
            text.hidden_size, text.hidden_size, axes=("embed", "mlp"), use_bias=False,
            param_dtype=text.jnp_param_dtype, dtype=text.jnp_dtype, rngs=rngs,
        )
        self.image_prefill_embeds = (
            layers.make_param(
                rngs, nnx.initializers.normal(0.02), (config.num_slots, text.hidden_size), ("slots", "embed"),
                text.jnp_param_dtype,
            )
            if config.uses_prefill_embeds
            else None
        )

    def encode_images(self, pixel_values: jax.Array, layout: dict[str, jax.Array], num_merged: int) -> jax.Array:
        """Frozen-ViT merged features. pixel_values [Np, patch_dim] padded to ``layout`` -> [num_merged, hidden]."""
        return self.image_features(pixel_values, layout)[:num_merged]

    def embed_inputs(
        self,
        input_ids: jax.Array,
        slot_index: jax.Array,
        input_features: jax.Array | None = None,
        input_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Input embeddings [B, L, hidden]: token embeddings; V2 prefill rows at output slots; ViT features at
        input-image slots (``input_features`` [T, hidden] row-major into ``input_mask`` [B, L], or [B, R, hidden]
        per example)."""
        check_token_ids(input_ids, self.config.vl.text.vocab_size)
        embeds = self.language_model.model.embed_tokens(input_ids)
        if self.image_prefill_embeds is not None:
            n = self.config.num_slots
            if not isinstance(slot_index, jax.core.Tracer) and int(jnp.max(slot_index)) >= n:
                raise ValueError(f"slot index {int(jnp.max(slot_index))} is outside the {n} prefill embeddings")
            rows = jnp.take(self.image_prefill_embeds[...], jnp.clip(slot_index, 0, n - 1), axis=0)
            embeds = jnp.where((slot_index >= 0)[..., None], rows.astype(embeds.dtype), embeds)
        if input_features is not None:
            if input_mask is None:
                raise ValueError("input_features need input_mask (the input-image <|image_pad|> positions)")
            per_example = input_features.ndim == 3
            check_slot_count(input_mask, input_features.shape[-2 if per_example else 0], "input images", per_example)
            feats = scatter_rows(input_features.astype(embeds.dtype), input_mask)
            embeds = jnp.where(input_mask[..., None], feats, embeds)
        return sharding.constrain(embeds, HIDDEN_AXES)

    def head(self, hidden: jax.Array) -> jax.Array:
        """vision_head: hidden [..., hidden] -> predicted image embeddings [..., hidden]."""
        out = self.vision_head(hidden)
        return sharding.constrain(out, HIDDEN_AXES) if out.ndim == 3 else out

    def __call__(  # type: ignore[override]  # Nexus inputs: slot indices and precomputed input-image features
        self,
        input_ids: jax.Array,
        *,
        positions: jax.Array,
        slot_index: jax.Array,
        attention_mask: jax.Array | None = None,
        input_features: jax.Array | None = None,
        input_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        with_logits: bool = True,
    ) -> NexusOutput:
        """input_ids / slot_index [B, L] int, positions [3, B, L], attention_mask [B, L] (1 = token).

        Returns :class:`NexusOutput` with logits (unless ``with_logits=False``) and vision_head embeddings.
        """
        embeds = self.embed_inputs(input_ids, slot_index, input_features, input_mask)
        hidden, cache = self.language_model.model(
            inputs_embeds=embeds, positions=positions, attention_mask=attention_mask, cache=cache
        )
        logits = self.language_model.logits(hidden) if with_logits else None
        return NexusOutput(logits, self.head(hidden), hidden, cache)
