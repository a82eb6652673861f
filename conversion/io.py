"""Streaming checkpoint I/O: read one tensor at a time from safetensors (single file or sharded with an index) or
torch ``.bin`` pickles, and write sharded safetensors / torch ``.bin`` in the Hugging Face layout.

Safetensors headers are parsed here (8-byte little-endian length + JSON) and each tensor is read with one positioned
read, which supports bf16 / fp8 through ``ml_dtypes`` (``safetensors.numpy`` cannot load bf16) and lets a truncated
shard be reported with the names of the tensors it lost before anything is converted.

Every path may be a local path or an object-store URL (``gs://bucket/...``; see :mod:`nexus_jax.paths`): remote
safetensors are read with ranged reads, remote ``.bin`` pickles are downloaded to a local temporary file first (torch
memory-maps them), and outputs go through :func:`atomic_output_dir`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import ml_dtypes
import numpy as np
from etils.epath import Path

from conversion.errors import ConversionError, MissingTensorsError, TruncatedFileError
from nexus_jax.fileperms import set_default_mode
from nexus_jax.paths import as_path, copy_tree, fsync_dir, is_remote

Shape = tuple[int, ...]
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # 5 GB, as transformers' save_pretrained

ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
ST_NAMES: dict[np.dtype, str] = {v: k for k, v in ST_DTYPES.items()}
INDEX_NAMES = ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json")
SINGLE_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors", "ae.safetensors")
BIN_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def st_dtype_name(dtype: np.dtype) -> str:
    """Safetensors dtype tag for a numpy dtype (bf16 via ml_dtypes)."""
    try:
        return ST_NAMES[np.dtype(dtype)]
    except KeyError:
        raise ConversionError(f"dtype {dtype} cannot be stored in safetensors") from None


# ----------------------------------------------------------------------------------------------------------- reading
class TensorReader:
    """Random access to the tensors of a checkpoint: ``shapes``, ``dtypes`` without loading; ``read(name)``."""

    where: str
    shapes: dict[str, Shape]
    dtypes: dict[str, np.dtype]

    def read(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def nbytes(self, name: str) -> int:
        return int(np.prod(self.shapes[name], dtype=np.int64)) * self.dtypes[name].itemsize

    def close(self) -> None:
        pass

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _open_rb(path: str | os.PathLike, buffering: int = -1):
    """Binary read handle: the builtin ``open`` for local files, ``epath`` (seekable, ranged reads) for URLs."""
    return as_path(path).open("rb") if is_remote(path) else open(path, "rb", buffering=buffering)


def _size(path: str | os.PathLike) -> int:
    return int(as_path(path).stat().length) if is_remote(path) else os.path.getsize(path)


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """(header without ``__metadata__``, byte offset of the data section). Checks that every tensor's bytes exist."""
    path = str(path)
    size = _size(path)
    with _open_rb(path) as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise TruncatedFileError(path, [], size, 8)
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise TruncatedFileError(path, ["<header>"], size, 8 + n)
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ConversionError(f"{path} is not a safetensors file (header is not JSON: {e})") from e
    header.pop("__metadata__", None)
    start = 8 + n
    needed = start + max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if needed > size:
        lost = [k for k, v in header.items() if start + int(v["data_offsets"][1]) > size]
        raise TruncatedFileError(path, lost, size, needed)
    for k, v in header.items():
        if v["dtype"] not in ST_DTYPES:
            raise ConversionError(f"{path}: tensor {k} has unsupported safetensors dtype {v['dtype']}")
        want = int(np.prod(v["shape"], dtype=np.int64)) * ST_DTYPES[v["dtype"]].itemsize
        b, e = v["data_offsets"]
        if e - b != want:
            raise ConversionError(f"{path}: tensor {k} spans {e - b} bytes, its shape {v['shape']} needs {want}")
    return header, start


class SafetensorsReader(TensorReader):
    """One or more safetensors files (shards). ``index`` optionally maps names to files and is cross-checked."""

    def __init__(self, files: Sequence[str | os.PathLike], index: dict[str, str] | None = None, where: str = ""):
        self.where = where or ", ".join(map(str, files))
        self.shapes, self.dtypes = {}, {}
        self._loc: dict[str, tuple[str, int, int]] = {}
        for file in files:
            header, start = read_safetensors_header(file)
            for name, v in header.items():
                if name in self._loc:
                    raise ConversionError(f"tensor {name} appears in both {self._loc[name][0]} and {file}")
                self.shapes[name] = tuple(int(d) for d in v["shape"])
                self.dtypes[name] = ST_DTYPES[v["dtype"]]
                b, e = v["data_offsets"]
                self._loc[name] = (str(file), start + int(b), int(e) - int(b))
        if index is not None:
            missing = sorted(set(index) - set(self._loc))
            if missing:
                raise MissingTensorsError(missing, f"the shards of {self.where} (listed in its index)")
            moved = [n for n, f in index.items() if Path(self._loc[n][0]).name != Path(f).name]
            if moved:
                raise ConversionError(f"{self.where}: index puts tensors in other shards than they are: {moved[:20]}")

    def read(self, name: str) -> np.ndarray:
        path, offset, nbytes = self._loc[name]
        buf = np.empty(nbytes, np.uint8)  # not zero-filled: pages are touched once, by the read
        with _open_rb(path, buffering=0) as f:
            f.seek(offset)
            got = 0
            view = memoryview(buf)
            while got < nbytes:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
        if got != nbytes:
            raise TruncatedFileError(path, [name], offset + got, offset + nbytes)
        return buf.view(self.dtypes[name]).reshape(self.shapes[name])


def torch_to_numpy(t: Any) -> np.ndarray:
    """A CPU torch tensor as a numpy array of the same dtype (bf16 / fp8 through ml_dtypes, no float upcast)."""
    import torch

    special = {
        torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
        torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
        torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2),
    }
    t = t.detach().cpu()
    if t.dtype in special:
        as_int, np_dtype = special[t.dtype]
        return t.contiguous().view(as_int).numpy().view(np_dtype)
    return t.contiguous().numpy()


def numpy_to_torch(x: np.ndarray) -> Any:
    """Inverse of :func:`torch_to_numpy` (shares memory where it can)."""
    import torch

    special = {
        np.dtype(ml_dtypes.bfloat16): (np.int16, torch.bfloat16),
        np.dtype(ml_dtypes.float8_e4m3fn): (np.uint8, torch.float8_e4m3fn),
        np.dtype(ml_dtypes.float8_e5m2): (np.uint8, torch.float8_e5m2),
    }
    x = np.ascontiguousarray(x)
    if x.dtype in special:
        as_int, t_dtype = special[x.dtype]
        return torch.from_numpy(x.view(as_int)).view(t_dtype)
    return torch.from_numpy(x)


class TorchBinReader(TensorReader):
    """A ``torch.save`` state dict loaded with ``mmap=True, weights_only=True``: tensors stay on disk until read."""

    def __init__(self, path: str | os.PathLike):
        import torch

        self.where = str(path)
        self._download = None
        if is_remote(path):  # torch memory-maps local files only: fetch the pickle to a local temporary file
            fd, self._download = tempfile.mkstemp(suffix=as_path(path).suffix, prefix="nexus-jax-download-")
            with os.fdopen(fd, "wb") as out, _open_rb(path) as src:
                shutil.copyfileobj(src, out, 64 * 2**20)
        try:
            state = torch.load(self._download or str(path), map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError on damaged files
            raise ConversionError(f"cannot read torch checkpoint {path} (truncated or not a state dict): {e}") from e
        for wrapper in ("state_dict", "model"):  # Lightning / LDM checkpoints; MAR's kl16.ckpt is {"model": sd}
            if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
                state = state[wrapper]
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)] if isinstance(state, dict) else ["?"]
        if bad:
            raise ConversionError(f"{path} is not a flat state dict of tensors; offending entries: {bad[:20]}")
        self._state = state
        self.shapes = {k: tuple(v.shape) for k, v in state.items()}
        self.dtypes = {k: torch_to_numpy(v.reshape(-1)[:0]).dtype for k, v in state.items()}

    def read(self, name: str) -> np.ndarray:
        return torch_to_numpy(self._state[name])

    def close(self) -> None:
        self._state = {}
        if self._download is not None:
            os.unlink(self._download)
            self._download = None


class DictReader(TensorReader):
    """In-memory name -> array (tests, or a live JAX model's flat state)."""

    def __init__(self, arrays: dict[str, Any], where: str = "the in-memory state"):
        self.where, self._arrays = where, arrays
        self.shapes = {k: tuple(v.shape) for k, v in arrays.items()}
        self.dtypes = {k: np.dtype(v.dtype) for k, v in arrays.items()}

    def read(self, name: str) -> np.ndarray:
        return np.asarray(self._arrays[name])


def skip_tensors(reader: TensorReader, prefixes: Sequence[str]) -> list[str]:
    """Hide the tensors whose names start with one of ``prefixes`` from ``reader`` (a family's unused parts, e.g.
    UniPic-1's SigLIP2 tower); logs their count and returns their names."""
    if not prefixes:
        return []
    skipped = [n for n in reader.shapes if n.startswith(tuple(prefixes))]
    for n in skipped:
        del reader.shapes[n]
        reader.dtypes.pop(n, None)
    if skipped:
        import logging

        logging.getLogger("conversion").warning(
            "skipped %d tensors under %s in %s (not part of the model)", len(skipped), ", ".join(prefixes),
            reader.where)
    return skipped


def open_checkpoint(path: str | os.PathLike) -> TensorReader:
    """Open a safetensors file, a ``.bin``/``.pt`` pickle, or a directory (an index, one safetensors file, or a
    ``pytorch_model.bin``). Shards named by an index must all exist and be complete. ``path`` may be a URL."""
    p = as_path(path)
    if not p.exists():
        raise ConversionError(f"checkpoint path {p} does not exist")
    if p.is_file():
        if p.suffix == ".safetensors":
            return SafetensorsReader([p])
        if p.suffix in BIN_SUFFIXES:
            return TorchBinReader(p)
        if p.name.endswith(".index.json"):
            return _open_index(p)
        raise ConversionError(f"unknown checkpoint file type {p.name}; expected .safetensors, .bin/.pt or an index")
    for name in INDEX_NAMES:
        if (p / name).exists():
            return _open_index(p / name)
    for name in SINGLE_NAMES:
        if (p / name).exists():
            return SafetensorsReader([p / name])
    sts = sorted(p.glob("*.safetensors"))
    if sts:
        return SafetensorsReader(sts, where=str(p))
    bins = sorted(f for f in p.iterdir() if f.suffix in BIN_SUFFIXES)
    if len(bins) == 1:
        return TorchBinReader(bins[0])
    raise ConversionError(f"no checkpoint found in directory {p} (looked for {INDEX_NAMES}, *.safetensors, *.bin)")


def _open_index(index_path: Path) -> SafetensorsReader:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (ValueError, KeyError) as e:
        raise ConversionError(f"{index_path} is not a safetensors index (no weight_map): {e}") from e
    files = sorted(set(weight_map.values()))
    absent = [f for f in files if not (index_path.parent / f).exists()]
    if absent:
        lost = [n for n, f in weight_map.items() if f in absent]
        raise ConversionError(
            f"{index_path} names shard files that do not exist: {absent}; {len(lost)} tensors lost: {lost[:20]}"
        )
    return SafetensorsReader([index_path.parent / f for f in files], weight_map, where=str(index_path.parent))


# ----------------------------------------------------------------------------------------------------------- writing
def plan_shards(entries: Sequence[tuple[str, Shape, np.dtype]], max_shard_bytes: int) -> list[list[int]]:
    """Greedy in-order packing of tensors into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[int]] = [[]]
    used = 0
    for i, (_, shape, dtype) in enumerate(entries):
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if shards[-1] and used + n > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += n
    return shards if shards[0] else []


class SafetensorsWriter:
    """Streams tensors into HF-style shards: ``{prefix}-0000k-of-0000n.safetensors`` + ``{prefix}.safetensors.index
    .json`` (or a single ``{prefix}.safetensors``). The names, shapes and dtypes are declared up front (so each
    shard's header is written first); tensors must then arrive in that order."""

    def __init__(
        self,
        directory: str | os.PathLike,
        entries: Sequence[tuple[str, Shape, Any]],
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        prefix: str = "model",
        metadata: dict[str, str] | None = None,
    ):
        self.dir = as_path(directory)
        self.entries = [(n, tuple(int(d) for d in s), np.dtype(d)) for n, s, d in entries]
        self.prefix, self.metadata = prefix, {"format": "pt", **(metadata or {})}
        self.shards = plan_shards(self.entries, max_shard_bytes)
        n = len(self.shards)
        self.files = (
            [f"{prefix}.safetensors"] if n == 1 else [f"{prefix}-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        )
        self._shard_of = {i: k for k, idx in enumerate(self.shards) for i in idx}
        self._next = 0
        self._fh: Any = None
        self._shard = -1

    def _header(self, k: int) -> bytes:
        header: dict[str, Any] = {"__metadata__": self.metadata}
        offset = 0
        for i in self.shards[k]:
            name, shape, dtype = self.entries[i]
            n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {"dtype": st_dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw

    def write(self, name: str, array: np.ndarray) -> None:
        if self._next >= len(self.entries):
            raise ConversionError(f"writer got tensor {name} after all {len(self.entries)} declared tensors")
        want_name, shape, dtype = self.entries[self._next]
        if name != want_name or tuple(array.shape) != shape or np.dtype(array.dtype) != dtype:
            raise ConversionError(
                f"writer expected {want_name} {shape} {dtype} next, got {name} {tuple(array.shape)} {array.dtype}"
            )
        k = self._shard_of[self._next]
        if k != self._shard:
            self._close_file()
            self._fh = (self.dir / self.files[k]).open("wb")
            self._fh.write(self._header(k))
            self._shard = k
        self._fh.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        self._next += 1

    def _close_file(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def close(self) -> dict[str, str]:
        """Finish the last shard and write the index (if sharded). Returns the weight map."""
        self._close_file()
        if self._next != len(self.entries):
            left = [n for n, _, _ in self.entries[self._next :]]
            raise MissingTensorsError(left, "the data written (declared but never written)")
        weight_map = {self.entries[i][0]: self.files[k] for k, idx in enumerate(self.shards) for i in idx}
        if len(self.files) > 1:
            total = sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for _, s, d in self.entries)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.dir / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return weight_map


def write_torch_bin(path: str | os.PathLike, staged: SafetensorsReader) -> None:
    """``torch.save`` an OrderedDict of all tensors of ``staged`` (a safetensors file already written tensor by
    tensor). Tensors are memory-mapped from the staged file, so only the pickler's pages are resident. With a URL
    for ``path`` or staged files at URLs, the work happens in a local temporary directory (memory maps need local
    files) and the pickle is uploaded."""
    import collections

    import torch

    staged_files = sorted({loc[0] for loc in staged._loc.values()})
    if is_remote(path) or any(is_remote(f) for f in staged_files):
        with tempfile.TemporaryDirectory(prefix="nexus-jax-bin-") as d:
            local = []
            for i, f in enumerate(staged_files):
                if is_remote(f):
                    local.append(os.path.join(d, f"staged-{i}.safetensors"))
                    with _open_rb(f) as src, open(local[-1], "wb") as out:
                        shutil.copyfileobj(src, out, 64 * 2**20)
                else:
                    local.append(f)
            out_local = os.path.join(d, "out.bin") if is_remote(path) else os.fspath(path)
            write_torch_bin(out_local, SafetensorsReader(local, where=staged.where))
            if is_remote(path):
                with open(out_local, "rb") as src, as_path(path).open("wb") as out:
                    shutil.copyfileobj(src, out, 64 * 2**20)
        return

    state = collections.OrderedDict()
    for name in staged.shapes:
        path_, offset, nbytes = staged._loc[name]
        mm = np.memmap(path_, dtype=np.uint8, mode="c", offset=offset, shape=(nbytes,))
        state[name] = numpy_to_torch(mm.view(staged.dtypes[name]).reshape(staged.shapes[name]))
    torch.save(state, str(path))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    as_path(path).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


COMPLETION_MARKERS = ("config.json",)  # uploaded last: a remote output directory is complete once they exist


@contextlib.contextmanager
def atomic_output_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a directory to write the output into; it appears at ``final`` only when the block succeeds.

    Local ``final``: a temporary sibling directory renamed to ``final`` on success, deleted on any error.
    URL ``final``: a local temporary directory whose files are uploaded to ``final`` on success, ``config.json``
    last (object stores have no atomic directory rename, so ``config.json`` marks a complete output; an upload that
    fails deletes what it wrote). Local staging is also what Orbax needs: its partial saves (the streaming writes of
    :func:`conversion.orbax.save_streaming`) are refused on GCS by orbax 0.12 ("Snapshot is not supported for
    CommitFileTemporaryPath"). ``overwrite`` replaces an existing ``final``."""
    if is_remote(final):
        with _remote_output_dir(as_path(final), overwrite) as out:
            yield out
        return
    final = as_path(final)
    if final.exists() and not overwrite:
        raise ConversionError(f"output {final} already exists (pass --overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = as_path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    set_default_mode(tmp, directory=True)  # mkdtemp creates 0700; give it the mode a plain mkdir would
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)


@contextlib.contextmanager
def _remote_output_dir(final: Path, overwrite: bool) -> Iterator[Path]:
    if final.exists() and not overwrite:
        raise ConversionError(f"output {final} already exists (pass --overwrite to replace it)")
    with tempfile.TemporaryDirectory(prefix="nexus-jax-upload-") as d:
        yield as_path(d)
        if final.exists():
            final.rmtree()
        try:
            copy_tree(d, final, last=COMPLETION_MARKERS)
        except BaseException:
            final.rmtree(missing_ok=True)
            raise


def iter_progress(items: Iterable[Any], total: int, desc: str, enabled: bool = True) -> Iterable[Any]:
    """tqdm progress bar over ``items`` (stderr), or the items unchanged."""
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, unit="tensor", dynamic_ncols=True)
