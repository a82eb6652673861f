"""Load UniPic-1 for inference: a converted checkpoint directory, or an in-memory torch state dict.

Layout of a converted UniPic-1 directory (what ``nexus-jax infer --checkpoint`` points at)::

    <dir>/config.json, <dir>/params/   ``nexus-jax convert import pytorch_model.bin <dir> --family unipic``
    <dir>/vae/                          ``nexus-jax convert import kl16.ckpt <dir>/vae --family kl16_vae``
    <dir>/tokenizer.json                optional: {"type": "hf", "path": ...} (Qwen2.5 tokenizer with <image>) or
                                        {"type": "bytes"} (UTF-8 bytes, the tiny test models; the default)

The model is built abstractly and restored from Orbax (``conversion.pipeline.load_model``: no random init, shardings
per the inference rules with a mesh), as ``nexus_jax.inference.loading`` does for Nexus-Gen.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

VAE_DIR = "vae"
FAMILY = "unipic"
VAE_FAMILY = "kl16_vae"


@dataclasses.dataclass
class UniPicCheckpoint:
    """``model``: ``nexus_jax.models.unipic.model.UniPic``; ``vae``: the KL-16 ``FluxVAE``; ``codec``: text <-> ids."""

    model: Any
    vae: Any
    codec: Any

    @property
    def config(self) -> Any:
        return self.model.config


def checkpoint_family(path: str | os.PathLike) -> str | None:
    """The ``family`` of a converted checkpoint directory's config.json, or None if it has none."""
    p = Path(path) / "config.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text()).get("family")
    except (ValueError, AttributeError):
        return None


def is_unipic_checkpoint(path: str | os.PathLike) -> bool:
    return checkpoint_family(path) == FAMILY


def load(path: str | os.PathLike, mesh: Any = None, config: Any = None) -> UniPicCheckpoint:
    """Restore the model from ``path`` and its VAE from ``path/vae``; raises FileNotFoundError / ValueError naming
    what is missing or of the wrong family. ``config`` overrides the stored one (e.g. fewer sampling iterations)."""
    from conversion.pipeline import load_model
    from nexus_jax.inference.loading import load_codec
    from nexus_jax.nexus.tiny import TINY_TOKENS

    root = Path(path)
    family = checkpoint_family(root)
    if family != FAMILY:
        raise ValueError(f"{root}: not a converted UniPic-1 checkpoint (config.json family {family!r}, "
                         f"want {FAMILY!r})")
    vae_dir = root / VAE_DIR
    if checkpoint_family(vae_dir) != VAE_FAMILY:
        raise FileNotFoundError(
            f"{vae_dir}: no converted KL-16 VAE (family {VAE_FAMILY!r}); run `nexus-jax convert import kl16.ckpt "
            f"{vae_dir} --family {VAE_FAMILY}`"
        )
    model = load_model(root, mesh=mesh, config=config)
    vae = load_model(vae_dir, mesh=mesh)
    if vae.config.latent_channels != model.config.mar.token_embed_dim:
        raise ValueError(f"{vae_dir}: VAE latent channels {vae.config.latent_channels} != MAR token width "
                         f"{model.config.mar.token_embed_dim}")
    # the bytes codec only needs ids < 256 (UniPic's special ids are >= 256); the hf codec reads tokenizer files
    return UniPicCheckpoint(model, vae, load_codec(root, TINY_TOKENS))


def from_torch_state_dict(config: Any, state_dict: Mapping[str, Any], model: Any = None) -> Any:
    """A ``UniPic`` model holding the tensors of an in-memory state dict in the published ``pytorch_model.bin`` layout
    (``siglip2*`` ignored, tied ``llm.lm_head.weight`` checked) through the same table as the converter. Built
    abstractly (no random init) unless ``model`` is given."""
    from flax import nnx

    from conversion import engine
    from conversion.io import DictReader, skip_tensors, torch_to_numpy
    from conversion.state import assign, param_shapes
    from conversion.tables.unipic import SKIP_PREFIXES, unipic_mapping
    from nexus_jax.models.unipic.model import UniPic

    arrays = {k: torch_to_numpy(v) if hasattr(v, "detach") else np.asarray(v) for k, v in state_dict.items()}
    reader = DictReader(arrays, "the state dict")
    skip_tensors(reader, SKIP_PREFIXES)
    model = model if model is not None else nnx.eval_shape(lambda: UniPic(config, rngs=nnx.Rngs(0)))
    steps = engine.plan(unipic_mapping(config), reader.shapes, param_shapes(model), "to_jax", reader.where)
    return assign(model, dict(engine.execute(steps, reader.read)))


def to_torch_state_dict(model: Any) -> dict[str, np.ndarray]:
    """The published ``pytorch_model.bin`` tensors (numpy, no ``siglip2*``) of a ``UniPic`` model."""
    from conversion import engine
    from conversion.io import DictReader
    from conversion.state import module_arrays
    from conversion.tables.unipic import unipic_mapping

    reader = DictReader(module_arrays(model), "the model")
    steps = engine.plan(unipic_mapping(model.config), reader.shapes, None, "to_torch", reader.where)
    return dict(engine.execute(steps, reader.read))
