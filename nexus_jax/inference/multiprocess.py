"""Coordination of the processes of one ``nexus-jax infer`` job (``python -m launch.distributed infer ...``).

Each process serves its own share of the requests on a mesh of its *local* devices (the processes run different
batches, so no program spans them). They meet only through the JAX coordination service's key-value store:

* :meth:`Group.agree` - every process publishes a value (the digest of its plan) and waits for all the others';
  different values raise. It is also the barrier after which outputs may be written.
* :meth:`Group.wait` - wait until every process reached a named point, e.g. "my share is done".
* :meth:`Group.fail` - publish this process's error, so the waiting ones stop with it instead of waiting on.

A process that dies without a word (SIGKILL, OOM) stops sending heartbeats; the coordination service then
terminates the others within its heartbeat timeout (``NEXUS_JAX_HEARTBEAT_TIMEOUT_S``, see
``launch.distributed``). With one process every call is a no-op.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

PREFIX = "nexus_jax/infer"
_groups_made = 0  # every process makes its groups in the same order: the n-th one gets key namespace n
DEFAULT_WAIT_S = 7 * 24 * 3600.0  # waiting on slower peers is normal; dead peers are caught by the heartbeat


class PeerFailed(RuntimeError):
    """Another process of the job reported an error."""


class Group:
    """The processes of this job (``process_index`` of ``process_count``); ``client`` is JAX's distributed client."""

    def __init__(self, process_index: int = 0, process_count: int = 1, client: Any = None, poll_s: float = 0.2,
                 namespace: str = PREFIX):
        if process_count > 1 and client is None:
            raise ValueError(f"{process_count} processes need the JAX distributed client (jax.distributed.initialize)")
        self.index, self.count, self.client, self.poll_s = process_index, process_count, client, poll_s
        self.namespace = namespace

    @classmethod
    def from_jax(cls) -> Group:
        import jax

        if jax.process_count() == 1:
            return cls()
        from jax._src import distributed  # the key-value store has no public API yet

        global _groups_made
        _groups_made += 1  # a second infer in the same job must not meet the first one's keys
        return cls(jax.process_index(), jax.process_count(), distributed.global_state.client,
                   namespace=f"{PREFIX}/{_groups_made}")

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def log(self, message: str) -> None:
        if self.count > 1:
            print(f"[infer process {self.index}/{self.count}] {message}", file=sys.stderr, flush=True)

    def _get(self, directory: str) -> dict[int, str]:
        """Process index -> value of the keys set under ``directory``."""
        out = {}
        for key, value in self.client.key_value_dir_get(f"{self.namespace}/{directory}/"):
            out[int(key.rsplit("/", 1)[-1])] = value
        return out

    def _check_failures(self) -> None:
        failed = self._get("failed")
        if failed:
            j = min(failed)
            raise PeerFailed(f"process {j} of {self.count} failed: {failed[j]}")

    def wait(self, name: str, value: str = "", timeout_s: float = DEFAULT_WAIT_S) -> list[str]:
        """Publish ``value`` under ``name``, wait until all processes did, return their values (index order)."""
        if self.count == 1:
            return [value]
        self.client.key_value_set(f"{self.namespace}/{name}/{self.index}", value)
        start = time.monotonic()
        while True:
            self._check_failures()
            got = self._get(name)
            if len(got) == self.count:
                return [got[i] for i in range(self.count)]
            if time.monotonic() - start > timeout_s:
                missing = sorted(set(range(self.count)) - set(got))
                raise TimeoutError(f"processes {missing} did not reach {name!r} within {timeout_s:.0f}s")
            time.sleep(self.poll_s)

    def agree(self, name: str, value: str, timeout_s: float = DEFAULT_WAIT_S) -> None:
        """:meth:`wait`, then raise unless every process published the same ``value``."""
        values = self.wait(name, value, timeout_s)
        differ = [i for i, v in enumerate(values) if v != value]
        if differ:
            raise RuntimeError(f"{name}: processes {differ} disagree with process {self.index} ({values[differ[0]]!r} "
                               f"!= {value!r}); did they see different input files or output directories?")

    def fail(self, error: str) -> None:
        """Tell the other processes that this one failed (best effort)."""
        if self.count == 1:
            return
        try:
            self.client.key_value_set(f"{self.namespace}/failed/{self.index}", error[:2000])
        except Exception:  # noqa: BLE001 - the service may be gone already
            pass

    def gather_json(self, name: str, doc: Any, timeout_s: float = DEFAULT_WAIT_S) -> list[Any]:
        """Every process's ``doc`` (JSON-serialisable), in process order; also a barrier."""
        return [json.loads(v) for v in self.wait(name, json.dumps(doc, sort_keys=True), timeout_s)]


def local_mesh(spec: str | None, devices: Sequence[Any] | None = None):
    """The ``(data, fsdp, tensor)`` mesh of this process's devices (``--mesh data,fsdp,tensor``; default all on data);
    None for a single device and no ``spec``."""
    import jax

    from nexus_jax.sharding import make_mesh, parse_mesh_spec

    devices = list(jax.local_devices() if devices is None else devices)
    if spec is None:
        return make_mesh(data=-1, fsdp=1, tensor=1, devices=devices) if len(devices) > 1 else None
    d, f, t = parse_mesh_spec(spec)
    if d * f * t != len(devices) and -1 not in (d, f, t):
        raise ValueError(f"--mesh {spec} needs {d * f * t} devices, but this process has {len(devices)} local devices "
                         "(with several processes --mesh is each process's own mesh)")
    return make_mesh(d, f, t, devices=devices)
