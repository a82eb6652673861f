"""Run a pod job as N JAX processes on this machine (``nexus-jax launch local --processes N -- <command>``).

Every process runs ``python -m launch.distributed <nexus-jax command>`` exactly as a pod worker does, with its own
environment: ``JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, the CPU
platform with ``--devices-per-process`` fake devices and gloo CPU collectives. Logs go to
``<log-dir>/process-<i>.log``. The run is bounded: when one process fails the others get ``grace_s`` to exit on their
own (the JAX coordination service notices a dead peer within its heartbeat timeout), then they are killed; a run past
``timeout_s`` is killed whole. Nothing is left running.

The tests use :func:`run_local` as their multi-process harness, so users debug pod jobs with the same code.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: Mapping[str, str], process_id: int, num_processes: int, port: int, devices: int,
                heartbeat_s: int | None = None) -> dict[str, str]:
    """The environment of local process ``process_id``: coordinator, ids, CPU platform with ``devices`` devices."""
    env = dict(base)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env.update(JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
               JAX_PROCESS_ID=str(process_id), NEXUS_JAX_CPU_COLLECTIVES="gloo", TF_CPP_MIN_LOG_LEVEL="3")
    if heartbeat_s is not None:
        env["NEXUS_JAX_HEARTBEAT_TIMEOUT_S"] = str(heartbeat_s)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


@dataclasses.dataclass
class ProcessResult:
    process_id: int
    returncode: int | None  # None: killed by the harness (hung or outlived a failed peer)
    log_path: Path
    killed: bool = False

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""


@dataclasses.dataclass
class LocalRun:
    """Outcome of :func:`run_local`."""

    results: list[ProcessResult]
    wall_s: float
    timed_out: bool

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(r.returncode == 0 for r in self.results)

    def summary(self, tail: int = 3000) -> str:
        """One block per process: exit status and the end of its log (for test failures and the CLI)."""
        lines = [f"{len(self.results)} processes, {self.wall_s:.1f} s" + (" (timed out)" if self.timed_out else "")]
        for r in self.results:
            status = "killed by the harness" if r.killed else f"exit {r.returncode}"
            lines.append(f"--- process {r.process_id}: {status}; log {r.log_path}\n{r.log(tail)}")
        return "\n".join(lines)


def run_local(
    command: Sequence[str],
    num_processes: int,
    *,
    devices_per_process: int = 4,
    timeout_s: float = 600.0,
    grace_s: float = 60.0,
    log_dir: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    extra_env: Sequence[Mapping[str, str]] | None = None,
    heartbeat_s: int | None = None,
    python: str = sys.executable,
    on_start: Callable[[list[subprocess.Popen]], None] | None = None,
) -> LocalRun:
    """Run ``python -m launch.distributed *command`` as ``num_processes`` local JAX processes and wait (bounded).

    ``extra_env[i]`` adds variables to process ``i``; ``on_start(procs)`` is called once all are started (tests use
    it to kill one). Returns every process's exit code and log path; raises nothing for a failed job.
    """
    if num_processes < 1:
        raise ValueError(f"--processes must be >= 1, got {num_processes}")
    if devices_per_process < 1:
        raise ValueError(f"--devices-per-process must be >= 1, got {devices_per_process}")
    log_root = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="nexus-jax-local-"))
    log_root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = dict(os.environ if env is None else env)
    procs: list[subprocess.Popen] = []
    results: list[ProcessResult] = []
    start = time.monotonic()
    try:
        for i in range(num_processes):
            penv = process_env(base, i, num_processes, port, devices_per_process, heartbeat_s)
            if extra_env is not None and i < len(extra_env):
                penv.update(extra_env[i])
            path = log_root / f"process-{i}.log"
            with open(path, "wb") as log:
                procs.append(subprocess.Popen([python, "-m", "launch.distributed", *command], env=penv,
                                              stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              start_new_session=True))
            results.append(ProcessResult(i, None, path))
        if on_start is not None:
            on_start(procs)
        timed_out, failed_at = False, None
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if now - start > timeout_s:
                timed_out = True
                break
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = now
            if failed_at is not None and now - failed_at > grace_s:
                break
            time.sleep(0.1)
    finally:
        for p, r in zip(procs, results):
            if p.poll() is None:
                _kill_group(p)
                r.killed = True
            r.returncode = None if r.killed else p.returncode
    return LocalRun(results, time.monotonic() - start, timed_out)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nexus-jax launch local", description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, required=True, help="number of JAX processes (pod hosts) to start")
    p.add_argument("--devices-per-process", type=int, default=4, help="fake CPU devices of each process")
    p.add_argument("--timeout", type=float, default=3600.0, help="kill the whole job after this many seconds")
    p.add_argument("--grace", type=float, default=120.0,
                   help="seconds the other processes get to exit after one fails, before they are killed")
    p.add_argument("--heartbeat-timeout", type=int, default=30,
                   help="seconds after which the JAX coordination service declares a silent process dead")
    p.add_argument("--log-dir", default="", help="per-process logs (default: a new temporary directory)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the nexus-jax command, after --")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("error: give the nexus-jax command after --, e.g. -- train --preset tiny_ar ...", file=sys.stderr)
        return 2
    run = run_local(command, args.processes, devices_per_process=args.devices_per_process, timeout_s=args.timeout,
                    grace_s=args.grace, log_dir=args.log_dir or None, heartbeat_s=args.heartbeat_timeout)
    print(run.summary(tail=1500 if run.ok else 6000))
    if run.ok:
        return 0
    codes = [r.returncode for r in run.results if r.returncode not in (0, None)]
    return codes[0] if codes and codes[0] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
