"""``nexus-jax convert from-run RUN_DIR[/STEP] OUT``: a training checkpoint -> a converted (infer-ready) checkpoint.

The output has the layout ``nexus-jax convert import`` writes (``<component>/params`` + ``config.json``), so
``nexus-jax infer --checkpoint OUT`` and ``nexus-jax convert export OUT/<component> ...`` read it:

* AR run: ``OUT/ar`` (trained LLM + heads and the frozen ViT of the train state);
* decoder run: ``OUT/generation_decoder`` or ``OUT/edit_decoder`` (DiT + adapter / merger), ``OUT/vae`` (the frozen
  VAE of the train state) and ``empty_prompt.safetensors`` with the state's pooled vector (T5("") from the base);
* everything else (the other models, the tokenizer pointer and files) is copied from the *base* converted
  checkpoint: ``--base DIR``, by default the run's ``--init-from`` directory.

The model configs come from ``RUN_DIR/nexus_jax_run.json`` (written by ``nexus-jax train``). ``RUN_DIR`` takes the
newest checkpoint step whose integrity manifest verifies; ``RUN_DIR/STEP`` or ``RUN_DIR/checkpoints/STEP`` picks one.
Only the model parameters are read (no optimiser state).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from conversion import io
from conversion import orbax as orbax_io
from conversion.errors import ConversionError, list_names

RUN_INFO = "nexus_jax_run.json"
CHECKPOINTS = "checkpoints"
EMPTY_PROMPT = "empty_prompt.safetensors"
DTYPES = ("keep", "float32", "bfloat16")


def add_parser(sub: Any) -> None:
    """Register ``from-run`` on the ``nexus-jax convert`` sub-command parser."""
    p = sub.add_parser("from-run", help="training checkpoint (nexus-jax train run) -> converted checkpoint dir")
    p.add_argument("run", help="RUN_DIR (newest valid step), RUN_DIR/STEP or RUN_DIR/checkpoints/STEP")
    p.add_argument("out")
    p.add_argument("--base", help="converted checkpoint to copy the untrained parts from (default: the run's "
                                  "--init-from directory)")
    p.add_argument("--dtype", default="keep", choices=DTYPES, help="store floating tensors in this dtype")
    p.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> dict[str, Any]:
    return from_run(args.run, args.out, base=args.base, dtype=args.dtype, overwrite=args.overwrite)


def resolve_step(path: str | Path) -> tuple[Path, Path]:
    """(run directory, verified checkpoint step directory) of ``RUN_DIR``, ``RUN_DIR/STEP`` or a step directory."""
    from nexus_jax.training.checkpoint import CheckpointError, verify_step_dir

    p = Path(path)
    if not p.exists() and p.name.isdigit() and (p.parent / CHECKPOINTS / p.name).is_dir():
        p = p.parent / CHECKPOINTS / p.name
    if (p / "state").is_dir():
        step_dir = p
        run_dir = p.parent.parent if p.parent.name == CHECKPOINTS else p.parent
    elif (p / CHECKPOINTS).is_dir():
        run_dir = p
        steps = sorted((int(d.name) for d in (p / CHECKPOINTS).iterdir() if d.name.isdigit()), reverse=True)
        step_dir = None
        for s in steps:
            try:
                verify_step_dir(p / CHECKPOINTS / str(s))
            except CheckpointError:
                continue
            step_dir = p / CHECKPOINTS / str(s)
            break
        if step_dir is None:
            raise ConversionError(f"{p / CHECKPOINTS}: no complete checkpoint step (steps found: {sorted(steps)})")
    else:
        raise ConversionError(f"{p} is neither a training run directory (no {CHECKPOINTS}/) nor a checkpoint step")
    try:
        verify_step_dir(step_dir)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    return run_dir, step_dir


def read_model_params(step_dir: Path) -> dict[str, np.ndarray]:
    """Dotted name -> host array of every model parameter (train state ``params`` + ``frozen``) of a step."""
    import jax
    import orbax.checkpoint as ocp

    ckpt = ocp.PyTreeCheckpointer()
    meta = ckpt.metadata(step_dir / "state")
    tree = getattr(getattr(meta, "item_metadata", None), "tree", meta)
    if not isinstance(tree, dict) or not {"params", "frozen"} <= set(tree):
        raise ConversionError(f"{step_dir / 'state'} is not a nexus-jax train state (no params / frozen)")
    wanted = {k: tree[k] for k in ("params", "frozen")}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    restored = ckpt.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
        item=wanted, restore_args=restore_args, partial_restore=True))
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]:
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path][1:]  # drop params / frozen
        if keys and keys[-1] == "value":
            keys = keys[:-1]
        out[".".join(keys)] = np.asarray(leaf)
    return out


def _read_run_info(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RUN_INFO
    if not path.is_file():
        raise ConversionError(f"{path} is missing: it is written by `nexus-jax train` (this run is older or not a "
                              f"nexus-jax training run)")
    return json.loads(path.read_text())


def _component_arrays(task: str, params: dict[str, np.ndarray], names: list[str]) -> dict[str, dict]:
    """Split the train model's parameters per converted component (AR: all; decoders: decoder. / vae.)."""
    if task == "ar":
        return {names[0]: dict(params)}
    sub = next(n for n in names if n != "vae")
    out: dict[str, dict] = {sub: {}, "vae": {}}
    for k, v in params.items():
        if k.startswith("decoder."):
            out[sub][k[len("decoder."):]] = v
        elif k.startswith("vae."):
            out["vae"][k[len("vae."):]] = v
        elif k != "pooled":
            raise ConversionError(f"train state parameter {k} belongs to no decoder component")
    return out


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "keep" or (not np.issubdtype(x.dtype, np.floating) and x.dtype.name != "bfloat16"):
        return x
    import ml_dtypes

    return x.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)


def _write_component(tmp: Path, name: str, family_name: str, config_json: dict, arrays: dict[str, np.ndarray],
                     base: Path | None, source: str, dtype: str) -> int:
    from conversion.families import get_family
    from conversion.pipeline import _abstract_model

    family = get_family(family_name)
    cfg = family.config_from_json(config_json)
    _, target = _abstract_model(family, cfg)
    missing, extra = sorted(set(target) - set(arrays)), sorted(set(arrays) - set(target))
    if missing or extra:
        msg = ([f"{len(missing)} parameters missing: {list_names(missing)}"] if missing else []) + (
            [f"{len(extra)} unknown tensors: {list_names(extra)}"] if extra else [])
        raise ConversionError(f"{source}: the {family_name} model of the run config does not match: " + "; ".join(msg))
    bad = [k for k in target if tuple(target[k].shape) != tuple(arrays[k].shape)]
    if bad:
        raise ConversionError(f"{source}: shapes differ from the {family_name} config: {list_names(bad)}")
    doc = orbax_io.read_config(base / name) if base is not None and (base / name / orbax_io.CONFIG_FILE).is_file() \
        else {}
    scheme = doc.get("scheme") or family.export_scheme
    items = ((k, _cast(arrays[k], dtype)) for k in sorted(target))
    orbax_io.save_streaming(tmp / name / orbax_io.PARAMS_DIR, items)
    orbax_io.write_config(tmp / name, family.name, config_json, source=source, scheme=scheme,
                          table=family.table(scheme, cfg).name)
    return len(target)


def _empty_prompt(tmp: Path, pooled: np.ndarray, base: Path | None) -> bool:
    """``empty_prompt.safetensors`` = the base's T5("") + the trained state's pooled vector (False without a base)."""
    if base is None or not (base / EMPTY_PROMPT).is_file():
        return False
    from safetensors.numpy import load_file

    d = dict(load_file(str(base / EMPTY_PROMPT)))
    d["pooled"] = np.asarray(pooled, np.float32).reshape(np.shape(d.get("pooled", pooled)))
    writer = io.SafetensorsWriter(tmp, [(k, v.shape, v.dtype) for k, v in d.items()], 2**62, prefix="empty_prompt")
    for k, v in d.items():
        writer.write(k, v)
    writer.close()
    return True


def from_run(run: str | Path, out: str | Path, base: str | Path | None = None, dtype: str = "keep",
             overwrite: bool = False) -> dict[str, Any]:
    """Write the converted checkpoint of a training run's step to ``out``; returns a summary."""
    from nexus_jax.inference.loading import TOKENIZER

    if dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    run_dir, step_dir = resolve_step(run)
    info = _read_run_info(run_dir)
    base_dir = Path(base) if base else (Path(info["init_from"]) if info.get("init_from") else None)
    if base_dir is not None and not base_dir.is_dir():
        raise ConversionError(f"base checkpoint {base_dir} does not exist (pass --base or train with --init-from)")
    comps = info["components"]
    params = read_model_params(step_dir)
    per = _component_arrays(info["task"], params, list(comps))
    written: dict[str, int] = {}
    copied: list[str] = []
    with io.atomic_output_dir(out, overwrite) as tmp:
        for name, c in comps.items():
            written[name] = _write_component(tmp, name, c["family"], c["config"], per[name], base_dir,
                                             str(step_dir), dtype)
        if "pooled" in params and _empty_prompt(tmp, params["pooled"], base_dir):
            written[EMPTY_PROMPT] = 2
        if base_dir is not None:
            for entry in sorted(base_dir.iterdir()):
                if (tmp / entry.name).exists() or entry.name.startswith("."):
                    continue
                (shutil.copytree if entry.is_dir() else shutil.copyfile)(entry, tmp / entry.name)
                copied.append(entry.name)
        if info["task"] == "ar" and not any((tmp / n).exists() for n in (TOKENIZER, "tokenizer.json")):
            tok = info.get("tokenizer")
            io.write_json(tmp / TOKENIZER, {"type": "hf", "path": tok} if tok else {"type": "bytes"})
        io.write_json(tmp / "nexus_jax_from_run.json", {"run": str(run_dir.absolute()), "step": int(step_dir.name),
                                                        "base": str(base_dir) if base_dir else ""})
    return {"run": str(run_dir), "step": int(step_dir.name), "out": str(out), "written": written, "copied": copied,
            "base": str(base_dir) if base_dir else None}
