"""Tiny models overfit a 16-record synthetic set: the loss falls below 20% of its start."""

from __future__ import annotations

import dataclasses

import pytest

from configs.training import TINY_AR
from nexus_jax.data.synthetic import write_ar_dataset
from nexus_jax.nexus.tiny import ByteTokenizer
from nexus_jax.training.ar_loop import ar_task
from nexus_jax.training.loop import train

r = dataclasses.replace


@pytest.mark.slow
def test_tiny_ar_overfits_16_records(tmp_path):
    data = write_ar_dataset(tmp_path / "data", 16, seed=0, text_words=6)
    steps = 60
    cfg = r(TINY_AR, data=r(TINY_AR.data, path=str(data), length_buckets=(256,)),
            optim=r(TINY_AR.optim, learning_rate=1e-2, warmup_steps=5, decay_steps=steps, grad_accum=2),
            checkpoint=r(TINY_AR.checkpoint, every_steps=10_000, resume="none"),
            loop=r(TINY_AR.loop, total_steps=steps, batch_size=16, log_every=10))
    res = train(cfg, ar_task(cfg, ByteTokenizer().encode), tmp_path / "run")
    start, end = res.losses[1], res.losses[steps]
    print(f"tiny AR: loss {start:.4f} -> {end:.4f} ({end / start:.1%} of start)")
    assert end < 0.2 * start
