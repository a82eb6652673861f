"""End-to-end conversions: torch checkpoint -> Orbax (import), Orbax -> torch layout (export), Orbax -> nnx model.

Every writer goes through :func:`conversion.io.atomic_output_dir`: the output appears only when complete.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from etils.epath import Path  # local paths and gs:// URLs alike

from conversion import engine, io
from conversion import orbax as orbax_io
from conversion.errors import ConversionError
from conversion.families import Family, get_family
from conversion.schemes import detect_scheme


def resolve_config(
    family: Family, spec: str | None, source: str | os.PathLike | None = None, shapes: dict | None = None
) -> Any:
    """``spec``: a preset name, a path to a JSON file of config fields, or ``hf`` (the source dir's config.json);
    None = ``hf`` if the source directory has a config.json and the family reads HF configs. With None or ``hf``,
    the family's exact config file (``extras_file``, e.g. ``nexus_gen_config.json`` written by export) wins."""
    src_cfg = Path(source) / "config.json" if source is not None and Path(source).is_dir() else None
    extras = src_cfg.parent / family.extras_file if src_cfg is not None and family.extras_file else None
    if spec in (None, "hf") and extras is not None and extras.is_file():
        doc = json.loads(extras.read_text())
        return family.config_from_json(doc.get("config", doc))
    if spec is None:
        if family.config_from_hf is not None and src_cfg is not None and src_cfg.exists():
            spec = "hf"
        else:
            raise ConversionError(
                f"family {family.name!r} needs --config: one of the presets {sorted(family.presets)}, a JSON file, "
                f"or 'hf' (read <source>/config.json)"
            )
    if spec == "hf":
        if family.config_from_hf is None or src_cfg is None or not src_cfg.exists():
            raise ConversionError("--config hf needs a source directory with config.json and a family that reads it")
        return family.config_from_hf(json.loads(src_cfg.read_text()), shapes)
    if spec in family.presets:
        return family.preset(spec)
    if Path(spec).is_file():
        if family.config_from_json is None:
            raise ConversionError(f"family {family.name!r} cannot read a JSON config")
        doc = json.loads(Path(spec).read_text())
        return family.config_from_json(doc.get("config", doc))
    raise ConversionError(f"--config {spec!r} is neither a preset of {family.name} {sorted(family.presets)} nor a file")


def pipeline_component(source: str | os.PathLike, family: Family) -> str | os.PathLike:
    """``source/transformer`` or ``source/vae`` when ``source`` is a diffusers pipeline root (a ``model_index.json``,
    or no weights of its own beside that folder) and the family has such a folder; else ``source``."""
    p = Path(source)
    sub = p / family.pipeline_subdir if family.pipeline_subdir and p.is_dir() else None
    if sub is None or not sub.is_dir():
        return source
    own = any(f.suffix in (".safetensors", ".bin", ".pt") or f.name.endswith(".index.json") for f in p.iterdir())
    return sub if (p / "model_index.json").is_file() or not own else source


def _abstract_model(family: Family, config: Any):
    from flax import nnx

    from conversion.state import abstract_params

    return abstract_params(lambda: family.build(config, nnx.Rngs(0)))


def _placer(abstract_module: Any, mesh: Any, rules: Any):
    """name -> (array -> jax.Array placed with the parameter's target NamedSharding)."""
    import jax
    from flax import nnx

    from conversion.state import flat_variables
    from nexus_jax import sharding

    shardings = sharding.state_shardings(nnx.state(abstract_module, nnx.Param), mesh, rules)
    flat = {k: v.get_value() for k, v in flat_variables(shardings).items()}
    return (lambda name, x: jax.device_put(x, flat[name])), flat


def import_checkpoint(
    source: str | os.PathLike,
    out: str | os.PathLike,
    family_name: str,
    config: str | Any | None = None,
    scheme: str | None = None,
    mesh: Any = None,
    rules: Any = None,
    progress: bool = True,
    overwrite: bool = False,
    group_bytes: int = 256 * 2**20,
) -> dict[str, Any]:
    """torch checkpoint (file or directory) -> Orbax checkpoint at ``out`` + config.json. Returns a summary."""
    from conversion.split_layout import SplitReader, split_subdirs

    family = get_family(family_name)
    source = pipeline_component(source, family)
    subdirs = split_subdirs(source, tuple(family.split_configs))
    with SplitReader(source, subdirs) if subdirs else io.open_checkpoint(source) as reader:
        skipped = io.skip_tensors(reader, family.skip_prefixes)
        if config is None or isinstance(config, str):
            config = resolve_config(family, config, source, reader.shapes)
        cfg = config
        scheme = scheme or detect_scheme(reader.shapes, str(source))
        table = family.table(scheme, cfg)
        if family.build is None:
            if mesh is not None:
                raise ConversionError(f"family {family.name!r} has no JAX model wired in: --mesh is not available")
            abstract, target_shapes = None, None
        else:
            abstract, target = _abstract_model(family, cfg)
            target_shapes = {k: v.shape for k, v in target.items()}
        steps = engine.plan(table, reader.shapes, target_shapes, "to_jax", source_name=reader.where)
        place = None
        if mesh is not None:
            from nexus_jax.sharding import INFERENCE_RULES

            place, _ = _placer(abstract, mesh, rules or INFERENCE_RULES)
        n_out = sum(len(s.outputs) for s in steps)
        items = io.iter_progress(
            engine.execute(steps, reader.read, prefetch=True), n_out, f"import {family.name}", progress
        )
        with io.atomic_output_dir(out, overwrite) as tmp:
            orbax_io.save_streaming(tmp / orbax_io.PARAMS_DIR, items, place, group_bytes)
            orbax_io.write_config(
                tmp, family.name, family.config_to_json(cfg), source=str(source), scheme=scheme, table=table.name,
                **({"skipped_tensors": len(skipped)} if skipped else {}),
            )
    return {"family": family.name, "scheme": scheme, "tensors_in": len(reader.shapes), "tensors_out": n_out,
            "tensors_skipped": len(skipped)}


def export_checkpoint(
    source: str | os.PathLike,
    out: str | os.PathLike,
    scheme: str | None = None,
    fmt: str = "safetensors",
    max_shard_bytes: int = io.DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
    overwrite: bool = False,
    group_bytes: int = 256 * 2**20,
) -> dict[str, Any]:
    """Orbax checkpoint written by :func:`import_checkpoint` -> torch layout directory at ``out``.

    ``fmt``: ``safetensors`` (HF shards + index, plus the family's HF config.json) or ``bin`` (one torch pickle,
    ``{weights_prefix}.bin``, as the Nexus-Gen decoders ship)."""
    if fmt not in ("safetensors", "bin"):
        raise ConversionError(f"export format must be 'safetensors' or 'bin', got {fmt!r}")
    doc = orbax_io.read_config(source)
    family = get_family(doc["family"])
    cfg = family.config_from_json(doc["config"])
    scheme = scheme or doc.get("scheme") or family.export_scheme
    table = family.table(scheme, cfg)
    params = Path(source) / orbax_io.PARAMS_DIR
    stored = orbax_io.metadata(params)
    steps = engine.plan(table, {k: v.shape for k, v in stored.items()}, None, "to_torch", source_name=str(params))
    entries = []
    for s in steps:
        dtypes = {np.dtype(stored[n].dtype) for n in s.inputs}
        if len(dtypes) != 1:
            raise ConversionError(f"tensors {s.inputs} of one rule have different dtypes {sorted(map(str, dtypes))}")
        entries += [
            (n, shape, dtypes.pop() if len(s.outputs) == 1 else next(iter(dtypes)))
            for n, shape in zip(s.outputs, s.output_shapes)
        ]
    read = _grouped_reader(params, steps, {k: v.shape for k, v in stored.items()}, stored, group_bytes)
    items = io.iter_progress(engine.execute(steps, read), len(entries), f"export {family.name}", progress)
    split = any("/" in n for n, _, _ in entries)
    if split and fmt != "safetensors":
        raise ConversionError(f"key scheme {scheme!r} spans folders; it is written as safetensors only, not {fmt}")
    with io.atomic_output_dir(out, overwrite) as tmp:
        staging = tmp if fmt == "safetensors" else tmp / ".staging"
        staging.mkdir(exist_ok=True)
        cap = max_shard_bytes if fmt == "safetensors" else 2**62
        if split:
            from conversion.split_layout import SplitWriter

            writer = SplitWriter(staging, entries, cap, prefix=family.weights_prefix)
            for sub in writer.subdirs:
                if sub not in family.split_configs:
                    raise ConversionError(f"family {family.name!r} has no config.json for folder {sub}/")
                io.write_json(tmp / sub / "config.json", family.split_configs[sub](cfg))
        else:
            writer = io.SafetensorsWriter(staging, entries, cap, prefix=family.weights_prefix)
        for name, array in items:
            writer.write(name, array)
        writer.close()
        if fmt == "bin":
            staged = io.SafetensorsReader([staging / f for f in writer.files])
            io.write_torch_bin(tmp / f"{family.weights_prefix}.bin", staged)
            del staged
            for f in writer.files:
                (staging / f).unlink()
            staging.rmdir()
        if family.hf_config is not None and (not family.hf_config_schemes or scheme in family.hf_config_schemes):
            hf = family.hf_config(cfg)
            if family.extras_file is not None and hf.get("dtype") is None:  # transformers: the stored dtype
                hf["dtype"] = hf["torch_dtype"] = _main_dtype(entries)  # (5.x reads dtype, 4.x torch_dtype)
            io.write_json(tmp / "config.json", hf)
        if family.extras_file is not None:
            io.write_json(tmp / family.extras_file, family.config_to_json(cfg))
    return {"family": family.name, "scheme": scheme, "tensors_out": len(entries), "format": fmt}


def _main_dtype(entries: list) -> str:
    """The dtype holding most of the exported elements (``torch_dtype`` of a transformers config)."""
    count: dict[str, int] = {}
    for _, shape, dtype in entries:
        count[np.dtype(dtype).name] = count.get(np.dtype(dtype).name, 0) + int(np.prod(shape, dtype=np.int64))
    return max(count, key=count.get) if count else "float32"


def _grouped_reader(params: Path, steps, shapes, stored, group_bytes: int):
    """A ``read(name)`` for :func:`engine.execute` that restores the next steps' inputs in one Orbax call per
    ``group_bytes`` (a bigger tensor alone) and forgets each tensor once it has been read."""
    order = [n for s in steps for n in s.inputs]
    cache: dict[str, Any] = {}
    pos = 0

    def nbytes(n: str) -> int:
        return int(np.prod(shapes[n], dtype=np.int64)) * np.dtype(stored[n].dtype).itemsize

    def read(name: str) -> np.ndarray:
        nonlocal pos
        if name not in cache:
            if order[pos] != name:
                raise ConversionError(f"export read {name} out of order (expected {order[pos]})")
            batch, used = [], 0
            while pos + len(batch) < len(order) and (
                not batch or used + nbytes(order[pos + len(batch)]) <= group_bytes
            ):
                used += nbytes(order[pos + len(batch)])
                batch.append(order[pos + len(batch)])
            cache.update(orbax_io.load(params, batch))
        pos += 1
        return cache.pop(name)

    return read


def load_arrays(source: str | os.PathLike, prefix: str = "") -> dict[str, Any]:
    """Host arrays of a converted checkpoint whose paths start with ``prefix`` (prefix stripped)."""
    params = Path(source) / orbax_io.PARAMS_DIR
    names = [n for n in orbax_io.metadata(params) if n.startswith(prefix)]
    if not names:
        raise ConversionError(f"{source} has no tensors under {prefix!r}")
    return {n[len(prefix) :]: a for n, a in orbax_io.load(params, names).items()}


def load_submodule(source: str | os.PathLike, prefix: str, module: Any) -> Any:
    """Fill ``module`` (e.g. a ``FluxDiT``) from the tensors under ``prefix`` (e.g. ``dit.``) of a checkpoint."""
    from conversion.state import assign

    return assign(module, load_arrays(source, prefix))


def load_model(source: str | os.PathLike, mesh: Any = None, rules: Any = None, config: Any = None) -> Any:
    """Build the nnx model of a converted checkpoint and fill it (sharded over ``mesh`` per ``rules`` if given;
    stored dtypes are cast to the model's parameter dtypes)."""
    import jax.numpy as jnp

    from conversion.state import flat_variables

    doc = orbax_io.read_config(source)
    family = get_family(doc["family"])
    cfg = config if config is not None else family.config_from_json(doc["config"])
    abstract, target = _abstract_model(family, cfg)
    shardings = None
    if mesh is not None:
        from nexus_jax.sharding import INFERENCE_RULES

        _, shardings = _placer(abstract, mesh, rules or INFERENCE_RULES)
    arrays = orbax_io.load(Path(source) / orbax_io.PARAMS_DIR, list(target), shardings)
    for name, var in flat_variables(abstract).items():
        want = target[name]
        if tuple(arrays[name].shape) != tuple(want.shape):
            raise ConversionError(f"{name}: stored shape {arrays[name].shape}, model wants {want.shape}")
        value = arrays[name] if mesh is not None else jnp.asarray(arrays[name])
        var.set_value(value if value.dtype == want.dtype else value.astype(want.dtype))
    return abstract
