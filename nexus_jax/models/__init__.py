"""Model definitions (flax.nnx): Qwen2.5 text decoder, Qwen2.5-VL, Nexus-Gen AR, FLUX DiT, FLUX VAE."""
