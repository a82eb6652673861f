"""Nexus-Gen adapter / editing merger vs torch modules written from the spec, edit text ids, decode pipeline."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image
from torch import nn
from transformers import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf

from configs.nexus_decoders import MergerConfig, NexusDecoderConfig
from configs.vae import FluxVAEConfig
from conversion import load
from conversion.tables.nexus_decoders import adapter_mapping, merger_mapping
from nexus_jax import sharding
from nexus_jax.models.flux import image_ids
from nexus_jax.models.nexus_decoders import (
    EditingDecoder,
    EmbeddingMerger,
    GenerationDecoder,
    apply_adapter,
    edit_text_ids,
    make_adapter,
    merger_positions,
)
from nexus_jax.models.vae import FluxVAE
from nexus_jax.pipelines.decode import DecodePipeline, EmptyPrompt, save_pngs
from tests.helpers.qwen2_reference import _text_kwargs

CFG = NexusDecoderConfig.tiny()
MERGER = MergerConfig.tiny(target_grid=(18, 18), ref_grid=(36, 36))  # 81 + 324 = 405 tokens, as upstream


def load_adapter(ours: nnx.List, ref: nn.Module) -> None:
    """torch ``Sequential`` adapter -> ours, through the converter's ``adapter.*`` table (unprefixed here)."""
    load.load(ours, adapter_mapping("", ""), ref.state_dict())


def load_merger(ours: EmbeddingMerger, ref: nn.Module) -> None:
    """TorchMerger -> ours through the converter's ``embedding_merger.*`` table (unprefixed, rotary buffers skipped)."""
    load.load(ours, merger_mapping(ours.cfg, "", ""), ref.state_dict(), skip_prefixes=("rotary.",))


def randomize(module: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and ("norm" in name or "layernorm" in name or name.split(".")[-2].isdigit()):
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / max(p.shape[-1], 1) ** 0.5)
    return module.eval()


# ------------------------------------------------------------------------------------------------ adapter
def test_adapter_matches_torch_spec():
    a = CFG.adapter
    ref = randomize(nn.Sequential(nn.Linear(a.in_dim, a.out_dim), nn.LayerNorm(a.out_dim), nn.ReLU(),
                                  nn.Linear(a.out_dim, a.out_dim), nn.LayerNorm(a.out_dim)), seed=0)
    ours = make_adapter(a, rngs=nnx.Rngs(0))
    load_adapter(ours, ref)
    x = np.random.default_rng(0).standard_normal((2, 81, a.in_dim)).astype(np.float32) * 3
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    err = np.abs(np.asarray(apply_adapter(ours, jnp.asarray(x))) - expected).max()
    print(f"adapter max abs err {err:.2e}")
    assert err <= 1e-5
    with pytest.raises(ValueError, match=r"embeds must be \[B, N, 48\], got shape \(2, 81, 47\)"):
        apply_adapter(ours, jnp.zeros((2, 81, 47)))


# ------------------------------------------------------------------------------------------------ merger
class TorchMerger(nn.Module):
    """The merger as described in nexus-gen.md 2.3, on transformers' Qwen2.5-VL decoder layer (eager, no mask)."""

    def __init__(self, cfg: MergerConfig):
        super().__init__()
        text = Qwen2_5_VLConfig(text_config=_text_kwargs(cfg.layer)).text_config
        text._attn_implementation = "eager"
        d, p, o, eps = cfg.layer.hidden_size, cfg.projector_dim, cfg.out_dim, cfg.layer.rms_norm_eps
        self.layers = nn.ModuleList([hf.Qwen2_5_VLDecoderLayer(text, i) for i in range(cfg.num_layers)])
        rms = hf.Qwen2_5_VLRMSNorm
        self.projector = nn.Sequential(rms(d, eps), nn.Linear(d, p), rms(p, eps), nn.SiLU(), nn.Linear(p, o),
                                       rms(o, eps))
        self.rotary = hf.Qwen2_5_VLRotaryEmbedding(text)
        self.cfg = cfg

    def positions(self, grid) -> torch.Tensor:  # DiffSynth get_position_ids, t = 0
        h, w = grid
        hi = torch.arange(h // 2).view(-1, 1).expand(-1, w // 2).flatten() * (72 / h)
        wi = torch.arange(w // 2).view(1, -1).expand(h // 2, -1).flatten() * (72 / w)
        return torch.stack([torch.zeros_like(hi), hi, wi])

    def forward(self, embeds, ref):
        pos = torch.cat([self.positions(self.cfg.target_grid), self.positions(self.cfg.ref_grid)], -1)
        x = torch.cat([embeds, ref], 1)
        pos = pos[:, None].expand(3, x.shape[0], -1)
        pe = self.rotary(x, pos)
        for layer in self.layers:
            x = layer(x, attention_mask=None, position_embeddings=pe)
        return self.projector(x)


@pytest.fixture(scope="module")
def merger_pair():
    ref = randomize(TorchMerger(MERGER), seed=1)
    ours = EmbeddingMerger(MERGER, rngs=nnx.Rngs(0))
    load_merger(ours, ref)
    return ref, ours


def merger_inputs(b: int, seed: int = 2):
    rng = np.random.default_rng(seed)
    d = MERGER.layer.hidden_size
    return (rng.standard_normal((b, 81, d)).astype(np.float32), rng.standard_normal((b, 324, d)).astype(np.float32))


def test_merger_matches_transformers_layer(merger_pair):
    ref, ours = merger_pair
    e, r = merger_inputs(2)
    with torch.no_grad():
        expected = ref(torch.from_numpy(e), torch.from_numpy(r)).numpy()
    got = np.asarray(jax.jit(lambda m, a, b: m(a, b))(ours, jnp.asarray(e), jnp.asarray(r)))
    err = np.abs(got - expected).max()
    print(f"merger (405 tokens, bidirectional) max abs err {err:.2e}")
    assert got.shape == (2, 405, MERGER.out_dim) and err <= 1e-5
    # bidirectional: the first (target) tokens see the reference tokens
    r2 = r.copy()
    r2[:, -1] += 1.0
    moved = np.asarray(ours(jnp.asarray(e), jnp.asarray(r2)))[:, 0] - got[:, 0]
    assert np.abs(moved).max() > 1e-4


def test_merger_positions_and_edit_ids_match_spec():
    pos = merger_positions((18, 18))
    assert pos.shape == (3, 81) and pos[1].max() == 32.0 and pos[2][:3].tolist() == [0.0, 4.0, 8.0]
    assert merger_positions((36, 36))[1].max() == 34.0
    # torch formula of DiffSynth get_editing_text_ids at 512x512 (latent 64x64), cast to bf16
    def torch_ids(hl, wl, g, t):
        ids = torch.zeros(g[0] // 2, g[1] // 2, 3)
        ids[..., 0] += t
        ids[..., 1] += torch.arange(g[0] // 2)[:, None] * (hl / g[0])
        ids[..., 2] += torch.arange(g[1] // 2)[None, :] * (wl / g[1])
        return ids.reshape(-1, 3)

    for hl, wl in ((64, 64), (48, 80)):
        ref = torch.cat([torch_ids(hl, wl, (18, 18), 0.0), torch_ids(hl, wl, (36, 36), 1.0)]).to(torch.bfloat16)
        ours = edit_text_ids((hl, wl))
        np.testing.assert_array_equal(ours, ref.float().numpy())
        exact = edit_text_ids((hl, wl), round_to_bf16=False)
        assert np.abs(exact - ours).max() > 0  # the rounding is real (e.g. 3.556 -> 3.5625)
    assert edit_text_ids((64, 64), ref_grid=None).shape == (81, 3)


def test_merger_sharded_equals_unsharded(merger_pair):
    _, ours = merger_pair
    e, r = merger_inputs(4, seed=3)
    expected = np.asarray(jax.jit(lambda m, a, b: m(a, b))(ours, jnp.asarray(e), jnp.asarray(r)))
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    rules = sharding.TRAIN_RULES
    sharded = sharding.create_sharded(lambda: EmbeddingMerger(MERGER, rngs=nnx.Rngs(9)), mesh, rules)
    nnx.update(sharded, jax.device_put(nnx.state(ours), sharding.state_shardings(nnx.state(sharded), mesh, rules)))
    assert sharded.projector[1].kernel[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    with sharding.sharding_context(mesh, rules):
        es = jax.device_put(jnp.asarray(e), sharding.data_sharding(mesh, 3))
        got = jax.jit(lambda m, a, b: m(a, b))(sharded, es, jnp.asarray(r))
    err = np.abs(np.asarray(got) - expected).max()
    print(f"sharded vs unsharded merger max abs err {err:.2e}")
    assert err <= 1e-5


def test_merger_bad_inputs(merger_pair):
    _, ours = merger_pair
    e, r = merger_inputs(1)
    with pytest.raises(ValueError, match="embeds has 80 tokens, its grid needs 81"):
        ours(jnp.asarray(e[:, :80]), jnp.asarray(r))
    with pytest.raises(ValueError, match=r"ref_embeds must be \[B, N, 48\]"):
        ours(jnp.asarray(e), jnp.asarray(r[..., :40]))


# ------------------------------------------------------------------------------------------------ pipeline
def tiny_pipeline(kind: str, **sampler) -> DecodePipeline:
    cfg = NexusDecoderConfig.tiny(**{**dict(num_steps=2, height=48, width=80), **sampler})
    cfg = NexusDecoderConfig(dit=cfg.dit, adapter=cfg.adapter, merger=MergerConfig.tiny(), sampler=cfg.sampler)
    dec = (GenerationDecoder if kind == "gen" else EditingDecoder)(cfg, rngs=nnx.Rngs(0))
    vae = FluxVAE(FluxVAEConfig.tiny(), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    empty = EmptyPrompt(rng.standard_normal((1, cfg.dit.pooled_dim)).astype(np.float32),
                        rng.standard_normal((1, 12, cfg.dit.context_dim)).astype(np.float32))
    return DecodePipeline(dec, vae, empty)


def test_generation_pipeline_writes_pngs(tmp_path):
    pipe = tiny_pipeline("gen", cfg_scale=3.0)
    embeds = np.random.default_rng(1).standard_normal((2, 81, 48)).astype(np.float32)
    images = pipe(jax.random.key(0), embeds)
    assert images.shape == (2, 48, 80, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, pipe(jax.random.key(0), embeds))
    paths = save_pngs(images, [tmp_path / "a.png", tmp_path / "b.png"])
    np.testing.assert_array_equal(np.asarray(Image.open(paths[1])), images[1])


def test_editing_pipeline_and_bad_inputs():
    pipe = tiny_pipeline("edit", cfg_scale=1.0)
    rng = np.random.default_rng(2)
    embeds, ref = rng.standard_normal((1, 9, 48)).astype(np.float32), rng.standard_normal((1, 24, 48))
    assert pipe(jax.random.key(1), embeds, ref.astype(np.float32)).shape == (1, 48, 80, 3)
    bad = embeds.copy()
    bad[0, 3, 7] = np.nan
    with pytest.raises(ValueError, match=r"embeds contains 1 non-finite values \(first at index \(0, 3, 7\)"):
        pipe(jax.random.key(1), bad, ref)
    with pytest.raises(ValueError, match=r"embeds must be \[B, N, 48\]"):
        pipe(jax.random.key(1), embeds[..., :32], ref)
    with pytest.raises(ValueError, match="height=40 must be a positive multiple of 16"):
        tiny_pipeline("gen", height=40)
    with pytest.raises(ValueError, match="empty-prompt pooled contains"):
        DecodePipeline(pipe.decoder, pipe.vae, EmptyPrompt(np.full((1, 24), np.inf, np.float32), pipe.empty.t5))


# ------------------------------------------------------------------------------------------------ whole decoders
def test_decoders_match_torch_composition():
    """conditioner -> DiT velocity for both decoders vs torch adapter / merger -> diffusers FluxTransformer2DModel."""
    from tests.test_flux_dit import jax_flux_from, torch_flux

    cfg = NexusDecoderConfig.tiny()
    dit_t = torch_flux(cfg.dit, seed=11)
    a = cfg.adapter
    adapter_t = randomize(nn.Sequential(nn.Linear(a.in_dim, a.out_dim), nn.LayerNorm(a.out_dim), nn.ReLU(),
                                        nn.Linear(a.out_dim, a.out_dim), nn.LayerNorm(a.out_dim)), seed=12)
    merger_t = randomize(TorchMerger(cfg.merger), seed=13)
    gen, edit = GenerationDecoder(cfg, rngs=nnx.Rngs(0)), EditingDecoder(cfg, rngs=nnx.Rngs(0))
    dit_state = nnx.state(jax_flux_from(dit_t, cfg.dit))
    nnx.update(gen.dit, dit_state)
    nnx.update(edit.dit, dit_state)
    load_adapter(gen.adapter, adapter_t)
    load_merger(edit.embedding_merger, merger_t)

    rng = np.random.default_rng(14)
    b, hl, wl = 2, 6, 10  # latent 48x80 px / 8
    embeds = rng.standard_normal((b, 9, a.in_dim)).astype(np.float32)
    ref = rng.standard_normal((b, 24, a.in_dim)).astype(np.float32)
    pooled = rng.standard_normal((1, cfg.dit.pooled_dim)).astype(np.float32)
    tokens = rng.standard_normal((b, (hl // 2) * (wl // 2), 64)).astype(np.float32)
    sigma, guidance = np.array([0.8, 0.3], np.float32), np.full((b,), 3.5, np.float32)
    img_ids = np.asarray(image_ids(hl, wl))

    def torch_v(context, txt_ids):
        with torch.no_grad():
            return dit_t(hidden_states=torch.from_numpy(tokens), encoder_hidden_states=context,
                         pooled_projections=torch.from_numpy(pooled).expand(b, -1), timestep=torch.from_numpy(sigma),
                         img_ids=torch.from_numpy(img_ids), txt_ids=txt_ids, guidance=torch.from_numpy(guidance)).sample

    with torch.no_grad():
        gen_ref = torch_v(adapter_t(torch.from_numpy(embeds)), torch.zeros(9, 3)).numpy()
        edit_ids = torch.from_numpy(edit_text_ids((hl, wl), cfg.merger.target_grid, cfg.merger.ref_grid))
        edit_ref = torch_v(merger_t(torch.from_numpy(embeds), torch.from_numpy(ref)), edit_ids).numpy()

    def ours_v(dec, cond):
        return dec.dit(jnp.asarray(tokens), jnp.asarray(sigma), cond.context, cond.pooled, cond.txt_ids,
                       jnp.asarray(img_ids), jnp.asarray(guidance))

    gen_out = jax.jit(lambda d: ours_v(d, d.conditioning(jnp.asarray(embeds), jnp.asarray(pooled))))(gen)
    edit_out = jax.jit(lambda d: ours_v(d, d.conditioning(jnp.asarray(embeds), jnp.asarray(ref), jnp.asarray(pooled),
                                                          (hl, wl))))(edit)
    errs = np.abs(np.asarray(gen_out) - gen_ref).max(), np.abs(np.asarray(edit_out) - edit_ref).max()
    print(f"generation decoder max abs err {errs[0]:.2e}, editing decoder {errs[1]:.2e}")
    assert max(errs) <= 1e-4


def test_empty_prompt_has_one_file_format(tmp_path):
    """EmptyPrompt.save/load and the checkpoint loader share one format: empty_prompt.safetensors."""
    from nexus_jax.inference.loading import load_empty_prompt
    from nexus_jax.pipelines.decode import EmptyPrompt

    rng = np.random.default_rng(0)
    empty = EmptyPrompt(rng.normal(size=(1, 12)).astype(np.float32), rng.normal(size=(1, 7, 16)).astype(np.float32))
    empty.save(tmp_path / "empty_prompt.safetensors")
    for got in (EmptyPrompt.load(tmp_path / "empty_prompt.safetensors"),
                load_empty_prompt(tmp_path / "empty_prompt.safetensors")):
        np.testing.assert_array_equal(got.pooled, empty.pooled)
        np.testing.assert_array_equal(got.t5, empty.t5)
    np.savez(tmp_path / "empty.npz", pooled=empty.pooled, t5=empty.t5)
    with pytest.raises(ValueError, match="must be a .safetensors file"):
        EmptyPrompt.load(tmp_path / "empty.npz")
