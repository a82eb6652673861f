"""UniPic-1 image understanding (unipic.md 3.3; upstream ``scripts/image2text.py``).

    image --pad to square with gray (127,127,127)--> --resize (bicubic) to R x R--> [-1, 1]
          --KL-16 VAE encode (posterior mean x 0.2325)--> tokens [B, N, 16]
          --MAR encoder, nothing masked--> x_con [B, buffers + N, C]
          --proj_in, buffers rotated to the end--> z [B, N + buffers, D]
    INSTR("<image>" * (N + buffers) + "\\n" + question): token embeddings, z rows at the <image> ids
          --Qwen2.5 prefill + greedy decode (tied lm_head)--> answer ids

Prompts are right-padded (``prompts.understanding_batch``); the prefill takes each row's first token from its last
real position and the decode loop (``nexus_jax.generation.decode``) continues every row from its true length, with
the padding slots invalid in the KV cache, so padding never changes an answer.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from nexus_jax.generation.generate import GenerationOutput, decode
from nexus_jax.models.qwen2.cache import init_cache_for
from nexus_jax.models.qwen2.masks import positions_from_mask
from nexus_jax.models.vae.kl16 import encode_tokens
from nexus_jax.nexus.slots import check_slot_count, scatter_rows
from nexus_jax.processing.image_processor import to_rgb_uint8
from nexus_jax.unipic import prompts

GRAY = 127


def pad_to_square(image: np.ndarray, fill: int = GRAY) -> np.ndarray:
    """uint8 [H, W, 3] -> [S, S, 3], S = max(H, W), the image centred on ``fill`` (upstream ``expand2square``:
    offset ``(S - short side) // 2``)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    h, w = image.shape[:2]
    if h == w:
        return image
    s = max(h, w)
    out = np.full((s, s, 3), fill, image.dtype)
    top, left = (s - h) // 2, (s - w) // 2
    out[top : top + h, left : left + w] = image
    return out


def center_crop_square(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> the centred S x S crop, S = min(H, W) (upstream editing ``crop2square``)."""
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return image[top : top + s, left : left + s]


def preprocess_image(image: np.ndarray | str, resolution: int, square: str = "pad") -> np.ndarray:
    """An RGB uint8 array or an image path -> float32 [R, R, 3] in [-1, 1]: made square (``"pad"``: gray padding
    as understanding does; ``"crop"``: centre crop as editing does), bicubic resize, ``2 x / 255 - 1``."""
    rgb = to_rgb_uint8(image) if isinstance(image, str) else np.asarray(image)
    if rgb.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image, got dtype {rgb.dtype}")
    if square not in ("pad", "crop"):
        raise ValueError(f"square must be 'pad' or 'crop', got {square!r}")
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {rgb.shape}")
    square_img = Image.fromarray(pad_to_square(rgb) if square == "pad" else center_crop_square(rgb))
    resized = np.asarray(square_img.resize((resolution, resolution), Image.Resampling.BICUBIC), np.float32)
    return 2.0 * (resized / 255.0) - 1.0


def visual_features(model: nnx.Module, vae: nnx.Module, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Upstream ``extract_visual_feature``: pixels [B, R, R, 3] in [-1, 1] -> (x_con [B, buffers + N, C] = unmasked
    MAR-encoder output, z [B, N + buffers, D] = proj_in(x_con) with the buffer rows moved to the end)."""
    tokens = encode_tokens(vae, pixels)
    side = pixels.shape[1] // vae.config.downsample_factor
    x_con = model.mar.mar_encoder_unmasked(tokens, (side, side))
    z = model.project_in(x_con)
    nb = model.mar.cfg.buffer_size
    return x_con, jnp.concatenate([z[:, nb:], z[:, :nb]], axis=1)


def image_embeds(model: nnx.Module, input_ids: jax.Array, image_rows: jax.Array, image_id: int) -> jax.Array:
    """Token embeddings of input_ids [B, L] with the ``<image>`` ids replaced, in order, by image_rows
    [B, K, D] (each row must hold exactly K image ids) -> [B, L, D]."""
    is_image = input_ids == image_id
    check_slot_count(is_image, image_rows.shape[0] * image_rows.shape[1], "<image> slots")
    text = model.llm.model.embed_tokens(jnp.where(is_image, 0, input_ids))
    rows = scatter_rows(image_rows.reshape(-1, image_rows.shape[-1]).astype(text.dtype), is_image)
    return jnp.where(is_image[..., None], rows, text)


@functools.partial(jax.jit, static_argnames=("graphdef", "vae_graphdef", "capacity"))
def understanding_prefill(graphdef, state, vae_graphdef, vae_state, pixels, input_ids, attention_mask, *,
                          capacity: int):
    """Images (or None: text only) + right-padded prompts into a fresh KV cache. Returns (greedy first token [B],
    cache, next position [B] = each row's true length)."""
    model = nnx.merge(graphdef, state)
    if pixels is None:
        embeds = model.llm.model.embed_tokens(input_ids)
    else:
        _, z = visual_features(model, nnx.merge(vae_graphdef, vae_state), pixels)
        embeds = image_embeds(model, input_ids, z, model.config.tokens.image)
    lengths = attention_mask.astype(jnp.int32).sum(-1)
    positions = positions_from_mask(attention_mask)
    cache = init_cache_for(model.llm.config, input_ids.shape[0], capacity)
    hidden, cache = model.llm.model(inputs_embeds=embeds, positions=positions, attention_mask=attention_mask,
                                    cache=cache)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    first = jnp.argmax(model.llm.logits(last), axis=-1).astype(jnp.int32)
    return first, cache, lengths


def answer_ids(model: nnx.Module, vae: nnx.Module, pixels: jax.Array | np.ndarray | None,
               batch: prompts.PromptBatch, *, max_new_tokens: int) -> GenerationOutput:
    """Greedy answers for pixels [B, R, R, 3] (one image per row; None: text-only prompts) and their right-padded
    prompts. Returns tokens [B, max_new_tokens] (pad after the stop id) and num_generated [B] (stop id included)."""
    tok = model.config.tokens
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if pixels is None:
        prompts.image_slots(batch.input_ids, tok, 0)  # raises if a row has <image> ids
    else:
        pixels = jnp.asarray(pixels, jnp.float32)
        if pixels.ndim != 4 or pixels.shape[0] != batch.input_ids.shape[0] or pixels.shape[1] != pixels.shape[2]:
            raise ValueError(f"pixels must be [B={batch.input_ids.shape[0]}, R, R, 3] (square), got {pixels.shape}")
        per_row = (pixels.shape[1] // vae.config.downsample_factor) ** 2 + model.mar.cfg.buffer_size
        prompts.image_slots(batch.input_ids, tok, per_row)  # raises unless every row has per_row <image> ids
    capacity = batch.input_ids.shape[1] + max_new_tokens
    graphdef, state = nnx.split(model)
    vae_graphdef, vae_state = nnx.split(vae)
    first, cache, position = understanding_prefill(
        graphdef, state, vae_graphdef, vae_state, pixels, jnp.asarray(batch.input_ids),
        jnp.asarray(batch.attention_mask), capacity=capacity)
    lm_graph, lm_state = nnx.split(model.llm)
    return decode(lm_graph, lm_state, cache, first, position, jax.random.key(0), jnp.float32(0.0), jnp.float32(1.0),
                  max_new_tokens=max_new_tokens, eos_token_ids=(tok.im_end, tok.endoftext), pad_token_id=tok.pad)


def understand(model: nnx.Module, vae: nnx.Module, images: Sequence[np.ndarray | str] | None, questions: Sequence[str],
               encode: prompts.Encode, *, max_new_tokens: int = 64, resolution: int | None = None) -> list[list[int]]:
    """One answer (ids without the stop id) per (image, question) pair, at ``resolution`` (default: the config's);
    ``images=None``: text-only questions."""
    cfg = model.config
    if images is None:
        ids = [prompts.encode_instruction(q, encode, cfg.tokens) for q in questions]
        pixels, batch = None, prompts.right_pad(ids, cfg.tokens.pad)
    else:
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        res = resolution or cfg.resolution
        if res % vae.config.downsample_factor:
            raise ValueError(f"resolution {res} must be a multiple of the VAE stride {vae.config.downsample_factor}")
        pixels = np.stack([preprocess_image(im, res) for im in images])
        k = (res // vae.config.downsample_factor) ** 2 + cfg.mar.buffer_size
        batch = prompts.understanding_batch(list(questions), encode, cfg.tokens, k)
    out = answer_ids(model, vae, pixels, batch, max_new_tokens=max_new_tokens)
    tokens, counts = np.asarray(out.tokens), np.asarray(out.num_generated)
    stops = {cfg.tokens.im_end, cfg.tokens.endoftext}
    return [[int(t) for t in tokens[i, : counts[i]] if int(t) not in stops] for i in range(len(questions))]
