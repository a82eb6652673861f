"""UniPic-1 training objectives (unipic.md 4.1; upstream ``skywork_unipic_dev.py``), pure functions of the model.

* text-to-image: VAE-encode the target (no gradient), mask ``ceil(N r)`` tokens along random orders (r ~ normal(1,
  0.25) truncated to [0.7, 1]), MAR encoder over the visible tokens -> LLM bridge over [prompt ; visible ; buffers]
  -> MAR decoder -> hybrid diffusion loss (eps MSE + VLB) of the per-token head on the masked tokens only, every token
  repeated ``diffusion_batch_mul`` times with its own t and noise.
* image-to-text (understanding): VAE -> unmasked MAR encoder -> proj_in with the gradient into the visual features
  scaled by 0.1, embeddings at the ``<image>`` slots, next-token CE on the answer tokens (labels != -100).
* editing: the source image gives x_con (MAR decoder fill) and z_src (``<image>`` slots), both gradient-scaled by 0.1;
  the target is masked and reconstructed as in text-to-image, with x_con fed to the decoder.
* total = 0.01 * image2text + 1 * text2image + 1 * image_edit (:data:`LOSS_WEIGHTS`).

The static-shape MAR encoder / bridge (masked tokens excluded as attention keys) stands in for torch's token dropping
(numerically the same; see ``nexus_jax.models.unipic.mar`` and ``nexus_jax.unipic.bridge``). Dropout is off (the
released MAR config trains with attn/proj dropout 0.1; pass ``dropout_key`` support when it is needed). Prompts are
right-padded (``nexus_jax.unipic.prompts``); where the ``<image>`` ids sit in the sequence is the caller's choice
(upstream editing *training* puts them before the chat template, inference inside the user turn).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nexus_jax.diffusion.gaussian import diffusion_loss, training_schedule
from nexus_jax.diffusion.maskgit import training_mask
from nexus_jax.models.qwen2.masks import positions_from_mask
from nexus_jax.models.vae.kl16 import encode_tokens
from nexus_jax.nexus.loss import token_cross_entropy
from nexus_jax.unipic.bridge import bridge, prefill_context
from nexus_jax.unipic.understand import image_embeds, visual_features

LOSS_WEIGHTS: dict[str, float] = {"image2text": 0.01, "text2image": 1.0, "image_edit": 1.0}
VISUAL_GRAD_SCALE = 0.1
MASK_RATIO_MIN = 0.7


def scale_gradient(x: jax.Array, scale: float) -> jax.Array:
    """Identity forward (bit-exact), gradient multiplied by ``scale`` (upstream ``_ScaleGradient``)."""
    frozen = jax.lax.stop_gradient(x)
    return frozen + scale * (x - frozen)


@dataclasses.dataclass(frozen=True)
class Randomness:
    """The random draws of one generation loss: mask [B, N] (1 = masked), diffusion timesteps t [mul * B * N] and
    noise [mul * B * N, C] (row-major over (repeat, batch, token)). Built by :func:`draw` or given (tests)."""

    mask: jax.Array
    t: jax.Array
    noise: jax.Array


def draw(key: jax.Array, model: nnx.Module, batch: int, seq_len: int) -> Randomness:
    """Mask along random orders with one MAR ratio per batch, then t uniform over the training steps and noise."""
    k_mask, k_t, k_n = jax.random.split(key, 3)
    mask, _ = training_mask(k_mask, batch, seq_len, MASK_RATIO_MIN)
    cfg = model.config
    rows = cfg.diffusion.diffusion_batch_mul * batch * seq_len
    t = jax.random.randint(k_t, (rows,), 0, cfg.diffusion.num_timesteps)
    noise = jax.random.normal(k_n, (rows, cfg.mar.token_embed_dim), jnp.float32)
    return Randomness(mask, t, noise)


def generation_loss(model: nnx.Module, target: jax.Array, ctx_embeds: jax.Array, ctx_mask: jax.Array,
                    rnd: Randomness, x_con: jax.Array | None = None) -> jax.Array:
    """Diffusion loss of reconstructing masked target tokens [B, N, C] given a right-padded context ctx_embeds
    [B, Lc, D] / ctx_mask [B, Lc] (and the editing source's x_con [B, buffers + N, C_mar]). Scalar."""
    b, n, c = target.shape
    mar = model.mar
    if rnd.mask.shape != (b, n):
        raise ValueError(f"mask must be [{b}, {n}] like the target tokens, got {rnd.mask.shape}")
    side = int(round(n**0.5))
    grid = (side, side) if side * side == n else None
    visible = rnd.mask < 0.5
    x_enc = mar.forward_mae_encoder(target, rnd.mask, mar.fake_class_embedding(b), grid)
    prefix = prefill_context(model.llm, ctx_embeds, ctx_mask, x_enc.shape[1])
    x_enc = bridge(model.llm, model.project_in, model.project_out, x_enc, visible, prefix, ctx_mask)
    z = mar.forward_mae_decoder(x_enc, rnd.mask, grid, x_con)
    schedule = training_schedule(model.config.diffusion)
    return diffusion_loss(mar.diffloss, schedule, target.reshape(b * n, c), z.reshape(b * n, -1),
                          mask=rnd.mask.reshape(-1), batch_mul=model.config.diffusion.diffusion_batch_mul,
                          t=rnd.t, noise=rnd.noise)


def text_to_image_loss(model: nnx.Module, vae: nnx.Module, pixels: jax.Array, input_ids: jax.Array,
                       attention_mask: jax.Array, rnd: Randomness) -> jax.Array:
    """pixels [B, R, R, 3] in [-1, 1] (target images), right-padded prompt ids / mask [B, L]. Scalar."""
    target = jax.lax.stop_gradient(encode_tokens(vae, pixels))
    ctx = model.llm.model.embed_tokens(input_ids)
    return generation_loss(model, target, ctx, attention_mask, rnd)


def _source_features(model: nnx.Module, vae: nnx.Module, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
    x_con, z = visual_features(model, vae, jax.lax.stop_gradient(pixels))
    return scale_gradient(x_con, VISUAL_GRAD_SCALE), scale_gradient(z, VISUAL_GRAD_SCALE)


def image_to_text_loss(model: nnx.Module, vae: nnx.Module, pixels: jax.Array, input_ids: jax.Array,
                       attention_mask: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Understanding CE. pixels [B, R, R, 3], ids / mask / labels [B, L] (labels -100 except the answer tokens).
    Returns (mean CE over counted tokens, their count)."""
    _, z = _source_features(model, vae, pixels)
    embeds = image_embeds(model, input_ids, z, model.config.tokens.image)
    positions = positions_from_mask(attention_mask)
    out = model.llm(inputs_embeds=embeds, positions=positions, attention_mask=attention_mask)
    return token_cross_entropy(out.logits, labels, model.config.tokens.image)


def image_edit_loss(model: nnx.Module, vae: nnx.Module, source: jax.Array, target: jax.Array, input_ids: jax.Array,
                    attention_mask: jax.Array, rnd: Randomness) -> jax.Array:
    """Editing: source / target pixels [B, R, R, 3], prompt ids with the source's ``<image>`` slots. Scalar."""
    x_con, z_src = _source_features(model, vae, source)
    ctx = image_embeds(model, input_ids, z_src, model.config.tokens.image)
    tokens = jax.lax.stop_gradient(encode_tokens(vae, target))
    return generation_loss(model, tokens, ctx, attention_mask, rnd, x_con)


def unipic_loss(model: nnx.Module, vae: nnx.Module, batches: Mapping[str, Mapping[str, Any]], key: jax.Array | None,
                weights: Mapping[str, float] = LOSS_WEIGHTS, randomness: Mapping[str, Randomness] | None = None,
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted sum over the tasks present in ``batches``:

    * ``text2image``: pixels, input_ids, attention_mask
    * ``image2text``: pixels, input_ids, attention_mask, labels
    * ``image_edit``: source, target, input_ids, attention_mask

    ``randomness`` (per generation task) replaces the draws from ``key``. Returns (loss, unweighted per-task losses).
    """
    unknown = sorted(set(batches) - set(LOSS_WEIGHTS))
    if unknown or not batches:
        raise ValueError(f"tasks must be a non-empty subset of {sorted(LOSS_WEIGHTS)}, got {sorted(batches)}")
    randomness = dict(randomness or {})
    keys = dict(zip(sorted(LOSS_WEIGHTS), jax.random.split(key, 3))) if key is not None else {}

    def rnd_for(task: str, pixels: jax.Array) -> Randomness:
        if task in randomness:
            return randomness[task]
        if task not in keys:
            raise ValueError(f"{task}: pass a PRNG key or its Randomness")
        n = (pixels.shape[1] // vae.config.downsample_factor) * (pixels.shape[2] // vae.config.downsample_factor)
        return draw(keys[task], model, pixels.shape[0], n)

    metrics: dict[str, jax.Array] = {}
    if "text2image" in batches:
        b = batches["text2image"]
        metrics["text2image"] = text_to_image_loss(model, vae, b["pixels"], b["input_ids"], b["attention_mask"],
                                                   rnd_for("text2image", b["pixels"]))
    if "image2text" in batches:
        b = batches["image2text"]
        metrics["image2text"], metrics["image2text_tokens"] = image_to_text_loss(
            model, vae, b["pixels"], b["input_ids"], b["attention_mask"], b["labels"])
    if "image_edit" in batches:
        b = batches["image_edit"]
        metrics["image_edit"] = image_edit_loss(model, vae, b["source"], b["target"], b["input_ids"],
                                                b["attention_mask"], rnd_for("image_edit", b["target"]))
    total = sum(weights[k] * metrics[k] for k in LOSS_WEIGHTS if k in metrics)
    return total, metrics
