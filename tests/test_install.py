"""What a new user sees: ``--version``, CLIs whose stderr has no libtpu error block and no deprecation warnings,
outputs with the permissions of the umask (not tempfile's 0600 / 0700), the tqdm progress bar's rate on resume."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import nexus_jax
from nexus_jax import tpu_env

LIBTPU_BLOCK = ("Failed to find host bounds", "unexpected worker hostname")
QUIET_VARS = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "TPU_SKIP_MDS_QUERY")
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def user_env() -> dict[str, str]:
    """The environment of a user's shell: no JAX_PLATFORMS (conftest's), none of the libtpu defaults that importing
    nexus_jax put into this process, warnings shown once each. ``ALLOW_MULTIPLE_LIBTPU_LOAD`` makes libtpu start
    (and complain) even while another process on this machine holds /tmp/libtpu_lockfile."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS", *QUIET_VARS)}
    return {**env, "PYTHONWARNINGS": "default", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TF_CPP_MIN_LOG_LEVEL": "0"}


def run(args: list[str], cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=user_env(), capture_output=True, text=True, timeout=timeout,
                          preexec_fn=lambda: os.umask(0o022))


def nexus_jax_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "nexus_jax.cli", *args], **kw)


def assert_quiet(stderr: str) -> None:
    for text in LIBTPU_BLOCK:
        assert text not in stderr, f"libtpu error block on stderr:\n{stderr[-3000:]}"
    assert "deprecat" not in stderr.lower(), f"deprecation warning on stderr:\n{stderr[-3000:]}"


def modes(root: Path) -> set[tuple[str, str]]:
    """{(kind, octal mode)} of everything under ``root`` (itself included)."""
    out = {("d", oct(stat.S_IMODE(root.stat().st_mode)))}
    for p in root.rglob("*"):
        out.add(("d" if p.is_dir() else "f", oct(stat.S_IMODE(p.stat().st_mode))))
    return out


# ------------------------------------------------------------------------------------------------------ --version
def test_version_flag_prints_the_installed_version():
    r = nexus_jax_cli("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"nexus-jax {nexus_jax.__version__}"
    assert importlib.metadata.version("nexus-jax") == nexus_jax.__version__  # pyproject reads the same attribute
    bad = nexus_jax_cli("no-such-command")
    assert bad.returncode == 2 and "unknown command 'no-such-command'" in bad.stderr


# ---------------------------------------------------------------------------------------------------- libtpu quiet
def test_libtpu_defaults_are_applied_only_without_tpu_chips(monkeypatch):
    for k in QUIET_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # "libtpu is installed"
    monkeypatch.setattr(tpu_env, "tpu_chips_visible", lambda: True)
    assert not tpu_env.quiet_libtpu_without_tpu()
    assert not any(k in os.environ for k in QUIET_VARS), "a TPU host must keep libtpu's own metadata"
    monkeypatch.setattr(tpu_env, "tpu_chips_visible", lambda: False)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.2,10.0.0.3")
    assert tpu_env.quiet_libtpu_without_tpu()
    assert os.environ["TPU_ACCELERATOR_TYPE"] and os.environ["TPU_SKIP_MDS_QUERY"] == "1"
    assert os.environ["TPU_WORKER_HOSTNAMES"] == "10.0.0.2,10.0.0.3", "only defaults: a user's value stays"
    monkeypatch.delenv("TPU_ACCELERATOR_TYPE")
    monkeypatch.setenv("NEXUS_JAX_LIBTPU_ENV", "keep")
    assert not tpu_env.quiet_libtpu_without_tpu() and "TPU_ACCELERATOR_TYPE" not in os.environ
    monkeypatch.setattr(tpu_env, "_google_pci_devices", lambda: False)
    assert not tpu_env.tpu_chips_visible()


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (the tpu extra): it cannot print its block")
def test_generate_cli_stderr_has_no_libtpu_block_or_deprecation(tmp_path):
    if tpu_env.tpu_chips_visible():
        pytest.skip("a TPU host: libtpu starts for real")
    control = run([sys.executable, "-c", "import jax; jax.devices()"])
    assert any(t in control.stderr for t in LIBTPU_BLOCK), "premise: plain JAX makes libtpu print its block here"
    r = nexus_jax_cli("generate", "--config", "tiny", "--prompt", "hi", "--max-new-tokens", "4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert '"generated_ids"' in r.stdout
    assert_quiet(r.stderr)


def test_convert_cli_is_quiet_and_writes_umask_permissions(tmp_path):
    from flax import nnx

    from conversion.families import get_family
    from conversion.state import abstract_params
    from conversion.tables import flux_dit
    from tests.test_conversion_engine import CFG, random_source, write_st

    family = get_family("flux_dit")
    shapes = {k: v.shape for k, v in abstract_params(lambda: family.build(CFG, nnx.Rngs(0)))[1].items()}
    write_st(tmp_path / "src", random_source(flux_dit.diffusers_mapping(CFG), shapes))
    out = tmp_path / "out"
    r = nexus_jax_cli("convert", "import", str(tmp_path / "src"), str(out), "--family", "flux_dit",
                      "--config", "tiny")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_quiet(r.stderr)
    assert "tensor" in r.stderr and "100%" in r.stderr, "the tqdm bar reports the conversion"
    assert modes(out) == {("d", "0o755"), ("f", "0o644")}


# ----------------------------------------------------------------------------------------------------- permissions
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_writes_respect_the_umask(tmp_path, umask):
    from conversion import io as conversion_io
    from nexus_jax import paths
    from nexus_jax.inference import outputs
    from nexus_jax.inference.outputs import OutputDir

    old = os.umask(umask)
    try:
        paths.atomic_write_bytes(tmp_path / "a.bin", b"x")
        outputs.atomic_write_bytes(str(tmp_path / "b.bin"), b"y")
        with conversion_io.atomic_output_dir(tmp_path / "conv") as d:
            (d / "f.json").write_text("{}")
        out = OutputDir(tmp_path / "infer")
        out.write_image("r0", np.zeros((4, 4, 3), np.float32))
        out.record({"id": "r0", "status": "ok"})
        out.finalize(["r0"], {"requests": 1})
        out.close()
    finally:
        os.umask(old)
    file_mode, dir_mode = oct(0o666 & ~umask), oct(0o777 & ~umask)
    assert modes(tmp_path) == {("d", oct(stat.S_IMODE(tmp_path.stat().st_mode))), ("d", dir_mode), ("f", file_mode)}
    assert oct(stat.S_IMODE((tmp_path / "infer" / "images" / "r0.png").stat().st_mode)) == file_mode
    assert oct(stat.S_IMODE((tmp_path / "conv").stat().st_mode)) == dir_mode


# -------------------------------------------------------------------------------------------------------- progress
def test_progress_bar_rate_on_resume_counts_only_this_run():
    from nexus_jax.inference.outputs import Progress

    buf = io.StringIO()
    p = Progress(100, stream=buf, initial=50)
    time.sleep(0.3)
    p.update(5, failed=1)
    line = p.line()
    assert "55/100 requests (1 failed)" in line and "req/s" in line and "ETA" in line
    elapsed = time.perf_counter() - p.start
    assert p.rate() == pytest.approx(5 / elapsed, rel=0.2)  # not 55 / elapsed
    shown = float(line.rsplit(", ", 1)[1].removesuffix("req/s]"))
    assert shown < 2 * 5 / 0.3, f"the bar's rate counts the resumed requests: {line}"
    p.close()
    assert "55/100" in buf.getvalue() and buf.getvalue().endswith("\n")
