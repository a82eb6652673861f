"""``nexus-jax convert`` / ``python -m conversion``: import torch checkpoints to Orbax, export back, inspect.

    convert import SRC OUT --family F [--config PRESET|FILE|hf] [--scheme S] [--mesh D,F,T] [--overwrite]
    convert export SRC OUT [--scheme S] [--format safetensors|bin] [--max-shard-size 5GB] [--overwrite]
    convert nexus-gen SRC [--flux FLUX_DIR] OUT   # a whole Nexus-Gen release -> an infer-ready checkpoint
    convert unipic SRC OUT                        # a whole UniPic-1 release -> an infer-ready checkpoint
    convert from-run RUN_DIR[/STEP] OUT [--base DIR]  # a `nexus-jax train` checkpoint -> an infer-ready checkpoint
    convert detect SRC          # print the key scheme of a checkpoint
    convert list                # families, presets and schemes

Exit status 0 on success, 1 on a conversion error (message on stderr; no partial output left), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from conversion.errors import ConversionError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """``5GB`` / ``500MiB`` / ``1234`` -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; use e.g. 5GB, 500MB, 64KiB or a byte count")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return size


def parse_mesh(text: str) -> tuple[int, int, int]:
    """argparse type for ``--mesh`` (:func:`nexus_jax.sharding.parse_mesh_spec`)."""
    from nexus_jax.sharding import parse_mesh_spec

    try:
        return parse_mesh_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nexus-jax convert", description="Convert checkpoints PyTorch <-> JAX/Orbax.")
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="torch checkpoint (file or directory) -> Orbax checkpoint + config.json")
    imp.add_argument("source")
    imp.add_argument("out")
    imp.add_argument("--family", required=True, help="model family (see `convert list`)")
    imp.add_argument("--config", help="preset name, JSON file, or 'hf' (default: hf when SOURCE has config.json)")
    imp.add_argument("--scheme", help="key scheme (default: detected from the tensor names)")
    imp.add_argument("--mesh", type=parse_mesh, help="data,fsdp,tensor: store tensors sharded for this mesh")
    imp.add_argument("--overwrite", action="store_true")
    imp.add_argument("--no-progress", action="store_true")
    exp = sub.add_parser("export", help="Orbax checkpoint -> torch layout (HF safetensors shards or one .bin)")
    exp.add_argument("source")
    exp.add_argument("out")
    exp.add_argument("--scheme", help="target key scheme (default: the one it was imported from)")
    exp.add_argument("--format", default="safetensors", choices=("safetensors", "bin"))
    exp.add_argument("--max-shard-size", type=parse_size, default="5GB")
    exp.add_argument("--overwrite", action="store_true")
    exp.add_argument("--no-progress", action="store_true")
    ng = sub.add_parser("nexus-gen", help="Nexus-Gen release dir (+ FLUX.1-dev dir) -> infer-ready checkpoint dir")
    ng.add_argument("source", help="the downloaded Nexus-Gen(V2) directory")
    ng.add_argument("out")
    ng.add_argument("--flux", help="FLUX.1-dev directory: ae.safetensors or vae/, text_encoder{,_2}/, tokenizer{,_2}/")
    ng.add_argument("--tokenizer", help="tokenizer directory (default: the tokenizer files in SOURCE)")
    ng.add_argument("--text-encoder-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="compute dtype of CLIP / T5 for the empty prompt (float32 needs ~19 GB RAM for T5-XXL)")
    ng.add_argument("--max-sequence-length", type=int, default=512, help="T5 length of the empty prompt")
    up = sub.add_parser("unipic", help="UniPic-1 release dir -> infer-ready checkpoint dir")
    up.add_argument("source", help="the downloaded UniPic-1 directory (pytorch_model.bin, kl16.ckpt)")
    up.add_argument("out")
    up.add_argument("--tokenizer", help="tokenizer directory (default: SOURCE/Qwen2.5-1.5B-Instruct)")
    for release in (ng, up):
        release.add_argument("--mesh", type=parse_mesh, help="data,fsdp,tensor: store tensors sharded for this mesh")
        release.add_argument("--overwrite", action="store_true")
        release.add_argument("--no-progress", action="store_true")
    det = sub.add_parser("detect", help="print the key scheme of a checkpoint")
    det.add_argument("source")
    sub.add_parser("list", help="list families, presets and key schemes")
    from conversion import from_run

    from_run.add_parser(sub)
    return p


def _run(args: argparse.Namespace) -> dict:
    from conversion import pipeline

    if args.command == "import":
        mesh = None
        if args.mesh:
            from nexus_jax.sharding import make_mesh

            mesh = make_mesh(*args.mesh)
        return pipeline.import_checkpoint(
            args.source,
            args.out,
            args.family,
            args.config,
            args.scheme,
            mesh,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    if args.command in ("nexus-gen", "unipic"):
        from conversion import release

        mesh = None
        if args.mesh:
            from nexus_jax.sharding import make_mesh

            mesh = make_mesh(*args.mesh)
        common = dict(tokenizer=args.tokenizer, mesh=mesh, progress=not args.no_progress, overwrite=args.overwrite)
        if args.command == "unipic":
            return release.import_unipic(args.source, args.out, **common)
        return release.import_nexus_gen(args.source, args.out, args.flux, text_encoder_dtype=args.text_encoder_dtype,
                                        max_sequence_length=args.max_sequence_length, **common)
    if args.command == "from-run":
        from conversion import from_run

        return from_run.run(args)
    if args.command == "export":
        return pipeline.export_checkpoint(
            args.source,
            args.out,
            args.scheme,
            args.format,
            args.max_shard_size,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    if args.command == "detect":
        from conversion.schemes import detect_scheme
        from conversion.split_layout import open_any

        with open_any(args.source) as reader:
            return {"scheme": detect_scheme(reader.shapes, args.source), "tensors": len(reader.shapes)}
    from conversion.families import family_names, get_family
    from conversion.schemes import SCHEMES

    fams = {n: {"presets": sorted((f := get_family(n)).presets), "schemes": sorted(f.tables)} for n in family_names()}
    return {"families": fams, "schemes": SCHEMES}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        result = _run(args)
    except ConversionError as e:
        print(f"convert {args.command}: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
