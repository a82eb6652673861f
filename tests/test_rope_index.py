"""M-RoPE position ids vs transformers 5 Qwen2_5_VLModel.get_rope_index (0, 1 and 3 images, left/right padding)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

from nexus_jax.processing.rope_index import get_rope_index

IMG, VS, VE = 151655, 151652, 151653


def hf_rope_index(ids, grids, mask):
    cfg = SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=2, tokens_per_second=2))
    fake = SimpleNamespace(config=cfg)
    fake.get_vision_position_ids = lambda *a, **k: Qwen2_5_VLModel.get_vision_position_ids(fake, *a, **k)
    ids_t = torch.from_numpy(ids)
    pos, deltas = Qwen2_5_VLModel.get_rope_index(
        fake, ids_t, mm_token_type_ids=(ids_t == IMG).int(),
        image_grid_thw=None if grids is None else torch.from_numpy(grids), attention_mask=torch.from_numpy(mask),
    )
    return pos.numpy(), deltas.numpy()


def prompt(rng, images, text_len):
    """Random text with ``images`` (grids) embedded as <vs> pad*n <ve> at random points."""
    ids = list(rng.integers(0, 1000, text_len))
    cuts = sorted(rng.choice(text_len, size=len(images), replace=False).tolist(), reverse=True)
    for cut, grid in zip(cuts, images[::-1]):
        ids[cut:cut] = [VS] + [IMG] * (int(np.prod(grid)) // 4) + [VE]
    return ids


def batch(seqs, left):
    length = max(map(len, seqs))
    ids = np.full((len(seqs), length), 151643, np.int64)
    mask = np.zeros_like(ids)
    for i, s in enumerate(seqs):
        sl = slice(length - len(s), length) if left else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    return ids, mask


@pytest.mark.parametrize("left", [True, False])
def test_rope_index_matches_transformers_0_1_3_images(left):
    rng = np.random.default_rng(0)
    grids = [[1, 36, 22], [1, 4, 4], [1, 18, 18], [1, 2, 40]]
    seqs = [prompt(rng, [], 520), prompt(rng, grids[:1], 37), prompt(rng, grids[1:], 60)]
    ids, mask = batch(seqs, left)
    assert ids.shape[1] > 500
    ours, our_deltas = get_rope_index(ids, np.array(grids), mask)
    ref, ref_deltas = hf_rope_index(ids, np.array(grids), mask)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(our_deltas, ref_deltas)
    assert (ours[1] != ours[2]).any()  # non-square grids exercise distinct h/w streams


def test_rope_index_text_only_is_arange():
    ids, mask = batch([list(range(10)), list(range(4))], left=True)
    pos, deltas = get_rope_index(ids, None, mask)
    np.testing.assert_array_equal(pos[:, 1, 6:], np.broadcast_to(np.arange(4), (3, 4)))
    np.testing.assert_array_equal(pos[:, 1, :6], 0)
    np.testing.assert_array_equal(deltas, 0)


def test_rope_index_rejects_token_feature_mismatch():
    ids = np.array([[1, VS] + [IMG] * 5 + [VE, 2]])
    with pytest.raises(ValueError, match="1 <\\|image_pad\\|> tokens at position 6 have no image left"):
        get_rope_index(ids, np.array([[1, 4, 4]]))  # 5 pads, but a 4x4 grid needs 4: leftover run of 1
    with pytest.raises(ValueError, match="needs 16"):
        get_rope_index(ids, np.array([[1, 8, 8]]))
    with pytest.raises(ValueError, match="2 images but the prompts contain only 1"):
        get_rope_index(np.array([[1, VS] + [IMG] * 4 + [VE]]), np.array([[1, 4, 4], [1, 4, 4]]))
