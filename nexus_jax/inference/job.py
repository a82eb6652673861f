"""What ``nexus-jax infer`` runs, family by family: a :class:`Session` (a loaded checkpoint, how to prepare a request,
how to compute a batch) and the :class:`Job` base that records each batch's results. A family's inference entry
(:class:`nexus_jax.families.InferenceEntry`) opens a session; the CLI only batches, runs and writes."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from nexus_jax.inference.batching import Batch
from nexus_jax.inference.outputs import OutputDir, Progress
from nexus_jax.inference.reader import Done
from nexus_jax.inference.requests import Failure, Request


class Job:
    """Runs batches and records their results (one record per real request). Subclasses implement
    :meth:`compute`."""

    max_new_tokens: int = 32

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
        raise NotImplementedError

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


@dataclasses.dataclass(frozen=True)
class Session:
    """A loaded checkpoint ready to serve. ``prepare(request)``: the batchable item (fields ``request``, ``length``,
    ``grid`` as :class:`nexus_jax.inference.batching.Batcher` reads them; raises ValueError for a request the family
    cannot serve); ``job(out, progress)``: the :class:`Job` that computes and records its batches."""

    checkpoint: Any
    prepare: Callable[[Request], Any]
    job: Callable[[OutputDir, Progress], Job]
