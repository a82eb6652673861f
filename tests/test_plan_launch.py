"""Launcher commands and multi-host helpers (no compilation)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from configs.plans import get_plan
from launch import distributed, launcher


def test_tpu_vm_commands_for_ar_training(capsys):
    rc = launcher.main(["--config", "ar_train", "--name", "nx", "--zone", "us-east5-a", "--data", "gs://b/d",
                        "--run-dir", "gs://b/r", "--", "--steps", "10"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert out[1] == ("gcloud compute tpus tpu-vm create nx --zone=us-east5-a --accelerator-type=v5p-128 "
                      "--version=v2-alpha-tpuv5")
    assert "--worker=all" in out[2] and "--worker=all" in out[3]
    assert "python3 -m launch.distributed train --preset ar_stage3" in out[4]
    assert out[4].endswith("--data gs://b/d --run-dir gs://b/r --remat none --steps 10'")
    assert out[5].startswith("gcloud compute tpus tpu-vm delete nx")


def test_xpk_commands_and_errors(capsys):
    rc = launcher.main(["--config", "generation_sample_512", "--name", "gen", "--zone", "us-east1-d", "--xpk",
                        "--cluster", "c1", "--docker-image", "gcr.io/p/nexus:1"])
    out = capsys.readouterr().out
    assert rc == 0 and "xpk workload create --cluster=c1 --workload=gen --tpu-type=v6e-8" in out
    assert launcher.main(["--config", "ar_train", "--name", "x", "--zone", "z"]) == 2
    assert "pass --data <records> and --run-dir" in capsys.readouterr().err
    assert launcher.main(["--config", "ar_train", "--name", "x", "--zone", "z", "--topology", "v5p:4x4"]) == 2
    assert "has 2 dimensions but v5p slices have 3" in capsys.readouterr().err


def test_multi_host_detection():
    assert not distributed.needs_initialize(None, None, {})
    assert not distributed.needs_initialize(None, None, {"TPU_WORKER_HOSTNAMES": "10.0.0.2"})
    assert distributed.needs_initialize(None, None, {"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"})
    assert distributed.needs_initialize("10.0.0.2:8476", None, {})
    assert not distributed.needs_initialize("10.0.0.2:8476", 1, {})
    info = distributed.initialize(env={})  # single host: no jax.distributed call
    assert info.process_count == 1 and info.global_devices == 8
    with pytest.raises(ValueError, match="process_id=3 is outside"):
        distributed.initialize(num_processes=2, process_id=3, env={})


def test_per_host_batch_slices_cover_the_batch():
    slices = [distributed.host_batch_slice(128, i, 16) for i in range(16)]
    rows = np.concatenate([np.arange(128)[s] for s in slices])
    np.testing.assert_array_equal(rows, np.arange(128))
    with pytest.raises(ValueError, match="global batch 100 does not split evenly over 16 hosts"):
        distributed.host_batch_slice(100, 0, 16)


def test_global_batch_from_local_rows_single_host():
    from nexus_jax.sharding import make_mesh

    mesh = make_mesh(2, 4, 1)
    local = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
    out = distributed.global_batch(local, mesh)
    np.testing.assert_array_equal(np.asarray(out["x"]), local["x"])
    assert out["x"].sharding.shard_shape((16, 3)) == (2, 3)


def test_train_jobs_run_the_remat_policy_they_were_planned_with():
    from launch.launcher import job_command
    from nexus_jax.training.cli import build_parser, config_from_args

    argv = job_command(get_plan("ar_train_v6e"), "gs://b/d", "gs://b/r", [])
    assert argv[argv.index("--remat") + 1] == "full"
    cfg = config_from_args(build_parser().parse_args(argv[4:]))
    assert cfg.loop.remat == "full"
    from nexus_jax.training.decoder_loop import decoder_parts

    assert decoder_parts("generation_decoder", "tiny", "dots").decoder.dit.remat == "dots"
    with pytest.raises(ValueError, match="remat must be one of"):
        dataclasses.replace(cfg.loop, remat="sometimes")


# --- refusals decided from config / topology arithmetic (no compile) -------------------------------------------
LAUNCH = ["--name", "nx", "--zone", "z", "--data", "gs://b/d", "--run-dir", "gs://b/r"]


def test_every_preset_can_run_on_its_own_slice():
    from configs.plans import PLANS
    from launch.checks import check_plan
    from launch.topology import parse_topology

    for plan in PLANS.values():
        topo = parse_topology(plan.topology)
        mesh = check_plan(plan, topo, plan.mesh)
        assert mesh[0] * mesh[1] * mesh[2] == topo.num_chips, plan.name


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "120"], "global batch 120 does not split over the 16 hosts (processes); use a multiple of 16"),
    (["--batch-size", "32"], "batch 32 does not split over the 64 data-parallel devices (data 1 x fsdp 64)"),
    (["--batch-size", "64", "--grad-accum", "3"], "global batch 64 does not split into grad_accum=3 micro-batches"),
    (["--batch-size", "96", "--grad-accum", "4"],
     "global batch 96 does not split over the 16 hosts (processes) x grad_accum 4; use a multiple of 64"),
    (["--mesh", "1,32,1"], "= 32 devices, but topology v5p:4x4x4 has 64 devices"),
    (["--mesh", "1,8,8"], "tensor=8 does not divide text num_heads=28; tensor=8 does not divide text num_kv_heads=4"),
])
def test_launch_refuses_jobs_that_cannot_run_on_the_slice(capsys, extra, message):
    assert launcher.main(["--config", "ar_train", *LAUNCH, "--", *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert message in captured.err


def test_model_dims_must_divide_their_mesh_axes():
    from launch.checks import PlanError, check_plan
    from launch.topology import parse_topology

    tiny = get_plan("tiny_decoder_train").replace(global_batch=32)  # hidden 48 = 3 heads x 16
    with pytest.raises(PlanError, match=r"fsdp=32 does not divide DiT hidden_size=48$"):
        check_plan(tiny, parse_topology("v5p:2x2x8"), (1, -1, 1))
    with pytest.raises(PlanError, match="tensor=2 does not divide DiT num_heads=3"):
        check_plan(get_plan("tiny_decoder_train"), parse_topology("v5p:2x2x1"), (1, 2, 2))
    # inference rules keep "embed" unsharded: the hidden size need not divide fsdp
    sample = get_plan("generation_sample_512").replace(global_batch=64)
    assert check_plan(sample, parse_topology("v6e:8x8"), (1, 64, 1)) == (1, 64, 1)
    with pytest.raises(PlanError, match="tensor=16 does not divide DiT num_heads=24"):
        check_plan(sample, parse_topology("v6e:8x8"), (4, 1, 16))
    editing = get_plan("editing_decoder_train")
    with pytest.raises(PlanError, match="tensor=8 does not divide merger num_kv_heads=4"):
        check_plan(editing, parse_topology("v5p:2x2x2"), (1, 1, 8))


def test_plan_refuses_before_compiling(capsys):
    from launch import plan as planner

    assert planner.main(["--config", "ar_train", "--mesh", "1,8,8"]) == 2
    assert "tensor=8 does not divide text num_kv_heads=4" in capsys.readouterr().err
    assert planner.main(["--config", "generation_sample_512", "--topology", "v6e:8x8", "--mesh=-1,1,4"]) == 2
    assert "global batch 8 does not split over the 16 hosts" in capsys.readouterr().err


def test_launch_refuses_a_job_whose_plan_report_does_not_fit(capsys, tmp_path):
    import json

    report = {"config": "ar_train", "topology": "v5p:4x4x4", "mesh": {"data": 1, "fsdp": 64, "tensor": 1},
              "remat": "none", "global_batch": 128, "fits": False, "bytes_per_device": 120 * 2**30,
              "hbm_bytes_per_device": 95 * 2**30}
    path = tmp_path / "ar.json"
    path.write_text(json.dumps(report))
    assert launcher.main(["--config", "ar_train", *LAUNCH, "--plan-report", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "refusing to launch: plan report ar.json: ar_train on v5p:4x4x4" in captured.err
    assert "does not fit: 120.00 of 95 GiB/device" in captured.err
    # the stored report of the shipped config says it fits; a job the reports do not cover gets a warning
    assert launcher.main(["--config", "ar_train", *LAUNCH]) == 0
    assert "plan_ar_train_v5p-4x4x4.json: ar_train on v5p:4x4x4" in capsys.readouterr().out
    assert launcher.main(["--config", "ar_train", *LAUNCH, "--", "--batch-size", "256"]) == 0
    captured = capsys.readouterr()
    assert "WARNING: no stored plan report for ar_train on v5p:4x4x4" in captured.err
    assert "batch 256" in captured.err and "gcloud compute tpus tpu-vm create" in captured.out
