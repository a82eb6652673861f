"""Output directory: atomically written PNGs, append-only results journals, resume, merge, progress and summary.

Layout of ``<output>`` (a local directory or a URL such as ``gs://bucket/run``, see :mod:`.paths`)::

    images/<id>.png     generated / edited images (written atomically: temp file + fsync + rename)
    results.jsonl       one record per request, in request order (rewritten atomically at the end of a run)
    journal.jsonl       append-only: one fsynced line per finished request (what a restart resumes from)
    summary.json        counts, requests/s and timings of the last run

A job of ``n`` processes writes one journal per process, ``journal-<i>-of-<n>.jsonl`` (and its own
``summary-<i>-of-<n>.json``); process 0 merges all journals into ``results.jsonl`` / ``summary.json`` once every
process is done (``nexus-jax infer --merge`` does the same after the fact). The PNGs share ``images/``.

Resume reads **every** journal in the directory (``journal*.jsonl``), whatever process count wrote it. A request
counts as complete when some journal has an ``ok`` record for it and, for image tasks, its PNG exists with the
recorded SHA-256. Complete requests are skipped on restart; failed ones are retried. Of several records of one id
(journals ordered by modification time, then line order) the latest complete ``ok`` one wins, else the latest one.

On a URL the journal cannot be appended to; each new record rewrites this process's journal object whole (still
atomic, O(records) per request).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

import numpy as np
from PIL import Image
from tqdm import tqdm

from nexus_jax import paths
from nexus_jax.paths import TEMP_PREFIX, atomic_write_bytes

IMAGES_DIR = "images"
JOURNAL = "journal.jsonl"
RESULTS = "results.jsonl"
SUMMARY = "summary.json"
JOURNAL_NAME = re.compile(r"^journal(-\d+-of-\d+)?\.jsonl$")


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


def image_name(request_id: str, index: int = 0) -> str:
    """Path under the output root of a request's image: ``images/<id>.png``; image ``index`` >= 1 of a chat answer:
    ``images/<id>.more/<index>.png`` (ids hold no '/', so no other request's name can take it)."""
    return f"{IMAGES_DIR}/{request_id}.png" if index == 0 else f"{IMAGES_DIR}/{request_id}.more/{index}.png"


def process_suffix(process_index: int, process_count: int) -> str:
    return "" if process_count == 1 else f"-{process_index:05d}-of-{process_count:05d}"


def _join(root: str | os.PathLike, *parts: str) -> str:
    """``root/part/...`` as text (a URL keeps its scheme)."""
    return os.fspath(paths.join(root, *parts))


def journal_paths(root: str) -> list[str]:
    """Every journal under ``root`` (any process count), oldest modification first."""
    found = [_join(root, n) for n in paths.listdir(root) if JOURNAL_NAME.match(n)]
    return sorted(found, key=lambda p: (paths.mtime(p), p))


class OutputDir:
    """Writes results under ``root`` and knows which requests are already complete (from all journals)."""

    def __init__(self, root: str | os.PathLike, process_index: int = 0, process_count: int = 1):
        self.root = os.fspath(root)
        self.suffix = process_suffix(process_index, process_count)
        paths.ensure_dir(_join(self.root, IMAGES_DIR))
        self.history: dict[str, list[dict[str, Any]]] = {}
        for path in journal_paths(self.root):
            for rec in read_jsonl_tolerant(path):
                self.history.setdefault(rec["id"], []).append(rec)
        self._journal: TextIO | None = None  # opened on the first record
        self._remote_lines: list[str] | None = None

    @property
    def records(self) -> dict[str, dict[str, Any]]:
        """id -> its latest record (any journal)."""
        return {k: v[-1] for k, v in self.history.items()}

    def _path(self, name: str) -> str:
        stem, ext = os.path.splitext(name)
        return _join(self.root, f"{stem}{self.suffix}{ext}")

    def image_path(self, request_id: str, index: int = 0) -> str:
        return _join(self.root, image_name(request_id, index))

    def remove_stale_temps(self) -> int:
        """Delete ``images/.tmp-*`` left by a killed run (call before any process of this run writes)."""
        images = _join(self.root, IMAGES_DIR)
        if paths.is_remote(images):
            return 0  # object stores write whole objects: nothing half-written is left behind
        stale = [n for n in paths.listdir(images) if n.startswith(TEMP_PREFIX)]
        for n in stale:
            try:
                os.unlink(os.path.join(images, n))
            except FileNotFoundError:
                pass
        return len(stale)

    def _valid(self, rec: dict[str, Any]) -> bool:
        """An ``ok`` record whose image (if any) is on disk with the recorded hash."""
        if rec.get("status") != "ok":
            return False
        if rec.get("image") is None:
            return True
        files = list(zip(rec.get("images") or [rec["image"]], rec.get("images_sha256") or [rec.get("image_sha256")]))
        for name, digest in files:  # chat answers may hold several images
            path = _join(self.root, name)
            if not paths.is_file(path) or sha256(paths.read_bytes(path)) != digest:
                return False
        return True

    def chosen(self, request_id: str) -> tuple[dict[str, Any] | None, bool]:
        """(the record that stands for ``request_id``, whether it is complete): the latest complete ``ok`` record,
        else the latest record; (None, False) without any."""
        recs = self.history.get(request_id, [])
        for rec in reversed(recs):
            if self._valid(rec):
                return rec, True
        return (recs[-1] if recs else None), False

    def is_complete(self, request_id: str) -> bool:
        """True when an ``ok`` record exists and its image (if any) is on disk with the recorded hash."""
        return self.chosen(request_id)[1]

    def write_image(self, request_id: str, image: np.ndarray, index: int = 0) -> tuple[str, str]:
        """PNG-encode ``image`` ([H, W, 3] in [-1, 1]) atomically -> (path relative to root, sha256); ``index``: the
        image's place in a chat answer (see :func:`image_name`)."""
        data = png_bytes(image)
        paths.atomic_write_bytes(self.image_path(request_id, index), data)
        return image_name(request_id, index), sha256(data)

    def record(self, rec: dict[str, Any]) -> None:
        """Append one finished request to this process's journal (durable before returning)."""
        self.history.setdefault(rec["id"], []).append(rec)
        line = json.dumps(rec, ensure_ascii=False) + "\n"
        path = self._path(JOURNAL)
        if paths.is_remote(path):
            if self._remote_lines is None:
                self._remote_lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in read_jsonl_tolerant(path)]
            self._remote_lines.append(line)
            paths.atomic_write_bytes(path, "".join(self._remote_lines).encode())
            return
        if self._journal is None:
            self._journal = open(path, "a", encoding="utf-8")  # noqa: SIM115
        self._journal.write(line)
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def results_lines(self, order: Iterable[str]) -> tuple[list[str], list[str]]:
        """(``results.jsonl`` lines: the chosen record of each id in ``order``, ids without any record)."""
        lines, missing = [], []
        for i in order:
            rec, _ = self.chosen(i)
            if rec is None:
                missing.append(i)
            else:
                lines.append(json.dumps(rec, ensure_ascii=False))
        return lines, missing

    def finalize(self, order: Iterable[str], summary: dict[str, Any]) -> None:
        """Rewrite this process's ``results.jsonl`` (chosen record per id, in ``order``) and ``summary.json``."""
        lines, _ = self.results_lines(order)
        atomic_write_bytes(self._path(RESULTS), ("\n".join(lines) + "\n" if lines else "").encode())
        self.write_summary(summary)

    def write_summary(self, summary: dict[str, Any], merged: bool = False) -> None:
        path = _join(self.root, SUMMARY) if merged else self._path(SUMMARY)
        atomic_write_bytes(path, (json.dumps(summary, indent=2) + "\n").encode())

    def merge(self, order: Sequence[str], summary: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the job's ``results.jsonl`` and ``summary.json`` from all journals; returns the summary.

        ``summary`` (a run's figures) gets ``missing`` added; without it the summary counts the merged records."""
        lines, missing = self.results_lines(order)
        atomic_write_bytes(_join(self.root, RESULTS), ("\n".join(lines) + "\n" if lines else "").encode())
        if summary is None:
            statuses = [json.loads(x)["status"] for x in lines]
            summary = {"requests": len(order), "ok": statuses.count("ok"), "error": statuses.count("error"),
                       "journals": [os.path.basename(p) for p in journal_paths(self.root)]}
        summary = {**summary, "missing": len(missing)}
        self.write_summary(summary, merged=True)
        return summary

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None


def read_jsonl_tolerant(path: str) -> list[dict[str, Any]]:
    """Records of a journal; a torn last line (the run was killed mid-write) and non-objects are ignored."""
    if not paths.exists(path):
        return []
    out = []
    for line in paths.read_text(path).split("\n"):  # not splitlines(): U+2028 may sit in a text
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("id"), str):
            out.append(rec)
    return out


class _RequestBar(tqdm):
    """tqdm whose ``bar_format`` may use ``{failed}`` (requests that ended in an error record)."""

    failed = 0

    @property
    def format_dict(self) -> dict[str, Any]:
        return {**super().format_dict, "failed": self.failed}


BAR_FORMAT = ("{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} requests ({failed} failed) "
              "[{elapsed}, ETA {remaining}, {rate_fmt}]")


class Progress:
    """A tqdm bar on ``stream``: done/total requests, failures, requests/s and ETA (redrawn at most every 0.2 s).

    ``initial`` requests finished by an earlier run (resume) count in done/total but not in the rate or ETA: tqdm
    measures the rate from the position it started at."""

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 28, enabled: bool = True,
                 initial: int = 0):
        self.total, self.done, self.failed, self.initial = total, initial, 0, initial
        self.stream = stream or sys.stderr
        self.width, self.enabled = width, enabled
        self.start = time.perf_counter()
        self._format = BAR_FORMAT.replace("{bar}", f"{{bar:{width}}}")
        self._bar = _RequestBar(total=total, initial=initial, file=self.stream, disable=not enabled, mininterval=0.2,
                                unit="req", desc="infer", bar_format=self._format)

    def rate(self) -> float:
        """Requests per second of this run (resumed requests excluded)."""
        elapsed = time.perf_counter() - self.start
        return (self.done - self.initial) / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        """The bar as text (also when disabled)."""
        return tqdm.format_meter(self.done, self.total, time.perf_counter() - self.start, prefix="infer", unit="req",
                                 bar_format=self._format, initial=self.initial, failed=self.failed)

    def update(self, n: int = 1, failed: int = 0) -> None:
        self.done += n
        self.failed += failed
        self._bar.failed = self.failed
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()
