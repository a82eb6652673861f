"""UniPic-1 masked-AR sampling: the JAX loop (static shapes, one compiled iteration) vs the torch reference loop of
unipic.md 3.1 / 3.2 (token dropping, DynamicCache prefix + crop, the head's p_sample_loop, the KL-16 decoder) fed the
same orders and noise, at the tiny config (G = 2 images, CFG batch 4, odd head counts). The weights go torch ->
JAX through the real conversion tables (``unipic_mapping``, ``kl16_mapping``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import configs.unipic as unipic_configs
from configs.unipic import SamplingConfig
from nexus_jax import sharding
from nexus_jax.diffusion import gaussian, maskgit
from nexus_jax.models.unipic.model import UniPic
from nexus_jax.models.vae.kl16 import pixels_to_uint8_unipic
from nexus_jax.nexus.tiny import ByteTokenizer
from nexus_jax.unipic import prompts
from nexus_jax.unipic import sample as jsample
from nexus_jax.unipic.bridge import prefill_context
from tests.helpers import unipic_torch
from tests.helpers.kl16_torch import to_uint8

CFG = unipic_configs.tiny()
G = 2
ENCODE = ByteTokenizer().encode


@pytest.fixture(scope="module")
def models():
    """(torch UniPic, torch diffusion, torch VAE codec, JAX UniPic, JAX VAE) with identical weights."""
    return unipic_torch.reference_models(CFG)


def _noise(sampling: SamplingConfig, seed: int, cfg=CFG):
    """(SampleNoise for JAX, per-step torch init / step noise lists cut to each step's predicted count)."""
    sched = maskgit.mask_schedule(cfg.seq_len, sampling.num_iter)
    p, c, s = sched.max_pred, cfg.mar.token_embed_dim, int(cfg.diffusion.sampling_steps)
    rng = np.random.default_rng(seed)
    orders = np.stack([rng.permutation(cfg.seq_len) for _ in range(G)])
    init = rng.standard_normal((sampling.num_iter, G, p, c)).astype(np.float32)
    steps = rng.standard_normal((sampling.num_iter, s, G, p, c)).astype(np.float32)
    t_init = [torch.tensor(init[k, :, :m].reshape(G * m, c)) for k, m in enumerate(sched.num_pred)]
    t_steps = [torch.tensor(steps[k, :, :, :m].reshape(s, G * m, c)) for k, m in enumerate(sched.num_pred)]
    return jsample.SampleNoise(orders, init, steps), torch.tensor(orders), t_init, t_steps


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _compare(out, t_tokens, t_pixels, what):
    tok_err = float(np.abs(np.asarray(out.tokens) - t_tokens.numpy()).max())
    pix_err = float(np.abs(np.asarray(out.pixels) - t_pixels.numpy().transpose(0, 2, 3, 1)).max())
    ours = np.asarray(pixels_to_uint8_unipic(out.pixels))
    ref = to_uint8(t_pixels).numpy().transpose(0, 2, 3, 1)
    psnr = _psnr(ours, ref)
    scale = float(np.abs(t_tokens.numpy()).max())  # random heads amplify: x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)
    print(f"{what}: tokens max abs err {tok_err:.2e} (max |token| {scale:.1f}, relative {tok_err / scale:.1e}), "
          f"pixels max abs err {pix_err:.2e}, uint8 PSNR {psnr:.1f} dB")
    assert psnr >= 40.0
    assert pix_err <= 1e-4
    assert tok_err <= 1e-5 * scale and scale > 0.1


def test_text_to_image_matches_torch_reference_loop(models):
    tu, diffusion, codec, model, vae = models
    sampling = CFG.sampling  # visible_buckets 2: the LLM runs on 0 / 8 / 8 / 16 gathered image slots
    assert jsample.segment_capacities(CFG.seq_len, sampling) == [0, 8, 8, 16]
    batch = prompts.text_to_image_batch(["a red cube on a wooden table", "two cats"], ENCODE, CFG.tokens)
    assert batch.lengths[0] != batch.lengths[1]  # right padding in play
    noise, orders, t_init, t_steps = _noise(sampling, seed=0)
    out = jsample.text_to_image(model, vae, batch, noise=noise)
    with torch.no_grad():
        ids = torch.tensor(batch.input_ids, dtype=torch.long)
        t_tokens, t_pixels = unipic_torch.sample(
            tu, diffusion, codec, tu.llm.model.embed_tokens(ids), torch.tensor(batch.attention_mask), orders, t_init,
            t_steps, num_iter=sampling.num_iter, cfg=sampling.cfg, temperature=sampling.temperature,
            buffer_size=CFG.mar.buffer_size, grid=CFG.grid)
    _compare(out, t_tokens, t_pixels, "text-to-image")


def test_editing_at_an_interpolated_grid_matches_torch_reference_loop(models):
    """128 px: an 8x8 token grid from the MAR's 4x4 tables (bilinear resize, as UniPic at 1024 px from 32x32)."""
    tu, diffusion, codec, small, vae = models
    cfg = CFG.replace(resolution=128)
    model = nnx.eval_shape(lambda: UniPic(cfg, rngs=nnx.Rngs(0)))
    nnx.update(model, nnx.state(small))
    sampling = SamplingConfig(num_iter=3, cfg=2.5, cfg_schedule="linear", temperature=0.9, visible_buckets=1)
    batch = prompts.editing_batch(["make it blue", "add a hat to the cat"], ENCODE, cfg.tokens, cfg.image_tokens)
    src = np.random.default_rng(7).uniform(-1, 1, (G, cfg.resolution, cfg.resolution, 3)).astype(np.float32)
    noise, orders, t_init, t_steps = _noise(sampling, seed=1, cfg=cfg)
    out = jsample.edit(model, vae, batch, src, sampling=sampling, noise=noise)
    nb, shape = cfg.mar.buffer_size, (cfg.grid, cfg.grid)
    with torch.no_grad():
        x_src = codec.encode(torch.tensor(src.transpose(0, 3, 1, 2))).reshape(G, cfg.seq_len, -1)
        fake = tu.mar.fake_latent.expand(G, -1)
        x_con = tu.mar.forward_mae_encoder(x_src, torch.zeros(G, cfg.seq_len), fake, shape)
        z_src = tu.proj_in(x_con)
        z_src = torch.cat([z_src[:, nb:], z_src[:, :nb]], dim=1)
        ids = torch.tensor(batch.input_ids, dtype=torch.long)
        embeds = tu.llm.model.embed_tokens(ids)
        embeds[ids == cfg.tokens.image] = torch.cat([z_src, z_src]).reshape(-1, z_src.shape[-1])
        t_tokens, t_pixels = unipic_torch.sample(
            tu, diffusion, codec, embeds, torch.tensor(batch.attention_mask), orders, t_init, t_steps,
            num_iter=sampling.num_iter, cfg=sampling.cfg, cfg_schedule=sampling.cfg_schedule,
            temperature=sampling.temperature, buffer_size=nb, grid=cfg.grid, x_con=torch.cat([x_con, x_con]))
    _compare(out, t_tokens, t_pixels, "editing at 128 px (8x8 grid from 4x4 tables)")


def test_key_sampling_compiles_one_iteration_and_is_deterministic(models):
    *_, model, vae = models
    batch = prompts.text_to_image_batch(["a dog", "a boat at sea"], ENCODE, CFG.tokens)
    sampling = SamplingConfig(num_iter=5, cfg=1.5, visible_buckets=1)
    before = jsample.iteration._cache_size()
    a = jsample.text_to_image(model, vae, batch, sampling=sampling, key=jax.random.key(3))
    assert jsample.iteration._cache_size() - before == 1  # 5 iterations, one compiled function
    b = jsample.text_to_image(model, vae, batch, sampling=sampling, key=jax.random.key(3))
    c = jsample.text_to_image(model, vae, batch, sampling=sampling, key=jax.random.key(4))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert not np.allclose(np.asarray(a.tokens), np.asarray(c.tokens))
    assert a.pixels.shape == (G, CFG.resolution, CFG.resolution, 3) and np.isfinite(np.asarray(a.pixels)).all()
    with pytest.raises(ValueError, match="exactly one of key"):
        jsample.text_to_image(model, vae, batch)


def _start_tokens():
    tokens = jnp.asarray(np.random.default_rng(8).standard_normal((G, CFG.seq_len, 16)), jnp.float32)
    return jnp.concatenate([tokens, tokens])


def _one_iteration(model, batch, noise, step):
    sampling = CFG.sampling
    tables, max_pred = jsample.step_tables(CFG.seq_len, sampling)
    graphdef, state = nnx.split(model)
    embeds = model.llm.model.embed_tokens(jnp.asarray(batch.input_ids))
    mask = jnp.asarray(batch.attention_mask)
    prefix = nnx.jit(prefill_context, static_argnums=(3,))(model.llm, embeds, mask, CFG.seq_len + CFG.mar.buffer_size)
    tokens = _start_tokens()
    orders = jnp.asarray(np.concatenate([noise.orders, noise.orders]), jnp.int32)
    return jsample.iteration(graphdef, state, tokens, orders, jnp.int32(step), tables, prefix, mask,
                             gaussian.make_schedule(CFG.diffusion), None, None, jnp.asarray(noise.init[step]),
                             jnp.asarray(noise.steps[step]), jnp.float32(1.0), max_pred=max_pred)


@pytest.mark.slow
def test_sharded_iteration_equals_unsharded(models):
    *_, model, _ = models
    batch = prompts.text_to_image_batch(["a red cube", "two cats"], ENCODE, CFG.tokens)
    noise = _noise(CFG.sampling, seed=2)[0]
    want = np.asarray(_one_iteration(model, batch, noise, step=1))
    mesh = sharding.make_mesh(data=2, fsdp=1, tensor=4)
    sharded = nnx.merge(*nnx.split(model))  # a copy whose state gets placed on the mesh
    sharding.shard_module(sharded, mesh, sharding.INFERENCE_RULES)
    assert "tensor" in str(sharded.llm.model.layers[0].mlp.gate_proj.kernel.get_value().sharding.spec)
    with sharding.sharding_context(mesh, sharding.INFERENCE_RULES):
        got = np.asarray(_one_iteration(sharded, batch, noise, step=1))
    err, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
    print(f"sharded (data 2 x tensor 4) vs unsharded iteration: max abs err {err:.2e} (max |token| {scale:.1f})")
    assert err <= 1e-5 * scale and not np.array_equal(got[:, :, 0], np.asarray(_start_tokens())[:, :, 0])


def _brute_force_capacities(counts, buckets, limit, multiple=8):
    """Every choice of at most ``buckets`` capacities among the rounded counts: the smallest total."""
    import itertools

    cands = sorted({min(limit, -(-c // multiple) * multiple) for c in counts if c > 0})
    best = None
    for k in range(1, buckets + 1):
        for caps in itertools.combinations(cands, k):
            if caps[-1] < max(counts):
                continue
            total = sum(0 if c == 0 else min(q for q in caps if q >= c) for c in counts)
            best = total if best is None else min(best, total)
    return best if best is not None else 0


def test_bucket_capacities_are_the_cheapest_cover():
    rng = np.random.default_rng(0)
    for _ in range(60):
        limit = int(rng.integers(1, 120))
        counts = sorted(int(c) for c in rng.integers(0, limit + 1, int(rng.integers(1, 12))))
        buckets = int(rng.integers(1, 5))
        caps = jsample.bucket_capacities(counts, buckets, limit)
        assert all(c <= q <= limit for c, q in zip(counts, caps)), (counts, caps)
        assert all(q % 8 == 0 or q == limit for q in caps) and all((q == 0) == (c == 0) for c, q in zip(counts, caps))
        assert len({q for q in caps if q}) <= buckets
        assert sum(caps) == _brute_force_capacities(counts, buckets, limit), (counts, buckets, limit, caps)
    with pytest.raises(ValueError, match="counts"):
        jsample.bucket_capacities([3, 40], 2, 32)


def test_segment_capacities_spend_fewer_slots_than_uniform_buckets():
    """The benchmark's schedule (256 tokens, 16 iterations, 4 buckets): 1720 image slots over the sampling instead of
    1920 with buckets at multiples of N / 4 (1371 visible tokens in all)."""
    sampling = SamplingConfig(num_iter=16, visible_buckets=4)
    caps = jsample.segment_capacities(256, sampling)
    visible = maskgit.mask_schedule(256, 16).num_visible
    uniform = [min(256, -(-int(v) // 64) * 64) for v in visible]
    assert len({c for c in caps if c}) <= 4 and all(c >= v for c, v in zip(caps, visible))
    assert (sum(caps), sum(uniform), int(sum(visible))) == (1720, 1920, 1371)
    assert jsample.segment_capacities(256, SamplingConfig(num_iter=16, visible_buckets=1)) == [None] * 16
