"""One-command import of a released model directory into an ``nexus-jax infer``-ready checkpoint.

``nexus-jax convert nexus-gen SRC [--flux FLUX_DIR] OUT`` (Nexus-Gen V1 / V2 as downloaded, plus FLUX.1-dev)::

    SRC/model-*.safetensors + index + config.json  -> OUT/ar/                 (family nexus_ar; or SRC/ar/)
    SRC/generation_decoder.bin | decoder_81_512.bin -> OUT/generation_decoder/ (preset full)
    SRC/edit_decoder.bin                            -> OUT/edit_decoder/       (preset full)
    FLUX_DIR/ae.safetensors | FLUX_DIR/vae/ | SRC/ae.safetensors -> OUT/vae/
    FLUX_DIR/text_encoder{,_2}/ + tokenizer{,_2}/   -> OUT/empty_prompt.safetensors (CLIP("") pooled, T5("") x 512)
    SRC tokenizer files (tokenizer.json, vocab.json...) -> OUT/tokenizer/ + OUT/nexus_jax_tokenizer.json

``nexus-jax convert unipic SRC OUT`` (Skywork UniPic-1 as downloaded)::

    SRC/pytorch_model.bin -> OUT/ (family unipic, preset full);  SRC/kl16.ckpt -> OUT/vae/ (family kl16_vae)
    SRC/Qwen2.5-1.5B-Instruct/ tokenizer (+ the <image> token) -> OUT/tokenizer/ + OUT/nexus_jax_tokenizer.json

A ``<stem>_config.json`` beside a weights file (``generation_decoder_config.json``, ``ae_config.json``,
``unipic_config.json``...) replaces the full preset: the embedded default checkpoint and the tests use that. The whole
output is written to a temporary sibling and renamed when complete. ``OUT/release.json`` records what came from where.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from conversion import io
from conversion.errors import ConversionError

POINTER = "nexus_jax_tokenizer.json"  # = nexus_jax.inference.loading.TOKENIZER (kept import-free here)
LEGACY_POINTER = "tokenizer.json"
TOKENIZER_DIR = "tokenizer"
EMPTY_PROMPT = "empty_prompt.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "chat_template.json", "chat_template.jinja", "tokenizer.model", "spiece.model",
)
UNIPIC_IMAGE_TOKEN = "<image>"


def _log(msg: str, enabled: bool) -> None:
    if enabled:
        print(f"[convert] {msg}", file=sys.stderr, flush=True)


def _config_beside(weights: Path, default: str) -> str:
    """``<stem>_config.json`` next to ``weights`` if present, else ``default`` (a preset name or ``hf``)."""
    cfg = weights.parent / f"{weights.name.split('.')[0]}_config.json"
    return str(cfg) if cfg.is_file() else default


# ---------------------------------------------------------------------------------------------------- tokenizer
def _is_pointer(path: Path) -> dict | None:
    """The pointer object in ``path`` if it is a nexus-jax tokenizer pointer (not a Hugging Face tokenizer.json)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(doc, dict) and doc.get("type") in ("bytes", "hf") and "model" not in doc:
        return doc
    return None


def find_tokenizer(*dirs: Path) -> tuple[str, Path | None]:
    """The first of ``dirs`` with Hugging Face tokenizer files -> ("hf", dir); one with a nexus-jax pointer ->
    ("hf", target dir) or ("bytes", None); nothing -> ("none", None)."""
    for d in dirs:
        if d is None or not d.is_dir():
            continue
        for name in (POINTER, LEGACY_POINTER):
            doc = _is_pointer(d / name) if (d / name).is_file() else None
            if doc is not None:
                if doc["type"] == "bytes":
                    return "bytes", None
                target = Path(doc["path"]) if os.path.isabs(doc["path"]) else d / doc["path"]
                return "hf", target
        if (d / "tokenizer_config.json").is_file() or (d / "tokenizer.json").is_file() or (
            (d / "vocab.json").is_file() and (d / "merges.txt").is_file()
        ):
            return "hf", d
    return "none", None


def copy_tokenizer(src: Path, out_root: Path, add_special: tuple[str, ...] = ()) -> dict[str, Any]:
    """Copy the tokenizer files of ``src`` to ``out_root/tokenizer/`` (with ``add_special`` tokens added if absent,
    re-saved with ``save_pretrained``), check that ``AutoTokenizer`` loads them, write the pointer."""
    from transformers import AutoTokenizer

    dst = out_root / TOKENIZER_DIR
    dst.mkdir()
    files = [f for f in TOKENIZER_FILES if (src / f).is_file()]
    if not files:
        raise ConversionError(f"{src} holds no tokenizer files (looked for {list(TOKENIZER_FILES)})")
    for f in files:
        shutil.copyfile(src / f, dst / f)
    try:
        tok = AutoTokenizer.from_pretrained(str(dst))
    except Exception as e:  # transformers raises many types here; name the directory
        raise ConversionError(f"the tokenizer files of {src} ({files}) do not load with AutoTokenizer: {e}") from e
    added = [t for t in add_special if t not in tok.get_vocab()]
    if added:
        tok.add_special_tokens({"additional_special_tokens": added}, replace_extra_special_tokens=False)
        shutil.rmtree(dst)
        tok.save_pretrained(str(dst))
    io.write_json(out_root / POINTER, {"type": "hf", "path": TOKENIZER_DIR})
    return {"type": "hf", "from": str(src), "files": files, "added_tokens": added, "vocab": len(tok)}


def _tokenizer(out_root: Path, found: tuple[str, Path | None], progress: bool, add_special=()) -> dict[str, Any]:
    kind, where = found
    if kind == "hf":
        return copy_tokenizer(where, out_root, add_special)
    if kind == "none":
        _log("no tokenizer files found: the byte tokenizer is used (right only for tiny test models)", progress)
    io.write_json(out_root / POINTER, {"type": "bytes"})
    return {"type": "bytes"}


# ---------------------------------------------------------------------------------------------------- Nexus-Gen
def _first(*paths: Path) -> Path | None:
    return next((p for p in paths if p is not None and p.exists()), None)


def nexus_gen_sources(src: Path, flux: Path | None) -> dict[str, tuple[Path, str, str | None]]:
    """Output directory -> (source, family, config) for each model of a Nexus-Gen release (missing parts left out)."""
    ar = src / "ar" if (src / "ar").is_dir() else src
    parts: dict[str, tuple[Path, str, str | None]] = {"ar": (ar, "nexus_ar", None)}
    gen = _first(src / "generation_decoder.bin", src / "decoder_81_512.bin")
    if gen is not None:
        parts["generation_decoder"] = (gen, "generation_decoder", _config_beside(gen, "full"))
    edit = _first(src / "edit_decoder.bin")
    if edit is not None:
        parts["edit_decoder"] = (edit, "editing_decoder", _config_beside(edit, "full"))
    vae = _first(flux / "ae.safetensors" if flux else None, flux / "vae" if flux else None, src / "ae.safetensors")
    if vae is not None:
        parts["vae"] = (vae, "vae", "hf" if vae.is_dir() else _config_beside(vae, "full"))
    return parts


def import_nexus_gen(
    source: str | os.PathLike,
    out: str | os.PathLike,
    flux: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    mesh: Any = None,
    text_encoder_dtype: str = "float32",
    max_sequence_length: int = 512,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """A Nexus-Gen release directory (+ FLUX.1-dev for the VAE and the empty prompt) -> the checkpoint directory
    ``nexus-jax infer --checkpoint`` reads (``nexus_jax.inference.loading``). Returns a summary."""
    from conversion.pipeline import import_checkpoint
    from conversion.text_encoders import check_flux_dir, encode_empty_prompt, write_empty_prompt

    src, flux_dir = Path(source), Path(flux) if flux is not None else None
    if not src.is_dir():
        raise ConversionError(f"Nexus-Gen source {src} is not a directory")
    if flux_dir is not None and not flux_dir.is_dir():
        raise ConversionError(f"--flux {flux_dir} is not a directory")
    parts = nexus_gen_sources(src, flux_dir)
    decoders = [k for k in ("generation_decoder", "edit_decoder") if k in parts]
    if decoders and "vae" not in parts:
        raise ConversionError(f"{decoders} need the FLUX VAE: pass --flux with FLUX.1-dev's ae.safetensors or vae/")
    encoders = flux_dir is not None and all((flux_dir / d).is_dir() for d in ("text_encoder", "text_encoder_2"))
    if decoders and not encoders and not (src / EMPTY_PROMPT).is_file():
        raise ConversionError(f"{decoders} need the empty-prompt conditioning: pass --flux with FLUX.1-dev's "
                              f"text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/ (or put {EMPTY_PROMPT} "
                              f"in {src})")
    summary: dict[str, Any] = {"kind": "nexus-gen", "source": str(src), "flux": str(flux_dir) if flux_dir else None,
                               "components": {}}
    with io.atomic_output_dir(out, overwrite) as tmp:
        for name, (path, family, config) in parts.items():
            _log(f"{name}: {path} (family {family}, config {config or 'from the source'})", progress)
            r = import_checkpoint(path, tmp / name, family, config, mesh=mesh, progress=progress)
            summary["components"][name] = {"source": str(path), "config": config, **r}
        if encoders:
            check_flux_dir(flux_dir)
            _log(f"empty prompt: CLIP + T5 of {flux_dir} ({text_encoder_dtype}, {max_sequence_length} tokens)",
                 progress)
            arrays = encode_empty_prompt(flux_dir, max_sequence_length, text_encoder_dtype)
            write_empty_prompt(tmp / EMPTY_PROMPT, arrays)
            summary["empty_prompt"] = {"from": str(flux_dir), "dtype": text_encoder_dtype,
                                       "shapes": {k: list(v.shape) for k, v in arrays.items()}}
        elif (src / EMPTY_PROMPT).is_file():
            shutil.copyfile(src / EMPTY_PROMPT, tmp / EMPTY_PROMPT)
            summary["empty_prompt"] = {"from": str(src / EMPTY_PROMPT)}
        found = ("hf", Path(tokenizer)) if tokenizer is not None else find_tokenizer(src, parts["ar"][0])
        summary["tokenizer"] = _tokenizer(tmp, found, progress)
        io.write_json(tmp / "release.json", summary)
    return summary


# ----------------------------------------------------------------------------------------------------- UniPic-1
def import_unipic(
    source: str | os.PathLike,
    out: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    mesh: Any = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """A UniPic-1 release directory (``pytorch_model.bin``, ``kl16.ckpt``, ``Qwen2.5-1.5B-Instruct/``) -> the
    directory ``nexus-jax infer`` runs as UniPic (model at the top, VAE in ``vae/``). Returns a summary."""
    from conversion.pipeline import import_checkpoint

    src = Path(source)
    model, vae = src / "pytorch_model.bin", src / "kl16.ckpt"
    missing = [p.name for p in (model, vae) if not p.is_file()]
    if missing:
        raise ConversionError(f"UniPic-1 source {src} lacks {missing} (the release has pytorch_model.bin and "
                              "kl16.ckpt)")
    summary: dict[str, Any] = {"kind": "unipic", "source": str(src), "components": {}}
    with io.atomic_output_dir(out, overwrite) as tmp:
        staged = tmp / ".model"
        cfg = _config_beside(model, "full")
        if cfg == "full" and (src / "unipic_config.json").is_file():
            cfg = str(src / "unipic_config.json")
        _log(f"model: {model} (family unipic, config {cfg})", progress)
        summary["components"]["model"] = import_checkpoint(model, staged, "unipic", cfg, mesh=mesh, progress=progress)
        for entry in os.listdir(staged):
            os.replace(staged / entry, tmp / entry)
        staged.rmdir()
        vcfg = _config_beside(vae, "full")
        _log(f"vae: {vae} (family kl16_vae, config {vcfg})", progress)
        summary["components"]["vae"] = import_checkpoint(vae, tmp / "vae", "kl16_vae", vcfg, mesh=mesh,
                                                         progress=progress)
        found = ("hf", Path(tokenizer)) if tokenizer is not None else find_tokenizer(
            src / "Qwen2.5-1.5B-Instruct", src)
        summary["tokenizer"] = _tokenizer(tmp, found, progress, add_special=(UNIPIC_IMAGE_TOKEN,))
        io.write_json(tmp / "release.json", summary)
    return summary
