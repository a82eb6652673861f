"""Load a converted inference checkpoint directory (what ``nexus-jax infer --checkpoint`` points at).

Layout (each model directory is an Orbax checkpoint written by ``nexus-jax convert import``)::

    ar/                     Nexus-Gen AR model          (family nexus_ar)
    generation_decoder/     generation decoder          (optional; family of the Nexus-Gen decoders)
    edit_decoder/           editing decoder             (optional)
    vae/                    FLUX VAE                    (needed by both decoders)
    empty_prompt.safetensors  pooled CLIP("") and T5("") (needed by the decoders)
    nexus_jax_tokenizer.json  {"type": "bytes"} or {"type": "hf", "path": "<dir with tokenizer files>"}
    tokenizer/              the Hugging Face tokenizer files (``nexus-jax convert nexus-gen`` copies them here)

Older directories name the pointer ``tokenizer.json``; it is still read when it is a pointer. A real Hugging Face
``tokenizer.json`` at the top level (no pointer) makes the directory itself the tokenizer.

Missing optional parts only disable the tasks that need them (those requests fail with a clear error).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nexus_jax.inference.runner import EmptyPrompt, ImageDecoder

AR_DIR, GEN_DIR, EDIT_DIR, VAE_DIR = "ar", "generation_decoder", "edit_decoder", "vae"
EMPTY_PROMPT, TOKENIZER = "empty_prompt.safetensors", "nexus_jax_tokenizer.json"
LEGACY_TOKENIZER = "tokenizer.json"  # the pointer's old name, which collides with Hugging Face's file


@dataclasses.dataclass
class TextCodec:
    """``encode(text) -> ids`` for plain text and ``decode(ids) -> text`` without special tokens."""

    encode: Callable[[str], Sequence[int]]
    decode: Callable[[Sequence[int]], str]


@dataclasses.dataclass
class Checkpoint:
    ar: Any
    codec: TextCodec
    vae: Any | None = None
    generation: ImageDecoder | None = None
    editing: ImageDecoder | None = None
    empty: EmptyPrompt | None = None


def tokenizer_spec(root: Path) -> dict:
    """The tokenizer pointer of a checkpoint directory: ``nexus_jax_tokenizer.json``; else an old-style pointer
    ``tokenizer.json`` (a JSON object with a ``type``); else a Hugging Face ``tokenizer.json`` at the top level
    (``{"type": "hf", "path": "."}``); else the byte tokenizer."""
    if (root / TOKENIZER).exists():
        return json.loads((root / TOKENIZER).read_text())
    legacy = root / LEGACY_TOKENIZER
    if legacy.exists():
        try:
            doc = json.loads(legacy.read_text())
        except ValueError as e:
            raise ValueError(f"{legacy}: not JSON ({e}); write the pointer as {root / TOKENIZER}") from e
        if isinstance(doc, dict) and doc.get("type") in ("bytes", "hf") and "model" not in doc:
            return doc
        return {"type": "hf", "path": "."}
    return {"type": "bytes"}


def load_codec(root: Path, tokens: Any) -> TextCodec:
    root = Path(root)
    spec = tokenizer_spec(root)
    if spec.get("type") == "bytes":
        from nexus_jax.nexus.tiny import ByteTokenizer

        tok = ByteTokenizer(tokens)
        return TextCodec(tok.encode, lambda ids: tok.decode([i for i in ids if int(i) < 256]))
    if spec.get("type") == "hf":
        from transformers import AutoTokenizer

        path = spec["path"] if os.path.isabs(spec["path"]) else str(root / spec["path"])
        hf = AutoTokenizer.from_pretrained(path)
        return TextCodec(lambda s: hf.encode(s, add_special_tokens=False),
                         lambda ids: hf.decode(list(map(int, ids)), skip_special_tokens=True))
    raise ValueError(f"{root / TOKENIZER}: unknown tokenizer type {spec.get('type')!r}; expected 'bytes' or 'hf'")


def load_empty_prompt(path: Path) -> EmptyPrompt:
    return EmptyPrompt.load(path)


def load_decoder(path: Path, mesh: Any = None) -> ImageDecoder:
    """A converted generation / editing decoder directory -> :class:`ImageDecoder` (params placed per the inference
    rules when ``mesh`` is given)."""
    from flax import nnx

    from conversion import orbax as orbax_io
    from conversion.families import get_family
    from conversion.pipeline import load_arrays
    from conversion.state import assign
    from nexus_jax.models.nexus_decoders import EditingDecoder, GenerationDecoder

    doc = orbax_io.read_config(path)
    classes = {"generation_decoder": GenerationDecoder, "editing_decoder": EditingDecoder}
    if doc["family"] not in classes:
        raise ValueError(f"{path}: family {doc['family']!r} is not a decoder family {sorted(classes)}")
    cfg = get_family(doc["family"]).config_from_json(doc["config"])
    model = nnx.eval_shape(lambda: classes[doc["family"]](cfg, rngs=nnx.Rngs(0)))
    assign(model, load_arrays(path))
    if mesh is not None:
        from nexus_jax.sharding import INFERENCE_RULES, shard_module

        shard_module(model, mesh, INFERENCE_RULES)
    return ImageDecoder(model, cfg.sampler)


def checkpoint_root(checkpoint: str | os.PathLike) -> Path:
    """``checkpoint`` as a path object: ``pathlib.Path`` locally, ``etils.epath.Path`` for a URL (``gs://...``)."""
    if "://" in os.fspath(checkpoint):
        from etils import epath

        return epath.Path(os.fspath(checkpoint))
    return Path(checkpoint)


def load(checkpoint: str | os.PathLike, mesh: Any = None) -> Checkpoint:
    """Load every component present under ``checkpoint``; raises FileNotFoundError naming what is missing."""
    from conversion.pipeline import load_model

    root = checkpoint_root(checkpoint)
    if not (root / AR_DIR).is_dir():
        raise FileNotFoundError(f"{root}: no AR model directory {AR_DIR}/ (convert one with `nexus-jax convert`)")
    ar = load_model(root / AR_DIR, mesh=mesh)
    ck = Checkpoint(ar=ar, codec=load_codec(root, ar.config.tokens))
    if (root / VAE_DIR).is_dir():
        ck.vae = load_model(root / VAE_DIR, mesh=mesh)
    if (root / EMPTY_PROMPT).exists():
        ck.empty = load_empty_prompt(root / EMPTY_PROMPT)
    if (root / GEN_DIR).is_dir():
        ck.generation = load_decoder(root / GEN_DIR, mesh)
    if (root / EDIT_DIR).is_dir():
        ck.editing = load_decoder(root / EDIT_DIR, mesh)
    return ck
