"""Can a plan config's job run on a slice? Decided from config and topology arithmetic alone (no compile, no TPU).

Used by ``nexus-jax plan`` (before compiling) and ``nexus-jax launch`` (before printing or running any command).
A job is refused (:class:`PlanError`, one line naming the numbers) when

* the mesh (data, fsdp, tensor) does not multiply to the slice's chip count;
* the global batch does not split over the slice's hosts (each process loads its own contiguous rows; with
  gradient accumulation each host's rows must also split into the micro-batches);
* a (micro-)batch does not split over the data-parallel devices (data x fsdp: the ``batch`` rule of
  :mod:`nexus_jax.sharding`); otherwise the batch would be replicated instead of sharded;
* a mesh axis does not divide a model dimension it shards: attention heads, KV heads and the MLP width by
  ``tensor``, the hidden size by ``fsdp`` (training rules only: inference keeps ``embed`` unsharded). The sharding
  rules would silently replicate (or split heads mid-way), so the job would not run the sharding it was planned
  with. The frozen ViT of the AR model is exempt (it is replicated where its dims do not divide).

:func:`stored_fit` looks a job up in the stored ``nexus-jax plan`` reports (``benchmarks/results/plan_*.json``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from launch.topology import GiB, Topology
from nexus_jax.sharding import parse_mesh_spec

MESH_AXES = ("data", "fsdp", "tensor")
REPORT_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


class PlanError(ValueError):
    """Bad planner / launcher input: unknown topology or config, or a job that cannot run on the slice."""


def parse_mesh(text: str) -> tuple[int, int, int]:
    """``"1,16,4"`` (data,fsdp,tensor; one entry may be -1) -> tuple (:func:`nexus_jax.sharding.parse_mesh_spec`)."""
    try:
        return parse_mesh_spec(text)
    except ValueError as e:
        raise PlanError(str(e)) from None


def resolve_mesh(sizes: Sequence[int], num_devices: int, topology: str) -> tuple[int, int, int]:
    """Fill a -1 entry and check that the mesh multiplies to the device count (clear message otherwise)."""
    sizes = list(sizes)
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise PlanError(f"mesh {tuple(sizes)}: sizes must be >= 1, with at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise PlanError(
                f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes multiply to {known}, which does not divide the "
                f"{num_devices} devices of {topology}"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        desc = " x ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
        raise PlanError(
            f"mesh {desc} = {math.prod(sizes)} devices, but topology {topology} has {num_devices} devices; "
            f"the mesh must multiply to {num_devices}"
        )
    return tuple(sizes)  # type: ignore[return-value]


def sharded_dims(plan: Any) -> list[tuple[str, int, str]]:
    """(name, size, mesh axis) of the model dimensions ``plan``'s sharding rules split over a mesh axis."""
    from configs.nexus_decoders import MergerConfig

    training = plan.workload.endswith("_train")
    out: list[tuple[str, int, str]] = []

    def qwen(prefix: str, c: Any) -> None:
        out.extend([(f"{prefix}num_heads", c.num_heads, "tensor"), (f"{prefix}num_kv_heads", c.num_kv_heads, "tensor"),
                    (f"{prefix}intermediate_size", c.intermediate_size, "tensor")])
        if training:
            out.append((f"{prefix}hidden_size", c.hidden_size, "fsdp"))

    m = plan.model
    if plan.workload == "matmul_train":
        out += [("dim", m.dim, "fsdp"), ("dim", m.dim, "tensor")]
    elif plan.workload == "ar_train":
        qwen("text ", m.vl.text)
    elif plan.workload == "unipic_train":
        qwen("LLM ", m.text)
        out += [("MAR num_heads", m.mar.num_heads, "tensor"), ("MAR mlp width", m.mar.mlp_dim, "tensor"),
                ("MAR width", m.mar.width, "fsdp")]
    else:  # FLUX DiT (decoder_train, decoder_sample)
        out += [("DiT num_heads", m.num_heads, "tensor"), ("DiT mlp width", m.mlp_dim, "tensor")]
        if training:
            out.append(("DiT hidden_size", m.hidden_size, "fsdp"))
        if plan.context_len == 81 + 324:  # editing decoder: the Qwen merger layer is trained too
            qwen("merger ", (plan.merger or MergerConfig()).layer)
    return out


def check_plan(plan: Any, topo: Topology, sizes: Sequence[int], batch: int | None = None, accum: int = 1
               ) -> tuple[int, int, int]:
    """The resolved mesh if ``plan`` can run on ``topo`` with mesh ``sizes``; PlanError listing every problem.

    ``batch``: global batch per optimiser step (default: the plan's); ``accum``: micro-batches it is split into
    (the program the planner compiles is one micro-batch).
    """
    mesh = resolve_mesh(sizes, topo.num_chips, topo.name)
    data, fsdp, tensor = mesh
    batch = plan.global_batch if batch is None else batch
    hosts, dp = topo.num_hosts, data * fsdp
    problems = []
    if accum < 1 or batch % accum:
        problems.append(f"global batch {batch} does not split into grad_accum={accum} micro-batches")
    elif batch % (hosts * accum):
        split = f" x grad_accum {accum}" if accum > 1 else ""
        problems.append(f"global batch {batch} does not split over the {hosts} hosts (processes){split}; use a "
                        f"multiple of {hosts * accum}")
    elif (batch // accum) % dp:
        problems.append(f"{'micro-' if accum > 1 else ''}batch {batch // accum} does not split over the {dp} "
                        f"data-parallel devices (data {data} x fsdp {fsdp})")
    axes = {"fsdp": fsdp, "tensor": tensor}
    for name, size, axis in sharded_dims(plan):
        if size % axes[axis]:
            problems.append(f"{axis}={axes[axis]} does not divide {name}={size}")
    if problems:
        raise PlanError(f"{plan.name} cannot run on {topo.name} ({topo.num_chips} chips, {hosts} hosts) with mesh "
                        f"data={data} fsdp={fsdp} tensor={tensor}: " + "; ".join(problems))
    return mesh


def stored_reports(directory: Path = REPORT_DIR) -> list[tuple[Path, dict[str, Any]]]:
    """(path, report) of every ``plan_*.json`` in ``directory`` (unreadable files are skipped)."""
    out = []
    for path in sorted(directory.glob("plan_*.json")):
        try:
            out.append((path, json.loads(path.read_text())))
        except (OSError, ValueError):
            continue
    return out


def stored_fit(plan_name: str, topo: Topology, mesh: Sequence[int], remat: str, batch: int,
               reports: Sequence[tuple[Path, dict[str, Any]]]) -> tuple[bool | None, str]:
    """(fits, message) from the stored report of exactly this config, slice, mesh, remat and (micro-)batch;
    (None, message) when there is none."""
    want = dict(zip(MESH_AXES, mesh))
    where = f"{plan_name} on {topo.name} mesh {want} remat={remat} batch {batch}"
    same_slice = [(p, r) for p, r in reports if r.get("config") == plan_name and r.get("topology") == topo.name]
    for path, r in same_slice:
        if r.get("mesh") == want and r.get("remat") == remat and r.get("global_batch") == batch:
            need, hbm = r["bytes_per_device"] / GiB, r["hbm_bytes_per_device"] / GiB
            verdict = "fits" if r["fits"] else "does not fit"
            return bool(r["fits"]), f"plan report {path.name}: {where} {verdict}: {need:.2f} of {hbm:.0f} GiB/device"
    others = ", ".join(f"{p.name} (mesh {r.get('mesh')}, remat={r.get('remat')}, batch {r.get('global_batch')})"
                       for p, r in same_slice)
    return None, (f"no stored plan report for {where}" + (f" (stored for this slice: {others})" if others else "")
                  + f"; check it fits first: nexus-jax plan --config {plan_name} --topology {topo.name} --mesh "
                  f"{','.join(map(str, mesh))} --remat {remat}")
