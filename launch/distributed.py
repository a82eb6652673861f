"""Multi-host start-up for Cloud TPU VMs / pods and per-host data sharding.

On a TPU VM slice every host runs the same program; ``jax.distributed.initialize()`` discovers the coordinator and
process ids from the TPU metadata server, so on Cloud TPU no arguments are needed. Elsewhere (GPU clusters, CPU
tests) pass ``coordinator_address`` / ``num_processes`` / ``process_id`` or set ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DEFAULT_TIMEOUT_S = 1800  # cold pod restarts: some hosts are still importing when others call initialize
DEFAULT_HEARTBEAT_S = 100  # a process silent this long is declared dead and the others stop with an error


@dataclasses.dataclass(frozen=True)
class HostInfo:
    """Where this process sits in the job."""

    process_index: int
    process_count: int
    local_devices: int
    global_devices: int


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = DEFAULT_TIMEOUT_S,
    env: Mapping[str, str] | None = None,
) -> HostInfo:
    """Call ``jax.distributed.initialize`` once when the job spans several hosts; a no-op on a single host.

    Multi-host is detected from explicit arguments, ``JAX_COORDINATOR_ADDRESS``, or a TPU pod environment
    (``TPU_WORKER_HOSTNAMES`` listing more than one host / ``MEGASCALE_COORDINATOR_ADDRESS`` for multislice).
    """
    env = os.environ if env is None else env
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} is outside [0, num_processes={num_processes})")
    if needs_initialize(coordinator_address, num_processes, env):
        # CPU processes (local pod rehearsals, CPU clusters) need a cross-process collectives backend; TPU/GPU
        # backends ignore this option.
        jax.config.update("jax_cpu_collectives_implementation", env.get("NEXUS_JAX_CPU_COLLECTIVES", "gloo"))
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=timeout_s,
            heartbeat_timeout_seconds=int(env.get("NEXUS_JAX_HEARTBEAT_TIMEOUT_S", DEFAULT_HEARTBEAT_S)),
        )
    return host_info()


def needs_initialize(coordinator_address: str | None, num_processes: int | None, env: Mapping[str, str]) -> bool:
    """True when this process is one of several (explicitly, or on a multi-host TPU slice)."""
    if num_processes is not None:
        return num_processes > 1
    if coordinator_address:
        return True
    workers = [w for w in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if w.strip()]
    return len(workers) > 1 or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))


def host_info() -> HostInfo:
    return HostInfo(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def host_batch_slice(global_batch: int, process_index: int, process_count: int) -> slice:
    """The rows of a global batch that host ``process_index`` loads (contiguous, equal shares)."""
    if global_batch % process_count:
        raise ValueError(
            f"global batch {global_batch} does not split evenly over {process_count} hosts; "
            f"use a multiple of {process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is outside [0, {process_count})")
    per_host = global_batch // process_count
    return slice(process_index * per_host, (process_index + 1) * per_host)


def global_batch_array(local: np.ndarray, mesh: Mesh, spec: PartitionSpec | None = None) -> jax.Array:
    """Assemble the global array from this host's rows (``local`` [global_batch / hosts, ...])."""
    spec = PartitionSpec(("data", "fsdp")) if spec is None else spec
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, specs: Mapping[str, PartitionSpec] | None = None
                 ) -> dict[str, Any]:
    """:func:`global_batch_array` over a dict of host-local arrays (batch-major unless ``specs`` say otherwise)."""
    specs = specs or {}
    return {k: global_batch_array(np.asarray(v), mesh, specs.get(k)) for k, v in local.items()}


def main(argv: list[str] | None = None) -> int:
    """``python -m launch.distributed <nexus-jax command> [args]``: initialise multi-host JAX, then run the command.

    Every host of a slice runs this same line (``gcloud ... ssh --worker=all`` or an xpk workload).
    """
    import sys

    from nexus_jax import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    info = initialize()
    print(f"[host {info.process_index}/{info.process_count}] {info.local_devices} local of {info.global_devices} "
          f"devices", flush=True)
    return cli.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
