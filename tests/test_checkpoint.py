"""Orbax train-state checkpoints: resharding restore, integrity manifests, interrupted saves, keep-last-N."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.training import OptimConfig
from nexus_jax import layers, sharding
from nexus_jax.training import state as state_lib
from nexus_jax.training.checkpoint import MANIFEST, Checkpointer, CheckpointError

RULES = sharding.TRAIN_RULES


class TwoLayer(nnx.Module):
    """Test fixture: a 2-layer MLP whose kernels shard over fsdp and tensor."""

    def __init__(self, rngs: nnx.Rngs):
        self.up = layers.Linear(16, 64, axes=("embed", "mlp"), rngs=rngs)
        self.down = layers.Linear(64, 8, axes=("mlp", "embed"), rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


def mse_loss(model, batch, rng):
    err = model(batch["x"]) - batch["y"]
    loss = jnp.mean(err * err)
    return loss, {"mse": loss}


OPTIM = OptimConfig(learning_rate=1e-2, warmup_steps=1, decay_steps=20, grad_accum=2, weight_decay=0.01)


def _batch(seed: int) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    return {"x": r.standard_normal((8, 16)).astype(np.float32), "y": r.standard_normal((8, 8)).astype(np.float32)}


def _setup(mesh, seed=0):
    graphdef, state, abstract = state_lib.init_train_state(lambda: TwoLayer(nnx.Rngs(seed)), OPTIM, mesh, RULES, 3)
    state_sh = jax.tree.map(lambda a: a.sharding, abstract)
    batch_sh = state_lib.batch_shardings(_batch(0), mesh, RULES)
    step = state_lib.jit_train_step(state_lib.make_train_step(graphdef, mse_loss, OPTIM), state_sh, batch_sh)
    return state, abstract, step


def _run(step, state, mesh, seeds):
    losses = []
    with sharding.sharding_context(mesh, RULES):
        for s in seeds:
            state, m = step(state, _batch(s))
            losses.append(float(m["loss"]))
    return state, losses


def test_resharding_restore_fsdp8_to_data2_fsdp4(tmp_path):
    mesh_a = sharding.make_mesh(data=1, fsdp=8)
    state, _, step_a = _setup(mesh_a)
    state, _ = _run(step_a, state, mesh_a, [1, 2, 3])
    kernel = state["params"]["up"]["kernel"][...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    ckpt = Checkpointer(tmp_path / "ck", keep_last=2)
    saved_host = [np.asarray(x) for x in jax.tree.leaves(state)]
    ckpt.save(3, state, {"next": 3})
    _, next_a = _run(step_a, state, mesh_a, [4])

    mesh_b = sharding.make_mesh(data=2, fsdp=4)
    _, abstract_b, step_b = _setup(mesh_b, seed=99)  # different init: restore must overwrite everything
    restored, data_state = ckpt.restore(3, abstract_b)
    ckpt.close()
    assert data_state == {"next": 3}
    rk = restored["params"]["up"]["kernel"][...]
    assert rk.sharding.mesh.shape == {"data": 2, "fsdp": 4, "tensor": 1}
    assert rk.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert len({str(s.index) for s in rk.addressable_shards}) == 4  # really split four ways
    for a, b in zip(saved_host, jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    _, next_b = _run(step_b, restored, mesh_b, [4])
    print(f"next-step loss fsdp=8: {next_a[0]!r}  data=2 x fsdp=4: {next_b[0]!r}  diff {abs(next_a[0]-next_b[0]):.2e}")
    assert abs(next_a[0] - next_b[0]) <= 1e-6


def _saved(tmp_path, steps=(1, 2), keep_last=3):
    mesh = sharding.make_mesh(data=1, fsdp=8)
    state, _, step = _setup(mesh)
    ckpt = Checkpointer(tmp_path / "ck", keep_last=keep_last)
    for s in steps:
        state, _ = _run(step, state, mesh, [s])
        ckpt.save(s, state, {"next": s})
    ckpt.wait()
    return ckpt, mesh


def _largest_file(step_dir: Path) -> Path:
    files = [p for p in Path(step_dir).rglob("*") if p.is_file() and p.name != MANIFEST]
    return max(files, key=lambda p: p.stat().st_size)


def test_truncated_file_detected_and_latest_valid_falls_back(tmp_path):
    ckpt, mesh = _saved(tmp_path)
    victim = _largest_file(ckpt.step_dir(2))
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    _, abstract, _ = _setup(mesh)
    with pytest.raises(CheckpointError, match=r"truncated .*expected"):
        ckpt.restore(2, abstract)
    with pytest.raises(CheckpointError, match=victim.name):
        ckpt.resolve("latest")
    assert ckpt.resolve("latest-valid") == 1
    restored, data_state = ckpt.restore(1, abstract)
    assert data_state == {"next": 1} and int(restored["step"]) == 1
    ckpt.close()


def test_missing_and_corrupt_files_detected(tmp_path):
    ckpt, _ = _saved(tmp_path)
    victim = _largest_file(ckpt.step_dir(2))
    victim.unlink()
    with pytest.raises(CheckpointError, match=r"is missing"):
        ckpt.verify(2)
    victim = _largest_file(ckpt.step_dir(1))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, flipped bits
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"CRC32"):
        ckpt.verify(1)
    assert ckpt.resolve("latest-valid") is None
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 7"):
        ckpt.resolve("7")
    ckpt.close()


def test_keep_last_n(tmp_path):
    ckpt, _ = _saved(tmp_path, steps=(1, 2, 3, 4), keep_last=2)
    assert ckpt.all_steps() == [3, 4]
    ckpt.verify(3)
    ckpt.verify(4)
    ckpt.close()


_INTERRUPTED_SAVE = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp
    from nexus_jax.training import checkpoint as ck
    state = {"w": jnp.arange(4_000_000, dtype=jnp.float32), "step": jnp.int32(1)}
    c = ck.Checkpointer(sys.argv[1], keep_last=3)
    c.save(1, state, {"next": 1}); c.wait()
    # Fault injection: the step-2 save blocks after Orbax has committed its files but before the manifest exists.
    real = ck.write_manifest
    def slow(step_dir, checksum=True):
        print("COMMITTED", flush=True)
        time.sleep(600)
    ck.write_manifest = slow
    c.save(2, {"w": state["w"] + 1, "step": jnp.int32(2)}, {"next": 2})
    print("SAVING", flush=True)
    time.sleep(600)
""")


def test_interrupted_save_never_looks_complete(tmp_path):
    """SIGKILL a real process while its step-2 save is in flight: step 2 must not be restorable."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", _INTERRUPTED_SAVE, str(tmp_path / "ck")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    seen = []
    deadline = time.time() + 120
    while time.time() < deadline and "COMMITTED" not in seen:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line.strip())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "COMMITTED" in seen, seen
    assert proc.returncode == -signal.SIGKILL
    ckpt = Checkpointer(tmp_path / "ck", keep_last=3)
    assert 2 in ckpt.all_steps()  # Orbax itself considers it finished ...
    with pytest.raises(CheckpointError, match=r"incomplete"):
        ckpt.verify(2)  # ... but without its manifest it never counts as complete
    assert ckpt.resolve("latest-valid") == 1
    with pytest.raises(CheckpointError, match=r"incomplete"):
        ckpt.resolve("latest")
    ckpt.close()
