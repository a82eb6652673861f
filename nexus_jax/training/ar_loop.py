"""Nexus-Gen AR trainer: CE on text + regression of the 81 output-image slots onto frozen-ViT target features.

The batch comes from :class:`nexus_jax.data.ar_examples.ARCollator` (micro-batched, fixed shapes). The loss runs the
frozen ViT on the packed input images (features placed at the input ``<|image_pad|>`` tokens) and on the target images
(252x252 -> 81 rows each, scattered onto the output slots), then :func:`nexus_jax.nexus.loss.nexus_ar_loss`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
from flax import nnx

from configs import nexus_gen
from configs.nexus_gen import NexusGenConfig
from configs.training import TrainConfig
from nexus_jax.data.ar_examples import LAYOUT_KEYS, ARCollator, AREncoder, ar_batch_axes, count_tokens
from nexus_jax.data.pipeline import BatchIterator, build_dataset
from nexus_jax.data.sources import open_source
from nexus_jax.models.nexus_ar import NexusGenAR
from nexus_jax.nexus.loss import LazyLogits, nexus_ar_loss
from nexus_jax.nexus.slots import scatter_rows
from nexus_jax.training.loop import TrainTask, local_batch_size, max_over_processes

VIT_FROZEN = (r"(^|/)visual/",)


def model_config(preset: str) -> NexusGenConfig:
    """'tiny' | 'tiny_v1' | 'nexus_gen_v2' | 'nexus_gen_v1'."""
    presets: dict[str, Callable[[], NexusGenConfig]] = {
        "tiny": nexus_gen.tiny,
        "tiny_v1": lambda: nexus_gen.tiny("v1"),
        "nexus_gen_v2": nexus_gen.nexus_gen_v2,
        "nexus_gen_v1": nexus_gen.nexus_gen_v1,
    }
    if preset not in presets:
        raise ValueError(f"unknown AR model preset {preset!r}; choose one of {sorted(presets)}")
    return presets[preset]()


def make_ar_loss(model_cfg: NexusGenConfig, collator: ARCollator, token_weight: float, image_weight: float):
    """loss_fn(model, micro_batch, rng) for :func:`nexus_jax.training.state.make_train_step`."""
    unit = model_cfg.vl.vision.spatial_merge_size ** 2
    input_rows = collator.input_budget.patches // unit
    target_rows = collator.target_budget.patches // unit
    image_id = model_cfg.tokens.image_pad

    def loss_fn(model: NexusGenAR, mb: dict[str, jax.Array], rng: jax.Array):
        del rng
        layout_in = {k: mb[f"input_layout.{k}"] for k in LAYOUT_KEYS}
        layout_t = {k: mb[f"target_layout.{k}"] for k in LAYOUT_KEYS}

        def encode(px, lay, n):  # per example: pixels [B, P, patch_dim] + layouts [B, ...] -> [B, n, hidden]
            return jax.vmap(lambda p, l: model.encode_images(p, l, n))(px, lay)

        feats = jax.lax.stop_gradient(encode(mb["input_pixels"], layout_in, input_rows))
        out = model(mb["input_ids"], positions=mb["positions"], slot_index=mb["slot_index"],
                    attention_mask=mb["attention_mask"], input_features=feats, input_mask=mb["input_mask"],
                    with_logits=False)
        # token CE over chunked logits (as model_loss and the AR plan): the fp32 [B, L, vocab] logits never exist
        logits = LazyLogits(out.hidden_states, model.language_model.logits, model_cfg.vl.text.vocab_size)
        rows = jax.lax.stop_gradient(encode(mb["target_pixels"], layout_t, target_rows))
        targets = scatter_rows(rows.astype(out.image_embeds.dtype), mb["labels"] == image_id)
        return nexus_ar_loss(logits, out.image_embeds, mb["labels"], targets, image_token_id=image_id,
                             token_weight=token_weight, image_weight=image_weight)

    return loss_fn


def ar_task(
    cfg: TrainConfig,
    encode_text: Callable[[str], Sequence[int]],
    *,
    model_cfg: NexusGenConfig | None = None,
    image_root: str | Path | None = None,
) -> TrainTask:
    """The AR :class:`TrainTask` for ``cfg`` (records at ``cfg.data.path``; tokenizer ``encode_text``)."""
    model_cfg = model_cfg or model_config(cfg.model_preset)
    if cfg.loop.remat != "none":
        model_cfg = dataclasses.replace(model_cfg, vl=dataclasses.replace(
            model_cfg.vl, text=model_cfg.vl.text.replace(remat=cfg.loop.remat)))
    accum = cfg.optim.grad_accum
    if cfg.loop.batch_size % accum:
        raise ValueError(f"batch_size={cfg.loop.batch_size} is not divisible by grad_accum={accum}")
    local = local_batch_size(cfg.loop.batch_size)
    if local % accum:
        raise ValueError(f"each of the {jax.process_count()} processes loads {local} records per step, which do not "
                         f"split into grad_accum={accum} micro-batches; use a batch_size that is a multiple of "
                         f"{accum * jax.process_count()}")
    collator = ARCollator(model_cfg, cfg.data, accum, local // accum,
                          agree_length=max_over_processes if jax.process_count() > 1 else None)
    root = str(image_root if image_root is not None else (cfg.data.image_root or Path(cfg.data.path).parent))
    encoder = AREncoder(model_cfg, cfg.data, encode_text, root)

    def batches(path: str, seed: int, epochs: int | None) -> BatchIterator:
        ds = build_dataset(open_source(path), encoder, seed=seed, num_epochs=epochs, global_batch=cfg.loop.batch_size)
        return BatchIterator(ds, local, collator, num_threads=cfg.data.num_threads, prefetch=cfg.data.prefetch,
                             filler=collator.filler)

    return TrainTask(
        name="ar",
        model_ctor=lambda: NexusGenAR(model_cfg, rngs=nnx.Rngs(cfg.loop.seed)),
        loss_fn=make_ar_loss(model_cfg, collator, cfg.ar_loss.token_weight, cfg.ar_loss.image_weight),
        make_batches=lambda seed: batches(cfg.data.path, seed, cfg.data.num_epochs),
        make_eval_batches=(lambda: batches(cfg.data.eval_path, 0, 1)) if cfg.data.eval_path else None,
        count_tokens=count_tokens,
        frozen=VIT_FROZEN,
        batch_axes=ar_batch_axes,
        micro_batched=True,
    )
