"""LDM AutoencoderKL in flax.nnx: the FLUX VAE and MAR / UniPic-1 KL-16 (token codec); API in docs/vae.md."""

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
from nexus_jax.models.vae.kl16 import decode_tokens, encode_tokens, pixels_to_uint8_unipic

__all__ = [
    "Decoder",
    "Encoder",
    "FluxVAE",
    "check_latents",
    "check_pixels",
    "decode_tokens",
    "encode_tokens",
    "latents_to_model",
    "model_to_latents",
    "pixels_to_uint8",
    "pixels_to_uint8_unipic",
]
