"""FLUX VAE (AutoencoderKL, 16 latent channels) in flax.nnx; API in docs/vae.md."""

from nexus_jax.models.vae.autoencoder import (
    FluxVAE,
    check_latents,
    check_pixels,
    latents_to_model,
    model_to_latents,
    pixels_to_uint8,
)
from nexus_jax.models.vae.decoder import Decoder
from nexus_jax.models.vae.encoder import Encoder

__all__ = [
    "Decoder",
    "Encoder",
    "FluxVAE",
    "check_latents",
    "check_pixels",
    "latents_to_model",
    "model_to_latents",
    "pixels_to_uint8",
]
