"""File access for batch inference: local paths through ``os``, URLs (``gs://``, ``s3://``, ...) through
``etils.epath``.

Writes are atomic either way: a local file is written to a fsynced temp file in the same directory and renamed over
the target; an object store writes an object whole (it becomes visible only once complete), so a URL target is
written in one ``write_bytes``.
"""

from __future__ import annotations

import os
import posixpath


def is_url(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def _epath(path: str):
    from etils import epath

    return epath.Path(path)


def join(root: str | os.PathLike, *parts: str) -> str:
    root = os.fspath(root)
    if is_url(root):
        return posixpath.join(root, *parts)
    return os.path.join(root, *parts)


def parent(path: str | os.PathLike) -> str:
    """The directory of ``path`` (absolute for local paths)."""
    path = os.fspath(path)
    if is_url(path):
        return path.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(path))


def resolve(path: str, base_dir: str) -> str:
    """``path`` relative to ``base_dir`` (absolute paths and URLs unchanged)."""
    if is_url(path) or os.path.isabs(path):
        return path
    if is_url(base_dir):
        scheme, rest = base_dir.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, path))}"
    return os.path.normpath(os.path.join(base_dir, path))


def exists(path: str) -> bool:
    return _epath(path).exists() if is_url(path) else os.path.exists(path)


def is_file(path: str) -> bool:
    return _epath(path).is_file() if is_url(path) else os.path.isfile(path)


def is_dir(path: str) -> bool:
    return _epath(path).is_dir() if is_url(path) else os.path.isdir(path)


def makedirs(path: str) -> None:
    if is_url(path):
        _epath(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def read_bytes(path: str) -> bytes:
    if is_url(path):
        return _epath(path).read_bytes()
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def listdir(path: str) -> list[str]:
    """Names in directory ``path`` (sorted; [] when it does not exist)."""
    if is_url(path):
        p = _epath(path)
        return sorted(c.name for c in p.iterdir()) if p.exists() else []
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def mtime(path: str) -> float:
    if is_url(path):
        return float(_epath(path).stat().mtime)
    return os.stat(path).st_mtime


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (see the module docstring). Local paths go through
    :func:`nexus_jax.paths.atomic_write_bytes` (temp named ``TEMP_PREFIX*``, fsync, rename)."""
    path = os.fspath(path)
    if is_url(path):
        _epath(path).write_bytes(data)
        return
    from nexus_jax import paths as shared

    shared.atomic_write_bytes(path, data)
