"""Checkpoint-conversion benchmark: peak memory and throughput on full-size tensor shapes.

Writes a synthetic transformers-layout Qwen2.5 checkpoint under /tmp: the 152064 x 3584 bf16 embedding (tied, so no
lm_head) plus two full-width Qwen2.5-7B decoder layers (hidden 3584, MLP 18944, 28/4 heads), as several safetensors
shards with an index. Then, each in a fresh subprocess (so peak RSS is that of the job alone):

1. ``read``: read every tensor from the shards (the floor any converter pays), from disk (the files are evicted
   from the page cache first with ``posix_fadvise(DONTNEED)``, only these files, inside the child after its
   imports, so every timed run starts the same time after the eviction) and again from the page cache;
2. ``convert``: ``conversion.pipeline.import_checkpoint`` to an Orbax checkpoint (family ``qwen2_text``), also
   starting from disk, including the final fsync of the output;
3. a reference: copying the files + fsync (the disk's write floor). ``ceiling_read_fraction`` = read time / copy
   time is the best ``read_fraction`` any converter that durably writes the same bytes can reach on this disk, and
   ``fraction_of_ceiling`` = read_fraction / ceiling.

Prints the timings and limits, and as its last line the JSON ``{"read_fraction", "peak_rss_gib",
"largest_tensor_gib", ...}`` where ``read_fraction`` = disk read time / conversion time (target >= 0.5;
``read_fraction_warm`` uses the page-cache read) and the memory target is ``peak_rss_gib < 3 * largest + 1``.
Temporary files are deleted at the end.

Each measurement is repeated (``--repeats``, default 3); the fastest run is reported and every run's time is listed
(``*_all_runs``): on the shared VM the same conversion varies by 2x between runs. Peak RSS is the child's ``VmHWM``.

    python benchmarks/conversion.py [--shard-size 700MB] [--workdir /tmp] [--repeats 3] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30


def bench_config():
    from configs import qwen2_5

    return qwen2_5.qwen2_5_vl_7b().replace(num_layers=2, tie_word_embeddings=True, param_dtype="bfloat16")


def write_checkpoint(directory: Path, shard_bytes: int) -> tuple[int, int]:
    """Synthetic bf16 tensors (finite random values) in transformers names; returns (total, largest) bytes."""
    import ml_dtypes
    from flax import nnx

    from conversion import io
    from conversion.engine import plan
    from conversion.families import get_family
    from conversion.state import abstract_params

    cfg = bench_config()
    fam = get_family("qwen2_text")
    _, target = abstract_params(lambda: fam.build(cfg, nnx.Rngs(0)))
    table = fam.table("hf_qwen2", cfg)
    torch_shapes = {}
    for r in table.concrete():
        torch_shapes.update(zip(r.torch, r.transform.torch_shapes([target[j].shape for j in r.jax])))
    plan(table, torch_shapes, {k: v.shape for k, v in target.items()}, "to_jax")  # the synthetic file is valid
    entries = [(k, s, np.dtype(ml_dtypes.bfloat16)) for k, s in torch_shapes.items()]
    writer = io.SafetensorsWriter(directory, entries, shard_bytes)
    rng = np.random.default_rng(0)
    for name, shape, _ in entries:
        bits = rng.integers(0, 2**16, size=shape, dtype=np.uint16) & np.uint16(0xBFFF)  # exponent < max: finite
        writer.write(name, bits.view(ml_dtypes.bfloat16))
        del bits
    writer.close()
    (directory / "config.json").write_text(json.dumps({"note": "synthetic benchmark checkpoint"}))
    sizes = [int(np.prod(s)) * 2 for _, s, _ in entries]
    return sum(sizes), max(sizes)


def child_read(src: str, cold: bool) -> dict:
    """Read every byte of the checkpoint's files (plain sequential reads into memory, no parsing)."""
    if cold:
        evict(Path(src))
    t0 = time.perf_counter()
    total = 0
    buf = bytearray(64 * 2**20)
    view = memoryview(buf)
    for f in sorted(Path(src).iterdir()):
        if f.is_file():
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(view):
                    total += n
    return {"seconds": time.perf_counter() - t0, "bytes": total}


def child_convert(src: str, cold: bool, out: str, config_file: str) -> dict:
    from conversion import pipeline

    if cold:
        evict(Path(src))
    t0 = time.perf_counter()
    summary = pipeline.import_checkpoint(src, out, "qwen2_text", config_file, progress=False)
    return {"seconds": time.perf_counter() - t0, **summary}


def evict(directory: Path) -> None:
    """Drop ``directory``'s files (and only those) from the page cache, so the next read comes from disk."""
    for f in directory.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def copy_seconds(src: Path, dst: Path) -> float:
    """Reference floor: copy the files and fsync them (what any converter writing to this disk pays at least)."""
    t0 = time.perf_counter()
    shutil.copytree(src, dst)
    for f in dst.rglob("*"):
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    seconds = time.perf_counter() - t0
    shutil.rmtree(dst)
    return seconds


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``VmHWM``: counted from its exec, unlike ``ru_maxrss``, which keeps
    the forking parent's peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(*args: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"child {args[0]} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(work: Path, shard_bytes: int, repeats: int) -> dict:
    src, out = work / "hf", work / "orbax"
    src.mkdir()
    t0 = time.perf_counter()
    total, largest = write_checkpoint(src, shard_bytes)
    shards = sorted(f.name for f in src.glob("*.safetensors"))
    cfg_file = work / "config.json"
    from conversion.config_io import to_dict

    cfg_file.write_text(json.dumps(to_dict(bench_config())))
    gib = total / GIB
    print(
        f"synthetic checkpoint: {gib:.2f} GiB in {len(shards)} shards, largest tensor {largest / GIB:.3f} GiB "
        f"(written in {time.perf_counter() - t0:.1f} s)"
    )

    def best(kind: str, *args: str, cold: bool) -> dict:
        """Fastest of ``repeats`` runs (the machine is shared: the minimum is the least disturbed run)."""
        runs = []
        for _ in range(repeats):
            shutil.rmtree(out, ignore_errors=True)
            runs.append(run_child(kind, str(src), "cold" if cold else "warm", *args))
        fastest = min(runs, key=lambda r: r["seconds"])
        return dict(fastest, all_seconds=sorted(round(r["seconds"], 2) for r in runs))

    read_cold = best("read", cold=True)  # from disk
    read_warm = best("read", cold=False)  # from the page cache (files just read)
    conv = best("convert", str(out), str(cfg_file), cold=True)  # from disk, like the cold read
    out_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    copies = []
    for _ in range(repeats):
        evict(src)
        copies.append(copy_seconds(src, work / "copy"))
    copy_s = min(copies)
    ceiling = read_cold["seconds"] / copy_s  # the best read_fraction a converter that writes these bytes can reach
    limit = 3 * largest / GIB + 1
    result = {
        "read_fraction": round(read_cold["seconds"] / conv["seconds"], 3),
        "peak_rss_gib": round(conv["peak_rss_gib"], 3),
        "largest_tensor_gib": round(largest / GIB, 3),
        "rss_limit_gib": round(limit, 3),
        "read_seconds": round(read_cold["seconds"], 2),
        "convert_seconds": round(conv["seconds"], 2),
        "read_warm_seconds": round(read_warm["seconds"], 2),
        "read_fraction_warm": round(read_warm["seconds"] / conv["seconds"], 3),
        "convert_seconds_all_runs": conv["all_seconds"],
        "read_seconds_all_runs": read_cold["all_seconds"],
        "copy_fsync_seconds": round(copy_s, 2),
        "copy_fsync_seconds_all_runs": sorted(round(c, 2) for c in copies),
        "ceiling_read_fraction": round(ceiling, 3),
        "fraction_of_ceiling": round(read_cold["seconds"] / conv["seconds"] / ceiling, 3),
        "read_peak_rss_gib": round(read_cold["peak_rss_gib"], 3),
        "checkpoint_gib": round(gib, 3),
        "orbax_gib": round(out_bytes / GIB, 3),
        "shards": len(shards),
        "repeats": repeats,
    }
    print(
        f"plain read from disk: {read_cold['seconds']:.2f} s ({gib / read_cold['seconds']:.2f} GiB/s); from the "
        f"page cache: {read_warm['seconds']:.2f} s; copy + fsync of the files: {copy_s:.2f} s"
    )
    print(
        f"conversion (from disk, durable Orbax write): {conv['seconds']:.2f} s ({gib / conv['seconds']:.2f} GiB/s),"
        f" peak RSS {conv['peak_rss_gib']:.2f} GiB (limit {limit:.2f})"
    )
    print(
        f"read_fraction {result['read_fraction']} (target >= 0.5); vs the page-cache read "
        f"{result['read_fraction_warm']}; a plain copy + fsync of the same bytes reaches "
        f"{result['ceiling_read_fraction']} (this disk's ceiling), so the conversion is at "
        f"{result['fraction_of_ceiling']} of that ceiling"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shard-size", default="700MB")
    p.add_argument("--workdir", default="/tmp")
    p.add_argument("--keep", action="store_true", help="keep the temporary files")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; the fastest is reported")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, src, temperature, *rest = args.child
        child = child_read if kind == "read" else child_convert
        result = child(src, temperature == "cold", *rest)
        result["peak_rss_gib"] = peak_rss_bytes() / GIB
        print(json.dumps(result))
        return 0

    from conversion.cli import parse_size

    work = Path(tempfile.mkdtemp(prefix="nexus_conv_bench_", dir=args.workdir))
    try:
        result = measure(work, parse_size(args.shard_size), args.repeats)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
