"""UniPic-1 trainer: one of UniPic's three losses (:mod:`nexus_jax.unipic.loss`) as a :class:`TrainTask` of the shared
loop (:mod:`nexus_jax.training.loop`: Grain pipeline, Orbax train state, resume, several processes).

Presets (``configs/training.py``): ``unipic_t2i`` (text2image diffusion loss), ``unipic_edit`` (image_edit),
``unipic_understanding`` (image2text CE), and ``tiny_unipic_*``. The trained module is :class:`UniPicTrainModel`
(``model``: the UniPic LLM + MAR + head + projectors, trained; ``vae``: the KL-16 VAE, frozen). Records are mapped by
:mod:`nexus_jax.data.unipic_examples`. Filler rows (broken records, ``weight`` 0) are left out of the loss: their
masked-token set is emptied (generation) or their labels set to -100 (understanding).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from configs import unipic as unipic_configs
from configs.training import TrainConfig, UniPicLossConfig
from configs.unipic import UniPicConfig
from nexus_jax.data.pipeline import BatchIterator, build_dataset
from nexus_jax.data.sources import open_source
from nexus_jax.data.unipic_examples import UniPicCollator, UniPicEncoder, count_tokens
from nexus_jax.models.unipic.model import UniPic
from nexus_jax.models.vae import FluxVAE
from nexus_jax.nexus.loss import IGNORE_INDEX
from nexus_jax.training.loop import TrainTask, local_batch_size, max_over_processes
from nexus_jax.unipic.loss import Randomness, draw, unipic_loss

VAE_FROZEN = (r"(^|/)vae/",)
# train task -> (record task, loss name in nexus_jax.unipic.loss)
TASKS: dict[str, tuple[str, str]] = {
    "unipic_t2i": ("generation", "text2image"),
    "unipic_edit": ("editing", "image_edit"),
    "unipic_understanding": ("understanding", "image2text"),
}
MODEL_PRESETS: dict[str, Callable[[], UniPicConfig]] = {"tiny": unipic_configs.tiny, "unipic_1_5b": unipic_configs.full}


def model_config(preset: str, remat: str = "none") -> UniPicConfig:
    """'tiny' | 'unipic_1_5b'; ``remat`` per LLM layer and MAR block."""
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown UniPic model preset {preset!r}; choose one of {sorted(MODEL_PRESETS)}")
    cfg = MODEL_PRESETS[preset]()
    if remat != "none":
        cfg = cfg.replace(text=cfg.text.replace(remat=remat), mar=dataclasses.replace(cfg.mar, remat=remat))
    return cfg


class UniPicTrainModel(nnx.Module):
    """``model`` (:class:`UniPic`, trained) and ``vae`` (KL-16 :class:`FluxVAE`, frozen by :data:`VAE_FROZEN`)."""

    def __init__(self, config: UniPicConfig, *, rngs: nnx.Rngs):
        self.model = UniPic(config, rngs=rngs)
        self.vae = FluxVAE(config.vae, rngs=rngs)


def _drop_prompts(batch: dict[str, jax.Array], p: float, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each row's (input_ids, attention_mask) replaced by its null prompt with probability ``p``."""
    if p <= 0:
        return batch["input_ids"], batch["attention_mask"]
    drop = jax.random.uniform(key, (batch["input_ids"].shape[0], 1)) < p
    return (jnp.where(drop, batch["null_ids"], batch["input_ids"]),
            jnp.where(drop, batch["null_mask"], batch["attention_mask"]))


def make_unipic_loss(task: str, cfg: UniPicLossConfig):
    """loss_fn(model: UniPicTrainModel, batch, rng) -> (weighted loss, {task loss (unweighted), real_rows})."""
    if task not in TASKS:
        raise ValueError(f"unknown UniPic train task {task!r}; choose one of {sorted(TASKS)}")
    name = TASKS[task][1]
    weights = {"image2text": cfg.image2text_weight, "text2image": cfg.text2image_weight,
               "image_edit": cfg.image_edit_weight}

    def loss_fn(tm: UniPicTrainModel, batch: dict[str, jax.Array], rng: jax.Array):
        k_drop, k_rnd = jax.random.split(rng)
        real = batch["weight"].astype(jnp.float32)
        if name == "image2text":
            labels = jnp.where(real[:, None] > 0, batch["labels"], IGNORE_INDEX)
            sub = {"pixels": batch["pixels"], "input_ids": batch["input_ids"],
                   "attention_mask": batch["attention_mask"], "labels": labels}
            loss, parts = unipic_loss(tm.model, tm.vae, {name: sub}, None, weights)
        else:
            ids, mask = _drop_prompts(batch, cfg.prompt_dropout, k_drop)
            target = batch["pixels"] if name == "text2image" else batch["target"]
            f = tm.vae.config.downsample_factor
            rnd = draw(k_rnd, tm.model, target.shape[0], (target.shape[1] // f) * (target.shape[2] // f))
            rnd = Randomness(rnd.mask * real[:, None].astype(rnd.mask.dtype), rnd.t, rnd.noise)  # fillers: no loss
            sub = {"input_ids": ids, "attention_mask": mask}
            sub.update({"pixels": target} if name == "text2image" else {"source": batch["source"], "target": target})
            loss, parts = unipic_loss(tm.model, tm.vae, {name: sub}, None, weights, randomness={name: rnd})
        return loss, {name: parts[name], "real_rows": jnp.sum(real)}

    return loss_fn


def unipic_task(cfg: TrainConfig, encode_text: Callable[[str], Sequence[int]], *, model_cfg: UniPicConfig | None = None,
                image_root: str | os.PathLike | None = None) -> TrainTask:
    """The UniPic :class:`TrainTask` of ``cfg.task`` (records at ``cfg.data.path``; tokenizer ``encode_text``)."""
    if cfg.task not in TASKS:
        raise ValueError(f"unknown UniPic train task {cfg.task!r}; choose one of {sorted(TASKS)}")
    model_cfg = model_cfg or model_config(cfg.model_preset, cfg.loop.remat)
    size = cfg.data.image_size
    if size % model_cfg.vae_stride:
        raise ValueError(f"data.image_size={size} must be a multiple of the VAE stride {model_cfg.vae_stride}")
    slots = (size // model_cfg.vae_stride) ** 2 + model_cfg.mar.buffer_size
    root = str(image_root if image_root is not None else (cfg.data.image_root or Path(cfg.data.path).parent))
    encoder = UniPicEncoder(TASKS[cfg.task][0], model_cfg.tokens, encode_text, size, slots,
                            cfg.data.length_buckets[-1], root)
    collator = UniPicCollator(tuple(cfg.data.length_buckets), model_cfg.tokens.pad,
                              max_over_processes if jax.process_count() > 1 else None)
    local = local_batch_size(cfg.loop.batch_size)
    if cfg.loop.batch_size % cfg.optim.grad_accum:
        raise ValueError(f"batch_size={cfg.loop.batch_size} is not divisible by grad_accum={cfg.optim.grad_accum}")

    def batches(path: str, seed: int, epochs: int | None) -> BatchIterator:
        ds = build_dataset(open_source(path), encoder, seed=seed, num_epochs=epochs, global_batch=cfg.loop.batch_size)
        return BatchIterator(ds, local, collator, num_threads=cfg.data.num_threads, prefetch=cfg.data.prefetch,
                             filler=encoder.filler)

    return TrainTask(
        name=cfg.task,
        model_ctor=lambda: UniPicTrainModel(model_cfg, rngs=nnx.Rngs(cfg.loop.seed)),
        loss_fn=make_unipic_loss(cfg.task, cfg.unipic_loss),
        make_batches=lambda seed: batches(cfg.data.path, seed, cfg.data.num_epochs),
        make_eval_batches=(lambda: batches(cfg.data.eval_path, 0, 1)) if cfg.data.eval_path else None,
        count_tokens=count_tokens,
        frozen=VAE_FROZEN,
    )


def unipic_components(model_cfg: UniPicConfig) -> dict[str, tuple[str, Any]]:
    """Converted-directory name -> (family, config) of what a UniPic run trains / carries (``nexus_jax_run.json``)."""
    no_remat = model_cfg.replace(text=model_cfg.text.replace(remat="none"),
                                 mar=dataclasses.replace(model_cfg.mar, remat="none"))
    return {"unipic": ("unipic", no_remat), "vae": ("kl16_vae", model_cfg.vae)}
