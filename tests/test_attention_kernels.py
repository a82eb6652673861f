"""Attention implementations (layers.ATTENTION_IMPLS) against the einsum reference ``layers.xla_attention``.

fp32 on CPU, tolerance 1e-5: jax.nn.dot_product_attention, and the Pallas splash kernel run by the Pallas
interpreter (its Mosaic TPU lowering is compiled ahead of time for a v5p topology in the slow test at the end).
Odd head counts, GQA, padding, segment and causal masks, lengths that are not a multiple of the splash block.
Kernel-level checks use max abs err <= 1e-5; whole models (weights scaled up so attention is peaked, outputs of
size ~10-20) use max abs err <= 1e-5 x max |reference|.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import qwen2_5
from configs.flux import FluxDiTConfig
from configs.qwen2_5_vl import QWEN25_VISION_TINY, Qwen25VisionConfig
from nexus_jax import layers
from nexus_jax.models.qwen2 import model as qmodel
from nexus_jax.models.qwen2.attention import grouped_query_attention

TOL = 1e-5


def qkv(b, length, hq, hkv, d, seed=0, scale=1.5):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, length, hq, d)) * scale
    k = rng.standard_normal((b, length, hkv, d)) * scale
    v = rng.standard_normal((b, length, hkv, d))
    return tuple(jnp.asarray(t, jnp.float32) for t in (q, k, v))


def causal_padded(b, length, pads):
    """SegmentMask: causal, left padding of pads[i] tokens in row i (padding = segment 0, tokens = segment 1)."""
    seg = np.ones((b, length), np.int32)
    for i, p in enumerate(pads):
        seg[i, :p] = 0
    return layers.SegmentMask(jnp.asarray(seg), causal=True)


def windows(length, sizes):
    """SegmentMask over one packed sequence: consecutive windows of ``sizes``, the rest padding (segment -1)."""
    seg = np.full(length, -1, np.int32)
    seg[: sum(sizes)] = np.repeat(np.arange(len(sizes)), sizes)
    return layers.SegmentMask(jnp.asarray(seg[None]))


CASES = {
    # name: (shape b, L, Hq, Hkv, D; mask factory)
    "causal_gqa_9_3_left_padding": ((2, 200, 9, 3, 16), lambda: causal_padded(2, 200, [0, 37])),
    "full_3_heads_L77": ((2, 77, 3, 3, 16), lambda: None),
    "full_3_heads_L300": ((1, 300, 3, 3, 16), lambda: None),  # splash pads to one 384-token tile
    "windows_3_heads_L150": ((1, 150, 3, 3, 12), lambda: windows(150, [64, 40, 16, 16])),
    "causal_mqa_5_1_L128": ((1, 128, 5, 1, 32), lambda: layers.SegmentMask(jnp.zeros((1, 128), jnp.int32), True)),
}


@pytest.mark.parametrize("impl", ["jax_nn", "splash"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_impl_matches_xla_reference(impl, case):
    shape, make_mask = CASES[case]
    q, k, v = qkv(*shape)
    mask = make_mask()
    want = layers.xla_attention(q, k, v, None if mask is None else mask.dense())
    got = jax.jit(lambda a, b, c: layers.dot_product_attention(a, b, c, mask=mask, impl=impl))(q, k, v)
    err = float(jnp.abs(got - want).max())
    print(f"{impl} {case}: max abs err {err:.1e}")
    assert got.shape == want.shape and err <= TOL


def test_jax_nn_dense_mask_zeroes_empty_rows_like_xla():
    """A dense padding mask with fully masked rows (the vision window layout): jax_nn path == reference, zeros."""
    q, k, v = qkv(3, 24, 3, 3, 12, seed=1)
    valid = np.ones((3, 24), bool)
    valid[1, 10:] = False
    valid[2, :] = False  # an all-padding window
    mask = jnp.asarray(valid)[:, None, None, :]
    want = layers.xla_attention(q, k, v, mask)
    got = layers.dot_product_attention(q, k, v, mask=mask, impl="jax_nn")
    assert float(jnp.abs(got - want).max()) <= TOL
    assert float(jnp.abs(got[2]).max()) == 0.0


def test_jax_nn_matches_qwen2_grouped_query_attention_with_dense_mask():
    """The text decoder's dense-mask path ("jax_nn"): same as grouped_query_attention incl. fully masked rows."""
    q, k, v = qkv(2, 45, 9, 3, 16, seed=2)
    pad = np.ones((2, 45), bool)
    pad[1, :7] = False
    mask = jnp.tril(jnp.ones((45, 45), bool))[None, None] & jnp.asarray(pad)[:, None, None, :]
    err = float(jnp.abs(layers.jax_nn_attention(q, k, v, mask) - grouped_query_attention(q, k, v, mask)).max())
    assert err <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("length,causal", [(140, True), (300, False)])
def test_splash_gradients_match_reference(length, causal):
    """The kernel's custom VJP (dq, dk, dv) against autodiff of the reference; GQA 6/2, segments (20 tokens of
    padding), causal at 140 tokens (128-token tiles) or full at 300 (one 384-token tile)."""
    assert layers.splash_block(length, causal) == (128 if causal else 384)
    q, k, v = qkv(1, length, 6, 2, 16, seed=3, scale=1.0)
    mask = layers.SegmentMask(causal_padded(1, length, [20]).segment_ids, causal=causal)
    w = jnp.asarray(np.random.default_rng(4).standard_normal((1, length, 6, 16)), jnp.float32)

    def loss(fn):
        return lambda a, b, c: jnp.sum(fn(a, b, c) * w)

    want = jax.grad(loss(lambda a, b, c: layers.xla_attention(a, b, c, mask.dense())), argnums=(0, 1, 2))(q, k, v)
    got = jax.jit(jax.grad(loss(lambda a, b, c: layers.splash_attention(a, b, c, mask)), argnums=(0, 1, 2)))(q, k, v)
    for name, g, r in zip("qkv", got, want):
        rel = float(jnp.abs(g - r).max() / jnp.abs(r).max())
        print(f"splash d{name}: max rel err {rel:.1e}")
        assert rel <= TOL


def test_config_validation_and_resolution():
    for make in (lambda i: qwen2_5.tiny(attention_impl=i), lambda i: FluxDiTConfig.tiny(attention_impl=i),
                 lambda i: dataclasses.replace(QWEN25_VISION_TINY, attention_impl=i)):
        for impl in qwen2_5.ATTENTION_IMPLS:
            assert make(impl).attention_impl == impl
        with pytest.raises(ValueError, match="attention_impl='flash2'"):
            make("flash2")
    assert Qwen25VisionConfig().attention_impl == "auto"
    on_tpu = jax.default_backend() == "tpu"
    assert layers.resolve_attention_impl("auto") == ("splash" if on_tpu else "jax_nn")
    assert layers.resolve_attention_impl("auto", jnp.ones((1, 1, 2, 2), bool)) == "jax_nn"
    assert layers.resolve_attention_impl("xla") == "xla"
    q, k, v = qkv(1, 8, 2, 2, 8)
    with pytest.raises(ValueError, match="not a dense mask"):
        layers.splash_attention(q, k, v, jnp.ones((1, 1, 8, 8), bool))
    with pytest.raises(ValueError, match="self-attention only"):
        layers.splash_attention(q, k[:, :4], v[:, :4])


def scaled(model: nnx.Module, factor: float) -> nnx.Module:
    """Every parameter x factor (init std 0.02 makes attention nearly uniform, which would hide errors)."""
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda p: p * factor, state))
    return model


def qwen2_hidden(impl: str, ids, attention_mask):
    cfg = qwen2_5.tiny(attention_impl=impl)
    model = scaled(qmodel.Qwen2Model(cfg, rngs=nnx.Rngs(0)), 4.0)
    return jax.jit(lambda m, i, a: m(i, attention_mask=a)[0])(model, ids, attention_mask)


@pytest.mark.parametrize("impl", ["jax_nn", pytest.param("splash", marks=pytest.mark.slow)])
def test_qwen2_decoder_impls_match_xla(impl):
    """Tiny text decoder (9 / 3 heads), batch 2 with left padding, L = 37: hidden states on real tokens."""
    rng = np.random.default_rng(5)
    ids = jnp.asarray(rng.integers(0, 384, (2, 37)))
    am = np.ones((2, 37), np.int32)
    am[1, :11] = 0
    want = qwen2_hidden("xla", ids, jnp.asarray(am))
    got = qwen2_hidden(impl, ids, jnp.asarray(am))
    real = am.astype(bool)
    err = float(np.abs(np.asarray(got)[real] - np.asarray(want)[real]).max())
    print(f"qwen2 decoder {impl}: max abs err {err:.1e} (scale {float(jnp.abs(want).max()):.1f})")
    assert err <= TOL * float(jnp.abs(want).max())


def test_qwen2_chunked_jax_nn_matches_xla(monkeypatch):
    """Long cache-free sequences (query chunks) through jax.nn equal the reference chunks."""
    monkeypatch.setattr(qmodel, "QUERY_CHUNK", 7)
    ids = jnp.asarray(np.random.default_rng(6).integers(0, 384, (1, 30)))
    am = jnp.ones((1, 30), jnp.int32)
    want = qwen2_hidden("xla", ids, am)
    assert float(jnp.abs(qwen2_hidden("jax_nn", ids, am) - want).max()) <= TOL * float(jnp.abs(want).max())


def flux_out(impl: str):
    from nexus_jax.models.flux import FluxDiT, image_ids

    cfg = FluxDiTConfig.tiny(attention_impl=impl)
    model = scaled(FluxDiT(cfg, rngs=nnx.Rngs(0)), 3.0)
    rng = np.random.default_rng(7)
    x = dict(
        tokens=rng.standard_normal((2, 24, cfg.in_channels)), sigma=np.array([0.9, 0.3]),
        context=rng.standard_normal((2, 7, cfg.context_dim)), pooled=rng.standard_normal((2, cfg.pooled_dim)),
        txt_ids=np.zeros((7, 3)), img_ids=np.asarray(image_ids(8, 12)), guidance=np.array([3.5, 1.0]),
    )
    x = {k_: jnp.asarray(v_, jnp.float32) for k_, v_ in x.items()}
    return jax.jit(lambda m, a: m(**a))(model, x)


@pytest.mark.slow  # the default path ("auto" = jax_nn on CPU) is also checked against diffusers in test_flux_dit.py
@pytest.mark.parametrize("impl", ["jax_nn", "splash"])
def test_flux_dit_impls_match_xla(impl):
    """Tiny DiT (3 heads, 7 text + 24 image tokens = 31, not a block multiple): full attention."""
    want, got = flux_out("xla"), flux_out(impl)
    err = float(jnp.abs(got - want).max())
    print(f"flux DiT {impl}: max abs err {err:.1e} (scale {float(jnp.abs(want).max()):.1f})")
    assert err <= TOL * float(jnp.abs(want).max())


@pytest.mark.slow  # the default path ("auto" = jax_nn on CPU) is also checked against transformers in test_vision.py
@pytest.mark.parametrize("impl,frame_groups", [("jax_nn", False), ("jax_nn", True), ("splash", False),
                                               ("splash", True)])
def test_vision_impls_match_xla(impl, frame_groups):
    """Tiny ViT, two images with several (partial) windows: window blocks as segment ids for splash."""
    from nexus_jax.models.qwen2_5_vl.vision import Qwen25VisionTransformer

    grid = np.array([[1, 8, 12], [1, 6, 10]])
    px = np.random.default_rng(8).standard_normal((int(grid.prod(1).sum()), QWEN25_VISION_TINY.patch_dim))

    def run(i):
        cfg = dataclasses.replace(QWEN25_VISION_TINY, attention_impl=i)
        vit = scaled(Qwen25VisionTransformer(cfg, rngs=nnx.Rngs(0)), 5.0)
        return vit.encode(px.astype(np.float32), grid, frame_groups=frame_groups, pad_patches_to=64)

    want, got = run("xla"), run(impl)
    err = float(jnp.abs(got - want).max())
    print(f"vision {impl} frame_groups={frame_groups}: max abs err {err:.1e} (scale {float(jnp.abs(want).max()):.1f})")
    assert err <= TOL * float(jnp.abs(want).max())


def tpu_topology_devices():
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x2", chip_config_name="default",
                                            chips_per_host_bounds=(2, 2, 1), num_slices=1)
    except Exception as err:  # noqa: BLE001 - no libtpu in this environment
        pytest.skip(f"no TPU topology for AOT compiles: {err}")
    return topo.devices


@pytest.mark.slow
@pytest.mark.parametrize("head_dim,causal", [(128, True), (80, True), (128, False)])
def test_splash_compiles_for_tpu_and_is_not_priced_by_cost_analysis(head_dim, causal):
    """Mosaic lowering (not the interpreter) of the kernel and its VJP for one v5p device, bf16, GQA 6 / 2, segments,
    L = 300: causal in 128-token tiles, full in one 384-token tile; head_dim 80 is the Qwen2.5-VL ViT's. XLA's
    cost_analysis does not price the custom call: it reports far fewer FLOPs than the kernel's matmuls (planner MFU
    is analytic, launch/flops.py)."""
    sh = jax.sharding.SingleDeviceSharding(tpu_topology_devices()[0])
    b, length, hq, hkv = 2, 300, 6, 2
    q = jax.ShapeDtypeStruct((b, length, hq, head_dim), jnp.bfloat16, sharding=sh)
    kv = jax.ShapeDtypeStruct((b, length, hkv, head_dim), jnp.bfloat16, sharding=sh)
    seg = jax.ShapeDtypeStruct((b, length), jnp.int32, sharding=sh)

    def f(q_, k_, v_, s_):
        out = layers.splash_attention(q_, k_, v_, layers.SegmentMask(s_, causal=causal), interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    with jax.default_matmul_precision("default"):  # conftest's "highest" (fp32 passes) is invalid for bf16 in Mosaic
        lowered = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2))).lower(q, kv, kv, seg)
    assert "tpu_custom_call" in lowered.as_text()
    compiled = lowered.compile()
    matmul_flops = 3 * 4 * b * hq * length * length * head_dim // (2 if causal else 1)  # fwd + bwd: 3 x 4 B H L^2 D
    reported = compiled.cost_analysis()["flops"]
    print(f"head_dim {head_dim} causal {causal}: cost_analysis {reported:.3g} FLOPs, kernel ~{matmul_flops:.3g}")
    assert reported < 0.05 * matmul_flops


@pytest.mark.slow
def test_tiny_qwen2_splash_train_step_compiles_for_v5p_mesh():
    """A tiny text decoder (attention_impl="splash", 4 / 2 heads of 128, bf16) gradient on a 2x2x2 (data, fsdp,
    tensor) mesh of v5p:2x2x2: the kernel runs under shard_map (batch and heads split), compiled by libtpu."""
    from nexus_jax import sharding

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2, devices=tpu_topology_devices())
    cfg = qwen2_5.tiny(attention_impl="splash", num_heads=4, num_kv_heads=2, head_dim=128, hidden_size=256,
                       mrope_section=None, dtype="bfloat16")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: qmodel.Qwen2Model(cfg, rngs=nnx.Rngs(0))))
    shardings = sharding.state_shardings(state, mesh, sharding.TRAIN_RULES)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
    ids = jax.ShapeDtypeStruct((8, 300), jnp.int32, sharding=sharding.data_sharding(mesh, 2))

    def loss(st, i):
        hidden = nnx.merge(graphdef, st)(i, attention_mask=(i > 0).astype(jnp.int32))[0]
        return jnp.mean(hidden.astype(jnp.float32) ** 2)

    with sharding.sharding_context(mesh, sharding.TRAIN_RULES), jax.default_matmul_precision("default"):
        lowered = jax.jit(jax.grad(loss)).lower(state, ids)
    assert "tpu_custom_call" in lowered.as_text()
    assert lowered.compile().memory_analysis().temp_size_in_bytes > 0


@pytest.mark.parametrize("heads", [(6, 2), (9, 3)])
def test_splash_under_sharding_context_matches_unsharded(heads):
    """A (data 2, fsdp 2, tensor 2) CPU mesh: the kernel runs per shard in shard_map (6/2 heads split over tensor;
    9/3 cannot split, heads replicated) and equals the unsharded call."""
    from nexus_jax import sharding

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    hq, hkv = heads
    q, k, v = qkv(4, 130, hq, hkv, 16, seed=9)
    mask = causal_padded(4, 130, [0, 5, 50, 129])
    want = layers.splash_attention(q, k, v, mask)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    with sharding.sharding_context(mesh, sharding.TRAIN_RULES):
        got = jax.jit(lambda a, b, c, s: layers.splash_attention(a, b, c, layers.SegmentMask(s, True)))(
            q, k, v, mask.segment_ids)
        assert "shard_map" in str(jax.make_jaxpr(lambda a: layers.splash_attention(a, k, v))(q))
    assert float(jnp.abs(got - want).max()) <= TOL


def test_softmax_forward_is_jax_nn_and_its_dot_backward_matches():
    # layers.softmax: jax.nn.softmax's forward bit for bit; its custom backward (sum(g * y) as a dot) equals autodiff
    # of jax.nn.softmax, also on rows with masked (finfo.min) entries
    k1, k2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k1, (2, 3, 40, 33)) * 4
    x = jnp.where(jnp.arange(33) > 25, jnp.finfo(jnp.float32).min, x)
    w = jax.random.normal(k2, x.shape)
    assert bool((layers.softmax(x) == jax.nn.softmax(x, axis=-1)).all())
    got = jax.grad(lambda a: jnp.sum(layers.softmax(a) * w))(x)
    want = jax.grad(lambda a: jnp.sum(jax.nn.softmax(a, axis=-1) * w))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    assert float(jnp.abs(want).max()) > 0.1 and float(jnp.abs(got[..., 26:]).max()) == 0.0
