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
