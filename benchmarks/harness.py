"""Benchmarks that cannot lie: each side (JAX, torch) runs in its own child process, pinned to the same cores with the
same thread count, one after the other; the machine's load is recorded and a busy machine is flagged.

A benchmark script calls :func:`setup` at its very top (before jax / torch are imported), defines

    add_args(parser)                        its own options (``--smoke`` is added by the harness)
    measure(side, args) -> (metrics, arrays)   in the child: build, warm up, time ``side`` only
    combine(results, arrays, args) -> dict  in the parent: ratios and cross-side errors, the benchmark's JSON keys

and ends with ``main(__doc__, add_args, measure, combine)``. The parent re-runs the script once per side with
``--side S --cores C --threads N --out-dir D``; each child prints its metrics as its last line and saves its output
arrays to ``D/S.npz``. The parent prints the children's output (prefixed), then ratios, and as the last line one JSON
object: the benchmark's keys plus ``load`` (1-minute load averages before, between and after the sides), ``busy``,
``threads`` and ``cores``.

What limits XLA's CPU threads (measured on the 2-core machine with a jitted 1024^2 matmul loop, counting CPU ticks
per OS thread): the process's CPU affinity (XLA sizes its intra-op pool from the schedulable CPUs) and the
``PJRT_NPROC`` environment variable. ``--xla_cpu_multi_thread_eigen=false``, ``OMP_NUM_THREADS`` and
``--xla_force_host_platform_device_count=1`` do not: with 2 schedulable cores the work still spreads over 2 threads.
``--xla_force_host_platform_device_count=8`` (as the tests set) spreads even one pinned core's work over 8 threads,
so :func:`pin` removes that flag.
``python benchmarks/harness.py --check-threads N`` repeats that measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

SIDES = ("jax", "torch")
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "PJRT_NPROC")


def _argv_value(argv: list[str], name: str) -> str | None:
    """The value of ``--name V`` or ``--name=V`` in ``argv`` (None when absent)."""
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def pin(cores: list[int], threads: int) -> None:
    """Pin this process to ``cores`` and cap every runtime's threads at ``threads`` (before jax / torch import)."""
    os.sched_setaffinity(0, cores)
    for var in _THREAD_ENV:
        os.environ[var] = str(threads)
    # Fake host devices (tests' conftest sets 8) each get a thread of their own: benchmarks run on one device.
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def setup(argv: list[str] | None = None) -> str | None:
    """In a child (``--side`` given): pin it and return the side; in the parent: return None. Call before importing
    jax or torch."""
    argv = sys.argv if argv is None else argv
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    side = _argv_value(argv, "--side")
    if side is not None:
        pin([int(c) for c in _argv_value(argv, "--cores").split(",")], int(_argv_value(argv, "--threads")))
    else:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    return side


def default_cores(threads: int) -> list[int]:
    """The first ``threads`` CPUs this process may run on."""
    avail = sorted(os.sched_getaffinity(0))
    if threads > len(avail):
        raise SystemExit(f"--threads {threads} exceeds the {len(avail)} schedulable CPUs {avail}")
    return avail[:threads]


def is_busy(load: list[float], cores: int) -> bool:
    """True when any sampled 1-minute load average exceeds the pinned core count + 0.5."""
    return max(load) > cores + 0.5


def thread_ticks() -> dict[str, int]:
    """CPU ticks (user + system) per OS thread of this process."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[tid] = int(fields[11]) + int(fields[12])
    return out


def working_threads(fn: Callable[[], object], min_ticks: int = 5) -> tuple[int, list[int], float, float]:
    """(threads that burnt >= ``min_ticks`` CPU ticks, their ticks, wall s, process CPU s) while running ``fn``."""
    t0, w0, c0 = thread_ticks(), time.perf_counter(), time.process_time()
    fn()
    wall, cpu, t1 = time.perf_counter() - w0, time.process_time() - c0, thread_ticks()
    ticks = sorted((t1[k] - t0.get(k, 0) for k in t1 if t1[k] - t0.get(k, 0) >= min_ticks), reverse=True)
    return len(ticks), ticks, wall, cpu


def _sample_load() -> float:
    return round(os.getloadavg()[0], 2)


def _run_child(script: str, argv: list[str], side: str, cores: list[int], threads: int, out_dir: str) -> dict:
    cmd = [sys.executable, script, *argv, "--side", side, "--cores", ",".join(map(str, cores)),
           "--threads", str(threads), "--out-dir", out_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    for line in lines[:-1]:
        print(f"[{side}] {line}", flush=True)
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"the {side} side of {os.path.basename(script)} exited {proc.returncode}")
    return json.loads(lines[-1])


def _load_arrays(path: str) -> dict:
    import numpy as np

    if not os.path.exists(path):
        return {}
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def main(doc: str, add_args: Callable[[argparse.ArgumentParser], None], measure: Callable, combine: Callable,
         sides: tuple[str, ...] = SIDES, argv: list[str] | None = None,
         on_result: Callable[[dict, argparse.Namespace], None] | None = None) -> dict | None:
    """Parse the arguments; in a child run ``measure`` for its side, in the parent run every side and ``combine``
    (then ``on_result(result, args)``, e.g. to store it, before the last line is printed)."""
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=doc.splitlines()[0], epilog="\n".join(doc.splitlines()[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny config, one repeat: checks that it runs and agrees")
    p.add_argument("--threads", type=int, default=None,
                   help="threads of each side (torch, XLA, OpenMP/MKL); default: one per --cores entry, else every "
                        "schedulable CPU")
    p.add_argument("--cores", default=None, help="comma-separated CPUs both sides are pinned to (default: the first "
                                                 "--threads schedulable CPUs)")
    p.add_argument("--side", choices=sides, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    add_args(p)
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = len(args.cores.split(",")) if args.cores else len(os.sched_getaffinity(0))
    cores = [int(c) for c in args.cores.split(",")] if args.cores else default_cores(args.threads)
    if len(cores) != args.threads:
        raise SystemExit(f"--cores {cores} must list exactly --threads {args.threads} CPUs")
    if args.side is not None:
        return _child(args, measure)
    script = os.path.abspath(sys.modules["__main__"].__file__)
    passthrough = _drop_values(argv)
    load, results, arrays = [_sample_load()], {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for side in sides:
            results[side] = _run_child(script, passthrough, side, cores, args.threads, tmp)
            arrays[side] = _load_arrays(os.path.join(tmp, f"{side}.npz"))
            load.append(_sample_load())
    out = combine(results, arrays, args)
    out.update(load=load, busy=is_busy(load, len(cores)), threads=args.threads, cores=cores)
    if out["busy"]:
        print(f"BUSY MACHINE: 1-minute load {load} exceeds {len(cores)} pinned cores + 0.5; do not quote these figures")
    if on_result is not None:
        on_result(out, args)
    print(json.dumps(out))
    return out


def _drop_values(argv: list[str]) -> list[str]:
    """``argv`` without ``--threads`` / ``--cores`` and their values (the parent passes its own to each child)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--threads", "--cores"):
            skip = True
            continue
        if a.startswith(("--threads=", "--cores=")):
            continue
        out.append(a)
    return out


def _child(args: argparse.Namespace, measure: Callable) -> dict:
    import numpy as np

    torch = sys.modules.get("torch")  # imported by the benchmark when it has a torch side
    if torch is not None:
        torch.set_num_threads(args.threads)
        torch.set_grad_enabled(False)
    metrics, arrays = measure(args.side, args)
    metrics = dict(metrics, affinity=sorted(os.sched_getaffinity(0)),
                   torch_threads=torch.get_num_threads() if torch is not None else None)
    if arrays:
        path = os.path.join(args.out_dir, f"{args.side}.npz")
        tmp = path + ".tmp.npz"
        np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
        os.replace(tmp, path)
    print(json.dumps(metrics), flush=True)
    return metrics


def check_threads(threads: int) -> dict:
    """Run a jitted 1024^2 matmul loop in a child pinned by :func:`pin`; how many of its threads did the work."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        f"import json, sys; sys.path.insert(0, {root!r}); from benchmarks import harness; "
        f"harness.pin({default_cores(threads)!r}, {threads})\n"
        "import jax, jax.numpy as jnp\n"
        "x = jnp.ones((1024, 1024), jnp.float32)\n"
        "f = jax.jit(lambda a: jax.lax.fori_loop(0, 10, lambda i, b: jnp.tanh(b @ a), a))\n"
        "f(x).block_until_ready()\n"
        "n, ticks, wall, cpu = harness.working_threads(lambda: [f(x).block_until_ready() for _ in range(3)])\n"
        "print(json.dumps(dict(working_threads=n, ticks=ticks, wall_s=round(wall, 3), cpu_s=round(cpu, 3))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Check that a pinned child's XLA runs on at most N threads")
    ap.add_argument("--check-threads", type=int, default=1)
    print(json.dumps(check_threads(ap.parse_args().check_threads) | {"load": _sample_load()}))
