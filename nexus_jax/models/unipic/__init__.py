"""Skywork UniPic-1 model components: MAR encoder/decoder, projectors, per-token diffusion head, assembled model."""
