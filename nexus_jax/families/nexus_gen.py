"""Nexus-Gen: the autoregressive Qwen2.5-VL model with image slots, the generation / editing diffusion decoders
(FLUX DiT + adapter / merger) and the FLUX VAE. The default inference family (a converted directory with ``ar/``)."""

from __future__ import annotations

from typing import Any

from nexus_jax.families import Component, Family, InferenceEntry, TrainingEntry


def train_task(cfg: Any, setup: Any, tokenizer_dir: str = "") -> Any:
    """The ``TrainTask`` of an AR (``ar``) or decoder (``generation_decoder`` / ``editing_decoder``) preset."""
    if cfg.task == "ar":
        from nexus_jax.training.ar_loop import ar_task
        from nexus_jax.training.text import text_encoder

        return ar_task(cfg, text_encoder(cfg, tokenizer_dir), model_cfg=setup.model_cfg)
    from nexus_jax.training.decoder_loop import decoder_task

    return decoder_task(cfg, setup.model_cfg, pooled=setup.pooled, negative_context=setup.negative_context)


FAMILY = Family(
    name="nexus_gen",
    description="Nexus-Gen: Qwen2.5-VL AR model with prefilled image slots + FLUX generation / editing decoders + VAE",
    components={
        "ar": Component("configs.nexus_gen:NexusGenConfig", "nexus_jax.models.nexus_ar:NexusGenAR", "nexus_ar"),
        "generation_decoder": Component("configs.nexus_decoders:NexusDecoderConfig",
                                        "nexus_jax.models.nexus_decoders:GenerationDecoder", "generation_decoder"),
        "editing_decoder": Component("configs.nexus_decoders:NexusDecoderConfig",
                                     "nexus_jax.models.nexus_decoders:EditingDecoder", "editing_decoder"),
        "vae": Component("configs.vae:FluxVAEConfig", "nexus_jax.models.vae:FluxVAE", "vae"),
    },
    conversion={
        "nexus_ar": "conversion.families:nexus_ar_family",
        "generation_decoder": "conversion.families:generation_decoder_family",
        "editing_decoder": "conversion.families:editing_decoder_family",
    },
    inference=InferenceEntry(open="nexus_jax.inference.nexus_gen:open_session"),
    training=TrainingEntry(tasks=("ar", "generation_decoder", "editing_decoder"),
                           setup="nexus_jax.training.init_from:nexus_gen_setup",
                           task="nexus_jax.families.nexus_gen:train_task"),
    workloads={
        "ar_train": "launch.workloads:ar_workload",
        "decoder_train": "launch.workloads:decoder_train_workload",
        "decoder_sample": "launch.workloads:decoder_sample_workload",
    },
)
