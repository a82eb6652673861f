"""Nexus-Gen autoregressive training objective (pure functions on arrays).

    loss = token_weight * CE(text) + image_weight * (0.5 * MSE + 0.5 * mean(1 - cos))

* CE: next-token cross entropy in fp32, ``logits[:, :-1]`` against ``labels[:, 1:]``; labels ``-100`` (prompt, padding)
  and output-image slot labels (``image_pad``) are ignored; mean over the remaining tokens. With :class:`LazyLogits`
  the fp32 logits are computed chunk by chunk over the tokens and recomputed in the backward pass, so neither the
  full ``[B, L, vocab]`` logits nor their gradient ever exist at once (what a 152k vocabulary needs at 4k tokens).
* Image loss: position ``p`` regresses the embedding of the slot at ``p + 1`` (the ``<|vision_start|>`` position
  predicts slot 0, slot ``k`` predicts slot ``k + 1``; the last slot's output is not regressed). Targets are the frozen
  ViT's merged features of the target image, laid out per position (``targets[b, t]`` is the target of the slot at
  ``t``). MSE is the mean over all selected elements, the cosine term the mean over selected rows.
* No output image in the batch: the image loss is exactly 0 (and so is its gradient), never NaN.

Everything works on fixed shapes (masks instead of boolean gathers), so it jits and shards like the model.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nexus_jax.nexus.slots import check_slot_count, scatter_rows

IGNORE_INDEX = -100
COSINE_EPS = 1e-8
CE_CHUNK = 512  # tokens per chunk of LazyLogits (fp32 logits of one chunk: B x 512 x 152064 x 4 B = B x 0.3 GB)


def _safe_mean(total: jax.Array, count: jax.Array) -> jax.Array:
    """total / count, or 0 when count == 0 (no NaN in value or gradient)."""
    return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)


def _check_labels(targets: jax.Array, valid: jax.Array, vocab: int) -> None:
    """Raise ValueError for a concrete counted label outside [0, vocab) (no-op while tracing)."""
    if isinstance(targets, np.ndarray | jax.Array) and not isinstance(targets, jax.core.Tracer):
        bad = np.asarray(valid & ((targets < 0) | (targets >= vocab)))
        if bad.any():
            raise ValueError(f"label {int(np.asarray(targets)[bad][0])} is outside the vocabulary [0, {vocab})")


def _nll(logits: jax.Array, targets: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed fp32 NLL of ``targets`` under ``logits`` [..., V] over the ``valid`` positions, logsumexp [...])."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(valid, logz - picked, 0.0).sum(), logz


def token_cross_entropy(logits: jax.Array, labels: jax.Array, image_token_id: int) -> tuple[jax.Array, jax.Array]:
    """Shifted next-token CE. logits [B, L, V], labels [B, L] int -> (mean CE, number of counted tokens)."""
    targets = labels[:, 1:]
    valid = (targets != IGNORE_INDEX) & (targets != image_token_id)
    _check_labels(targets, valid, logits.shape[-1])
    count = valid.sum()
    return _safe_mean(_nll(logits[:, :-1], targets, valid)[0], count), count


@dataclasses.dataclass(frozen=True)
class LazyLogits:
    """Logits that are never materialised whole: ``project(hidden[:, i:j])`` -> [B, j - i, vocab] per token chunk.

    hidden [B, L, D]; ``project`` e.g. ``NexusGenAR.language_model.logits``; ``chunk`` tokens per chunk (the last
    chunk may be shorter). Used by :func:`nexus_ar_loss` in place of a logits array.
    """

    hidden: jax.Array
    project: Callable[[jax.Array], jax.Array]
    vocab: int
    chunk: int = CE_CHUNK

    def __post_init__(self) -> None:
        if self.hidden.ndim != 3:
            raise ValueError(f"LazyLogits.hidden must be [B, L, D], got shape {self.hidden.shape}")
        if self.chunk < 1:
            raise ValueError(f"LazyLogits.chunk must be >= 1, got {self.chunk}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.hidden.shape[:2], self.vocab)


def _spans(length: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, length)) for s in range(0, length, chunk)]


def _chunk_logits(project: Callable, h: jax.Array, consts: tuple) -> jax.Array:
    return project(h, *consts).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked_nll(project: Callable, chunk: int, hidden: jax.Array, targets: jax.Array, valid: jax.Array,
                 *consts: jax.Array) -> jax.Array:
    return _chunked_nll_fwd(project, chunk, hidden, targets, valid, *consts)[0]


def _chunked_nll_fwd(project, chunk, hidden, targets, valid, *consts):
    """Summed NLL, chunk after chunk (each chunk's input waits for the previous chunk's sum: an optimization
    barrier keeps XLA from running all chunks at once); saves only the per-token logsumexp."""
    total = jnp.zeros((), jnp.float32)
    lse_parts = []
    for start, end in _spans(hidden.shape[1], chunk):
        h, total = jax.lax.optimization_barrier((hidden[:, start:end], total))
        nll, lse = _nll(_chunk_logits(project, h, consts), targets[:, start:end], valid[:, start:end])
        total = total + nll
        lse_parts.append(lse)
    return total, (hidden, targets, valid, consts, jnp.concatenate(lse_parts, axis=1))


def _chunked_nll_bwd(project, chunk, res, g):
    """Per chunk: recompute the logits, d logits = (softmax - onehot) * g, then the chunk's input and parameter
    gradients (parameter gradients accumulated in fp32, chunk after chunk)."""
    hidden, targets, valid, consts, lse = res
    dconsts = tuple(jnp.zeros(c.shape, jnp.float32) for c in consts)
    dh_parts = []
    for start, end in _spans(hidden.shape[1], chunk):
        h, dconsts = jax.lax.optimization_barrier((hidden[:, start:end], dconsts))
        logits, vjp = jax.vjp(lambda x, *c: _chunk_logits(project, x, c), h, *consts)
        t, v = targets[:, start:end], valid[:, start:end]
        probs = jnp.exp(logits - lse[:, start:end, None])
        dlogits = jnp.where(v[..., None], probs - jax.nn.one_hot(t, logits.shape[-1], dtype=jnp.float32), 0.0) * g
        dh, *dc = vjp(dlogits)
        dconsts = tuple(a + b.astype(jnp.float32) for a, b in zip(dconsts, dc))
        dh_parts.append(dh)
    dconsts = tuple(d.astype(c.dtype) for d, c in zip(dconsts, consts))
    return (jnp.concatenate(dh_parts, axis=1).astype(hidden.dtype), None, None, *dconsts)


_chunked_nll.defvjp(_chunked_nll_fwd, _chunked_nll_bwd)


def chunked_token_cross_entropy(logits: LazyLogits, labels: jax.Array, image_token_id: int
                                ) -> tuple[jax.Array, jax.Array]:
    """:func:`token_cross_entropy` from :class:`LazyLogits`, with a custom VJP: the forward keeps only the per-token
    logsumexp; the backward recomputes one chunk's fp32 logits at a time and accumulates the projection's gradient.
    The chunks are a Python loop (a loop-free program). labels [B, L] -> (mean CE, number of counted tokens)."""
    b, length, vocab = logits.shape
    # position p predicts labels[p + 1]; the last position predicts nothing
    targets = jnp.concatenate([labels[:, 1:], jnp.full((b, 1), IGNORE_INDEX, labels.dtype)], axis=1)
    valid = (targets != IGNORE_INDEX) & (targets != image_token_id)
    _check_labels(targets, valid, vocab)
    project, consts = jax.closure_convert(logits.project, logits.hidden[:, : min(logits.chunk, length)])
    floats = [jnp.issubdtype(c.dtype, jnp.inexact) for c in consts]
    if not all(floats):
        raise ValueError("LazyLogits.project may close over floating-point arrays only")
    total = _chunked_nll(project, logits.chunk, logits.hidden, targets, valid, *consts)
    count = valid.sum()
    return _safe_mean(total, count), count


def cosine_similarity(a: jax.Array, b: jax.Array, eps: float = COSINE_EPS) -> jax.Array:
    """Row-wise cosine over the last axis, each norm clamped at ``eps``. a, b [..., D] -> [...]."""
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    na = jnp.sqrt(jnp.sum(a * a, axis=-1))
    nb = jnp.sqrt(jnp.sum(b * b, axis=-1))
    return jnp.sum(a * b, axis=-1) / (jnp.maximum(na, eps) * jnp.maximum(nb, eps))


def image_embedding_loss(
    pred: jax.Array, targets: jax.Array, labels: jax.Array, image_token_id: int
) -> tuple[jax.Array, jax.Array]:
    """0.5 * MSE + 0.5 * mean(1 - cos) over output-image slots at shifted positions.

    pred [B, L, D] (vision_head outputs), targets [B, L, D] (target of the slot at each position; other rows are
    ignored), labels [B, L]. Returns (loss, number of regressed slots); loss is 0 when there are none.
    """
    sel = labels[:, 1:] == image_token_id  # [B, L-1]: position p predicts slot p+1
    p = pred[:, :-1].astype(jnp.float32)
    t = jax.lax.stop_gradient(targets[:, 1:].astype(jnp.float32))
    # Masked rows are zeroed before the cosine so that neither value nor gradient sees them.
    p = jnp.where(sel[..., None], p, 0.0)
    t = jnp.where(sel[..., None], t, 0.0)
    rows = sel.sum()
    dim = pred.shape[-1]
    mse = _safe_mean(jnp.sum(jnp.square(p - t)), rows * dim)
    cos = jnp.where(sel, 1.0 - cosine_similarity(p, t), 0.0)
    return 0.5 * mse + 0.5 * _safe_mean(cos.sum(), rows), rows


def nexus_ar_loss(
    logits: jax.Array | LazyLogits,
    image_embeds: jax.Array,
    labels: jax.Array,
    targets: jax.Array,
    *,
    image_token_id: int,
    token_weight: float,
    image_weight: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The full objective. logits [B, L, V] (or :class:`LazyLogits`), image_embeds/targets [B, L, D], labels [B, L].

    Returns (scalar loss, metrics dict with the unweighted ``token_loss``/``image_loss`` and token/slot counts).
    """
    if logits.shape[:2] != labels.shape or image_embeds.shape[:2] != labels.shape:
        raise ValueError(
            f"logits {logits.shape[:2]} / image_embeds {image_embeds.shape[:2]} must match labels {labels.shape}"
        )
    if targets.shape != image_embeds.shape:
        raise ValueError(f"targets shape {targets.shape} must equal image_embeds shape {image_embeds.shape}")
    if isinstance(logits, LazyLogits):
        ce, n_tokens = chunked_token_cross_entropy(logits, labels, image_token_id)
    else:
        ce, n_tokens = token_cross_entropy(logits, labels, image_token_id)
    img, n_slots = image_embedding_loss(image_embeds, targets, labels, image_token_id)
    loss = token_weight * ce + image_weight * img
    return loss, {"token_loss": ce, "image_loss": img, "num_tokens": n_tokens, "num_slots": n_slots}


def model_loss(
    model: Any,
    batch: dict[str, Any],
    *,
    num_input_rows: int = 0,
    num_target_rows: int = 0,
    train_vit: bool | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss of a :class:`~nexus_jax.models.nexus_ar.NexusGenAR` on a device batch (see ``batch.device_arrays``).

    ``num_input_rows`` / ``num_target_rows`` (static) are the real merged-token counts of the input / target images.
    Targets go through the ViT under ``stop_gradient`` (or come precomputed as ``batch["target_rows"]`` [T, hidden],
    row-major over the output slots); input-image features are detached too unless ``train_vit`` (default: the
    config's trainable policy trains the ViT or its merger).
    """
    cfg = model.config
    if train_vit is None:
        train_vit = cfg.trainable.vision_tower or cfg.trainable.vision_merger
    image_id = cfg.tokens.image_pad
    labels = batch["labels"]
    n_out = int(np.asarray(labels == image_id).sum()) if not isinstance(labels, jax.core.Tracer) else None
    if n_out is not None and n_out and "target_pixels" not in batch and "target_rows" not in batch:
        raise ValueError(f"the batch has {n_out} output-image slots but no target image to regress them onto")
    feats = None
    if num_input_rows:
        feats = model.encode_images(batch["input_pixels"], batch["input_layout"], num_input_rows)
        feats = feats if train_vit else jax.lax.stop_gradient(feats)
    out = model(
        batch["input_ids"], positions=batch["positions"], slot_index=batch["slot_index"],
        attention_mask=batch["attention_mask"], input_features=feats, input_mask=batch["input_mask"], with_logits=False,
    )
    logits = LazyLogits(out.hidden_states, model.language_model.logits, cfg.vl.text.vocab_size)
    rows = None
    if "target_rows" in batch:  # precomputed target embeddings [T, hidden]
        rows = batch["target_rows"]
    elif num_target_rows:
        rows = model.encode_images(batch["target_pixels"], batch["target_layout"], num_target_rows)
    if rows is not None:
        check_slot_count(labels == image_id, rows.shape[0], "target images")
        targets = scatter_rows(jax.lax.stop_gradient(rows), labels == image_id)
    else:
        targets = jnp.zeros_like(out.image_embeds)
    return nexus_ar_loss(
        logits, out.image_embeds, labels, targets, image_token_id=image_id,
        token_weight=cfg.token_loss_weight, image_weight=cfg.image_loss_weight,
    )
