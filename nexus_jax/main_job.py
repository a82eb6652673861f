"""The main job: default checkpoint -> converter -> batch inference on the shipped example requests.

    1. unpack the embedded default checkpoint (a tiny Nexus-Gen trained on coloured shapes by
       ``scripts/train_default_model.py``, shipped in the UPSTREAM PyTorch layout: AR safetensors + index,
       generation_decoder.bin / edit_decoder.bin, FLUX-structured ae.safetensors, empty-prompt conditioning) into
       ``<work-dir>/default_checkpoint`` (``--seed N``: a random-weight model of the same layout instead);
    2. convert every component with ``conversion`` (torch layout -> Orbax + config.json) into
       ``<work-dir>/converted``;
    3. run ``nexus-jax infer`` on ``examples/requests.jsonl`` (understanding, generation and editing requests),
       writing PNGs, ``results.jsonl`` and ``summary.json`` to ``<output-dir>``.

Steps whose outputs already exist are reused, and inference resumes, so a rerun is cheap. ``<work-dir>`` records which
default checkpoint it holds (``nexus_main_checkpoint.json``); when that changes (a new package version's trained
default, or another ``--seed``) the work dir is rebuilt and the earlier results move to ``<output-dir>/previous-<n>/``.
Run ``python -m nexus_jax.main_job`` (the README's ``bash scripts/main.sh``). The trained default draws, names and edits
"a <colour> <shape> on a <colour> background" (6 colours, circle / square / triangle); docs/inference.md shows the
same flow with the real Nexus-GenV2 checkpoints.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "requests.jsonl"

# (file or directory in the default checkpoint, converted directory, converter family, config file)
COMPONENTS = (
    ("ar", "ar", "nexus_ar", "ar/nexus_gen_config.json"),
    ("generation_decoder.bin", "generation_decoder", "generation_decoder", "generation_decoder_config.json"),
    ("edit_decoder.bin", "edit_decoder", "editing_decoder", "edit_decoder_config.json"),
    ("ae.safetensors", "vae", "vae", "ae_config.json"),
)
COPIED = ("empty_prompt.safetensors", "nexus_jax_tokenizer.json", "tokenizer.json")  # the pointer: new, old name


IDENTITY_FILE = "nexus_main_checkpoint.json"  # in <work-dir>: the default checkpoint the work dir and outputs hold


def checkpoint_identity(seed: int | None) -> str:
    """``"trained default <sha256[:16]>"`` of the shipped assets, or ``"random weights, seed N"``."""
    if seed is not None:
        return f"random weights, seed {seed}"
    from nexus_jax import default_checkpoint

    digest = hashlib.sha256()
    for f in sorted(p for p in default_checkpoint.TRAINED.rglob("*") if p.is_file()):
        digest.update(f.relative_to(default_checkpoint.TRAINED).as_posix().encode() + b"\0")
        digest.update(f.read_bytes())
    return f"trained default {digest.hexdigest()[:16]}"


def retire_stale(out: Path, work: Path, identity: str) -> None:
    """If ``work`` holds another checkpoint (or one of unknown origin), delete it (derived: rebuilt next) and move
    ``out``'s results of it to ``out/previous-<n>/``; then record ``identity``."""
    from nexus_jax import paths
    from nexus_jax.inference import outputs

    stamp = work / IDENTITY_FILE
    held = json.loads(stamp.read_text())["checkpoint"] if stamp.is_file() else None
    if held != identity:
        names = (outputs.RESULTS, outputs.SUMMARY, outputs.IMAGES_DIR)
        results = [p for p in out.iterdir() if p.name in names or outputs.JOURNAL_NAME.match(p.name)] \
            if out.is_dir() else []
        if work.exists() or results:
            log(f"{work} holds {held or 'a checkpoint of unknown origin'}, not {identity}: rebuilding it")
            shutil.rmtree(work, ignore_errors=True)
        if results:
            n = 1
            while (out / f"previous-{n}").exists():
                n += 1
            (out / f"previous-{n}").mkdir()
            for p in results:
                p.rename(out / f"previous-{n}" / p.name)
            log(f"results of that checkpoint moved to {out / f'previous-{n}'}")
    work.mkdir(parents=True, exist_ok=True)
    paths.atomic_write_text(stamp, json.dumps({"checkpoint": identity}) + "\n")


def log(msg: str) -> None:
    print(f"[main] {msg}", file=sys.stderr, flush=True)


def build_checkpoint(path: Path, seed: int | None = None) -> None:
    """The shipped trained default (``seed`` None) or a random-weight model of the same layout (``seed``)."""
    from nexus_jax import default_checkpoint

    if path.exists():
        log(f"default checkpoint: reusing {path}")
        return
    t = time.perf_counter()
    if seed is None:
        default_checkpoint.unpack_trained(path)
        log(f"default checkpoint: unpacked the trained default to {path} in {time.perf_counter() - t:.1f}s")
        return
    default_checkpoint.build(path, seed)
    log(f"default checkpoint: built {path} in {time.perf_counter() - t:.1f}s (random weights, seed {seed})")


def convert(source: Path, out: Path) -> int:
    """Convert every component (skipping those already converted); returns the converter's first failing status."""
    from conversion import cli as convert_cli

    out.mkdir(parents=True, exist_ok=True)
    for src, dst, family, config in COMPONENTS:
        if (out / dst).exists():
            log(f"convert {src}: reusing {out / dst}")
            continue
        t = time.perf_counter()
        rc = convert_cli.main(["import", str(source / src), str(out / dst), "--family", family,
                               "--config", str(source / config), "--no-progress"])
        if rc != 0:
            log(f"convert {src}: failed with status {rc}")
            return rc
        log(f"convert {src} -> {out / dst} ({family}) in {time.perf_counter() - t:.1f}s")
    for name in COPIED:
        if (source / name).exists():
            shutil.copyfile(source / name, out / name)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nexus_jax.main_job", description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", default="outputs", help="PNGs, results.jsonl, summary.json")
    p.add_argument("--work-dir", default=None, help="checkpoints (default: <output-dir>/work)")
    p.add_argument("--requests", default=str(EXAMPLES), help="requests JSONL (default: the shipped examples)")
    p.add_argument("--seed", type=int, default=None,
                   help="use a random-weight checkpoint with this seed instead of the shipped trained one")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    from nexus_jax.inference import cli as infer_cli
    from nexus_jax.inference.examples import write_examples

    out = Path(args.output_dir)
    work = Path(args.work_dir) if args.work_dir else out / "work"
    requests = Path(args.requests)
    if not requests.exists():
        if requests != EXAMPLES:
            log(f"requests file {requests} does not exist")
            return 2
        write_examples(EXAMPLES.parent)
        log(f"wrote the example requests to {EXAMPLES}")
    start = time.perf_counter()
    retire_stale(out, work, checkpoint_identity(args.seed))
    build_checkpoint(work / "default_checkpoint", args.seed)
    rc = convert(work / "default_checkpoint", work / "converted")
    if rc != 0:
        return rc
    infer_args = ["--checkpoint", str(work / "converted"), "--input", str(requests), "--output", str(out),
                  "--batch-size", str(args.batch_size), "--max-new-tokens", "64"]  # room for a whole caption
    rc = infer_cli.main(infer_args + (["--no-progress"] if args.no_progress else []))
    log(f"done in {time.perf_counter() - start:.1f}s: results in {out / 'results.jsonl'}, images in {out / 'images'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
