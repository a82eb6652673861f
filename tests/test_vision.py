"""Qwen2.5-VL ViT vs transformers (fp32, two non-square images with several windows), sharding, layout checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from configs.qwen2_5_vl import QWEN25_VISION_TINY as CFG
from nexus_jax import sharding
from nexus_jax.models.qwen2_5_vl.vision import Qwen25VisionTransformer, pad_pixels
from nexus_jax.models.qwen2_5_vl.vision_layout import vision_layout
from tests.helpers.qwen2_5_vl_reference import reference_vision_pair

# 112x168 px -> 8x12 patches -> 4x6 merged -> 2x3 full windows; 84x140 px -> 3x5 merged -> 2x3 windows (partial).
GRID = np.array([[1, 8, 12], [1, 6, 10]])


@pytest.fixture(scope="module")
def vit_pair():
    torch.set_num_threads(1)
    return reference_vision_pair(CFG, seed=0, std=0.2)  # larger than the default init, so every block matters


@pytest.fixture(scope="module")
def torch_vit(vit_pair):
    return vit_pair[0]


@pytest.fixture(scope="module")
def jax_vit(vit_pair):
    return vit_pair[1]


def pixels(grid, seed=0):
    n = int(grid.prod(1).sum())
    return np.random.default_rng(seed).standard_normal((n, CFG.patch_dim)).astype(np.float32)


def reference(torch_vit, px, grid):
    with torch.no_grad():
        return torch_vit(torch.from_numpy(px), grid_thw=torch.from_numpy(grid)).pooler_output.numpy()


def test_layout_has_several_windows_and_is_a_permutation():
    layout = vision_layout(GRID, CFG)
    assert layout.window_valid.any(1).sum() == 12
    assert sorted(layout.patch_order.tolist()) == list(range(layout.num_patches))
    assert (layout.window_valid.sum(1) < layout.window_valid.shape[1]).any()  # partial windows exist
    assert layout.frame_valid.sum(1).tolist() == [96, 60]  # one attention group per image for full attention


def test_vision_matches_transformers(torch_vit, jax_vit):
    px = pixels(GRID)
    ref = reference(torch_vit, px, GRID)
    for frame_groups in (True, False):  # full attention via padded frame groups / via the dense segment mask
        out = np.asarray(jax_vit.encode(px, GRID, frame_groups=frame_groups))
        err = np.abs(out - ref).max()
        print(f"vision tower (frame_groups={frame_groups}) max abs error {err:.3g} (|ref| max {np.abs(ref).max():.3g})")
        assert out.shape == ref.shape == (int(GRID.prod(1).sum()) // 4, CFG.out_hidden_size)
        assert err <= 1e-4


def test_vision_jit_buckets_are_shape_stable(torch_vit, jax_vit):
    graphdef, state = nnx.split(jax_vit)

    @jax.jit
    def forward(state, px, idx):
        return nnx.merge(graphdef, state)(px, **idx)

    for grid in (GRID, np.array([[1, 4, 6], [1, 2, 2], [1, 10, 4]])):
        layout = vision_layout(grid, CFG, pad_patches_to=256, pad_windows_to=16, pad_frames_to=4,
                               pad_frame_slots_to=128)
        px = pixels(grid, seed=1)
        out = forward(state, pad_pixels(px, layout), layout.arrays(frame_groups=True))[: layout.num_merged]
        assert np.abs(np.asarray(out) - reference(torch_vit, px, grid)).max() <= 1e-4
    assert forward._cache_size() == 1


def test_vision_sharded_equals_unsharded(jax_vit):
    px = pixels(GRID, seed=2)
    layout = vision_layout(GRID, CFG)
    idx = {k: jnp.asarray(v) for k, v in layout.arrays().items()}
    expected = np.asarray(jax_vit.encode(px, GRID))  # frame groups; the sharded run below uses the dense mask
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    graphdef, state = nnx.split(jax_vit)
    state = jax.device_put(state, sharding.state_shardings(state, mesh, sharding.TRAIN_RULES))
    qkv = state["blocks"][0]["attn"]["qkv"]["kernel"].get_value()
    assert qkv.sharding.spec == jax.sharding.PartitionSpec("fsdp", None, "tensor")
    down = state["blocks"][0]["mlp"]["down_proj"]["kernel"].get_value()
    assert down.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")

    @jax.jit
    def forward(state, px, idx):
        return nnx.merge(graphdef, state)(px, **idx)

    with sharding.sharding_context(mesh, sharding.TRAIN_RULES):
        out = forward(state, jnp.asarray(px), idx)
    err = np.abs(np.asarray(out) - expected).max()
    print(f"vision sharded vs unsharded max abs error {err:.3g}")
    assert err <= 1e-5


def test_vision_rejects_bad_input(jax_vit):
    with pytest.raises(ValueError, match="smaller than one 2x2 merge unit"):
        vision_layout(np.array([[1, 1, 4]]), CFG)
    with pytest.raises(ValueError, match="must be multiples of spatial_merge_size 2"):
        vision_layout(np.array([[1, 4, 5]]), CFG)
    with pytest.raises(ValueError, match="pixel_values has 10 patches but grid_thw describes 16"):
        jax_vit.encode(np.zeros((10, CFG.patch_dim), np.float32), np.array([[1, 4, 4]]))


def test_full_size_parameter_count_and_shapes():
    from configs.qwen2_5_vl import QWEN25_VISION_7B

    model = nnx.eval_shape(lambda: Qwen25VisionTransformer(QWEN25_VISION_7B, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    sizes = {".".join(map(str, path)): int(np.prod(v.shape)) for path, v in nnx.to_flat_state(params)}
    assert sum(sizes.values()) == 676_550_144  # blocks 630,470,400 + patch embed 1,505,280 + merger 44,574,464
    assert sizes["patch_embed.proj.kernel"] == 1_505_280
    assert sum(v for k, v in sizes.items() if k.startswith("merger.")) == 44_574_464
    assert model.blocks[7].full_attention and not model.blocks[8].full_attention
