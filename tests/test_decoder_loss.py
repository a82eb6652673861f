"""The decoder's flow-matching loss: conditioning-noise augmentation (``flow_loss.embed_noise``)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from configs.training import FlowLossConfig, TrainConfig
from nexus_jax.training.decoder_loop import decoder_parts, decoder_task, make_flow_loss, noisy_embed


def test_noisy_embed_scales_with_each_records_rms():
    rng = np.random.default_rng(0)
    embed = np.stack([rng.normal(0, 1, (81, 256)), rng.normal(0.5, 0.1, (81, 256))]).astype(np.float32)
    key = jax.random.key(1)
    assert np.array_equal(np.asarray(noisy_embed(embed, key, 0.0)), embed)
    noisy = np.asarray(noisy_embed(embed, key, 0.25))
    rms = np.sqrt(np.mean(embed ** 2, axis=(1, 2)))
    std = (noisy - embed).std(axis=(1, 2))
    np.testing.assert_allclose(std, 0.25 * rms, rtol=0.02)  # 20736 draws a record: std within ~1%
    assert np.abs((noisy - embed).mean(axis=(1, 2))).max() < 0.01 * rms.min()
    assert not np.array_equal(noisy, np.asarray(noisy_embed(embed, jax.random.key(2), 0.25)))


def _tiny_loss_inputs():
    cfg = TrainConfig(task="generation_decoder")
    parts = decoder_parts(cfg.task, "tiny")
    model = decoder_task(cfg, parts).model_ctor()
    rng = np.random.default_rng(3)
    batch = {"pixels": rng.uniform(-1, 1, (2, 32, 48, 3)).astype(np.float32),
             "embed": rng.normal(0, 0.5, (2, parts.embed_rows, parts.embed_dim)).astype(np.float32)}
    return model, batch


def test_flow_loss_applies_embed_noise_before_the_conditioner():
    """With embed_noise the loss is the plain loss of the noised embeddings: the noise takes its own key first."""
    model, batch = _tiny_loss_inputs()
    key = jax.random.key(7)
    plain = make_flow_loss(FlowLossConfig())
    augmented = make_flow_loss(FlowLossConfig(embed_noise=0.3))
    rest, k_e = jax.random.split(key)
    expected, _ = plain(model, {**batch, "embed": noisy_embed(batch["embed"], k_e, 0.3)}, rest)
    got, _ = augmented(model, batch, key)
    np.testing.assert_allclose(float(got), float(expected), rtol=1e-6)
    unaugmented, _ = plain(model, batch, key)
    assert abs(float(unaugmented) - float(got)) > 1e-6  # the noise reaches the loss


def test_embed_noise_is_validated():
    with pytest.raises(ValueError, match="embed_noise"):
        FlowLossConfig(embed_noise=-0.1)
    assert dataclasses.replace(FlowLossConfig(), embed_noise=0.2).embed_noise == 0.2
