"""``nexus-jax infer --checkpoint <dir> --input requests.jsonl --output <dir>``: resumable batch inference.

Reads requests through the Grain pipeline (:mod:`nexus_jax.inference.reader`), groups them by task and shape into
fixed-size padded batches (:mod:`nexus_jax.inference.batching`), runs them with compiled-once programs spread over
all devices (:mod:`nexus_jax.inference.runner`) and writes PNGs + results atomically
(:mod:`nexus_jax.inference.outputs`). A restart skips completed requests. Exit status: 0 unless every request
failed (1), 2 for bad usage / an unreadable checkpoint or input file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import numpy as np

from nexus_jax.inference.batching import Batch, Batcher, collate, collate_references
from nexus_jax.inference.outputs import OutputDir, Progress
from nexus_jax.inference.reader import Done, iterate, prepare_request, request_dataset
from nexus_jax.inference.requests import Failure, read_lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nexus-jax infer", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="converted checkpoint directory (see inference/loading.py)")
    p.add_argument("--input", required=True, help="requests JSONL (one request per line)")
    p.add_argument("--output", required=True, help="output directory (created; reused to resume)")
    p.add_argument("--batch-size", type=int, default=4, help="requests per batch (rounded up to the data devices)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer length limit for understanding")
    p.add_argument("--length-multiple", type=int, default=64, help="prompt lengths are padded to this multiple")
    p.add_argument("--mesh", default=None, help="data,fsdp,tensor sizes (default: all devices on data)")
    p.add_argument("--num-threads", type=int, default=2, help="Grain prefetch threads (0: none)")
    p.add_argument("--no-progress", action="store_true")
    unipic = p.add_argument_group("UniPic-1 checkpoints (sampling overrides; default: the checkpoint's config)")
    unipic.add_argument("--num-iter", type=int, default=None, help="masked-AR iterations")
    unipic.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale")
    unipic.add_argument("--diffusion-steps", type=int, default=None, help="diffusion-head sampling steps")
    return p


def _mesh(spec: str | None):
    import jax

    from nexus_jax.sharding import make_mesh

    if spec is None:
        return make_mesh(data=-1, fsdp=1, tensor=1) if len(jax.devices()) > 1 else None
    try:
        d, f, t = (int(x) for x in spec.split(","))
    except ValueError:
        raise ValueError(f"--mesh wants data,fsdp,tensor sizes such as 2,2,2; got {spec!r}") from None
    return make_mesh(d, f, t)


class InferenceJob:
    """Runs batches and records their results (one record per real request)."""

    def __init__(self, runner: Any, ckpt: Any, out: OutputDir, progress: Progress):
        self.runner, self.ckpt, self.out, self.progress = runner, ckpt, out, progress
        self.counts = {"ok": 0, "error": 0, "skipped": 0}
        self.task_seconds: dict[str, float] = {}

    def fail(self, item: Failure) -> None:
        self.out.record({"id": item.id, "index": item.index, "task": item.task, "status": "error",
                         "error": item.error})
        self.counts["error"] += 1
        self.progress.update(1, failed=1)

    def skip(self, item: Done) -> None:
        self.counts["skipped"] += 1
        self.progress.update(1)

    def compute(self, batch: Batch) -> list[dict[str, Any]]:
        """One result dict per real request of ``batch`` (images written); raises on failure."""
        nb = collate(batch, self.ckpt.ar.config)
        if batch.task == "understanding":
            tokens, counts = self.runner.understand(nb)
            return [{"text": self.ckpt.codec.decode(tokens[i, : counts[i]].tolist())} for i in range(batch.num_real)]
        seeds = np.asarray([p.request.seed for p in batch.rows()], np.uint32)
        if batch.task == "chat":
            return self.chat(batch, nb, seeds)
        refs = collate_references(batch, self.ckpt.ar.config) if batch.task == "editing" else None
        pixels = self.runner.images(batch.task, nb, seeds, refs)
        results = []
        for i, p in enumerate(batch.items):
            path, digest = self.out.write_image(p.request.id, pixels[i])
            results.append({"image": path, "image_sha256": digest, "height": int(pixels.shape[1]),
                            "width": int(pixels.shape[2])})
        return results

    def chat(self, batch: Batch, nb: Any, seeds: np.ndarray) -> list[dict[str, Any]]:
        """Free-form answers: text, plus a PNG from the generation decoder for rows that opened an image."""
        out = self.runner.text_then_image(nb)
        pixels = None if out.image_embeds is None else self.runner.decode_images("generation", out.image_embeds, seeds)
        results = []
        for i, p in enumerate(batch.items):
            res: dict[str, Any] = {"text": self.ckpt.codec.decode(out.tokens[i, : out.num_text[i]].tolist())}
            if out.has_image[i]:
                path, digest = self.out.write_image(p.request.id, pixels[i])
                res.update(image=path, image_sha256=digest, height=int(pixels.shape[1]), width=int(pixels.shape[2]))
            results.append(res)
        return results

    def run(self, batch: Batch) -> None:
        start = time.perf_counter()
        try:
            results = self.compute(batch)
        except Exception as e:  # noqa: BLE001 - one failing batch is recorded, the run goes on
            for p in batch.items:
                self.fail(Failure(p.request.id, p.request.index, p.request.task, f"{type(e).__name__}: {e}"))
            return
        seconds = time.perf_counter() - start
        self.task_seconds[batch.task] = self.task_seconds.get(batch.task, 0.0) + seconds
        for p, res in zip(batch.items, results):
            req = p.request
            self.out.record({"id": req.id, "index": req.index, "task": req.task, "status": "ok", "seed": req.seed,
                             "prompt": req.prompt, **res, "text": res.get("text"), "image": res.get("image"),
                             "batch_size": batch.size, "batch_real": batch.num_real,
                             "batch_seconds": round(seconds, 4), "prompt_tokens": p.length})
            self.counts["ok"] += 1
            self.progress.update(1)


def run(args: argparse.Namespace) -> int:
    from nexus_jax.inference import loading
    from nexus_jax.inference.runner import Runner

    lines = read_lines(args.input)
    if not lines:
        print(f"infer: {args.input} holds no requests", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    mesh = _mesh(args.mesh)
    from nexus_jax.unipic.loading import is_unipic_checkpoint

    unipic = is_unipic_checkpoint(args.checkpoint)  # UniPic-1: same requests and outputs, nexus_jax.unipic.infer
    if unipic:
        from nexus_jax.unipic import infer as unipic_infer

        ckpt, runner = unipic_infer.load_checkpoint(args, mesh), None
    else:
        ckpt = loading.load(args.checkpoint, mesh=mesh)
        runner = Runner(ckpt.ar, vae=ckpt.vae, generation=ckpt.generation, editing=ckpt.editing, empty=ckpt.empty,
                        max_new_tokens=args.max_new_tokens, mesh=mesh)
    data_devices = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    batch_size = -(-args.batch_size // data_devices) * data_devices
    load_seconds = time.perf_counter() - t0

    import jax

    out = OutputDir(args.output, jax.process_index(), jax.process_count())
    if unipic:
        def prepare(req):
            return unipic_infer.prepare_request(req, ckpt, args.max_new_tokens)
    else:
        cfg = ckpt.ar.config
        ref_grid = ckpt.editing.model.cfg.merger.ref_grid if ckpt.editing is not None else None

        def prepare(req):
            return prepare_request(req, cfg, ckpt.codec.encode, args.max_new_tokens, ref_grid)

    ds = request_dataset(lines, os.path.dirname(os.path.abspath(args.input)), prepare, out.is_complete)
    total = len(ds)  # this host's share
    progress = Progress(total, enabled=not args.no_progress)
    job = (unipic_infer.UniPicJob if unipic else InferenceJob)(runner, ckpt, out, progress)
    job.max_new_tokens = args.max_new_tokens
    batcher = Batcher(batch_size, args.length_multiple)
    order: dict[int, str] = {}
    t1 = time.perf_counter()
    for item in iterate(ds, num_threads=args.num_threads):
        prepared = not isinstance(item, (Failure, Done))  # reader.Prepared or a model family's own (UniPic-1)
        order[item.request.index if prepared else item.index] = item.request.id if prepared else item.id
        if isinstance(item, Failure):
            job.fail(item)
        elif isinstance(item, Done):
            job.skip(item)
        else:
            for batch in batcher.add(item):
                job.run(batch)
    for batch in batcher.flush():
        job.run(batch)
    progress.close()
    run_seconds = time.perf_counter() - t1
    done = job.counts["ok"]
    summary = {
        "requests": total, **job.counts, "batch_size": batch_size,
        "devices": 1 if mesh is None else int(mesh.size), "load_seconds": round(load_seconds, 3),
        "run_seconds": round(run_seconds, 3), "requests_per_second": round(done / run_seconds, 4) if done else 0.0,
        "task_seconds": {k: round(v, 3) for k, v in job.task_seconds.items()},
    }
    out.finalize([order[i] for i in sorted(order)], summary)
    out.close()
    print(f"infer: {job.counts['ok']} ok, {job.counts['error']} failed, {job.counts['skipped']} already complete "
          f"of {total} requests in {run_seconds:.1f}s -> {args.output}", file=sys.stderr)
    all_failed = job.counts["error"] == total
    return 1 if all_failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    for flag, value in (("--num-iter", args.num_iter), ("--diffusion-steps", args.diffusion_steps)):
        if value is not None and value < 1:
            print(f"infer: {flag} ({value}) must be >= 1", file=sys.stderr)
            return 2
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.length_multiple < 1:
        print(f"infer: --batch-size ({args.batch_size}), --max-new-tokens ({args.max_new_tokens}) and "
              f"--length-multiple ({args.length_multiple}) must be >= 1", file=sys.stderr)
        return 2
    for flag, path in (("--input", args.input), ("--checkpoint", args.checkpoint)):
        if not os.path.exists(path):
            print(f"infer: {flag} {path} does not exist", file=sys.stderr)
            return 2
    try:
        return run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"infer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
