"""A local fake of Google Cloud Storage for tests: ``gs://bucket/key`` is the file ``<root>/bucket/key``.

Both clients that production code uses for ``gs://`` are redirected to that directory, so the real URL code paths run:

- ``etils.epath`` (data, metrics, conversion I/O): its fsspec backend asks ``fsspec.filesystem("gcs")``;
  :class:`FakeGCSFileSystem` is registered under ``gs`` / ``gcs`` in place of ``gcsfs``. Like GCS it refuses
  append mode (objects are immutable) and has no atomic rename guarantees the code may rely on.
- TensorStore (Orbax checkpoints): its native ``gcs`` driver talks the GCS JSON API to ``TENSORSTORE_GCS_HTTP_URL``
  (with ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` skipping auth); :class:`FakeGCSServer` serves the subset it uses (object
  read with ranges and generation preconditions, media upload, delete, list).

Use :func:`install` once per process (TensorStore reads its endpoint once) and a fresh bucket name per test.
"""

from __future__ import annotations

import http.server
import json
import os
import tempfile
import threading
import urllib.parse
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem


class FakeGCSFileSystem(LocalFileSystem):
    """fsspec filesystem for ``gs://`` / ``gcs://`` URLs stored under :attr:`root`."""

    protocol = ("gs", "gcs")
    root = ""  # set by install()

    def __init__(self, *args, finalize_on_close: bool = False, **kwargs):  # gcsfs's kwarg, passed by epath
        super().__init__(*args, auto_mkdir=True, **kwargs)  # like GCS: writing a/b/c needs no "directory" a/b

    @classmethod
    def _strip_protocol(cls, path):
        path = os.fspath(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                return os.path.join(cls.root, path[len(prefix):]).rstrip("/") or "/"
        if path.startswith(cls.root):
            return path.rstrip("/")
        return os.path.join(cls.root, path.lstrip("/")).rstrip("/")  # gcsfs-style "bucket/key" names

    def glob(self, path, **kwargs):  # names relative to the store, as gcsfs returns them (epath adds "gs://")
        return [os.path.relpath(p, self.root) for p in super().glob(path, **kwargs)]

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        if "a" in mode:
            raise NotImplementedError(f"fake GCS: objects cannot be appended to ({path})")
        return super()._open(path, mode, block_size, **kwargs)


def _generation(path: Path) -> int:
    return path.stat().st_mtime_ns or 1


class _Handler(http.server.BaseHTTPRequestHandler):
    root: Path
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _reply(self, code: int, body: bytes = b"", headers: dict | None = None, ctype: str = "application/json"):
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, doc: dict):
        self._reply(code, json.dumps(doc).encode())

    def _error(self, code: int, msg: str):
        self._json(code, {"error": {"code": code, "message": msg}})

    def _parse(self):
        url = urllib.parse.urlsplit(self.path)
        q = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
        parts = url.path.split("/")
        return parts, q

    def _resource(self, bucket: str, name: str, f: Path) -> dict:
        return {"kind": "storage#object", "bucket": bucket, "name": name, "size": str(f.stat().st_size),
                "generation": str(_generation(f)), "metageneration": "1"}

    def _preconditions_fail(self, q: dict, f: Path) -> bool:
        gen = _generation(f) if f.is_file() else 0
        if "ifGenerationMatch" in q and int(q["ifGenerationMatch"]) != gen:
            return True
        return "ifGenerationNotMatch" in q and int(q["ifGenerationNotMatch"]) == gen

    def do_GET(self):
        parts, q = self._parse()
        # /storage/v1/b/{bucket}/o[/{object}]
        if parts[1:4] != ["storage", "v1", "b"] or len(parts) < 6 or parts[5] != "o":
            return self._error(400, f"unsupported request {self.path}")
        bucket = parts[4]
        if len(parts) == 6:
            return self._list(bucket, q)
        name = urllib.parse.unquote("/".join(parts[6:]))
        f = self.root / bucket / name
        if not f.is_file():
            return self._error(404, f"no object {name}")
        if "ifGenerationNotMatch" in q and int(q["ifGenerationNotMatch"]) == _generation(f):
            return self._reply(304)
        if self._preconditions_fail({k: v for k, v in q.items() if k == "ifGenerationMatch"}, f):
            return self._error(412, "precondition failed")
        if q.get("alt") != "media":
            return self._json(200, self._resource(bucket, name, f))
        data = f.read_bytes()
        headers = {"x-goog-generation": _generation(f)}
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            a, _, b = rng[len("bytes="):].partition("-")
            start = int(a) if a else max(0, len(data) - int(b))
            end = (int(b) if (a and b) else len(data) - 1)
            if start >= len(data) and len(data) > 0:
                return self._error(416, "range not satisfiable")
            body = data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{len(data)}"
            return self._reply(206, body, headers, "application/octet-stream")
        return self._reply(200, data, headers, "application/octet-stream")

    do_HEAD = do_GET

    def _list(self, bucket: str, q: dict):
        base = self.root / bucket
        names = sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()) if base.is_dir() else []
        prefix, start, end = q.get("prefix", ""), q.get("startOffset", ""), q.get("endOffset")
        names = [n for n in names if n.startswith(prefix) and n >= start and (end is None or n < end)]
        items = [self._resource(bucket, n, base / n) for n in names]
        self._json(200, {"kind": "storage#objects", "items": items} if items else {"kind": "storage#objects"})

    def do_POST(self):
        parts, q = self._parse()
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        # /upload/storage/v1/b/{bucket}/o?uploadType=media&name=...
        if parts[1:5] != ["upload", "storage", "v1", "b"] or q.get("uploadType") != "media":
            return self._error(400, f"unsupported request {self.path}")
        bucket, name = parts[5], q["name"]
        f = self.root / bucket / name
        if self._preconditions_fail(q, f):
            return self._error(412, "precondition failed")
        f.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=f.parent, prefix=".upload-")
        with os.fdopen(fd, "wb") as out:
            out.write(body)
        os.replace(tmp, f)
        self._json(200, self._resource(bucket, name, f))

    def do_DELETE(self):
        parts, q = self._parse()
        bucket, name = parts[4], urllib.parse.unquote("/".join(parts[6:]))
        f = self.root / bucket / name
        if not f.is_file():
            return self._error(404, f"no object {name}")
        if self._preconditions_fail(q, f):
            return self._error(412, "precondition failed")
        f.unlink()
        self._reply(204)


class FakeGCSServer:
    """The GCS JSON API subset TensorStore uses, over ``root``, on a free localhost port (daemon thread)."""

    def __init__(self, root: str | os.PathLike):
        handler = type("Handler", (_Handler,), {"root": Path(root)})
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


_INSTALLED: dict[str, object] = {}


def install() -> Path:
    """Redirect ``gs://`` (epath + TensorStore) of this process to a fresh temporary directory; idempotent.
    Returns the root (``gs://b/k`` is ``root / "b" / "k"``)."""
    if "root" in _INSTALLED:
        return _INSTALLED["root"]  # type: ignore[return-value]
    import fsspec
    from etils.epath import backend, gpath

    root = Path(tempfile.mkdtemp(prefix="fake-gcs-"))
    FakeGCSFileSystem.root = str(root)
    for proto in ("gs", "gcs"):
        fsspec.register_implementation(proto, FakeGCSFileSystem, clobber=True)
    backend._FileSystemSpecBackend._get_filesystem.cache_clear()
    if gpath._is_tf_installed():  # epath would use TensorFlow's gfile (real GCS) instead of fsspec
        raise RuntimeError("fake GCS needs EPATH_USE_TF=0 when TensorFlow is installed")
    # Orbax asks the bucket's metadata (google-cloud-storage, real network) whether it has a hierarchical
    # namespace before listing steps; the fake's buckets are flat.
    from orbax.checkpoint._src.path import gcs_utils

    gcs_utils.is_hierarchical_namespace_enabled = lambda path: False
    server = FakeGCSServer(root)
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = server.url
    os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "fake-token"
    _INSTALLED.update(root=root, server=server)
    return root
