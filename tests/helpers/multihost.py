"""Multi-process test harness: a nexus-jax command as P JAX processes on 127.0.0.1 (launch.local), bounded in time.

A dead or hung process fails the test with every process's log; nothing is left running.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from launch.local import LocalRun, run_local


def run_processes(command: Sequence[str], processes: int, log_dir: Path, *, devices_per_process: int | None = None,
                  timeout_s: float = 480.0, expect_ok: bool = True, heartbeat_s: int = 10, grace_s: float = 60.0,
                  extra_env: Sequence[Mapping[str, str]] | None = None, on_start=None) -> LocalRun:
    """Run ``python -m launch.distributed *command`` as ``processes`` processes; 8 devices in all by default."""
    devices = devices_per_process or max(8 // processes, 1)
    run = run_local([str(c) for c in command], processes, devices_per_process=devices, timeout_s=timeout_s,
                    grace_s=grace_s, log_dir=log_dir, heartbeat_s=heartbeat_s, extra_env=extra_env, on_start=on_start)
    if expect_ok and not run.ok:
        raise AssertionError(f"multi-process run failed: {' '.join(map(str, command))}\n{run.summary()}")
    return run
