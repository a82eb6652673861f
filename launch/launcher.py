"""``nexus-jax launch``: the Cloud TPU commands for a plan config and slice (printed; executed with ``--run``).

Two paths:
* ``tpu-vm`` (default): ``gcloud compute tpus tpu-vm create`` -> copy the work tree to every worker -> install ->
  run ``python -m launch.distributed <job>`` on all workers (``--worker=all``) -> delete.
* ``xpk`` (GKE): ``xpk cluster create`` -> ``xpk workload create --command ...`` (needs a container image holding
  this repository, ``--docker-image``).

The job is the plan config's ``job`` (e.g. ``train --preset ar_stage3 ...``) plus ``--data`` / ``--run-dir`` and any
arguments after ``--``. ``launch.distributed`` initialises multi-host JAX on every worker before running it.

Nothing is printed or run for a job that cannot run on the slice (:func:`refuse_or_note`: mesh vs chips, batch vs
hosts and data-parallel devices, model dims vs mesh axes, or a stored plan report that says it does not fit): exit
code 2 with one line naming the numbers. A job without a matching plan report gets a warning on stderr.

``nexus-jax launch local --processes N -- <command>`` runs the same job as N JAX processes on this machine
(:mod:`launch.local`), to debug a pod job before a slice is paid for.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from configs.plans import PlanConfig, get_plan
from launch.checks import check_plan, parse_mesh, stored_fit, stored_reports
from launch.topology import Topology, parse_topology

INSTALL = "cd ~/nexus-jax && python3 -m pip install -q -e '.[tpu,gcs]'"


def job_command(plan: PlanConfig, data: str | None, run_dir: str | None, extra: Sequence[str]) -> list[str]:
    """argv run on every worker: multi-host init + the nexus-jax command."""
    if not plan.job:
        raise ValueError(f"plan config {plan.name!r} has no job command to launch")
    argv = ["python3", "-m", "launch.distributed", *plan.job]
    if plan.job[0] == "train":
        if not data or not run_dir:
            raise ValueError(f"{plan.name} trains: pass --data <records> and --run-dir <gs://bucket/dir>")
        argv += ["--data", data, "--run-dir", run_dir]
        if "--remat" not in plan.job:  # the job runs the remat policy the plan was compiled (and fits) with
            argv += ["--remat", plan.remat]
    return argv + list(extra)


def _last_flag(argv: Sequence[str], flag: str) -> str | None:
    """The value of the last ``flag VALUE`` / ``flag=VALUE`` in ``argv`` (argparse: the last one wins)."""
    value = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def job_shape(plan: PlanConfig, job: Sequence[str]) -> tuple[tuple[int, int, int], int, int, str]:
    """(mesh, global batch, grad_accum, remat) the launched job runs with: for ``train`` the training CLI's own
    parse of the job's arguments (preset defaults + overrides); otherwise the plan's, with a ``--mesh`` override."""
    if plan.job[0] == "train":
        from nexus_jax.training.cli import build_parser, config_from_args

        cfg = config_from_args(build_parser().parse_args(list(job[4:])))
        m = cfg.mesh
        return (m.data, m.fsdp, m.tensor), cfg.loop.batch_size, cfg.optim.grad_accum, cfg.loop.remat
    mesh = _last_flag(job, "--mesh")
    return (parse_mesh(mesh) if mesh else plan.mesh), plan.global_batch, 1, plan.remat


def refuse_or_note(plan: PlanConfig, topo: Topology, job: Sequence[str], report_path: str | None = None) -> str:
    """Refuse (ValueError, one line) a job that cannot run on ``topo`` (:func:`launch.checks.check_plan`) or whose
    plan report says it does not fit in HBM; otherwise the line to print about the plan report."""
    sizes, batch, accum, remat = job_shape(plan, job)
    mesh = check_plan(plan, topo, sizes, batch, accum)
    reports = stored_reports()
    if report_path:
        with open(report_path) as f:
            loaded = json.load(f)
        reports = [(Path(report_path), r) for r in (loaded if isinstance(loaded, list) else [loaded])] + reports
    fits, note = stored_fit(plan.name, topo, mesh, remat, batch // accum, reports)
    if fits is False:
        raise ValueError(f"refusing to launch: {note}; run nexus-jax plan --search for a config that fits")
    if fits is None:
        print(f"WARNING: {note}", file=sys.stderr)
        return f"No matching plan report: check it fits first (nexus-jax plan --config {plan.name} --topology " \
               f"{topo.name})"
    return note


def tpu_vm_commands(plan: PlanConfig, topo: Topology, name: str, zone: str, project: str | None, spot: bool,
                    job: Sequence[str], keep: bool = False) -> list[list[str]]:
    """create, copy, install, run, and (unless ``keep``) delete: gcloud argv lists."""
    common = [f"--zone={zone}"] + ([f"--project={project}"] if project else [])
    create = ["gcloud", "compute", "tpus", "tpu-vm", "create", name, *common,
              f"--accelerator-type={topo.accelerator_type}", f"--version={topo.chip.runtime_version}"]
    if spot:
        create.append("--spot")
    copy = ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", ".", f"{name}:~/nexus-jax", *common,
            "--worker=all"]
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, *common, "--worker=all", "--command"]
    install = ssh + [INSTALL]
    run = ssh + [f"cd ~/nexus-jax && {shlex.join(job)}"]
    delete = ["gcloud", "compute", "tpus", "tpu-vm", "delete", name, *common, "--quiet"]
    return [create, copy, install, run] + ([] if keep else [delete])


def xpk_commands(plan: PlanConfig, topo: Topology, name: str, cluster: str, zone: str, project: str | None,
                 image: str, job: Sequence[str]) -> list[list[str]]:
    """xpk cluster create, workload create (argv lists)."""
    common = [f"--zone={zone}"] + ([f"--project={project}"] if project else [])
    cluster_create = ["xpk", "cluster", "create", f"--cluster={cluster}", f"--tpu-type={topo.accelerator_type}",
                      "--num-slices=1", *common]
    workload = ["xpk", "workload", "create", f"--cluster={cluster}", f"--workload={name}",
                f"--tpu-type={topo.accelerator_type}", "--num-slices=1", f"--docker-image={image}", *common,
                f"--command={shlex.join(job)}"]
    return [cluster_create, workload]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nexus-jax launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="plan config (configs/plans.py), e.g. ar_train")
    p.add_argument("--topology", help="slice, e.g. v5p:4x4x4 (default: the config's intended slice)")
    p.add_argument("--name", required=True, help="TPU VM / workload name")
    p.add_argument("--zone", required=True, help="e.g. us-east5-a (v5p), us-east1-d (v6e)")
    p.add_argument("--project", help="GCP project (default: gcloud's)")
    p.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
    p.add_argument("--keep", action="store_true", help="do not delete the TPU VM after the job")
    p.add_argument("--data", help="training records (JSONL or array_record directory, e.g. gs://...)")
    p.add_argument("--run-dir", help="checkpoints and logs (gs://...)")
    p.add_argument("--xpk", action="store_true", help="GKE via xpk instead of plain TPU VMs")
    p.add_argument("--cluster", help="xpk cluster name")
    p.add_argument("--docker-image", help="xpk: image containing this repository")
    p.add_argument("--plan-report", help="a 'nexus-jax plan --json' report to check the job against (besides "
                   "benchmarks/results/plan_*.json)")
    p.add_argument("--run", action="store_true", help="execute the commands (default: print them)")
    p.add_argument("extra", nargs="*", help="extra job arguments (after --)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["local"]:  # nexus-jax launch local --processes N -- <command>: a pod job on this machine
        from launch import local

        return local.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        plan = get_plan(args.config)
        topo = parse_topology(args.topology or plan.topology)
        job = job_command(plan, args.data, args.run_dir, args.extra)
        note = refuse_or_note(plan, topo, job, args.plan_report)
        if args.xpk:
            if not args.cluster or not args.docker_image:
                raise ValueError("--xpk needs --cluster and --docker-image")
            commands = xpk_commands(plan, topo, args.name, args.cluster, args.zone, args.project,
                                    args.docker_image, job)
        else:
            commands = tpu_vm_commands(plan, topo, args.name, args.zone, args.project, args.spot, job, args.keep)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"# {plan.name} on {topo.name} = {topo.accelerator_type} ({topo.num_chips} chips, {topo.num_hosts} hosts)."
          f" {note}")
    for cmd in commands:
        print(shlex.join(cmd))
        if args.run:
            rc = subprocess.call(cmd)
            if rc:
                print(f"error: command failed with exit code {rc}: {shlex.join(cmd)}", file=sys.stderr)
                return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
