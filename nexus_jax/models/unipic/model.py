"""The UniPic-1 model: ``llm`` (Qwen2.5, tied embeddings, 1-D RoPE), ``mar`` (MAR encoder/decoder owning the per-token
diffusion head as ``mar.diffloss``), ``proj_in`` (MAR width -> LLM width) and ``proj_out`` (back).

Attribute names follow the torch checkpoint (``llm.``, ``mar.``, ``mar.diffloss.net.``, ``proj_in.{0,2}``,
``proj_out.{0,2}``); the KL-16 VAE is separate (``kl16.ckpt``) and built by :func:`nexus_jax.models.vae` code.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from configs.unipic import UniPicConfig
from nexus_jax import sharding
from nexus_jax.models.qwen2 import Qwen2ForCausalLM
from nexus_jax.models.qwen2.build import check_mesh
from nexus_jax.models.unipic.diffusion_head import DiffusionHead
from nexus_jax.models.unipic.mar import MAR
from nexus_jax.models.unipic.projectors import make_proj_in, make_proj_out, project


class UniPic(nnx.Module):
    """The generator/understander without the VAE. See :mod:`nexus_jax.unipic.bridge` and ``sample`` for the use."""

    def __init__(self, config: UniPicConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.llm = Qwen2ForCausalLM(config.text, rngs=rngs)
        self.mar = MAR(config.mar, diffloss=DiffusionHead(config.head, rngs=rngs), rngs=rngs)
        self.proj_in = make_proj_in(config.mar, rngs=rngs)
        self.proj_out = make_proj_out(config.mar, rngs=rngs)

    def project_in(self, x: jax.Array) -> jax.Array:
        """MAR features [..., C] -> LLM embeddings [..., hidden]."""
        return project(self.proj_in, x)

    def project_out(self, h: jax.Array) -> jax.Array:
        """LLM hidden states [..., hidden] -> MAR residual [..., C]."""
        return project(self.proj_out, h)


def create_unipic(
    config: UniPicConfig, *, seed: int = 0, mesh: Mesh | None = None, rules: sharding.Rules = sharding.INFERENCE_RULES
) -> UniPic:
    """A randomly initialised model; with ``mesh`` it is built abstractly and materialised straight into its shardings
    (the LLM's mesh divisibility is checked first)."""

    def ctor() -> UniPic:
        return UniPic(config, rngs=nnx.Rngs(seed))

    if mesh is None:
        return ctor()
    check_mesh(config.text, mesh, rules)
    return sharding.create_sharded(ctor, mesh, rules)


def abstract_unipic(config: UniPicConfig) -> UniPic:
    """Shape-only model (``nnx.eval_shape``) for planning and checkpoint restore."""
    return nnx.eval_shape(lambda: UniPic(config, rngs=nnx.Rngs(0)))
