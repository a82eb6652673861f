"""Training metrics to stdout, TensorBoard (tensorboardX) and a JSONL step log.

The JSONL log (``steps.jsonl`` in the run directory) records, per step, the exact float32 loss and the record ids of
the batch; exact-resume tests compare it between runs. Each run appends a ``{"event": "start"}`` line first.

The run directory and the TensorBoard directory may be object-store URLs (``gs://bucket/runs/x``, see
:mod:`nexus_jax.paths`). Objects cannot be appended to, so there ``steps.jsonl`` is kept in memory (previous runs'
rows are read back first) and re-uploaded whole at every ``log_every`` step, eval, event and on close, and
TensorBoard events are written to a local temporary directory whose files are re-uploaded at the same moments
(tensorboardX's own ``gs://`` writer needs ``google-cloud-storage``). A crash loses at most the rows since the last
upload; a resumed run re-logs those steps.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np

from nexus_jax.paths import as_path, atomic_write_bytes, ensure_dir, is_remote

STEP_LOG = "steps.jsonl"


class _LocalLog:
    """Append-only local file, flushed after every line (a killed run keeps every row it logged)."""

    def __init__(self, path):
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, line: str, upload: bool = False) -> None:
        self._f.write(line)
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class _RemoteLog:
    """An object-store JSONL log: earlier content + new lines, re-uploaded whole when ``upload`` is asked for."""

    def __init__(self, path):
        self.path = as_path(path)
        self._chunks = [self.path.read_bytes()] if self.path.exists() else []
        if self._chunks and not self._chunks[0].endswith(b"\n"):
            self._chunks.append(b"\n")
        self._dirty = False

    def write(self, line: str, upload: bool = False) -> None:
        self._chunks.append(line.encode("utf-8"))
        self._dirty = True
        if upload:
            self.upload()

    def upload(self) -> None:
        if self._dirty:
            data = b"".join(self._chunks)
            self._chunks = [data]
            atomic_write_bytes(self.path, data)
            self._dirty = False

    def close(self) -> None:
        self.upload()


class _MirroredDir:
    """A local temporary directory whose files are copied to a remote directory on :meth:`sync` (whole files)."""

    def __init__(self, remote):
        self.remote = as_path(remote)
        self.local = tempfile.mkdtemp(prefix="nexus-jax-tb-")

    def sync(self) -> None:
        for root, _, files in os.walk(self.local):
            for name in files:
                src = os.path.join(root, name)
                with open(src, "rb") as f:
                    atomic_write_bytes(self.remote / os.path.relpath(src, self.local), f.read())

    def close(self) -> None:
        self.sync()
        shutil.rmtree(self.local, ignore_errors=True)


class MetricsWriter:
    """Writes scalars every ``log_every`` steps (stdout, TensorBoard) and every step to the JSONL log."""

    def __init__(self, run_dir: str | os.PathLike, log_every: int = 10, tensorboard_dir: str | os.PathLike = "",
                 stream=None):
        self.run_dir = ensure_dir(run_dir)
        self.log_every = max(1, log_every)
        self.stream = stream or sys.stdout
        log = self.run_dir / STEP_LOG
        self._jsonl = _RemoteLog(log) if is_remote(log) else _LocalLog(log)
        self._tb = None
        self._tb_mirror = None
        if tensorboard_dir:
            from tensorboardX import SummaryWriter

            if is_remote(tensorboard_dir):
                self._tb_mirror = _MirroredDir(tensorboard_dir)
                self._tb = SummaryWriter(self._tb_mirror.local)
            else:
                self._tb = SummaryWriter(os.fspath(as_path(tensorboard_dir)))
        self._last_time = time.perf_counter()
        self._tokens_since = 0
        self._records_since = 0

    def event(self, name: str, **fields: Any) -> None:
        self._jsonl.write(json.dumps({"event": name, **fields}) + "\n", upload=True)

    def step(self, step: int, metrics: dict[str, Any], *, tokens: int = 0, records: int = 0,
             record_ids: list[int] | None = None, skipped: int = 0) -> dict[str, float]:
        """Log one optimiser step. ``metrics`` are device scalars; returns the host floats."""
        host = {k: float(np.asarray(v)) for k, v in metrics.items()}
        self._tokens_since += tokens
        self._records_since += records
        row = {"step": step, **host, "skipped_records": skipped}
        if record_ids is not None:
            row["record_ids"] = record_ids
        logged = step % self.log_every == 0
        self._jsonl.write(json.dumps(row) + "\n", upload=logged)
        if logged:
            now = time.perf_counter()
            dt = max(now - self._last_time, 1e-9)
            host["tokens_per_s"] = self._tokens_since / dt
            host["records_per_s"] = self._records_since / dt
            host["skipped_records"] = float(skipped)
            self._last_time, self._tokens_since, self._records_since = now, 0, 0
            parts = " ".join(f"{k}={_fmt(v)}" for k, v in sorted(host.items()))
            print(f"step {step}: {parts}", file=self.stream, flush=True)
            if self._tb is not None:
                for k, v in host.items():
                    self._tb.add_scalar(f"train/{k}", v, step)
                self._flush_tb()
        return host

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        row = {"eval_step": step, **metrics}
        self._jsonl.write(json.dumps(row) + "\n", upload=True)
        print(f"eval @ {step}: " + " ".join(f"{k}={_fmt(v)}" for k, v in sorted(metrics.items())),
              file=self.stream, flush=True)
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"eval/{k}", v, step)
            self._flush_tb()

    def _flush_tb(self) -> None:
        self._tb.flush()
        if self._tb_mirror is not None:
            self._tb_mirror.sync()

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._tb_mirror is not None:
            self._tb_mirror.close()


def _fmt(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else str(v)


def read_step_log(path: str | os.PathLike, last_run_only: bool = False) -> list[dict[str, Any]]:
    """Rows of a ``steps.jsonl`` (a path or URL; optionally only those after the last ``start`` event)."""
    rows = [json.loads(line) for line in as_path(path).read_text().splitlines() if line.strip()]
    if last_run_only:
        starts = [i for i, r in enumerate(rows) if r.get("event") == "start"]
        rows = rows[starts[-1] + 1:] if starts else rows
    return [r for r in rows if "step" in r]
