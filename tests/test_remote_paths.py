"""Object-store URLs (``gs://``) for data, conversion outputs/inputs, metrics and the train CLI, against the local
fake GCS of ``tests/helpers/fake_gcs.py``: epath's real fsspec backend and TensorStore's real GCS driver both run,
redirected to a temporary directory (``gs://b/k`` is ``root/b/k``)."""

from __future__ import annotations

import io
import json
import os
import uuid

import jax
import numpy as np
import pytest
from PIL import Image

from nexus_jax import paths
from tests.helpers import fake_gcs


@pytest.fixture(scope="module")
def gcs_root():
    return fake_gcs.install()


@pytest.fixture()
def bucket(gcs_root):
    """A fresh bucket: (``gs://<name>``, its local directory in the fake)."""
    name = f"b-{uuid.uuid4().hex[:8]}"
    (gcs_root / name).mkdir()
    return f"gs://{name}", gcs_root / name


@pytest.fixture()
def in_tmp_cwd(tmp_path, monkeypatch):
    """Run in an empty directory and check at the end that no local ``gs:`` folder appeared there."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    assert not (tmp_path / "gs:").exists(), "a URL was treated as a local path"


# ------------------------------------------------------------------------------------------------------ helpers
def test_as_path_keeps_urls_and_refuses_unknown_schemes(tmp_path):
    p = paths.as_path("gs://bkt/runs/x")
    assert str(p) == os.fspath(p) == "gs://bkt/runs/x" and paths.is_remote(p)
    assert str(p / "tb") == "gs://bkt/runs/x/tb" and str(paths.join("gs://bkt/runs/x", "a", "b")) == "gs://bkt/runs/x/a/b"
    assert str(paths.as_path(f"file://{tmp_path}/a")) == f"{tmp_path}/a" and not paths.is_remote(f"file://{tmp_path}")
    assert not paths.is_remote(tmp_path) and str(paths.as_path("rel/x")) == "rel/x"
    with pytest.raises(ValueError, match="unsupported URL scheme memory://"):
        paths.as_path("memory://x/y")


def test_atomic_write_local_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "f.json"
    paths.atomic_write_text(target, "one")
    paths.atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two" and os.listdir(target.parent) == ["f.json"]


def test_atomic_write_and_copy_tree_on_the_fake_store(bucket, tmp_path, in_tmp_cwd):
    url, local = bucket
    paths.atomic_write_text(f"{url}/d/f.txt", "hello")
    assert (local / "d" / "f.txt").read_text() == "hello" and paths.as_path(f"{url}/d/f.txt").read_text() == "hello"
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "config.json").write_text("{}")
    (tmp_path / "src" / "sub" / "w.bin").write_bytes(b"\0" * 10)
    order = paths.copy_tree(tmp_path / "src", f"{url}/out", last=("config.json",))
    assert order == ["sub/w.bin", "config.json"]
    assert paths.list_files(f"{url}/out") == ["config.json", "sub/w.bin"]
    assert (local / "out" / "sub" / "w.bin").read_bytes() == b"\0" * 10


def test_fake_store_refuses_appends(bucket):
    """Appending is what object stores cannot do; the fake refuses it too, so code that appends fails here."""
    url, _ = bucket
    paths.as_path(f"{url}/log").write_text("a\n")
    with pytest.raises(NotImplementedError):
        with paths.as_path(f"{url}/log").open("a") as f:
            f.write("b\n")


# --------------------------------------------------------------------------------------------------- conversion
@pytest.fixture(scope="module")
def flux_src(tmp_path_factory):
    from flax import nnx

    from conversion.families import get_family
    from conversion.state import abstract_params
    from conversion.tables import flux_dit
    from tests.test_conversion_engine import CFG, random_source, write_st

    family = get_family("flux_dit")
    shapes = {k: v.shape for k, v in abstract_params(lambda: family.build(CFG, nnx.Rngs(0)))[1].items()}
    sd = random_source(flux_dit.diffusers_mapping(CFG), shapes)
    d = tmp_path_factory.mktemp("flux")
    write_st(d / "src", sd)
    return sd, d


def test_import_to_url_reads_back_like_local_and_exports_from_url(flux_src, bucket, in_tmp_cwd, capsys):
    from conversion import io as cio
    from conversion import pipeline
    from conversion.cli import main as convert

    sd, d = flux_src
    url, local = bucket
    args = ["--family", "flux_dit", "--config", "tiny", "--no-progress"]
    assert convert(["import", str(d / "src"), str(d / "out_local"), *args]) == 0
    assert convert(["import", str(d / "src"), f"{url}/ckpt", *args]) == 0
    assert (local / "ckpt" / "config.json").is_file() and (local / "ckpt" / "params").is_dir()
    ref, got = pipeline.load_arrays(d / "out_local"), pipeline.load_arrays(f"{url}/ckpt")  # TensorStore gcs driver
    assert sorted(ref) == sorted(got) and len(ref) == 84
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])
    assert convert(["import", str(d / "src"), f"{url}/ckpt", *args]) == 1  # exists, no --overwrite

    # gs:// -> gs:// export (safetensors shards), then a gs:// source read back tensor by tensor
    pipeline.export_checkpoint(f"{url}/ckpt", f"{url}/exported", progress=False, max_shard_bytes=50_000)
    assert (local / "exported" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    capsys.readouterr()
    assert convert(["detect", f"{url}/exported"]) == 0
    assert json.loads(capsys.readouterr().out) == {"scheme": "diffusers_flux_transformer", "tensors": len(sd)}
    with cio.open_checkpoint(f"{url}/exported") as r:
        assert sorted(r.shapes) == sorted(sd)
        for k, v in sd.items():
            np.testing.assert_array_equal(r.read(k), v)
    # .bin export to a URL (memory-mapped staging happens locally) and a .bin source read from a URL
    pipeline.export_checkpoint(f"{url}/ckpt", f"{url}/bin", fmt="bin", progress=False)
    bins = paths.list_files(f"{url}/bin")
    assert [b for b in bins if b.endswith(".bin")] == ["diffusion_pytorch_model.bin"]
    with cio.open_checkpoint(f"{url}/bin/diffusion_pytorch_model.bin") as r:
        for k, v in sd.items():
            np.testing.assert_array_equal(r.read(k), v)
    assert not [p for p in in_tmp_cwd.iterdir()], "conversion left files in the working directory"


def test_failed_import_to_url_leaves_nothing(flux_src, bucket, monkeypatch):
    from conversion.cli import main as convert

    _, d = flux_src
    url, local = bucket

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("conversion.orbax.write_config", boom)
    with pytest.raises(KeyboardInterrupt):
        convert(["import", str(d / "src"), f"{url}/ckpt", "--family", "flux_dit", "--config", "tiny",
                 "--no-progress"])
    assert not (local / "ckpt").exists()


# ---------------------------------------------------------------------------------------------------------- data
def test_jsonl_and_images_from_url(bucket, tmp_path):
    from nexus_jax.data.records import iter_records, resolve_image
    from nexus_jax.data.sources import JsonlSource, open_source
    from nexus_jax.processing.image_processor import load_image

    url, local = bucket
    rec = {"id": "r1", "images": ["cat.png"],
           "messages": [{"role": "user", "content": "Draw a cat."},
                        {"role": "assistant", "content": "Here: <image>"}]}
    lines = [json.dumps(rec), "{broken", json.dumps(dict(rec, id="r2"))]
    text = "\n".join(lines) + "\n"
    (tmp_path / "r.jsonl").write_text(text)
    paths.atomic_write_text(f"{url}/data/r.jsonl", text)
    src = open_source(f"{url}/data/r.jsonl")
    assert isinstance(src, JsonlSource) and str(src.path) == f"{url}/data/r.jsonl"
    assert list(src) == list(open_source(tmp_path / "r.jsonl")) == lines
    with pytest.raises(ValueError, match="record is not valid JSON"):
        list(iter_records(f"{url}/data/r.jsonl"))

    pixels = np.random.default_rng(0).integers(0, 255, (6, 5, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    paths.atomic_write_bytes(f"{url}/images/cat.png", buf.getvalue())
    f = resolve_image("cat.png", f"{url}/images")
    assert str(f) == f"{url}/images/cat.png"
    assert str(resolve_image(f"{url}/other/x.png", "/local/root")) == f"{url}/other/x.png"  # URLs are kept
    np.testing.assert_array_equal(np.asarray(load_image(f)), pixels)
    with pytest.raises(ValueError, match="cannot decode image"):
        load_image(resolve_image("missing.png", f"{url}/images"))


def test_decoder_embeddings_from_url(bucket):
    from nexus_jax.data.decoder_examples import _load_embed

    url, _ = bucket
    emb = np.arange(12, dtype=np.float32).reshape(3, 4)
    buf = io.BytesIO()
    np.save(buf, emb)
    paths.atomic_write_bytes(f"{url}/e.npy", buf.getvalue())
    np.testing.assert_array_equal(_load_embed(paths.as_path(f"{url}/e.npy"), 3, 4, "embed"), emb)


# ------------------------------------------------------------------------------------------------------- metrics
def test_metrics_to_url_run_dir(bucket, in_tmp_cwd):
    from nexus_jax.training.metrics import MetricsWriter, read_step_log

    url, local = bucket
    run = f"{url}/runs/x"
    out = io.StringIO()
    w = MetricsWriter(run, log_every=2, tensorboard_dir=f"{run}/tb", stream=out)
    w.event("start")
    w.step(1, {"loss": np.float32(1.5)}, tokens=10, records=2, record_ids=[3, 4])
    assert [r["step"] for r in read_step_log(f"{run}/steps.jsonl")] == []  # step 1 not uploaded yet (log_every=2)
    w.step(2, {"loss": np.float32(1.25)}, tokens=10, records=2, record_ids=[5, 6])
    assert [r["step"] for r in read_step_log(f"{run}/steps.jsonl")] == [1, 2]  # uploaded at the log step
    w.step(3, {"loss": np.float32(1.0)}, tokens=10, records=2, record_ids=[7, 8])
    w.eval(3, {"loss": 0.5})
    w.close()
    rows = read_step_log(f"{run}/steps.jsonl")
    assert [(r["step"], r["loss"], r["record_ids"]) for r in rows] == [(1, 1.5, [3, 4]), (2, 1.25, [5, 6]),
                                                                       (3, 1.0, [7, 8])]
    tb = list((local / "runs" / "x" / "tb").iterdir())
    assert len(tb) == 1 and tb[0].name.startswith("events.out.tfevents") and tb[0].stat().st_size > 0

    w = MetricsWriter(run, log_every=10, stream=out)  # a resumed run keeps the earlier rows
    w.event("start", resumed_from=2)
    w.step(3, {"loss": np.float32(0.9)})
    w.close()
    assert [r["step"] for r in read_step_log(f"{run}/steps.jsonl")] == [1, 2, 3, 3]
    assert [r["loss"] for r in read_step_log(f"{run}/steps.jsonl", last_run_only=True)] == [np.float32(0.9)]
    assert "step 2:" in out.getvalue()


# ------------------------------------------------------------------------------------------------------ train CLI
def test_train_cli_keeps_url_run_dir(bucket, in_tmp_cwd, capsys):
    from nexus_jax.training.cli import build_parser, config_from_args

    url, _ = bucket
    args = build_parser().parse_args(["--preset", "tiny_ar", "--data", f"{url}/r.jsonl", "--image-root",
                                      f"{url}/images", "--run-dir", f"{url}/runs/x", "--tensorboard"])
    assert str(args.run_dir) == f"{url}/runs/x" and paths.is_remote(args.run_dir)
    cfg = config_from_args(args)
    assert cfg.loop.log_dir == f"{url}/runs/x/tb"
    assert (cfg.data.path, cfg.data.image_root) == (f"{url}/r.jsonl", f"{url}/images")
    local = build_parser().parse_args(["--preset", "tiny_ar", "--data", "r.jsonl", "--run-dir", "runs/y",
                                       "--tensorboard"])
    assert config_from_args(local).loop.log_dir == "runs/y/tb"
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--preset", "tiny_ar", "--data", "r.jsonl", "--run-dir", "memory://x"])
    assert e.value.code == 2 and "unsupported URL scheme memory://" in capsys.readouterr().err


def test_checkpointer_on_url_saves_verifies_and_restores(bucket):
    """The train-state Checkpointer on a gs:// directory: Orbax save, manifest, verification, restore."""
    import jax.numpy as jnp

    from nexus_jax.training.checkpoint import Checkpointer, CheckpointError

    url, local = bucket
    state = {"w": jnp.arange(12.0).reshape(3, 4), "step": jnp.int32(3)}
    ckpt = Checkpointer(f"{url}/run/checkpoints", async_save=False)
    ckpt.save(3, state, {"batches": 3, "skipped": 1})
    assert (local / "run" / "checkpoints" / "3" / "nexus_manifest.json").is_file()
    assert ckpt.resolve("latest") == 3
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in state.items()}
    restored, data = ckpt.restore(3, abstract)
    assert data == {"batches": 3, "skipped": 1}
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]))
    victim = max((p for p in (local / "run" / "checkpoints" / "3").rglob("*") if p.is_file()
                  and p.name != "nexus_manifest.json"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match="truncated"):
        ckpt.verify(3)
    ckpt.close()


@pytest.mark.slow
def test_training_run_dir_on_url_checkpoints_and_resumes(bucket, in_tmp_cwd):
    """A decoder training run with a gs:// run dir: Orbax checkpoints, manifests, steps.jsonl land in the bucket;
    a second run resumes from the bucket's checkpoint with the uninterrupted run's losses."""
    import dataclasses

    from configs.training import PRESETS
    from nexus_jax.data.synthetic import write_decoder_dataset
    from nexus_jax.training.decoder_loop import decoder_parts, decoder_task
    from nexus_jax.training.loop import train
    from nexus_jax.training.metrics import read_step_log

    url, local = bucket
    parts = decoder_parts("generation_decoder", "tiny")
    data = write_decoder_dataset(in_tmp_cwd / "data", 8, (parts.embed_rows, parts.embed_dim), None, seed=2)
    base = PRESETS["tiny_generation_decoder"]
    r = dataclasses.replace
    cfg = r(base, data=r(base.data, path=str(data)),
            loop=r(base.loop, total_steps=2, batch_size=8, log_every=1),
            checkpoint=r(base.checkpoint, every_steps=1, async_save=False))
    full = train(r(cfg, loop=r(cfg.loop, total_steps=3)), decoder_task(cfg, parts), f"{url}/full")
    first = train(cfg, decoder_task(cfg, parts), f"{url}/run")
    assert first.final_step == 2 and (local / "run" / "checkpoints" / "2" / "nexus_manifest.json").is_file()
    resumed = train(r(cfg, loop=r(cfg.loop, total_steps=3)), decoder_task(cfg, parts), f"{url}/run")
    assert resumed.resumed_from == 2 and resumed.final_step == 3
    assert resumed.losses[3] == full.losses[3]
    rows = read_step_log(f"{url}/run/steps.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
