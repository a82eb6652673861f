"""Local paths and object-store URLs (``gs://``, ``s3://``, ``az://``, ``hf://``) behind one ``etils.epath`` API.

Every path argument of the data, conversion and metrics code goes through :func:`as_path`, so the same code runs on
a laptop and on Cloud TPU VMs writing to a bucket. ``epath`` sends URLs to its fsspec backend (``gcsfs`` for
``gs://``; TensorFlow's gfile instead when TensorFlow is installed) and local paths to ``os``.

Atomicity (what :func:`atomic_write_bytes` gives):

- local: temp file in the same directory, ``fsync``, ``os.replace``, ``fsync`` of the directory (a reader sees the
  old or the new file; a crash leaves no partial file under the final name);
- object stores: the object is uploaded straight under its final name. A GCS/S3 object appears only once its upload
  completes (single-request or finalised resumable upload), so readers again see the old or the new bytes. A rename
  would be a server-side copy + delete there, neither atomic nor cheaper, so none is done. There is no atomic
  directory rename on object stores: directory outputs are written in place with a completion marker written last
  (see ``conversion.io.atomic_output_dir``).
"""

from __future__ import annotations

import os
import posixpath
import tempfile

from etils import epath

from nexus_jax.fileperms import set_default_mode

REMOTE_PREFIXES = ("gs://", "s3://", "az://", "hf://")  # the URL schemes epath routes to a remote backend
PathLike = str | os.PathLike
TEMP_PREFIX = ".tmp-"  # names of atomic-write temporaries (a killed writer's leftovers can be found by it)


def _url_prefixes() -> tuple[str, ...]:
    """:data:`REMOTE_PREFIXES` plus any scheme registered with ``etils.epath.register`` (tests register fakes)."""
    from etils.epath import register

    return REMOTE_PREFIXES + tuple(p for p in getattr(register, "_URI_PREFIXES_TO_CLS", {}) if p not in REMOTE_PREFIXES)


def is_remote(path: PathLike) -> bool:
    """True for an object-store URL (``gs://bucket/x``), False for a local path (``file://`` URLs included)."""
    return os.fspath(path).startswith(_url_prefixes())


def as_path(path: PathLike) -> epath.Path:
    """``str`` / ``PathLike`` -> ``epath.Path``. URLs keep their scheme (``str()`` gives the URL back); ``file://x``
    becomes the local path ``x``; any other ``scheme://`` is refused (``pathlib`` would silently make it a local
    ``scheme:/...`` folder)."""
    text = os.fspath(path)
    if not isinstance(text, str):
        raise TypeError(f"path must be str or PathLike of str, got {type(text).__name__} {text!r}")
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text and not text.startswith(_url_prefixes()):
        scheme = text.split("://", 1)[0]
        raise ValueError(f"unsupported URL scheme {scheme}:// in {text!r}; use a local path or one of "
                         f"{', '.join(REMOTE_PREFIXES)}")
    return epath.Path(text)


def join(base: PathLike, *parts: str) -> epath.Path:
    """``base / part / ...`` as an ``epath.Path`` (URL-safe: ``f"{base}/x"`` on ``gs://b`` is fine, ``pathlib`` is
    not)."""
    return as_path(base).joinpath(*parts)


def atomic_write_bytes(path: PathLike, data: bytes) -> epath.Path:
    """Write ``data`` to ``path`` so that readers never see a partial file (see the module docstring). Creates the
    parent directory. Returns the path written."""
    p = as_path(path)
    if is_remote(p):
        p.write_bytes(data)  # object stores need no parent "directories"
        return p
    local = os.fspath(p)
    parent = os.path.dirname(os.path.abspath(local))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.path.basename(local)}.", dir=parent)
    set_default_mode(fd)  # mkstemp creates 0600; give the file the mode a plain open() would
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, local)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(parent)
    return p


def ensure_dir(path: PathLike) -> epath.Path:
    """Create a local directory (and parents); nothing for a URL: object stores have no directories, and gcsfs's
    ``makedirs`` may even create a missing *bucket* (a typo in a bucket name must fail, not make a bucket)."""
    p = as_path(path)
    if not is_remote(p):
        p.mkdir(parents=True, exist_ok=True)
    return p


def parent(path: PathLike) -> str:
    """The directory of ``path`` as text (absolute for local paths; a URL keeps its scheme)."""
    text = os.fspath(path)
    if is_remote(text):
        return text.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(os.fspath(as_path(text))))


def resolve(path: PathLike, base_dir: PathLike) -> str:
    """``path`` relative to ``base_dir`` as text (absolute paths and URLs unchanged, ``..`` normalised)."""
    path, base = os.fspath(path), os.fspath(base_dir)
    if is_remote(path) or os.path.isabs(path):
        return path
    if is_remote(base):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, path))}"
    return os.path.normpath(os.path.join(os.fspath(as_path(base)), path))


def exists(path: PathLike) -> bool:
    return as_path(path).exists()


def is_file(path: PathLike) -> bool:
    return as_path(path).is_file()


def is_dir(path: PathLike) -> bool:
    return as_path(path).is_dir()


def read_bytes(path: PathLike) -> bytes:
    return as_path(path).read_bytes()


def read_text(path: PathLike) -> str:
    """The file's text, decoded as UTF-8 (whatever the locale)."""
    return read_bytes(path).decode("utf-8")


def listdir(directory: PathLike) -> list[str]:
    """Sorted names in ``directory`` ([] when it does not exist)."""
    d = as_path(directory)
    return sorted(c.name for c in d.iterdir()) if d.exists() else []


def mtime(path: PathLike) -> float:
    """Modification time (seconds) of a file or object."""
    p = as_path(path)
    return float(p.stat().mtime) if is_remote(path) else os.stat(os.fspath(p)).st_mtime


def atomic_write_text(path: PathLike, text: str) -> epath.Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def fsync_dir(directory: PathLike) -> None:
    """fsync a local directory (its entries' renames become durable); a no-op for URLs."""
    if is_remote(directory):
        return
    fd = os.open(os.fspath(directory), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_tree(src: PathLike, dst: PathLike, last: tuple[str, ...] = ()) -> list[str]:
    """Copy every file under ``src`` to the same relative path under ``dst`` (either may be a URL; files are
    streamed in 64 MiB blocks). Files whose relative path is in ``last`` are copied after all others (completion
    markers such as ``config.json``). Returns the relative paths copied, in order."""
    src_p, dst_p = as_path(src), as_path(dst)
    rels = list_files(src_p)
    rels.sort(key=lambda r: (r in last, r))
    for rel in rels:
        target = dst_p / rel
        ensure_dir(target.parent)
        with (src_p / rel).open("rb") as fin, target.open("wb") as fout:
            while block := fin.read(64 * 2**20):
                fout.write(block)
    return rels


def list_files(directory: PathLike) -> list[str]:
    """Relative paths of all files under ``directory`` (recursive; ``iterdir`` based, which keeps URL schemes where
    some fsspec ``walk`` results drop them)."""
    base = as_path(directory)
    out: list[str] = []
    stack = [base]
    while stack:
        d = stack.pop()
        for child in d.iterdir():
            if child.is_dir():
                stack.append(child)
            else:
                out.append(os.fspath(child.relative_to(base)))
    return sorted(out)


def path_arg(text: str) -> str:
    """``argparse`` type of path options: the text unchanged if it is a local path or a supported URL; an
    unsupported ``scheme://`` is a usage error (exit 2) instead of a local folder named after the scheme."""
    import argparse

    try:
        as_path(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def dir_arg(text: str) -> epath.Path:
    """``argparse`` type of an output directory option (``--run-dir``): :func:`path_arg`, as an ``epath.Path``
    (``str()`` of a URL gives the URL back; ``pathlib.Path(...)`` of it would not)."""
    return as_path(path_arg(text))
