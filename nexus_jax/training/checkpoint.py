"""Orbax train-state checkpoints: async CheckpointManager, keep-last-N, data-iterator state, integrity manifests.

One checkpoint step directory holds two Orbax items:

* ``state``: the train-state pytree (params, frozen params, optimiser state, step, PRNG key data);
* ``data``: the data-iterator state as one JSON document written by process 0 (batches done, global counters), so a
  checkpoint written by N processes resumes on any other number of processes.

After Orbax has committed a step (its temporary directory renamed into place), a ``nexus_manifest.json`` listing every
file with its size and CRC32 is written atomically (temp file + rename). A step counts as complete only when that
manifest exists and every listed file is present with the recorded size and checksum, so a save killed at any point
never looks complete, and a truncated or deleted file is reported by name on restore.

Restores go onto an abstract state whose ShapeDtypeStructs carry the *current* mesh's shardings, so a checkpoint
saved on one mesh (e.g. fsdp=8) restores onto another (e.g. data=2 x fsdp=4).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import zlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from nexus_jax import paths

log = logging.getLogger(__name__)

MANIFEST = "nexus_manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint step is missing, incomplete, truncated or corrupt."""


def _crc32(path: epath.Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_manifest(step_dir: epath.Path, checksum: bool = True) -> None:
    """List every file under ``step_dir`` with size (and CRC32), written atomically as the completion marker."""
    step_dir = paths.as_path(step_dir)
    files = {}
    for rel in paths.list_files(step_dir):
        p = step_dir / rel
        if not p.name.startswith(MANIFEST):
            files[rel.replace(os.sep, "/")] = {"size": p.stat().length, **({"crc32": _crc32(p)} if checksum else {})}
    paths.atomic_write_text(step_dir / MANIFEST, json.dumps({"files": files}, indent=1, sort_keys=True))


def verify_step_dir(step_dir: epath.Path) -> None:
    """Raise :class:`CheckpointError` naming the problem if ``step_dir`` is not a complete, intact checkpoint."""
    step_dir = paths.as_path(step_dir)
    manifest = step_dir / MANIFEST
    if not step_dir.is_dir():
        raise CheckpointError(f"checkpoint {step_dir} does not exist")
    if not manifest.is_file():
        raise CheckpointError(f"checkpoint {step_dir} is incomplete: no {MANIFEST} (the save was interrupted)")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {step_dir}: unreadable {MANIFEST}: {e}") from e
    for rel, meta in files.items():
        p = step_dir / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint {step_dir}: file {rel} is missing")
        size = p.stat().length
        if size != meta["size"]:
            raise CheckpointError(
                f"checkpoint {step_dir}: file {rel} is truncated or altered: {size} bytes, expected {meta['size']}"
            )
        if "crc32" in meta and _crc32(p) != meta["crc32"]:
            raise CheckpointError(f"checkpoint {step_dir}: file {rel} is corrupt: CRC32 mismatch")


class Checkpointer:
    """Async Orbax CheckpointManager for ``{state, data}`` with keep-last-N and manifest-verified restores."""

    def __init__(self, directory: str | os.PathLike, keep_last: int = 3, async_save: bool = True,
                 checksum: bool = True):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = paths.as_path(directory if paths.is_remote(directory) else os.path.abspath(directory))
        self.checksum = checksum
        self.async_save = async_save
        self._manifest_thread: threading.Thread | None = None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last, enable_async_checkpointing=async_save, create=True
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_names=("state", "data"),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()},
        )

    # -- saving ---------------------------------------------------------------------------------------------------
    def _commit_manifest(self, step: int) -> None:
        """Wait for Orbax to commit ``step`` (tmp dir renamed into place), then write its manifest."""
        self._manager.wait_until_finished()
        step_dir = self.step_dir(step)
        if jax.process_index() == 0 and step_dir.is_dir():
            write_manifest(step_dir, self.checksum)

    def _join_manifest(self) -> None:
        if self._manifest_thread is not None:
            self._manifest_thread.join()
            self._manifest_thread = None

    def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
        """Start saving ``state`` and the data-iterator state at ``step`` (returns before the write finishes)."""
        self._join_manifest()
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(dict(data_state)),
            ),
            force=True,
        )
        if not saved:
            return
        if self.async_save:
            self._manifest_thread = threading.Thread(target=self._commit_manifest, args=(step,), daemon=True)
            self._manifest_thread.start()
        else:
            self._commit_manifest(step)

    def wait(self) -> None:
        """Block until the in-flight save (and its manifest) is written."""
        self._manager.wait_until_finished()
        self._join_manifest()

    def close(self) -> None:
        self.wait()
        self._manager.close()

    # -- inspecting -----------------------------------------------------------------------------------------------
    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def all_steps(self) -> list[int]:
        """Step directories Orbax knows about (complete or not), ascending."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def verify(self, step: int) -> None:
        verify_step_dir(self.step_dir(step))

    def latest_valid_step(self) -> int | None:
        """Newest step whose manifest verifies; bad steps are logged and skipped."""
        for step in reversed(self.all_steps()):
            try:
                self.verify(step)
                return step
            except CheckpointError as e:
                log.warning("skipping checkpoint step %d: %s", step, e)
        return None

    def resolve(self, resume: str) -> int | None:
        """Which step to restore for ``--resume``: 'none', 'latest', 'latest-valid' or a step number.

        'latest' and an explicit step raise :class:`CheckpointError` if that checkpoint is damaged.
        """
        if resume == "none":
            return None
        steps = self.all_steps()
        if resume == "latest-valid":
            return self.latest_valid_step()
        if resume == "latest":
            if not steps:
                return None
            self.verify(steps[-1])
            return steps[-1]
        try:
            step = int(resume)
        except ValueError:
            msg = f"resume must be 'none', 'latest', 'latest-valid' or a step number, got {resume!r}"
            raise ValueError(msg) from None
        if step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; have {steps}")
        self.verify(step)
        return step

    # -- restoring ------------------------------------------------------------------------------------------------
    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """(state placed per ``abstract_state``'s shardings, data-iterator state) of a verified step."""
        self.verify(step)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        data = restored["data"]
        if not isinstance(data, dict):
            raise CheckpointError(f"checkpoint {self.step_dir(step)} has no data-iterator state")
        return restored["state"], data
