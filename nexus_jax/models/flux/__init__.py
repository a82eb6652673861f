"""FLUX.1 DiT (DiffSynth ``FluxDiT`` names) for the Nexus-Gen decoders."""

from nexus_jax.models.flux.dit import FluxDiT
from nexus_jax.models.flux.packing import image_ids, latent_size, pack_latents, unpack_latents

__all__ = ["FluxDiT", "image_ids", "latent_size", "pack_latents", "unpack_latents"]
