"""Output directory: atomically written PNGs, an append-only results journal, resume, progress and summary.

Layout of ``<output>``::

    images/<id>.png     generated / edited images (written to a temp file, fsynced, then renamed)
    results.jsonl       one record per request, in request order (rewritten atomically at the end of a run)
    journal.jsonl       append-only: one fsynced line per finished request (what a restart resumes from)
    summary.json        counts, requests/s and timings of the last run

With several hosts, each writes ``journal-<i>-of-<n>.jsonl`` / ``results-<i>-of-<n>.jsonl`` / ``summary-...`` for
its own share of the requests (the PNGs share ``images/``; ids are unique).

A request counts as complete when the journal has an ``ok`` record for it and, for image tasks, its PNG exists with
the recorded SHA-256. Complete requests are skipped on restart; failed ones are retried.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterable
from typing import Any, TextIO

import numpy as np
from PIL import Image

IMAGES_DIR = "images"
JOURNAL = "journal.jsonl"
RESULTS = "results.jsonl"
SUMMARY = "summary.json"


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fsynced temp file in the same directory and ``os.replace``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Decoder pixels [H, W, 3] in [-1, 1] -> uint8 (the PNG encoding step)."""
    image = np.asarray(image, np.float32)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an [H, W, 3] image, got shape {image.shape}")
    return np.round((np.clip(image, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buf, format="PNG")
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class OutputDir:
    """Writes results under ``root`` and knows which requests are already complete."""

    def __init__(self, root: str | os.PathLike, process_index: int = 0, process_count: int = 1):
        self.root = os.fspath(root)
        # multi-host: each host owns its share of the requests and its own journal / results / summary files
        self.suffix = "" if process_count == 1 else f"-{process_index:05d}-of-{process_count:05d}"
        os.makedirs(os.path.join(self.root, IMAGES_DIR), exist_ok=True)
        self.records: dict[str, dict[str, Any]] = {}
        for rec in read_jsonl_tolerant(self._path(JOURNAL)):
            self.records[rec["id"]] = rec
        self._journal: TextIO = open(self._path(JOURNAL), "a", encoding="utf-8")  # noqa: SIM115

    def _path(self, name: str) -> str:
        stem, ext = os.path.splitext(name)
        return os.path.join(self.root, f"{stem}{self.suffix}{ext}")

    def image_path(self, request_id: str) -> str:
        return os.path.join(self.root, IMAGES_DIR, f"{request_id}.png")

    def is_complete(self, request_id: str) -> bool:
        """True when an ``ok`` record exists and its image (if any) is on disk with the recorded hash."""
        rec = self.records.get(request_id)
        if rec is None or rec.get("status") != "ok":
            return False
        if rec.get("image") is None:
            return True
        path = os.path.join(self.root, rec["image"])
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as f:
            return sha256(f.read()) == rec.get("image_sha256")

    def write_image(self, request_id: str, image: np.ndarray) -> tuple[str, str]:
        """PNG-encode ``image`` ([H, W, 3] in [-1, 1]) atomically -> (path relative to root, sha256)."""
        data = png_bytes(image)
        atomic_write_bytes(self.image_path(request_id), data)
        return os.path.join(IMAGES_DIR, f"{request_id}.png"), sha256(data)

    def record(self, rec: dict[str, Any]) -> None:
        """Append one finished request to the journal (flushed and fsynced before returning)."""
        self.records[rec["id"]] = rec
        self._journal.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def finalize(self, order: Iterable[str], summary: dict[str, Any]) -> None:
        """Rewrite ``results.jsonl`` (latest record per id, in ``order``) and ``summary.json`` atomically."""
        lines = [json.dumps(self.records[i], ensure_ascii=False) for i in order if i in self.records]
        atomic_write_bytes(self._path(RESULTS), ("\n".join(lines) + "\n" if lines else "").encode())
        atomic_write_bytes(self._path(SUMMARY), (json.dumps(summary, indent=2) + "\n").encode())

    def close(self) -> None:
        self._journal.close()


def read_jsonl_tolerant(path: str) -> list[dict[str, Any]]:
    """Records of a journal; a torn last line (the run was killed mid-write) and non-objects are ignored."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("id"), str):
                out.append(rec)
    return out


class Progress:
    """A one-line progress bar on ``stream``: done/total, requests/s and ETA (redrawn at most every 0.2 s)."""

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 28, enabled: bool = True):
        self.total, self.done, self.failed = total, 0, 0
        self.stream = stream or sys.stderr
        self.width, self.enabled = width, enabled
        self.start = time.perf_counter()
        self._last = 0.0

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(frac * self.width)
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_s = "--:--" if eta != eta else f"{int(eta) // 60:02d}:{int(eta) % 60:02d}"
        return (f"[{bar:<{self.width}}] {self.done}/{self.total} requests ({self.failed} failed) "
                f"{rate:.2f} req/s ETA {eta_s}")

    def update(self, n: int = 1, failed: int = 0) -> None:
        self.done += n
        self.failed += failed
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.2 or self.done >= self.total):
            self._last = now
            self.stream.write("\r" + self.line())
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + self.line() + "\n")
            self.stream.flush()
