"""The decoder's flow-matching loss: conditioning-noise augmentation (``flow_loss.embed_noise``)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

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


# ------------------------------------------------------------------ flow_loss.cond_dropout (classifier-free guidance)
def test_dropped_rows_counts_and_validation():
    assert FlowLossConfig().dropped_rows(16) == 0
    assert FlowLossConfig(cond_dropout=0.125).dropped_rows(16) == 2
    assert FlowLossConfig(cond_dropout=0.01).dropped_rows(16) == 1  # on means at least one row
    with pytest.raises(ValueError, match="drops all 2 rows"):
        FlowLossConfig(cond_dropout=0.9).dropped_rows(2)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="cond_dropout"):
            FlowLossConfig(cond_dropout=bad)


def _per_row(loss_fn, model, batch, key, row):
    """The loss of one row: the filler-row weights select it (same keys, so the same sigma and noise)."""
    weight = np.zeros(batch["pixels"].shape[0], np.float32)
    weight[row] = 1.0
    return float(loss_fn(model, {**batch, "weight": weight}, key)[0])


def test_cond_dropout_conditions_the_last_rows_on_the_empty_prompt(monkeypatch):
    """cond_dropout 0.5 of 2 rows: row 0 keeps its embeddings' loss, row 1's loss is the DiT's on T5("") + CLIP("")
    (what the sampler's negative branch feeds it), whatever that row's embeddings."""
    from nexus_jax.default_checkpoint import randomize_params
    from nexus_jax.models.nexus_decoders import negative_conditioning
    from nexus_jax.training.decoder_loop import DecoderTrainModel

    model, batch = _tiny_loss_inputs()
    randomize_params(model.decoder, 5, scale=0.2)  # the DiT's zero-initialised output layers would hide the context
    t5 = np.random.default_rng(4).normal(0, 0.5, (5, model.decoder.cfg.dit.context_dim)).astype(np.float32)
    key = jax.random.key(9)
    plain = nnx.jit(make_flow_loss(FlowLossConfig()))
    dropout = nnx.jit(make_flow_loss(FlowLossConfig(cond_dropout=0.5), t5))

    np.testing.assert_allclose(_per_row(dropout, model, batch, key, 0), _per_row(plain, model, batch, key, 0),
                               rtol=1e-5)
    got = _per_row(dropout, model, batch, key, 1)
    other = {**batch, "embed": batch["embed"] * np.array([1.0, -3.0], np.float32)[:, None, None]}
    assert _per_row(dropout, model, other, key, 1) == pytest.approx(got, rel=1e-6)  # row 1 ignores its embeddings
    assert abs(_per_row(plain, model, other, key, 1) - _per_row(plain, model, batch, key, 1)) > 1e-3

    neg = negative_conditioning(t5[None], model.pooled[...][None], 2)
    monkeypatch.setattr(DecoderTrainModel, "conditioning", lambda self, b, hw: neg)
    on_negative = nnx.jit(make_flow_loss(FlowLossConfig()))  # a new function: traced with the patched conditioning
    np.testing.assert_allclose(got, _per_row(on_negative, model, batch, key, 1), rtol=1e-5)


def test_cond_dropout_needs_the_empty_prompt():
    with pytest.raises(ValueError, match="empty prompt's T5 context"):
        make_flow_loss(FlowLossConfig(cond_dropout=0.1))
    cfg = TrainConfig(task="generation_decoder")
    parts = decoder_parts(cfg.task, "tiny")
    with pytest.raises(ValueError, match="context_dim"):
        decoder_task(cfg, parts, negative_context=np.zeros((4, parts.decoder.dit.context_dim + 1), np.float32))
