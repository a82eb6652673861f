"""``nexus-jax plan`` / ``python -m launch.plan``: ahead-of-time "does it fit" planning for a TPU slice.

Builds the workload of a plan config abstractly (shapes + shardings only), compiles it for the topology with
libtpu (no TPU needed), and reports per-device memory, FLOPs, estimated step time and MFU, and whether it fits.

Estimates:
* memory: the compiler's buffer assignment (arguments + non-aliased outputs + temporaries + code) of the full program;
* FLOPs / step time: the compiler's cost analysis (``flops``, ``optimal_seconds``: XLA's TPU cost model) of the full
  program when it is loop-free ("unrolled compile"); when it has while loops (counted once by XLA) they are
  extrapolated from loop-free 1- and 2-block compiles ("layer-difference extrapolation") and, for samplers,
  multiplied by the step count;
* Mosaic kernels (the splash attention the TPU runs for "auto" attention): XLA's cost model does not price custom
  calls, so the workload's kernel FLOPs and HBM traffic (``launch.kernels``) are added to the step time at an
  assumed fraction of their roofline, and the MFU is also reported at other fractions;
* MFU = analytic model FLOPs per device / (estimated step seconds x chip peak bf16 FLOP/s).

``--search`` ranks (data, fsdp, tensor) meshes x remat policies by estimated MFU among those that fit, using the
reduced-depth extrapolation for every candidate (fast), then confirms the best with a full compile.

A config whose job cannot run on the slice (mesh size, batch vs hosts / data-parallel devices, model dims vs mesh
axes: :func:`launch.checks.check_plan`) is refused before anything is compiled (exit code 2; ``--search`` skips
such candidates).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

from configs.plans import REMAT_CHOICES, PlanConfig, get_plan
from launch import compiled, kernels
from launch.checks import MESH_AXES, PlanError, check_plan, parse_mesh, resolve_mesh  # noqa: F401 (re-exported)
from launch.topology import GiB, Topology, parse_topology, topology_devices
from launch.workloads import Workload, make_workload


def _mesh(topo_devices: list[Any], sizes: tuple[int, int, int]):
    from nexus_jax.sharding import make_mesh

    return make_mesh(*sizes, devices=topo_devices)


def measure(workload: Workload, mesh: Any, full: bool) -> tuple[compiled.Measurement, str, str, float]:
    """(measurement, memory source, cost source, compile seconds) of ``workload`` on ``mesh``.

    ``full``: compile the full program for memory (and for costs when loop-free); otherwise memory and costs both
    come from the reduced-depth extrapolation.
    """
    fixed = {"steps": 1} if workload.cost_multiplier > 1 else {}
    seconds = 0.0
    full_m = None

    def build(overrides):
        return dataclasses.replace(workload.build(mesh, overrides), compiler_options=workload.compiler_options)

    if full:
        program = build(None)
        try:
            full_m = compiled.compile_and_measure(program)
        except compiled.CompilerOutOfMemory as oom:
            return _oom_measurement(program, oom)
        seconds += full_m.compile_seconds
        if not full_m.has_while and workload.cost_multiplier == 1:
            return full_m, "full compile", "unrolled compile (loop-free program)", seconds
    fields, parts = compiled.extrapolate(build, workload.depths, fixed)
    seconds += sum(p.compile_seconds for p in parts)
    for name in ("flops", "bytes_accessed", "optimal_seconds", "custom_calls"):
        fields[name] *= workload.cost_multiplier
    knobs = ", ".join(f"{k}={v}" for k, v in workload.depths.items())
    cost_src = f"layer-difference extrapolation from loop-free 1-/2-block compiles ({knobs})"
    if workload.cost_multiplier > 1:
        cost_src += f", x {workload.cost_multiplier} loop steps"
    if full_m is not None:
        for name in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "code_bytes"):
            fields[name] = getattr(full_m, name)
        return compiled.as_measurement(fields, full_m.has_while, seconds), "full compile", cost_src, seconds
    return compiled.as_measurement(fields, False, seconds), "layer-difference extrapolation", cost_src, seconds


def _oom_measurement(program: compiled.Program, oom: compiled.CompilerOutOfMemory
                     ) -> tuple[compiled.Measurement, str, str, float]:
    """The compiler refused the full program for lack of HBM: arguments from the abstract shapes, temporaries from
    the compiler's message; no cost estimate (the program cannot run on this slice)."""
    fields = dict.fromkeys(("flops", "bytes_accessed", "optimal_seconds"), 0.0)
    fields.update(argument_bytes=compiled.argument_bytes(program.args), output_bytes=0, alias_bytes=0,
                  temp_bytes=oom.required_bytes, code_bytes=0)
    src = f"compiler out-of-memory error ({oom}); arguments from the abstract shapes"
    return compiled.as_measurement(fields, False, 0.0), src, "not estimated (does not fit)", 0.0


def report(plan: PlanConfig, topo: Topology, sizes: tuple[int, int, int], remat: str, full: bool = True,
           devices: list[Any] | None = None) -> dict[str, Any]:
    """Compile ``plan`` for ``topo`` on mesh ``sizes`` with ``remat``; the JSON-able report."""
    sizes = check_plan(plan, topo, sizes)  # refuses jobs that cannot run on the slice before compiling
    devices = topology_devices(topo) if devices is None else devices
    sizes = resolve_mesh(sizes, len(devices), topo.name)
    workload = make_workload(plan, remat)
    mesh = _mesh(devices, sizes)
    m, mem_src, cost_src, seconds = measure(workload, mesh, full)
    n = len(devices)
    hbm = topo.hbm_bytes_per_device
    peak = topo.peak_flops_per_device
    bandwidth = topo.chip.hbm_bandwidth
    model_per_device = workload.model_flops / n
    kernel = _kernel_cost(workload, m, sizes, peak, bandwidth)
    if m.optimal_seconds > 0:
        base_seconds, step_source = m.optimal_seconds, "XLA TPU cost model optimal_seconds, "
    else:
        base_seconds = max(m.flops / peak, m.bytes_accessed / bandwidth)
        step_source = ("roofline max(FLOPs / peak, bytes accessed / HBM bandwidth) (the cost model gave no positive "
                       "optimal_seconds), ")
    step_seconds = base_seconds + kernel["kernel_seconds"] if base_seconds > 0 else 0.0
    step_source += cost_src + kernel.pop("step_time_note")
    roofline = max((m.flops + kernel["kernel_flops_per_device"]) / peak,
                   (m.bytes_accessed + kernel["kernel_hbm_bytes_per_device"]) / bandwidth)
    if kernel["kernel_flops_per_device"] and base_seconds > 0:
        roof = kernel["kernel_roofline_seconds"]
        kernel["estimated_mfu_by_kernel_efficiency"] = {
            str(e): model_per_device / ((base_seconds + roof / e) * peak) for e in kernels.SENSITIVITY}
    return {
        "config": plan.name,
        "workload": workload.name,
        "topology": topo.name,
        "accelerator_type": topo.accelerator_type,
        "num_devices": n,
        "num_hosts": topo.num_hosts,
        "mesh": dict(zip(MESH_AXES, sizes)),
        "remat": remat,
        "global_batch": plan.global_batch,
        "tokens_per_step": workload.tokens_per_step,
        "fits": m.total_bytes <= hbm,
        "bytes_per_device": m.total_bytes,
        "hbm_bytes_per_device": hbm,
        "headroom_bytes": hbm - m.total_bytes,
        "memory_per_device": {"arguments": m.argument_bytes, "outputs": m.output_bytes,
                              "aliased_outputs": m.alias_bytes, "temporaries": m.temp_bytes,
                              "generated_code": m.code_bytes},
        "memory_source": mem_src,
        "flops_per_step": m.flops * n,
        "flops_per_step_per_device": m.flops,
        "model_flops_per_step": workload.model_flops,
        "model_flops_per_device": model_per_device,
        "flops_source": cost_src,
        "estimated_step_seconds": step_seconds,
        "step_time_source": step_source,
        "roofline_step_seconds": roofline,
        "estimated_mfu": model_per_device / (step_seconds * peak) if step_seconds > 0 else 0.0,
        **kernel,
        "peak_bf16_flops_per_device": peak,
        "compile_seconds": round(seconds, 1),
        "compiler_options": dict(workload.compiler_options or {}),
        "notes": dict(workload.notes),
    }


def _kernel_cost(workload: Workload, m: compiled.Measurement, sizes: tuple[int, int, int], peak: float,
                 bandwidth: float) -> dict[str, Any]:
    """Report fields for the Mosaic kernels XLA's cost model does not price (launch.kernels).

    The workload's kernel work per device, at ``kernels.KERNEL_EFFICIENCY`` x its roofline; custom calls the
    workload cannot price are counted (``unpriced_custom_calls``) and the step time says it is under-stated."""
    fields: dict[str, Any] = {"custom_calls": m.custom_calls, "kernel_flops_per_device": 0.0,
                              "kernel_hbm_bytes_per_device": 0.0, "kernel_seconds": 0.0, "step_time_note": ""}
    if workload.kernel_cost is None:
        if m.custom_calls:
            fields["unpriced_custom_calls"] = m.custom_calls
            fields["step_time_note"] = (f"; UNDER-STATED: {m.custom_calls} Mosaic custom calls that this workload "
                                        "cannot price (launch.kernels)")
        return fields
    if m.optimal_seconds == 0 and m.flops == 0:  # the compiler refused the program (does not fit)
        return fields
    if not m.custom_calls:
        raise ValueError(f"workload {workload.name!r} prices Mosaic kernels but its compiled program has none (an "
                         "interpreted kernel is plain XLA and already priced)")
    cost = workload.kernel_cost(sizes)
    fields.update(kernel_flops_per_device=cost.flops, kernel_hbm_bytes_per_device=cost.hbm_bytes,
                  kernel_roofline_seconds=cost.roofline_seconds(peak, bandwidth),
                  kernel_efficiency=kernels.KERNEL_EFFICIENCY, kernel_seconds=cost.seconds(peak, bandwidth),
                  step_time_note=f" + Mosaic kernels at {kernels.KERNEL_EFFICIENCY} x their roofline "
                                 "(matmul FLOPs at peak, HBM bytes at bandwidth; launch.kernels)")
    return fields


def fit_message(rep: dict[str, Any]) -> str:
    """One line: fits (with headroom) or does not fit (by how much)."""
    need, hbm = rep["bytes_per_device"], rep["hbm_bytes_per_device"]
    where = f"{rep['config']} on {rep['topology']} mesh {rep['mesh']} remat={rep['remat']}"
    if rep["fits"]:
        return f"fits: {where} needs {need / GiB:.2f} GiB of {hbm / GiB:.0f} GiB HBM per device"
    over = need - hbm
    return (
        f"does not fit: {where} needs {need / GiB:.2f} GiB per device but the chip has {hbm / GiB:.0f} GiB HBM; "
        f"over by {over / GiB:.2f} GiB ({100 * over / hbm:.0f}%). Try --search, a larger slice, more fsdp/tensor "
        f"sharding, a smaller batch or remat=full"
    )


def format_report(rep: dict[str, Any]) -> str:
    mem = rep["memory_per_device"]
    lines = [
        f"{rep['config']} ({rep['workload']}) on {rep['topology']} [{rep['accelerator_type']}, "
        f"{rep['num_devices']} devices, {rep['num_hosts']} hosts], mesh {rep['mesh']}, remat={rep['remat']}",
        f"  memory/device: arguments {mem['arguments'] / GiB:.2f} GiB, temporaries {mem['temporaries'] / GiB:.2f} GiB,"
        f" outputs {mem['outputs'] / GiB:.2f} GiB ({mem['aliased_outputs'] / GiB:.2f} aliased), code "
        f"{mem['generated_code'] / 2**20:.1f} MiB -> total {rep['bytes_per_device'] / GiB:.2f} GiB of "
        f"{rep['hbm_bytes_per_device'] / GiB:.0f} GiB ({rep['memory_source']})",
        f"  FLOPs/step: compiler {rep['flops_per_step']:.3e} ({rep['flops_per_step_per_device']:.3e}/device), "
        f"model {rep['model_flops_per_step']:.3e} ({rep['flops_source']})",
        f"  step time ~{rep['estimated_step_seconds']:.3f} s (roofline {rep['roofline_step_seconds']:.3f} s), "
        f"estimated MFU {rep['estimated_mfu']:.2f}",
    ]
    if rep.get("kernel_flops_per_device"):
        by_eff = ", ".join(f"{e}: {v:.2f}" for e, v in rep["estimated_mfu_by_kernel_efficiency"].items())
        lines.append(f"  kernels: {rep['custom_calls']} Mosaic calls, {rep['kernel_flops_per_device']:.3e} FLOPs and "
                     f"{rep['kernel_hbm_bytes_per_device'] / GiB:.1f} GiB HBM traffic per device, roofline "
                     f"{rep['kernel_roofline_seconds']:.3f} s, at {rep['kernel_efficiency']} of it "
                     f"{rep['kernel_seconds']:.3f} s of the step; MFU by kernel efficiency {by_eff}")
    elif rep.get("unpriced_custom_calls"):
        lines.append(f"  WARNING: {rep['unpriced_custom_calls']} Mosaic custom calls are not priced: the step time is "
                     "under-stated")
    lines.append("  " + fit_message(rep))
    return "\n".join(lines)


def candidate_meshes(num_devices: int, max_tensor: int = 8) -> list[tuple[int, int, int]]:
    """(data, fsdp, tensor) with tensor and data powers of two (tensor <= max_tensor), fsdp taking the rest."""
    out = []
    tensor = 1
    while tensor <= min(max_tensor, num_devices):
        if num_devices % tensor == 0:
            data = 1
            while data * tensor <= num_devices:
                if num_devices % (data * tensor) == 0:
                    out.append((data, num_devices // (data * tensor), tensor))
                data *= 2
        tensor *= 2
    return out


def search(plan: PlanConfig, topo: Topology, remats: Sequence[str], meshes: Sequence[tuple[int, int, int]] | None,
           verify: bool = True, log=print) -> list[dict[str, Any]]:
    """Reports of every (mesh, remat) that fits, best estimated MFU first; the first one confirmed by a full compile.

    Candidates whose compile fails (e.g. a mesh the model cannot shard) are logged and skipped.
    """
    devices = topology_devices(topo)
    meshes = list(meshes) if meshes else candidate_meshes(len(devices))
    results = []
    for sizes in meshes:
        for remat in remats:
            try:
                rep = report(plan, topo, sizes, remat, full=False, devices=devices)
            except Exception as exc:  # a candidate that cannot compile is not a fit
                log(f"  skip mesh {sizes} remat={remat}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                continue
            finally:
                compiled.clear_caches()
            log(f"  mesh {sizes} remat={remat}: {rep['bytes_per_device'] / GiB:.2f} GiB, MFU "
                f"{rep['estimated_mfu']:.3f}, fits={rep['fits']}")
            results.append(rep)
    fitting = sorted((r for r in results if r["fits"]), key=lambda r: (-r["estimated_mfu"], r["bytes_per_device"]))
    if fitting and verify:
        best = fitting[0]
        sizes = tuple(best["mesh"][a] for a in MESH_AXES)
        fitting[0] = report(plan, topo, sizes, best["remat"], full=True, devices=devices)
        fitting[0]["search_rank"] = 1
    return fitting


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nexus-jax plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="plan config name (configs/plans.py), e.g. ar_train")
    p.add_argument("--topology", help="TPU slice, e.g. v5p:4x4x4 or v6e:8x8 (default: the config's)")
    p.add_argument("--mesh", help="data,fsdp,tensor (one may be -1), default: the config's")
    p.add_argument("--remat", choices=REMAT_CHOICES, help="rematerialisation policy (default: the config's)")
    p.add_argument("--search", action="store_true", help="rank meshes x remat policies that fit")
    p.add_argument("--search-remat", default="none,dots,full", help="remat policies tried by --search")
    p.add_argument("--search-mesh", action="append", help="mesh tried by --search (repeatable; default: all)")
    p.add_argument("--fast", action="store_true", help="estimate memory too from reduced-depth compiles")
    p.add_argument("--json", help="write the report (list of reports with --search) to this path")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = get_plan(args.config)
        topo = parse_topology(args.topology or plan.topology)
        sizes = parse_mesh(args.mesh) if args.mesh else plan.mesh
        if not args.search:
            check_plan(plan, topo, sizes)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.search:
        remats = [r.strip() for r in args.search_remat.split(",") if r.strip()]
        bad = [r for r in remats if r not in REMAT_CHOICES]
        if bad:
            print(f"error: unknown remat policies {bad}; choose from {REMAT_CHOICES}", file=sys.stderr)
            return 2
        try:
            meshes = [resolve_mesh(parse_mesh(m), topo.num_chips, topo.name) for m in args.search_mesh or []]
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"searching {plan.name} on {topo.name} ({topo.num_chips} devices)")
        ranked = search(plan, topo, remats, meshes or None, verify=not args.fast)
        if args.json:
            _write_json(args.json, ranked)
        if not ranked:
            print("error: no mesh x remat candidate fits; use a larger slice or a smaller batch", file=sys.stderr)
            return 1
        print("ranked candidates that fit (best first):")
        for i, r in enumerate(ranked, 1):
            print(f"  {i}. mesh {r['mesh']} remat={r['remat']}: MFU {r['estimated_mfu']:.3f}, "
                  f"{r['bytes_per_device'] / GiB:.2f} GiB/device")
        print(format_report(ranked[0]))
        return 0
    rep = report(plan, topo, sizes, args.remat or plan.remat, full=not args.fast)
    print(format_report(rep))
    if args.json:
        _write_json(args.json, rep)
    if not rep["fits"]:
        print("error: " + fit_message(rep), file=sys.stderr)
        return 1
    return 0


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    sys.exit(main())
