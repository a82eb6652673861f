"""Image-embedding generation by prefilled autoregression: all N slots in one parallel causal forward pass.

The slot inputs (V1: the ``<|image_pad|>`` embedding, V2: ``image_prefill_embeds[k]``) never depend on earlier
outputs, so the token-by-token loop of the reference implementation equals one forward pass over
``prompt <|vision_start|> slot_0 .. slot_{N-1}``: the ``vision_head`` output at ``<|vision_start|>`` is embedding 0
and the output at slot k is embedding k + 1. :func:`fill_slots_sequential` runs that loop with a KV cache (one slot
per step) as the reference and the benchmark baseline.

Batches are left-padded and every row ends with its N slots, so the predictions are the static slice
``[L - N - 1, L - 1)`` of every row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.nexus_gen import NexusGenConfig
from nexus_jax.models.nexus_ar import NexusGenAR
from nexus_jax.models.qwen2 import KVCache, init_cache_for
from nexus_jax.nexus import templates
from nexus_jax.nexus.batch import NexusBatch, Sample, make_batch


def generation_samples(prompts: Sequence[str], language: templates.Language = "en") -> list[Sample]:
    """Text-to-image requests (the answer text the model was trained with precedes the slots)."""
    return [Sample(templates.generation_messages(p, language)) for p in prompts]


def editing_samples(
    instructions: Sequence[str], images: Sequence[object], language: templates.Language = "en"
) -> list[Sample]:
    """Edit requests: each instruction with its source image (smart-resized, e.g. 512x512 -> 504x504 = 324 tokens)."""
    if len(instructions) != len(images):
        raise ValueError(f"{len(instructions)} edit instructions but {len(images)} source images")
    return [Sample(templates.editing_messages(t, language), input_images=[im]) for t, im in zip(instructions, images)]


def slot_batch(
    samples: Sequence[Sample], encode: templates.Encode, model_or_cfg: NexusGenAR | NexusGenConfig, **kwargs
) -> NexusBatch:
    """Batch for :func:`fill_slots`: each sequence stops after the N slots of its first output image."""
    cfg = getattr(model_or_cfg, "config", model_or_cfg)
    return make_batch(samples, encode, cfg, training=False, stop_after_slots=True, **kwargs)


def _check_slot_layout(batch: NexusBatch, n: int) -> None:
    tail = batch.slot_index[:, -n:]
    if batch.slot_index.shape[1] < n + 1 or not np.all(tail == np.arange(n)):
        raise ValueError(f"every row must end with its {n} image slots (build the batch with slot_batch)")
    if np.any(batch.slot_index[:, : -n] >= 0):
        raise ValueError("a row holds more than one output image; fill_slots fills exactly one per row")


def _input_features(model: NexusGenAR, batch: NexusBatch) -> jax.Array | None:
    """Frozen-ViT features of the batch's input images [num_merged, hidden], or None."""
    if batch.inputs is None:
        return None
    graphdef, state = nnx.split(model)
    layout = {k: jnp.asarray(v) for k, v in batch.inputs.arrays().items()}
    return _encode_for(graphdef, batch.inputs.num_merged)(state, jnp.asarray(batch.inputs.pixels), layout)


@lru_cache(maxsize=8)
def _encode_for(graphdef, num_merged: int) -> Callable:
    return jax.jit(lambda state, px, layout: nnx.merge(graphdef, state).encode_images(px, layout, num_merged))


def _parallel(model: NexusGenAR, ids, positions, slot_index, mask, feats, input_mask) -> jax.Array:
    n = model.config.num_slots
    embeds = model.embed_inputs(ids, slot_index, feats, input_mask if feats is not None else None)
    hidden, _ = model.language_model.model(inputs_embeds=embeds, positions=positions, attention_mask=mask)
    return model.head(hidden[:, -n - 1 : -1])


@lru_cache(maxsize=8)
def _parallel_for(graphdef) -> Callable:
    """Jitted :func:`_parallel` for one model structure (functional: state in, embeddings out)."""
    return jax.jit(lambda state, *args: _parallel(nnx.merge(graphdef, state), *args))


def fill_slots(model: NexusGenAR, batch: NexusBatch, *, jit: bool = True) -> jax.Array:
    """One parallel forward pass -> predicted image embeddings [B, N, hidden] (N = ``num_slots``)."""
    _check_slot_layout(batch, model.config.num_slots)
    args = (
        jnp.asarray(batch.input_ids), jnp.asarray(batch.positions), jnp.asarray(batch.slot_index),
        jnp.asarray(batch.attention_mask), _input_features(model, batch), jnp.asarray(batch.input_mask),
    )
    if not jit:
        return _parallel(model, *args)
    graphdef, state = nnx.split(model)
    return _parallel_for(graphdef)(state, *args)


def _step(graphdef, keep, state, cache, ids, positions, slot_index, mask, feats, input_mask):
    model = nnx.merge(graphdef, state)
    embeds = model.embed_inputs(ids, slot_index, feats, input_mask if feats is not None else None)
    hidden, cache = model.language_model.model(
        inputs_embeds=embeds, positions=positions, attention_mask=mask, cache=cache
    )
    return (model.head(hidden[:, -keep:]) if keep else None), cache


@lru_cache(maxsize=16)
def _step_for(graphdef, keep: int) -> Callable:
    """Jitted cached forward returning vision_head outputs of the last ``keep`` positions (0: none), one per model
    structure (the graphdef is closed over, not hashed on every call). The cache argument is donated."""
    return jax.jit(partial(_step, graphdef, keep), donate_argnums=(1,))


class SlotFiller:
    """Cached slot filling for a batch from :func:`slot_batch`.

    ``prompt_cache()`` runs the prompt (everything before ``<|vision_start|>``) into a fixed-size KV cache, as a
    decoding loop would have it when the model emits ``<|vision_start|>``. From there ``parallel(cache)`` fills all
    N slots with one N-token forward (``<|vision_start|>``, slot_0 .. slot_{N-2}) and ``sequential(cache)`` with N
    single-token steps (the reference implementation's loop). Both return [B, N, hidden] and consume the cache.
    """

    def __init__(self, model: NexusGenAR, batch: NexusBatch):
        self.n = model.config.num_slots
        _check_slot_layout(batch, self.n)
        self.text_config = model.config.vl.text
        self.graphdef, self.state = nnx.split(model)
        self.batch_size, self.length = batch.input_ids.shape
        self.start = self.length - self.n - 1  # column of <|vision_start|>
        self.ids, self.pos = jnp.asarray(batch.input_ids), jnp.asarray(batch.positions)
        self.slots, self.mask = jnp.asarray(batch.slot_index), jnp.asarray(batch.attention_mask)
        self.feats = _input_features(model, batch)
        self.input_mask = jnp.asarray(batch.input_mask)
        self._steps: list | None = None

    def _run(self, keep: int, cache, cols: slice, with_images: bool = False):
        feats = self.feats if with_images else None
        in_mask = self.input_mask[:, cols] if with_images else None
        return _step_for(self.graphdef, keep)(
            self.state, cache, self.ids[:, cols], self.pos[:, :, cols], self.slots[:, cols], self.mask[:, cols],
            feats, in_mask,
        )

    def prompt_cache(self) -> KVCache:
        """KV cache (capacity L) holding the prompt before ``<|vision_start|>``."""
        cache = init_cache_for(self.text_config, self.batch_size, self.length)
        return self._run(0, cache, slice(0, self.start), with_images=True)[1]

    def parallel(self, cache: KVCache) -> jax.Array:
        """One forward of the N slot-phase tokens on top of ``cache`` -> [B, N, hidden]."""
        return self._run(self.n, cache, slice(self.start, self.length - 1))[0]

    def sequential(self, cache: KVCache) -> jax.Array:
        """N single-token forwards (``<|vision_start|>``, then one slot per step) -> [B, N, hidden]."""
        if self._steps is None:  # per-step inputs sliced once, so the loop does nothing but the forwards
            cols = [slice(t, t + 1) for t in range(self.start, self.length - 1)]
            self._steps = [(self.ids[:, c], self.pos[:, :, c], self.slots[:, c], self.mask[:, c]) for c in cols]
        step = _step_for(self.graphdef, 1)
        outs = []
        for ids, pos, slots, mask in self._steps:
            out, cache = step(self.state, cache, ids, pos, slots, mask, None, None)
            outs.append(out[:, 0])
        return jnp.stack(outs, axis=1)


def fill_slots_sequential(model: NexusGenAR, batch: NexusBatch) -> jax.Array:
    """Reference path: prompt into a KV cache, then N single-slot steps. Same result as :func:`fill_slots`."""
    filler = SlotFiller(model, batch)
    return filler.sequential(filler.prompt_cache())


def slot_phase_inputs(cfg: NexusGenConfig, next_position: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs of the slot phase for rows whose next text position is ``next_position`` [B].

    Tokens: ``<|vision_start|>`` then N - 1 slots. Positions [3, B, N]: the start token sits at the text position
    ``p`` on all three streams; slot k at (s, s + row_k, s + col_k) with s = p + 1 on the merged slot grid (as
    ``get_rope_index`` places an image). Returns (ids [B, N], positions [3, B, N], slot_index [B, N]).
    """
    p = np.asarray(next_position, np.int64).reshape(-1, 1)
    n = cfg.num_slots
    rows, cols = cfg.merged_slot_grid
    r, c = np.divmod(np.arange(n - 1), cols)
    start = p + 1
    pos = np.stack([np.broadcast_to(start, (p.shape[0], n - 1)), start + r, start + c])
    pos = np.concatenate([np.broadcast_to(p[None], (3, p.shape[0], 1)), pos], axis=2)
    ids = np.full((p.shape[0], n), cfg.tokens.image_pad, np.int32)
    ids[:, 0] = cfg.tokens.vision_start
    slots = np.concatenate([np.full((p.shape[0], 1), -1), np.broadcast_to(np.arange(n - 1), (p.shape[0], n - 1))], 1)
    return ids, pos.astype(np.int32), slots.astype(np.int32)


def fill_slots_from_cache(model: NexusGenAR, cache: KVCache, next_position: np.ndarray) -> jax.Array:
    """Image mode of a decoding loop: the model has just emitted ``<|vision_start|>`` (not yet fed) and ``cache``
    holds everything before it; ``next_position`` [B] is each row's next text position (cache index + rope delta).
    One N-token forward fills all N slots -> [B, N, hidden]. The cache is consumed."""
    cfg = model.config
    ids, pos, slots = slot_phase_inputs(cfg, next_position)
    if cache.capacity - int(cache.index) < cfg.num_slots:
        raise ValueError(
            f"the KV cache has {cache.capacity - int(cache.index)} free slots; the image needs {cfg.num_slots}"
        )
    graphdef, state = nnx.split(model)
    mask = jnp.ones(ids.shape, bool)
    out, _ = _step_for(graphdef, cfg.num_slots)(
        state, cache, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(slots), mask, None, None
    )
    return out


def image_phase_inputs(cfg: NexusGenConfig, next_position: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The whole image of a decoding loop, as training lays it out: ``<|vision_start|>``, the N slots,
    ``<|vision_end|>`` for rows whose next text position is ``next_position`` [B]. Positions as
    :func:`slot_phase_inputs` (which they extend by the last slot), and ``<|vision_end|>`` at the image start + the
    merged grid's longer side (``get_rope_index``: text resumes at the image's largest position + 1). Returns
    (ids [B, N + 2], positions [3, B, N + 2], slot_index [B, N + 2])."""
    p = np.asarray(next_position, np.int64).reshape(-1)
    n = cfg.num_slots
    rows, cols = cfg.merged_slot_grid
    ids, pos, slots = slot_phase_inputs(cfg, p)
    s = p + 1
    r, c = divmod(n - 1, cols)
    last = np.stack([s, s + r, s + c])[:, :, None]
    end = np.broadcast_to((s + max(rows, cols))[None, :, None], (3, p.size, 1))
    tail = np.broadcast_to(np.asarray([cfg.tokens.image_pad, cfg.tokens.vision_end]), (p.size, 2))
    ids = np.concatenate([ids, tail], axis=1)
    pos = np.concatenate([pos, last, end], axis=2)
    slots = np.concatenate([slots, np.full((p.size, 1), n - 1), np.full((p.size, 1), -1)], axis=1)
    return ids.astype(np.int32), pos.astype(np.int32), slots.astype(np.int32)


def position_after_image(cfg: NexusGenConfig, next_position: np.ndarray) -> np.ndarray:
    """[B]: the text position after an image whose ``<|vision_start|>`` sat at ``next_position`` [B]."""
    return np.asarray(next_position, np.int64) + 2 + max(cfg.merged_slot_grid)


def _image_step(graphdef, suppress_ids, state, cache, ids, positions, slot_index, mask, row_suppress):
    from nexus_jax.generation.sampling import suppress_per_row, suppress_tokens

    model = nnx.merge(graphdef, state)
    n = model.config.num_slots
    embeds = model.embed_inputs(ids, slot_index)
    hidden, cache = model.language_model.model(inputs_embeds=embeds, positions=positions, attention_mask=mask,
                                               cache=cache)
    logits = model.language_model.logits(hidden[:, -1:])[:, 0].astype(jnp.float32)
    first = jnp.argmax(suppress_per_row(suppress_tokens(logits, suppress_ids), row_suppress), axis=-1)
    return model.head(hidden[:, :n]), first.astype(jnp.int32), cache


@lru_cache(maxsize=8)
def _image_step_for(graphdef, suppress_ids: tuple[int, ...]) -> Callable:
    return jax.jit(partial(_image_step, graphdef, suppress_ids), donate_argnums=(1,))


def image_from_cache(
    model: NexusGenAR, cache: KVCache, next_position: np.ndarray, opening: np.ndarray, *,
    suppress_token_ids: tuple[int, ...] = (), row_suppress: np.ndarray | None = None,
) -> tuple[jax.Array, jax.Array, KVCache]:
    """Image mode of a decoding loop that goes on after the image. Rows where ``opening`` [B] is True have just
    emitted ``<|vision_start|>`` (not yet fed; ``cache`` holds everything before it, ``next_position`` [B] is their
    next text position). One (N + 2)-token forward feeds ``<|vision_start|>``, the N slots and ``<|vision_end|>``
    (:func:`image_phase_inputs`); the other rows' entries are written invalid. Returns (image embeddings [B, N, hidden],
    the greedy token after ``<|vision_end|>`` [B] (``suppress_token_ids`` and each row's ``row_suppress`` [B, K]
    ids, -1 = none, never chosen), the cache). Rows not opening get meaningless values. The cache is consumed."""
    cfg = model.config
    ids, pos, slots = image_phase_inputs(cfg, next_position)
    free = cache.capacity - int(cache.index)
    if free < ids.shape[1]:
        raise ValueError(f"the KV cache has {free} free slots; an image with its markers needs {ids.shape[1]}")
    mask = jnp.broadcast_to(jnp.asarray(opening, bool)[:, None], ids.shape)
    rs = None if row_suppress is None else jnp.asarray(row_suppress, jnp.int32)
    graphdef, state = nnx.split(model)
    return _image_step_for(graphdef, tuple(suppress_token_ids))(
        state, cache, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(slots), mask, rs
    )
