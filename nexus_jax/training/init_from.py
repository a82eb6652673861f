"""Start training from a converted checkpoint (``nexus-jax train --init-from DIR``) and describe a run's models.

``DIR`` is what ``nexus-jax convert import`` / the main job write (see :mod:`nexus_jax.inference.loading`)::

    ar/  generation_decoder/  edit_decoder/  vae/  empty_prompt.safetensors  ...

AR runs take every parameter from ``ar/`` (the trained LLM and heads and the frozen ViT); decoder runs take the
decoder (DiT + adapter / merger) from ``generation_decoder/`` or ``edit_decoder/``, the frozen VAE from ``vae/`` and the
pooled CLIP("") vector and the T5("") context (for ``flow_loss.cond_dropout``) from ``empty_prompt.safetensors``.
The model configs come from the checkpoint's ``config.json`` files; a preset whose model config differs is an error
naming the differing fields (``remat``, the decoder's sampler settings and the editing merger's reference grid do not
count: no weight depends on them). Weights are restored by Orbax straight into the train state's shardings.

:func:`write_run_info` records the models of a run (``<run-dir>/nexus_jax_run.json``) so that
``nexus-jax convert from-run`` can write a converted checkpoint from the run's train checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from configs.training import TrainConfig

AR_DIR, GEN_DIR, EDIT_DIR, VAE_DIR = "ar", "generation_decoder", "edit_decoder", "vae"
EMPTY_PROMPT = "empty_prompt.safetensors"
DECODER_DIRS = {"generation_decoder": GEN_DIR, "editing_decoder": EDIT_DIR}
RUN_INFO = "nexus_jax_run.json"
# model-config fields that may differ between the preset and the checkpoint (training-only or inference-only, or,
# for the editing merger's reference grid, input geometry that no weight depends on); the run takes the checkpoint's
IGNORED_FIELDS = ("remat", "sampler", "ref_grid")

InitParams = Callable[[dict[str, Any]], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class ModelSetup:
    """The model configs of a training job and, with ``--init-from``, the hook that fills them from a checkpoint.

    ``model_cfg``: the AR :class:`~configs.nexus_gen.NexusGenConfig` or the decoder
    :class:`~nexus_jax.training.decoder_loop.DecoderParts`; ``components``: converted-directory name ->
    (family, config) of what the run trains or carries (without remat); ``pooled``: CLIP("") pooled vector or None;
    ``negative_context``: T5("") [Lt, context_dim] or None.
    """

    model_cfg: Any
    components: dict[str, tuple[str, Any]]
    init_params: InitParams | None = None
    pooled: np.ndarray | None = None
    init_from: str = ""
    negative_context: np.ndarray | None = None


def config_differences(preset: Any, found: Any, prefix: str = "") -> list[str]:
    """``["vl.text.num_layers: preset 2, checkpoint 4", ...]`` over two config dataclasses (IGNORED_FIELDS skipped)."""
    out = []
    for f in dataclasses.fields(preset):
        if f.name in IGNORED_FIELDS:
            continue
        a, b = getattr(preset, f.name), getattr(found, f.name, None)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
            out += config_differences(a, b, name + ".")
        elif not _same(a, b):
            out.append(f"{name}: preset {a!r}, checkpoint {b!r}")
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        if a == b:
            return True
    except Exception:  # noqa: BLE001 - arrays / dtypes with odd equality
        pass
    try:
        return np.dtype(a) == np.dtype(b)
    except TypeError:
        return False


def _check(preset: Any, found: Any, where: Path) -> None:
    diff = config_differences(preset, found)
    if diff:
        shown = "; ".join(diff[:10]) + (f"; ... ({len(diff)} in total)" if len(diff) > 10 else "")
        raise ValueError(f"--init-from {where}: the checkpoint's model config differs from the preset's: {shown}")


def read_component(directory: Path, family: str) -> Any:
    """The typed config of a converted model directory (its ``config.json``), which must be of ``family``."""
    from conversion import orbax as orbax_io
    from conversion.errors import ConversionError
    from conversion.families import get_family

    if not directory.is_dir():
        raise FileNotFoundError(f"--init-from: {directory} does not exist (expected a `nexus-jax convert import` "
                                f"output of family {family!r})")
    try:
        doc = orbax_io.read_config(directory)
    except ConversionError as e:
        raise ValueError(f"--init-from: {e}") from None
    if doc.get("family") != family:
        raise ValueError(f"--init-from: {directory} holds family {doc.get('family')!r}, this job needs {family!r}")
    return get_family(family).config_from_json(doc["config"])


def _leaf_name(path: tuple[Any, ...]) -> str:
    """Key path of a leaf in an nnx.State pytree -> the converter's dotted name (``decoder.dit.x.kernel``)."""
    return ".".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def load_into(abstract: dict[str, Any], sources: dict[str, Path], extra: dict[str, np.ndarray] | None = None,
              where: str = "") -> dict[str, Any]:
    """Fill an abstract ``{"params": nnx.State, "frozen": nnx.State}`` (ShapeDtypeStruct leaves with shardings).

    ``sources``: name prefix (``""``, ``"decoder."``, ``"vae."``) -> converted ``params/`` directory whose tensor
    names are the leaf names without that prefix; ``extra``: leaf name -> host array. Every leaf must be found,
    with its shape; every stored tensor must be used. Arrays land in the leaves' shardings and dtypes.
    """
    from conversion import orbax as orbax_io
    from conversion.errors import list_names

    extra = extra or {}
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    leaves = {_leaf_name(p[1:]): (i, a) for i, (p, a) in enumerate(flat)}
    values: list[Any] = [None] * len(flat)
    used: set[str] = set()
    for name, arr in extra.items():
        if name in leaves:
            i, a = leaves[name]
            arr = np.asarray(arr, a.dtype)
            if tuple(arr.shape) != tuple(a.shape):
                raise ValueError(f"--init-from {where}: {name} has shape {np.shape(arr)}, the model wants {a.shape}")
            values[i] = jax.device_put(arr, a.sharding)
            used.add(name)
    for prefix in sorted(sources, key=len, reverse=True):
        params = sources[prefix]
        stored = orbax_io.metadata(params)
        mine = {n: n[len(prefix):] for n in leaves if n.startswith(prefix) and n not in used}
        missing = sorted(n for n, s in mine.items() if s not in stored)
        unused = sorted(set(stored) - set(mine.values()))
        if missing or unused:
            msg = [f"{len(missing)} parameters of the training model are not in it: {list_names(missing)}"] if missing \
                else []
            msg += [f"{len(unused)} stored tensors match no parameter: {list_names(unused)}"] if unused else []
            raise ValueError(f"--init-from {params.parent}: " + "; ".join(msg))
        bad = {n: (stored[s].shape, leaves[n][1].shape) for n, s in mine.items()
               if tuple(stored[s].shape) != tuple(leaves[n][1].shape)}
        if bad:
            shown = ", ".join(f"{n} stored {a} != model {b}" for n, (a, b) in list(bad.items())[:10])
            raise ValueError(f"--init-from {params.parent}: shape mismatch: {shown}")
        loaded = orbax_io.load(params, list(mine.values()), {s: leaves[n][1].sharding for n, s in mine.items()})
        for n, s in mine.items():
            i, a = leaves[n]
            x = loaded.pop(s)
            values[i] = x if x.dtype == a.dtype else x.astype(a.dtype)
            used.add(n)
    left = sorted(n for n in leaves if n not in used)
    if left:
        raise ValueError(f"--init-from {where}: no source for {list_names(left)}")
    return jax.tree_util.tree_unflatten(treedef, values)


def _read_empty_prompt(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """(CLIP("") pooled [pooled_dim], T5("") context [Lt, context_dim]) through the one empty-prompt reader."""
    from nexus_jax.pipelines.decode import EmptyPrompt

    path = root / EMPTY_PROMPT
    if not path.is_file():
        raise FileNotFoundError(f"--init-from {root}: {EMPTY_PROMPT} (the pooled CLIP('') vector) is missing")
    empty = EmptyPrompt.load(path)
    return empty.pooled.reshape(-1), empty.t5[0]


def _ar_root(path: Path) -> tuple[Path, Path]:
    """(checkpoint root, AR model directory): DIR/ar, or DIR itself when it is the AR model directory."""
    if (path / AR_DIR).is_dir():
        return path, path / AR_DIR
    if (path / "config.json").is_file() and (path / "params").is_dir():
        return path.parent, path
    raise FileNotFoundError(f"--init-from {path}: no {AR_DIR}/ model directory (write one with "
                            f"`nexus-jax convert import ... --family nexus_ar`)")


def model_setup(cfg: TrainConfig, init_from: str | os.PathLike = "") -> ModelSetup:
    """The model configs of ``cfg`` (from the preset, or from the converted checkpoint ``init_from``), set up by the
    family that trains ``cfg.task`` (:func:`nexus_jax.families.for_task`)."""
    from nexus_jax import families

    return families.resolve(families.for_task(cfg.task).training.setup)(cfg, init_from)


def nexus_gen_setup(cfg: TrainConfig, init_from: str | os.PathLike = "") -> ModelSetup:
    """Nexus-Gen runs: the AR model (``ar``) or a decoder with its frozen VAE (``generation_decoder`` /
    ``editing_decoder``)."""
    if cfg.task == "ar":
        from nexus_jax.training.ar_loop import model_config

        preset = model_config(cfg.model_preset)
        if not init_from:
            return ModelSetup(preset, {AR_DIR: ("nexus_ar", preset)})
        _, ar_dir = _ar_root(Path(init_from))
        found = read_component(ar_dir, "nexus_ar")
        _check(preset, found, ar_dir)
        where = str(ar_dir)
        return ModelSetup(found, {AR_DIR: ("nexus_ar", found)},
                          lambda abstract: load_into(abstract, {"": ar_dir / "params"}, where=where),
                          init_from=str(Path(init_from).absolute()))
    from nexus_jax.training.decoder_loop import DecoderParts, decoder_parts

    parts = decoder_parts(cfg.task, cfg.model_preset, cfg.loop.remat)
    sub, family = DECODER_DIRS[cfg.task], cfg.task
    if not init_from:
        return ModelSetup(parts, {sub: (family, _no_remat(parts.decoder)), VAE_DIR: ("vae", parts.vae)})
    root = Path(init_from)
    dec = read_component(root / sub, family)
    vae = read_component(root / VAE_DIR, "vae")
    _check(parts.decoder, dec, root / sub)
    _check(parts.vae, vae, root / VAE_DIR)
    pooled, negative_context = _read_empty_prompt(root)
    new = DecoderParts(dataclasses.replace(dec, dit=dataclasses.replace(dec.dit, remat=parts.decoder.dit.remat)),
                       vae, parts.editing)
    sources = {"decoder.": root / sub / "params", "vae.": root / VAE_DIR / "params"}
    return ModelSetup(new, {sub: (family, dec), VAE_DIR: ("vae", vae)},
                      lambda abstract: load_into(abstract, sources, {"pooled": pooled}, where=str(root)),
                      pooled=pooled, init_from=str(root.absolute()), negative_context=negative_context)


def unipic_setup(cfg: TrainConfig, init_from: str | os.PathLike = "") -> ModelSetup:
    """UniPic runs: the model preset; ``--init-from`` is not wired up for UniPic yet."""
    from nexus_jax.training.unipic_loop import model_config, unipic_components

    if init_from:
        raise ValueError(f"--init-from {init_from}: starting a UniPic run from a converted checkpoint is not "
                         "supported yet")
    model_cfg = model_config(cfg.model_preset, cfg.loop.remat)
    return ModelSetup(model_cfg, unipic_components(model_cfg))


def _no_remat(dec: Any) -> Any:
    return dataclasses.replace(dec, dit=dataclasses.replace(dec.dit, remat="none"))


def write_run_info(run_dir: Any, cfg: TrainConfig, setup: ModelSetup, preset: str = "", tokenizer: str = "") -> Any:
    """``<run_dir>/nexus_jax_run.json``: task, presets, ``--init-from`` and each model's family and config (written
    atomically; read by ``nexus-jax convert from-run``)."""
    from conversion.families import get_family

    doc = {
        "format_version": 1, "task": cfg.task, "preset": preset, "model_preset": cfg.model_preset,
        "init_from": setup.init_from, "tokenizer": str(Path(tokenizer).absolute()) if tokenizer else "",
        "components": {name: {"family": fam, "config": get_family(fam).config_to_json(c)}
                       for name, (fam, c) in setup.components.items()},
    }
    from nexus_jax.paths import atomic_write_text, join

    return atomic_write_text(join(run_dir, RUN_INFO), json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
