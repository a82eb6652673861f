"""The Nexus-Gen objective as pure functions vs a torch implementation written from the specification."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nexus_jax.nexus import loss as L
from nexus_jax.nexus.slots import check_slot_count, scatter_rows

IMG = 7  # image_pad id in these synthetic batches
VOCAB = 11


def torch_objective(logits, embeds, labels, targets_rows, token_w, image_w):
    """Spec (nexus-gen.md 1.7): CE on shifted labels with image labels ignored + 0.5 MSE + 0.5 (1 - cos)."""
    logits, embeds, labels = torch.as_tensor(logits), torch.as_tensor(embeds), torch.as_tensor(labels).long()
    ce_labels = labels.clone()
    ce_labels[labels == IMG] = -100
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ce_labels[:, 1:].reshape(-1))
    sel = labels[:, 1:] == IMG
    pred = embeds[:, :-1][sel]
    tgt = torch.as_tensor(targets_rows)
    img = 0.5 * F.mse_loss(pred, tgt) + 0.5 * (1 - F.cosine_similarity(pred, tgt, dim=-1)).mean()
    if tgt.shape[0] == 0:
        img = img.nan_to_num(0.0)
    return (token_w * ce + image_w * img).item(), ce.item(), img.item()


def _batch(rng, b=3, length=40, dim=24, slots=(5, 0, 9)):
    """Random logits/embeds and labels with prompt (-100), text labels and runs of output slots per row."""
    logits = rng.standard_normal((b, length, VOCAB)).astype(np.float32) * 3
    embeds = rng.standard_normal((b, length, dim)).astype(np.float32)
    labels = np.full((b, length), -100, np.int64)
    for i, n in enumerate(slots):
        start = 10 + i
        labels[i, start:] = rng.integers(0, VOCAB - 1, length - start)
        labels[i, labels[i] == IMG] = 3
        labels[i, start + 2 : start + 2 + n] = IMG
    return logits, embeds, labels


@pytest.mark.parametrize("slots", [(5, 0, 9), (4, 4, 4)])
def test_loss_matches_torch_reference(slots):
    rng = np.random.default_rng(0)
    logits, embeds, labels = _batch(rng, slots=slots)
    n_rows = int((labels == IMG).sum())
    rows = rng.standard_normal((n_rows, embeds.shape[-1])).astype(np.float32)
    targets = np.asarray(scatter_rows(jnp.asarray(rows), jnp.asarray(labels == IMG)))
    want, want_ce, want_img = torch_objective(logits, embeds, labels, rows, 3.0, 3.0)
    got, metrics = L.nexus_ar_loss(
        jnp.asarray(logits), jnp.asarray(embeds), jnp.asarray(labels), jnp.asarray(targets),
        image_token_id=IMG, token_weight=3.0, image_weight=3.0,
    )
    err = max(abs(float(got) - want), abs(float(metrics["token_loss"]) - want_ce),
              abs(float(metrics["image_loss"]) - want_img))
    print(f"loss {float(got):.6f} vs torch {want:.6f}, max abs err {err:.2e}")
    assert err < 1e-5
    assert int(metrics["num_slots"]) == n_rows  # every slot is regressed (slot k from position k - 1)


def test_no_output_image_gives_zero_image_loss_and_finite_grads():
    rng = np.random.default_rng(1)
    logits, embeds, labels = _batch(rng, slots=(0, 0, 0))
    targets = np.zeros_like(embeds)

    def f(e):
        loss, m = L.nexus_ar_loss(jnp.asarray(logits), e, jnp.asarray(labels), jnp.asarray(targets),
                                  image_token_id=IMG, token_weight=0.1, image_weight=1.0)
        return loss, m

    (loss, m), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(embeds))
    assert float(m["image_loss"]) == 0.0 and int(m["num_slots"]) == 0
    assert np.isfinite(float(loss)) and np.all(np.asarray(g) == 0.0)
    want, _, _ = torch_objective(logits, embeds, labels, np.zeros((0, embeds.shape[-1]), np.float32), 0.1, 1.0)
    assert abs(float(loss) - want) < 1e-5


def test_image_loss_gradient_matches_torch():
    rng = np.random.default_rng(2)
    logits, embeds, labels = _batch(rng)
    rows = rng.standard_normal((int((labels == IMG).sum()), embeds.shape[-1])).astype(np.float32)
    targets = scatter_rows(jnp.asarray(rows), jnp.asarray(labels == IMG))
    g = jax.grad(lambda e: L.image_embedding_loss(e, targets, jnp.asarray(labels), IMG)[0])(jnp.asarray(embeds))
    te = torch.tensor(embeds, requires_grad=True)
    sel = torch.as_tensor(labels[:, 1:] == IMG)
    pred = te[:, :-1][sel]
    tgt = torch.as_tensor(np.asarray(targets)[:, 1:][labels[:, 1:] == IMG])
    (0.5 * F.mse_loss(pred, tgt) + 0.5 * (1 - F.cosine_similarity(pred, tgt, dim=-1)).mean()).backward()
    assert np.abs(np.asarray(g) - te.grad.numpy()).max() < 1e-6


def test_scatter_rows_places_rows_in_row_major_order():
    mask = np.array([[0, 1, 1, 0], [1, 0, 0, 1]], bool)
    rows = np.arange(8, dtype=np.float32).reshape(4, 2)
    out = np.asarray(scatter_rows(jnp.asarray(rows), jnp.asarray(mask)))
    np.testing.assert_array_equal(out[mask], rows)
    assert np.all(out[~mask] == 0)


def test_bad_inputs_raise():
    rng = np.random.default_rng(3)
    logits, embeds, labels = _batch(rng)
    with pytest.raises(ValueError, match="targets shape"):
        L.nexus_ar_loss(jnp.asarray(logits), jnp.asarray(embeds), jnp.asarray(labels), jnp.zeros((1, 2, 3)),
                        image_token_id=IMG, token_weight=1.0, image_weight=1.0)
    labels[0, -1] = VOCAB + 5
    with pytest.raises(ValueError, match=f"label {VOCAB + 5} is outside the vocabulary"):
        L.token_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), IMG)
    with pytest.raises(ValueError, match="3 slots but 2 feature rows"):
        check_slot_count(np.array([[1, 1, 1]], bool), 2, "target image")
