"""The empty-prompt conditioning of the Nexus-Gen decoders, computed with FLUX's own text encoders.

The decoders only ever encode ``""`` (the CFG negative of generation, the pooled vector of both), so the import
computes it once, as diffusers' ``FluxPipeline.encode_prompt("")`` does:

- CLIP-L (``text_encoder/`` + ``tokenizer/``): ``""`` padded to the tokenizer's ``model_max_length`` (77), the
  ``pooler_output`` of ``CLIPTextModel`` -> ``pooled`` ``[pooled_dim]`` (768);
- T5-XXL (``text_encoder_2/`` + ``tokenizer_2/``): ``""`` padded to ``max_sequence_length`` (512), no attention
  mask, the last hidden state of ``T5EncoderModel`` -> ``t5`` ``[512, context_dim]`` (4096).

Written as float32 ``empty_prompt.safetensors`` (what ``nexus_jax.inference.loading`` reads).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from conversion.errors import ConversionError

FLUX_MAX_SEQUENCE_LENGTH = 512
PARTS = {"clip": ("text_encoder", "tokenizer"), "t5": ("text_encoder_2", "tokenizer_2")}


def check_flux_dir(flux_dir: str | os.PathLike) -> Path:
    """``flux_dir`` if it holds the four folders the encoders need; else a ConversionError naming the missing."""
    root = Path(flux_dir)
    missing = [d for pair in PARTS.values() for d in pair if not (root / d).is_dir()]
    if missing:
        raise ConversionError(f"FLUX directory {root} lacks {missing}: it needs FLUX.1-dev's text_encoder/, "
                              "tokenizer/, text_encoder_2/ and tokenizer_2/ folders")
    return root


def _torch_dtype(dtype: str):
    import torch

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConversionError(f"text encoder dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return getattr(torch, dtype)


def encode_empty_prompt(
    flux_dir: str | os.PathLike, max_sequence_length: int = FLUX_MAX_SEQUENCE_LENGTH, dtype: str = "float32"
) -> dict[str, np.ndarray]:
    """``{"pooled": [pooled_dim], "t5": [max_sequence_length, context_dim]}`` (float32) for the prompt ``""``.

    ``dtype`` is the compute dtype of the encoders (float32 needs ~19 GB of RAM for T5-XXL, bfloat16 half of it).
    One encoder is in memory at a time."""
    import torch
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    root = check_flux_dir(flux_dir)
    tdtype = _torch_dtype(dtype)
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        tok = AutoTokenizer.from_pretrained(root / "tokenizer")
        ids = tok([""], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        clip = CLIPTextModel.from_pretrained(root / "text_encoder", dtype=tdtype).eval()
        out["pooled"] = clip(ids, output_hidden_states=False).pooler_output[0].float().numpy()
        del clip
        tok2 = AutoTokenizer.from_pretrained(root / "tokenizer_2")
        ids2 = tok2([""], padding="max_length", max_length=max_sequence_length, truncation=True,
                    return_tensors="pt").input_ids
        t5 = T5EncoderModel.from_pretrained(root / "text_encoder_2", dtype=tdtype).eval()
        out["t5"] = t5(ids2, output_hidden_states=False)[0][0].float().numpy()
        del t5
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def write_empty_prompt(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Write ``{"pooled", "t5"}`` as one safetensors file (``path``: ``.../empty_prompt.safetensors``)."""
    from conversion import io

    path = Path(path)
    if not path.name.endswith(".safetensors"):
        raise ConversionError(f"empty-prompt file must end in .safetensors, got {path}")
    entries = [(k, v.shape, v.dtype) for k, v in arrays.items()]
    writer = io.SafetensorsWriter(path.parent, entries, 2**62, prefix=path.name[: -len(".safetensors")])
    for k, v in arrays.items():
        writer.write(k, v)
    writer.close()
