"""Training metrics to stdout, TensorBoard (tensorboardX) and a JSONL step log.

The JSONL log (``steps.jsonl`` in the run directory) records, per step, the exact float32 loss and the record ids of
the batch; exact-resume tests compare it between runs. Each run appends a ``{"event": "start"}`` line first.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


class MetricsWriter:
    """Writes scalars every ``log_every`` steps (stdout, TensorBoard) and every step to the JSONL log."""

    def __init__(self, run_dir: str | Path, log_every: int = 10, tensorboard_dir: str = "", stream=None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_every = max(1, log_every)
        self.stream = stream or sys.stdout
        self._jsonl = open(self.run_dir / "steps.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self._tb = None
        if tensorboard_dir:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(tensorboard_dir)
        self._last_time = time.perf_counter()
        self._tokens_since = 0
        self._records_since = 0

    def event(self, name: str, **fields: Any) -> None:
        self._jsonl.write(json.dumps({"event": name, **fields}) + "\n")
        self._jsonl.flush()

    def step(self, step: int, metrics: dict[str, Any], *, tokens: int = 0, records: int = 0,
             record_ids: list[int] | None = None, skipped: int = 0) -> dict[str, float]:
        """Log one optimiser step. ``metrics`` are device scalars; returns the host floats."""
        host = {k: float(np.asarray(v)) for k, v in metrics.items()}
        self._tokens_since += tokens
        self._records_since += records
        row = {"step": step, **host, "skipped_records": skipped}
        if record_ids is not None:
            row["record_ids"] = record_ids
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if step % self.log_every == 0:
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
                self._tb.flush()
        return host

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        row = {"eval_step": step, **metrics}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        print(f"eval @ {step}: " + " ".join(f"{k}={_fmt(v)}" for k, v in sorted(metrics.items())),
              file=self.stream, flush=True)
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"eval/{k}", v, step)
            self._tb.flush()

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _fmt(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else str(v)


def read_step_log(path: str | Path, last_run_only: bool = False) -> list[dict[str, Any]]:
    """Rows of a ``steps.jsonl`` (optionally only those after the last ``start`` event)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if last_run_only:
        starts = [i for i, r in enumerate(rows) if r.get("event") == "start"]
        rows = rows[starts[-1] + 1:] if starts else rows
    return [r for r in rows if "step" in r]
