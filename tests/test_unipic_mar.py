"""UniPic-1 MAR encoder/decoder, ViT block, positional resize and projectors vs the torch reference (fp32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from configs.mar import MARConfig
from nexus_jax.models.unipic.mar import MAR
from nexus_jax.models.unipic.pos_embed import bilinear_matrix, resize_grid, resize_pos_embed
from nexus_jax.models.unipic.projectors import make_proj_in, make_proj_out, project
from nexus_jax.models.unipic.vit import Block
from nexus_jax.sharding import TRAIN_RULES, make_mesh, shard_module, sharding_context
from tests.helpers.mar_torch import TorchBlock, TorchMAR, load_into_nnx, randomize_, torch_projector

CFG = MARConfig.tiny()
B = 3


def _err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _masks(rng: np.random.Generator, b: int, n: int, n_masked: int) -> np.ndarray:
    """[b, n] float32 with exactly n_masked ones per row (random positions)."""
    mask = np.zeros((b, n), np.float32)
    for i in range(b):
        mask[i, rng.permutation(n)[:n_masked]] = 1.0
    return mask


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    tm = randomize_(TorchMAR(CFG).eval(), seed=1)
    jm = MAR(CFG, rngs=nnx.Rngs(0))
    load_into_nnx(jm, tm)
    return tm, jm


def _visible_rows(x_full: np.ndarray, mask: np.ndarray, buffer: int) -> np.ndarray:
    """Full-length [B, buffer + N, C] -> [B, buffer + N_vis, C] (torch's dropped layout)."""
    keep = np.concatenate([np.ones((mask.shape[0], buffer), bool), mask == 0], axis=1)
    return np.stack([x_full[i][keep[i]] for i in range(mask.shape[0])])


def test_block_parity_and_key_mask():
    dim, heads, length = 48, 3, 7
    torch.manual_seed(0)
    tb = randomize_(TorchBlock(dim, heads).eval(), seed=2)
    jb = Block(dim, heads, rngs=nnx.Rngs(0))
    load_into_nnx(jb, tb)
    x = np.random.default_rng(0).standard_normal((B, length, dim)).astype(np.float32)
    with torch.no_grad():
        ref = tb(torch.from_numpy(x)).numpy()
    run = jax.jit(lambda m, v, k: (m(v), m(v, k)))
    # key mask: dropping keys in torch == masking them as keys here (same kept count per row)
    keep = np.ones((B, length), bool)
    keep[0, [1, 4]] = keep[1, [0, 6]] = keep[2, [2, 3]] = False
    with torch.no_grad():
        ref_m = tb(torch.from_numpy(np.stack([x[i][keep[i]] for i in range(B)]))).numpy()
    out, out_m = run(jb, jnp.asarray(x), jnp.asarray(keep))
    out_m = np.asarray(out_m)
    err, err_m = _err(out, ref), _err(np.stack([out_m[i][keep[i]] for i in range(B)]), ref_m)
    print(f"block max abs err {err:.2e}, with key mask {err_m:.2e}")
    assert err <= 1e-5 and err_m <= 1e-5


@pytest.mark.parametrize("src,dst", [((4, 4), (6, 6)), ((4, 4), (3, 3)), ((4, 4), (3, 7)), ((5, 3), (2, 8))])
def test_resize_matches_torch_bilinear(src, dst):
    c = 5
    table = np.random.default_rng(1).standard_normal((1, src[0] * src[1], c)).astype(np.float32)
    grid = torch.from_numpy(table).reshape(1, *src, c).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=dst, mode="bilinear").permute(0, 2, 3, 1).reshape(1, -1, c).numpy()
    err = _err(resize_grid(jnp.asarray(table), src, dst), ref)
    print(f"resize {src}->{dst} max abs err {err:.2e}")
    assert err <= 1e-6
    buf = np.random.default_rng(2).standard_normal((1, 2, c)).astype(np.float32)
    full = resize_pos_embed(jnp.asarray(np.concatenate([buf, table], 1)), 2, src, dst)
    np.testing.assert_array_equal(np.asarray(full[:, :2]), buf)
    assert _err(full[:, 2:], ref) <= 1e-6


def test_jax_image_resize_differs_on_downsampling():
    """Why pos_embed.py writes the torch formula: jax.image.resize antialiases when shrinking."""
    x = np.random.default_rng(3).standard_normal((8, 8)).astype(np.float32)
    ours = bilinear_matrix(8, 3) @ x @ bilinear_matrix(8, 3).T
    assert _err(jax.image.resize(jnp.asarray(x), (3, 3), "bilinear"), ours) > 1e-2
    np.testing.assert_allclose(bilinear_matrix(4, 4), np.eye(4), atol=0)


@pytest.mark.parametrize("grid", [(4, 4), (6, 6), (3, 3), (3, 5)])
def test_encoder_decoder_parity(models, grid):
    tm, jm = models
    n = grid[0] * grid[1]
    rng = np.random.default_rng(sum(grid))
    x = rng.standard_normal((B, n, CFG.token_embed_dim)).astype(np.float32)
    mask = _masks(rng, B, n, n_masked=n // 2 + 1)
    ce = rng.standard_normal((B, CFG.width)).astype(np.float32)
    with torch.no_grad():
        ref_enc = tm.forward_mae_encoder(torch.from_numpy(x), torch.from_numpy(mask), torch.from_numpy(ce), grid)
        ref_z = tm.forward_mae_decoder(ref_enc, torch.from_numpy(mask), grid).numpy()
        x_con = tm.forward_mae_encoder(torch.from_numpy(x[::-1].copy()), torch.zeros(B, n), torch.from_numpy(ce), grid)
        ref_zc = tm.forward_mae_decoder(ref_enc, torch.from_numpy(mask), grid, x_con=x_con).numpy()
    enc = jax.jit(lambda m, a, k, c: m.forward_mae_encoder(a, k, c, grid))(jm, jnp.asarray(x), jnp.asarray(mask), ce)
    err_enc = _err(_visible_rows(np.asarray(enc), mask, CFG.buffer_size), ref_enc.numpy())
    # masked rows of x_enc are don't-care for the decoder: overwrite them with noise
    junk = np.where(np.concatenate([np.zeros((B, CFG.buffer_size)), mask], 1)[..., None] > 0,
                    rng.standard_normal(enc.shape).astype(np.float32) * 100, np.asarray(enc))
    dec = jax.jit(lambda m, e, k, xc: m.forward_mae_decoder(e, k, grid, x_con=xc))
    z = dec(jm, jnp.asarray(junk), jnp.asarray(mask), None)
    zc = dec(jm, enc, jnp.asarray(mask), jnp.asarray(x_con.numpy()))
    err_z, err_zc = _err(z, ref_z), _err(zc, ref_zc)
    print(f"grid {grid}: encoder {err_enc:.2e}, decoder {err_z:.2e}, decoder+x_con {err_zc:.2e}")
    assert z.shape == (B, n, CFG.width)
    assert max(err_enc, err_z, err_zc) <= 1e-4
    assert _err(zc, z) > 1e-3  # x_con really changes the masked slots


def test_unequal_masked_counts_per_row(models):
    """Key masking allows different masked counts per row; each row equals torch run on that row alone."""
    tm, jm = models
    n = CFG.seq_len
    rng = np.random.default_rng(7)
    x = rng.standard_normal((B, n, CFG.token_embed_dim)).astype(np.float32)
    mask = np.concatenate([_masks(rng, 1, n, k) for k in (0, 5, n - 1)])
    ce = np.array(jm.fake_class_embedding(B))

    def run(m, a, k, c):
        e = m.forward_mae_encoder(a, k, c)
        return e, m.forward_mae_decoder(e, k)

    enc, z = (np.asarray(t) for t in jax.jit(run)(jm, jnp.asarray(x), jnp.asarray(mask), jnp.asarray(ce)))
    errs = []
    for i in range(B):
        with torch.no_grad():
            r = tm.forward_mae_encoder(torch.from_numpy(x[i : i + 1]), torch.from_numpy(mask[i : i + 1]),
                                       torch.from_numpy(ce[i : i + 1]))
            rz = tm.forward_mae_decoder(r, torch.from_numpy(mask[i : i + 1])).numpy()
        errs += [_err(_visible_rows(enc[i : i + 1], mask[i : i + 1], CFG.buffer_size), r.numpy()), _err(z[i], rz[0])]
    print(f"unequal masked counts: max abs err {max(errs):.2e}")
    assert max(errs) <= 1e-4


@pytest.mark.parametrize("capacity", [11, 16])
def test_encoder_on_gathered_visible_tokens(models, capacity):
    """``capacity`` runs the blocks on the visible tokens only (torch's dropping; padded slots are masked keys):
    visible rows equal torch run row by row, masked rows are zero; capacity 0 (nothing visible) gives the buffers."""
    tm, jm = models
    n = CFG.seq_len
    rng = np.random.default_rng(8)
    x = rng.standard_normal((B, n, CFG.token_embed_dim)).astype(np.float32)
    mask = np.concatenate([_masks(rng, 1, n, k) for k in (n - 11, n - 3, n - 7)])  # 11, 3, 7 visible
    ce = np.array(jm.fake_class_embedding(B))
    enc = np.asarray(jax.jit(lambda m, a, k, c: m.forward_mae_encoder(a, k, c, capacity=capacity))(
        jm, jnp.asarray(x), jnp.asarray(mask), jnp.asarray(ce)))
    errs = []
    for i in range(B):
        with torch.no_grad():
            r = tm.forward_mae_encoder(torch.from_numpy(x[i : i + 1]), torch.from_numpy(mask[i : i + 1]),
                                       torch.from_numpy(ce[i : i + 1])).numpy()
        errs.append(_err(_visible_rows(enc[i : i + 1], mask[i : i + 1], CFG.buffer_size), r))
    print(f"encoder on gathered visible tokens (capacity {capacity}): max abs err {max(errs):.2e}")
    assert max(errs) <= 1e-4
    assert not np.any(enc[:, CFG.buffer_size:][mask == 1])
    all_masked = jnp.ones((B, n))
    e0, ef = jax.jit(lambda m, a, k, c: (m.forward_mae_encoder(a, k, c, capacity=0), m.forward_mae_encoder(a, k, c)))(
        jm, jnp.asarray(x), all_masked, jnp.asarray(ce))
    assert _err(e0[:, : CFG.buffer_size], ef[:, : CFG.buffer_size]) <= 1e-5
    with pytest.raises(ValueError, match="capacity"):
        jm.forward_mae_encoder(jnp.asarray(x), jnp.asarray(mask), jnp.asarray(ce), capacity=n + 1)


def test_unmasked_helper_matches_forward(models):
    _, jm = models
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, CFG.seq_len, 16)), jnp.float32)
    a, b = jax.jit(lambda m, v: (m.mar_encoder_unmasked(v), m.forward_mae_encoder(
        v, jnp.zeros((2, CFG.seq_len)), jnp.broadcast_to(m.fake_latent[...], (2, CFG.width)))))(jm, x)
    assert a.shape == (2, CFG.buffer_size + CFG.seq_len, CFG.width)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_projectors_parity():
    torch.manual_seed(0)
    t_in = randomize_(torch_projector(CFG.width, CFG.llm_hidden, CFG.llm_hidden), seed=3)
    t_out = randomize_(torch_projector(CFG.llm_hidden, CFG.llm_hidden, CFG.width), seed=4)
    j_in, j_out = make_proj_in(CFG, rngs=nnx.Rngs(0)), make_proj_out(CFG, rngs=nnx.Rngs(1))
    load_into_nnx(j_in, t_in)
    load_into_nnx(j_out, t_out)
    x = np.random.default_rng(5).standard_normal((B, 5, CFG.width)).astype(np.float32)
    with torch.no_grad():
        ref = t_out(t_in(torch.from_numpy(x))).numpy()
        ref_in = t_in(torch.from_numpy(x)).numpy()
    h = project(j_in, jnp.asarray(x))
    err_in, err = _err(h, ref_in), _err(project(j_out, h), ref)
    print(f"proj_in max abs err {err_in:.2e}, proj_out(proj_in) {err:.2e}")
    assert h.shape == (B, 5, CFG.llm_hidden) and max(err_in, err) <= 1e-5


def test_sharded_equals_unsharded(models):
    _, jm = models
    rng = np.random.default_rng(6)
    n = 36
    x = jnp.asarray(rng.standard_normal((4, n, 16)), jnp.float32)
    mask = jnp.asarray(_masks(rng, 4, n, 20))

    def run(m, a, k):
        enc = m.forward_mae_encoder(a, k, m.fake_class_embedding(a.shape[0]), (6, 6))
        return m.forward_mae_decoder(enc, k, (6, 6))

    ref = np.asarray(jax.jit(run)(jm, x, mask))
    sharded = MAR(CFG, rngs=nnx.Rngs(0))
    nnx.update(sharded, nnx.state(jm))
    mesh = make_mesh(2, 2, 2)
    shard_module(sharded, mesh, TRAIN_RULES)
    with sharding_context(mesh, TRAIN_RULES):
        out = jax.jit(run)(sharded, x, mask)
    kernel = sharded.encoder_blocks[0].mlp.fc1.kernel[...]
    assert len(kernel.sharding.device_set) == 8
    err = _err(out, ref)
    print(f"sharded (2,2,2) vs unsharded max abs err {err:.2e}")
    assert err <= 1e-5


def test_dropout_only_with_key():
    block = Block(48, 3, proj_dropout=0.5, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(8).standard_normal((2, 5, 48)), jnp.float32)
    run = jax.jit(lambda m, v, key: (m(v), m(v, dropout_key=key)))
    plain, dropped = run(block, x, jax.random.key(1))
    rate0_plain, rate0_keyed = run(Block(48, 3, rngs=nnx.Rngs(0)), x, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(rate0_plain))  # no key: dropout off
    np.testing.assert_array_equal(np.asarray(rate0_keyed), np.asarray(rate0_plain))  # rate 0: key ignored
    assert _err(dropped, plain) > 1e-3


@pytest.mark.slow
def test_remat_same_values_and_grads(models):
    _, jm = models
    remat = MAR(MARConfig.tiny(remat="full"), rngs=nnx.Rngs(0))
    nnx.update(remat, nnx.state(jm))
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.standard_normal((2, CFG.seq_len, 16)), jnp.float32)
    mask = jnp.asarray(_masks(rng, 2, CFG.seq_len, 9))

    def loss(m):
        enc = m.forward_mae_encoder(x, mask, m.fake_class_embedding(2))
        return jnp.sum(m.forward_mae_decoder(enc, mask) ** 2)

    grad = jax.jit(nnx.value_and_grad(loss))
    (v0, g0), (v1, g1) = grad(jm), grad(remat)
    err = max(_err(a, b) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True))
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g0))
    print(f"remat full vs none: loss {abs(float(v0 - v1)):.2e}, grads max abs err {err:.2e} (max |grad| {scale:.1f})")
    assert abs(float(v0 - v1)) <= 1e-5 * abs(float(v0)) and err <= 1e-5 * scale


def test_bf16_compute_close_to_fp32(models):
    _, jm = models
    half = MAR(MARConfig.tiny(dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
    nnx.update(half, nnx.state(jm))
    rng = np.random.default_rng(10)
    x = jnp.asarray(rng.standard_normal((2, CFG.seq_len, 16)), jnp.float32)
    mask = jnp.asarray(_masks(rng, 2, CFG.seq_len, 7))

    def run(m):
        return m.forward_mae_decoder(m.forward_mae_encoder(x, mask, m.fake_class_embedding(2)), mask)

    ref, out = jax.jit(run)(jm), jax.jit(run)(half)
    rel = _err(out, ref) / float(jnp.max(jnp.abs(ref)))
    print(f"bf16 compute vs fp32: max abs err / max |z| = {rel:.2e}")
    assert out.dtype == jnp.bfloat16 and rel < 5e-2


def test_full_size_parameter_counts():
    """mar_huge (abstract, no allocation): encoder 395.0 M, decoder 397.9 M, proj_in/out 4.33 M (unipic.md 2.1)."""
    cfg = MARConfig.full()

    def counts(ctor) -> dict[str, int]:
        out: dict[str, int] = {}
        for path, v in nnx.to_flat_state(nnx.state(nnx.eval_shape(ctor), nnx.Param)):
            out[str(path[0])] = out.get(str(path[0]), 0) + int(np.prod(v.get_value().shape))
        return out

    mar = counts(lambda: MAR(cfg, rngs=nnx.Rngs(0)))
    enc = sum(v for k, v in mar.items() if k.startswith(("z_proj", "encoder")))
    dec = sum(v for k, v in mar.items() if k.startswith(("decoder", "mask_token", "diffusion_pos")))
    assert (round(enc / 1e6, 1), round(dec / 1e6, 1)) == (395.0, 397.9)
    for make in (make_proj_in, make_proj_out):
        assert round(sum(counts(lambda m=make: m(cfg, rngs=nnx.Rngs(0))).values()) / 1e6, 2) == 4.33


def test_bad_inputs(models):
    _, jm = models
    n = CFG.seq_len
    x = jnp.zeros((2, n, 16))
    ce = jm.fake_class_embedding(2)
    with pytest.raises(ValueError, match="mask shape"):
        jm.forward_mae_encoder(x, jnp.zeros((2, n + 1)), ce)
    with pytest.raises(ValueError, match="grid"):
        jm.forward_mae_encoder(x, jnp.zeros((2, n)), ce, grid=(3, 3))
    with pytest.raises(ValueError, match=r"x must be \[B, N, 16\]"):
        jm.forward_mae_encoder(jnp.zeros((2, n, 8)), jnp.zeros((2, n)), ce)
    with pytest.raises(ValueError, match="class_embedding"):
        jm.forward_mae_encoder(x, jnp.zeros((2, n)), jnp.zeros((3, CFG.width)))
    enc = jnp.zeros((2, CFG.buffer_size + n, CFG.width))
    with pytest.raises(ValueError, match="x_enc"):
        jm.forward_mae_decoder(enc[:, 1:], jnp.zeros((2, n)))
    with pytest.raises(ValueError, match="x_con"):
        jm.forward_mae_decoder(enc, jnp.zeros((2, n)), x_con=enc[:, 1:])
    with pytest.raises(ValueError, match="key_mask"):
        jm.encoder_blocks[0](enc, jnp.ones((2, 3), bool))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MARConfig.tiny(num_heads=5)
    with pytest.raises(ValueError, match="buffer_size"):
        MARConfig.tiny(buffer_size=-1)
    with pytest.raises(ValueError, match="remat"):
        MARConfig.tiny(remat="some")
    with pytest.raises(ValueError, match="proj_dropout"):
        MARConfig.tiny(proj_dropout=1.0)
    assert MARConfig.full().head_dim == 80 and MARConfig.full().seq_len == 1024
