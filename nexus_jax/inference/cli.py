"""``nexus-jax infer --checkpoint <dir> --input requests.jsonl --output <dir>``: resumable batch inference.

Reads requests through the Grain pipeline (:mod:`nexus_jax.inference.reader`), groups them by task and shape into
fixed-size padded batches (:mod:`nexus_jax.inference.batching`), runs them through the checkpoint's model family
(:func:`nexus_jax.families.for_checkpoint`; Nexus-Gen: compiled-once programs spread over all devices,
:mod:`nexus_jax.inference.runner`; UniPic-1: :mod:`nexus_jax.unipic.infer`) and writes PNGs + results atomically
(:mod:`nexus_jax.inference.outputs`). A restart skips completed requests. Exit status: 0 unless every request
failed (1), 2 for bad usage / an unreadable checkpoint or input file.

Several processes (``python -m launch.distributed infer ...`` on every host) split the pending requests: each serves
its share on a mesh of its own devices and writes its own journal; process 0 merges all journals into
``results.jsonl`` / ``summary.json`` once every process is done (:mod:`nexus_jax.inference.multiprocess`).
``nexus-jax infer --merge --output <dir>`` merges after the fact.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from typing import Any

from nexus_jax import families, paths
from nexus_jax.inference.batching import Batcher
from nexus_jax.inference.multiprocess import Group, PeerFailed, local_mesh
from nexus_jax.inference.outputs import OutputDir, Progress
from nexus_jax.inference.reader import Done, iterate, request_dataset
from nexus_jax.inference.requests import MAX_IMAGES, Failure, read_lines, request_id


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nexus-jax infer", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="converted checkpoint directory or URL (see inference/loading.py)")
    p.add_argument("--input", help="requests JSONL (one request per line), a path or URL")
    p.add_argument("--output", required=True, help="output directory or URL (created; reused to resume)")
    p.add_argument("--merge", action="store_true",
                   help="only merge the journals under --output into results.jsonl + summary.json (request order "
                        "from --input if given, else from the records' line indices)")
    p.add_argument("--batch-size", type=int, default=4, help="requests per batch (rounded up to the data devices)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer length limit for understanding")
    p.add_argument("--max-images", type=int, default=1,
                   help="images a chat answer may hold (a request's \"max_images\" overrides it; 0: text only)")
    p.add_argument("--length-multiple", type=int, default=64, help="prompt lengths are padded to this multiple")
    p.add_argument("--mesh", default=None,
                   help="data,fsdp,tensor sizes of each process's local devices (default: all on data)")
    p.add_argument("--num-threads", type=int, default=2, help="Grain prefetch threads (0: none)")
    p.add_argument("--no-progress", action="store_true")
    unipic = p.add_argument_group("UniPic-1 checkpoints (sampling overrides; default: the checkpoint's config)")
    unipic.add_argument("--num-iter", type=int, default=None, help="masked-AR iterations")
    unipic.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale")
    unipic.add_argument("--diffusion-steps", type=int, default=None, help="diffusion-head sampling steps")
    return p


def __getattr__(name: str):
    if name == "InferenceJob":  # its old home; Nexus-Gen's job is nexus_jax.inference.nexus_gen.InferenceJob
        from nexus_jax.inference.nexus_gen import InferenceJob

        return InferenceJob
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def plan(lines: list[str], out: OutputDir) -> tuple[list[str], list[int]]:
    """(the id of every line, the line indices not complete in any journal of ``out``)."""
    ids = [request_id(line, i) for i, line in enumerate(lines)]
    return ids, [i for i, rid in enumerate(ids) if not out.is_complete(rid)]


def combine(summaries: list[dict[str, Any]], total: int, skipped: int) -> dict[str, Any]:
    """One job summary from the processes' own (counts summed, timings of the slowest process)."""
    ok, error = sum(s["ok"] for s in summaries), sum(s["error"] for s in summaries)
    run_seconds = max(s["run_seconds"] for s in summaries)
    task_seconds: dict[str, float] = {}
    for s in summaries:
        for k, v in s["task_seconds"].items():
            task_seconds[k] = round(task_seconds.get(k, 0.0) + v, 3)
    return {
        "requests": total, "ok": ok, "error": error, "skipped": skipped, "batch_size": summaries[0]["batch_size"],
        "devices": sum(s["devices"] for s in summaries), "load_seconds": max(s["load_seconds"] for s in summaries),
        "run_seconds": run_seconds, "requests_per_second": round(ok / run_seconds, 4) if ok and run_seconds else 0.0,
        "task_seconds": task_seconds, "processes": len(summaries),
    }


def run(args: argparse.Namespace, group: Group) -> int:
    lines = read_lines(args.input)
    if not lines:
        print(f"infer: {args.input} holds no requests", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    mesh = local_mesh(args.mesh)  # each process serves its own share on its own devices
    family = families.for_checkpoint(args.checkpoint)  # same requests and outputs for every family
    session = families.resolve(family.inference.open)(args, mesh)
    data_devices = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    batch_size = -(-args.batch_size // data_devices) * data_devices
    load_seconds = time.perf_counter() - t0

    out = OutputDir(args.output, group.index, group.count)
    ids, pending = plan(lines, out)
    if group.is_main:
        out.remove_stale_temps()  # nobody writes before the plan is agreed
    # every process must see the same journals before any writes: agreeing on the plan is also that barrier
    digest = hashlib.sha256(json.dumps([len(lines), pending]).encode()).hexdigest()[:16]
    group.agree("plan", digest)
    share = pending[group.index :: group.count]
    group.log(f"{len(share)} of {len(pending)} pending requests ({len(lines) - len(pending)} already complete)")
    ds = request_dataset(lines, paths.parent(args.input), session.prepare, indices=share)
    done_before = len(lines) - len(pending) if group.count == 1 else 0  # shown, not counted in the rate
    progress = Progress(len(share) + done_before, enabled=not args.no_progress, initial=done_before)
    job = session.job(out, progress)
    batcher = Batcher(batch_size, args.length_multiple)
    t1 = time.perf_counter()
    for item in iterate(ds, num_threads=args.num_threads):
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
    out.close()
    run_seconds = time.perf_counter() - t1
    done = job.counts["ok"]
    mine = {
        "requests": len(share), "ok": done, "error": job.counts["error"], "skipped": len(lines) - len(pending),
        "batch_size": batch_size, "devices": 1 if mesh is None else int(mesh.size),
        "load_seconds": round(load_seconds, 3), "run_seconds": round(run_seconds, 3),
        "requests_per_second": round(done / run_seconds, 4) if done else 0.0,
        "task_seconds": {k: round(v, 3) for k, v in job.task_seconds.items()},
    }
    print(f"infer: {job.counts['ok']} ok, {job.counts['error']} failed of {len(share)} requests in {run_seconds:.1f}s "
          f"({len(lines) - len(pending)} already complete) -> {args.output}", file=sys.stderr)
    if group.count > 1:
        out.write_summary(mine)
        group.log("share done; waiting for the other processes (a dead one stops this one within the heartbeat "
                  "timeout)")
    summaries = group.gather_json("done", mine)
    summary = combine(summaries, len(lines), len(lines) - len(pending))
    if group.is_main:  # every journal is final now
        merged = OutputDir(args.output).merge(ids, summary)
        if merged["missing"]:
            print(f"infer: error: {merged['missing']} requests have no record after the run", file=sys.stderr)
            return 1
    return 1 if summary["error"] == len(lines) else 0


def merge(args: argparse.Namespace) -> int:
    """``--merge``: results.jsonl + summary.json from the journals under --output (process 0 only)."""
    if not Group.from_jax().is_main:
        return 0
    if not paths.is_dir(args.output):
        print(f"infer: --output {args.output} does not exist", file=sys.stderr)
        return 2
    out = OutputDir(args.output)
    if args.input is not None:
        ids = [request_id(line, i) for i, line in enumerate(read_lines(args.input))]
    else:
        last = {rid: recs[-1] for rid, recs in out.history.items()}
        ids = sorted(last, key=lambda rid: (last[rid].get("index", float("inf")), rid))
    summary = out.merge(ids)
    print(f"infer: merged {summary['ok']} ok and {summary['error']} failed of {summary['requests']} requests from "
          f"{len(summary['journals'])} journals -> {args.output}", file=sys.stderr)
    if summary["missing"]:
        print(f"infer: {summary['missing']} requests of {args.input} have no record yet; run infer again to complete "
              "them", file=sys.stderr)
        return 1
    return 0


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
    if not 0 <= args.max_images <= MAX_IMAGES:
        print(f"infer: --max-images ({args.max_images}) must be in [0, {MAX_IMAGES}]", file=sys.stderr)
        return 2
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.length_multiple < 1:
        print(f"infer: --batch-size ({args.batch_size}), --max-new-tokens ({args.max_new_tokens}) and "
              f"--length-multiple ({args.length_multiple}) must be >= 1", file=sys.stderr)
        return 2
    if args.merge:
        if args.input is not None and not paths.exists(args.input):
            print(f"infer: --input {args.input} does not exist", file=sys.stderr)
            return 2
        return merge(args)
    for flag, path in (("--input", args.input), ("--checkpoint", args.checkpoint)):
        if path is None:
            print(f"infer: {flag} is required (unless --merge)", file=sys.stderr)
            return 2
        if not paths.exists(path):
            print(f"infer: {flag} {path} does not exist", file=sys.stderr)
            return 2
    group = Group.from_jax()
    try:
        return run(args, group)
    except (FileNotFoundError, ValueError) as e:
        group.fail(f"{type(e).__name__}: {e}")
        print(f"infer: error: {e}", file=sys.stderr)
        return 2
    except PeerFailed as e:  # another process's error, already reported there
        print(f"infer: error: {e}", file=sys.stderr)
        return 1
    except BaseException as e:
        group.fail(f"{type(e).__name__}: {e}")
        raise


if __name__ == "__main__":
    sys.exit(main())
