"""Skywork UniPic-1: Qwen2.5 LLM + MAR encoder / decoder + per-token diffusion head + projectors, and the KL-16 VAE.
Serves converted checkpoints whose ``config.json`` names family ``unipic``."""

from __future__ import annotations

from typing import Any

from nexus_jax.families import Component, Family, InferenceEntry, TrainingEntry


def train_task(cfg: Any, setup: Any, tokenizer_dir: str = "") -> Any:
    """The ``TrainTask`` of a ``unipic_*`` preset (text2image, image_edit or image2text loss)."""
    from nexus_jax.training.text import text_encoder
    from nexus_jax.training.unipic_loop import unipic_task

    return unipic_task(cfg, text_encoder(cfg, tokenizer_dir), model_cfg=setup.model_cfg)


FAMILY = Family(
    name="unipic",
    description="Skywork UniPic-1: Qwen2.5 + MAR + diffusion head + projectors, KL-16 VAE",
    components={
        "unipic": Component("configs.unipic:UniPicConfig", "nexus_jax.models.unipic.model:UniPic", "unipic"),
        "vae": Component("configs.vae:FluxVAEConfig", "nexus_jax.models.vae:FluxVAE", "kl16_vae"),
    },
    conversion={
        "unipic": "conversion.families:unipic_family",
        "kl16_vae": "conversion.families:kl16_vae_family",
    },
    inference=InferenceEntry(open="nexus_jax.unipic.infer:open_session",
                             detect="nexus_jax.unipic.loading:is_unipic_checkpoint"),
    training=TrainingEntry(tasks=("unipic_t2i", "unipic_edit", "unipic_understanding"),
                           setup="nexus_jax.training.init_from:unipic_setup",
                           task="nexus_jax.families.unipic:train_task"),
    workloads={"unipic_train": "launch.workloads:unipic_train_workload"},
)
