"""TPU topologies: parse ``"v5p:4x4x4"`` / ``"v6e:8x8"``, chip specifications, and abstract devices for AOT compiles.

Chip figures are per *chip* (one JAX device per chip: v4 and v5p run in megacore mode, v5e and v6e have one
TensorCore per chip). Sources, read 2026 (Google Cloud TPU documentation, "System architecture" pages
cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}):

============  ==========  ====================  ===============  ==============
generation    HBM         peak bf16 FLOP/s      HBM bandwidth    chips per host
============  ==========  ====================  ===============  ==============
v4            32 GiB      275e12                1200 GB/s        4 (2x2x1)
v5e           16 GiB      197e12                819 GB/s         4 (pods), 8 (v5e-8: one 2x4 host)
v5p           95 GiB      459e12                2765 GB/s        4 (2x2x1)
v6e           32 GiB      918e12                1640 GB/s        4 (pods), 8 (v6e-8: one 2x4 host)
============  ==========  ====================  ===============  ==============

Assumptions: "GiB" as printed by Google (2**30 bytes; v5p's 95 is the documented usable HBM, not the 96 of the
marketing sheets); peak FLOP/s are the dense bf16 numbers (no sparsity, no int8/fp8).

Cloud accelerator-type names count TensorCores for v4/v5p (``v5p:4x4x4`` = 64 chips = ``v5p-128``) and chips for
v5e/v6e (``v6e:8x8`` = 64 chips = ``v6e-64``); :attr:`Topology.accelerator_type` does that conversion.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """One TPU chip generation."""

    name: str  # "v5p"
    hbm_bytes: int  # per chip
    peak_bf16_flops: float  # per chip, dense
    hbm_bandwidth: float  # bytes/s per chip
    ndims: int  # 3 for the 3-D torus generations (v4, v5p), 2 for v5e / v6e
    cores_per_chip: int  # TensorCores per chip (for the Cloud accelerator-type name)
    cloud_prefix: str  # accelerator-type prefix in gcloud ("v5p", "v5litepod", "v6e")
    chip_config_name: str  # libtpu chip config for get_topology_desc ("megacore" = one device per chip)
    runtime_version: str  # gcloud --version (TPU VM software image)
    xpk_device_prefix: str  # xpk --tpu-type prefix


CHIPS: dict[str, ChipSpec] = {
    "v4": ChipSpec("v4", 32 * GiB, 275e12, 1200e9, 3, 2, "v4", "megacore", "tpu-ubuntu2204-base", "v4"),
    "v5e": ChipSpec("v5e", 16 * GiB, 197e12, 819e9, 2, 1, "v5litepod", "default", "v2-alpha-tpuv5-lite", "v5litepod"),
    "v5p": ChipSpec("v5p", 95 * GiB, 459e12, 2765e9, 3, 2, "v5p", "default", "v2-alpha-tpuv5", "v5p"),
    "v6e": ChipSpec("v6e", 32 * GiB, 918e12, 1640e9, 2, 1, "v6e", "default", "v2-alpha-tpuv6e", "v6e"),
}

_TOPOLOGY_RE = re.compile(r"^(?P<gen>[a-z0-9]+):(?P<dims>\d+(?:x\d+)*)$")


@dataclasses.dataclass(frozen=True)
class Topology:
    """A single TPU slice: chip generation and chip grid (``dims``)."""

    chip: ChipSpec
    dims: tuple[int, ...]

    @property
    def name(self) -> str:
        """Canonical ``"v5p:4x4x4"`` form."""
        return f"{self.chip.name}:{'x'.join(map(str, self.dims))}"

    @property
    def num_chips(self) -> int:
        return math.prod(self.dims)

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        """Chips on one TPU VM host: 2x4 for a single 8-chip v5e/v6e host, 2x2x1 otherwise (1x1 / 2x2 slices: all)."""
        dims3 = tuple(self.dims) + (1,) * (3 - len(self.dims))
        if self.chip.ndims == 2 and self.num_chips <= 8:
            return dims3  # one host holds the whole slice (v6e-1, -4, -8)
        return (min(2, dims3[0]), min(2, dims3[1]), 1)

    @property
    def chips_per_host(self) -> int:
        return math.prod(self.chips_per_host_bounds)

    @property
    def num_hosts(self) -> int:
        return self.num_chips // self.chips_per_host

    @property
    def accelerator_type(self) -> str:
        """gcloud ``--accelerator-type`` (TensorCore count for v4/v5p, chip count for v5e/v6e)."""
        return f"{self.chip.cloud_prefix}-{self.num_chips * self.chip.cores_per_chip}"

    @property
    def hbm_bytes_per_device(self) -> int:
        return self.chip.hbm_bytes

    @property
    def peak_flops_per_device(self) -> float:
        return self.chip.peak_bf16_flops


def parse_topology(text: str) -> Topology:
    """``"v5p:4x4x4"`` -> Topology. Raises ValueError naming the bad part and what is accepted."""
    m = _TOPOLOGY_RE.match(text.strip().lower())
    if not m:
        raise ValueError(
            f"cannot parse topology {text!r}: expected '<generation>:<AxB[xC]>' such as 'v5p:4x4x4' or 'v6e:8x8'"
        )
    gen = m.group("gen")
    if gen not in CHIPS:
        raise ValueError(f"unknown TPU generation {gen!r} in topology {text!r}; known generations: {sorted(CHIPS)}")
    chip = CHIPS[gen]
    dims = tuple(int(d) for d in m.group("dims").split("x"))
    if len(dims) != chip.ndims:
        example = "4x4x4" if chip.ndims == 3 else "8x8"
        raise ValueError(
            f"topology {text!r} has {len(dims)} dimensions but {gen} slices have {chip.ndims} (e.g. '{gen}:{example}')"
        )
    if any(d < 1 for d in dims):
        raise ValueError(f"topology {text!r} has a zero dimension; every dimension must be >= 1")
    topo = Topology(chip, dims)
    if topo.num_chips > 8 and any(d % b for d, b in zip(dims, topo.chips_per_host_bounds)):
        raise ValueError(
            f"topology {text!r}: dimensions {dims} are not multiples of the per-host chip block "
            f"{topo.chips_per_host_bounds[: chip.ndims]}; multi-host slices are made of whole hosts"
        )
    return topo


def _quiet_libtpu_env() -> None:
    """libtpu looks for TPU VM metadata at start-up; on a CPU-only machine these defaults stop its noise."""
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # Any jax process on this machine may hold /tmp/libtpu_lockfile (jax probes the TPU backend at start-up);
    # compiling for an abstract topology uses no chip, so sharing libtpu is safe.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def topology_devices(topo: Topology) -> list[Any]:
    """Abstract (non-addressable) TPU devices for ``topo``, usable in a Mesh for ``jit(...).lower().compile()``.

    Needs libtpu (``pip install 'jax[tpu]'``) but no TPU.
    """
    _quiet_libtpu_env()
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(
            platform="tpu",
            topology_name=topo.name,
            chip_config_name=topo.chip.chip_config_name,
            chips_per_host_bounds=topo.chips_per_host_bounds,
            num_slices=1,
        )
    except Exception as exc:  # libtpu missing or rejects the layout: say what to do
        raise RuntimeError(
            f"could not build TPU topology {topo.name!r} for ahead-of-time compilation ({exc}); "
            "is libtpu installed (pip install 'jax[tpu]')?"
        ) from exc
    devices = list(desc.devices)
    if len(devices) != topo.num_chips:
        raise RuntimeError(
            f"topology {topo.name} gave {len(devices)} devices, expected one per chip ({topo.num_chips})"
        )
    return devices
