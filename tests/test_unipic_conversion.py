"""UniPic-1 conversion: a tiny ``pytorch_model.bin`` in the published layout (unipic.md section 5, shapes written
from the spec here, not from the JAX model) -> Orbax -> ``pytorch_model.bin`` again, bit for bit; error reporting."""

from __future__ import annotations

import collections
import logging

import numpy as np
import pytest
import torch

from configs import unipic
from conversion import engine
from conversion.errors import ConversionError, MissingTensorsError, ShapeMismatchError, UnexpectedTensorsError
from conversion.pipeline import export_checkpoint, import_checkpoint, load_model
from conversion.schemes import detect_scheme
from conversion.state import module_arrays
from conversion.tables.unipic import SCHEME, TiedCopy


def _linear(sd, name, i, o, rnd, bias=True):
    sd[f"{name}.weight"] = rnd(o, i) / i**0.5
    if bias:
        sd[f"{name}.bias"] = 0.1 * rnd(o)


def _ln(sd, name, d, rnd):
    sd[f"{name}.weight"] = 1 + 0.1 * rnd(d)
    sd[f"{name}.bias"] = 0.1 * rnd(d)


def published_state_dict(cfg: unipic.UniPicConfig, seed: int = 0, dtype=torch.float32, meta: bool = False,
                         ) -> dict[str, torch.Tensor]:
    """Random tensors under every key of the released checkpoint, with the torch module shapes of the spec
    (Linear weights ~ N(0, 1/fan_in), norm scales ~ 1, so deep tiny models stay well conditioned).
    ``meta``: shape-only tensors (full-size layouts)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.empty(*shape, device="meta") if meta else torch.randn(*shape, generator=g)

    sd: dict[str, torch.Tensor] = collections.OrderedDict()
    t, m, h = cfg.text, cfg.mar, cfg.head
    emb = 0.5 * rnd(t.vocab_size, t.hidden_size)
    sd["llm.model.embed_tokens.weight"] = emb
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    for i in range(t.num_layers):
        p = f"llm.model.layers.{i}"
        _linear(sd, f"{p}.self_attn.q_proj", t.hidden_size, q, rnd)
        _linear(sd, f"{p}.self_attn.k_proj", t.hidden_size, kv, rnd)
        _linear(sd, f"{p}.self_attn.v_proj", t.hidden_size, kv, rnd)
        _linear(sd, f"{p}.self_attn.o_proj", q, t.hidden_size, rnd, bias=False)
        _linear(sd, f"{p}.mlp.gate_proj", t.hidden_size, t.intermediate_size, rnd, bias=False)
        _linear(sd, f"{p}.mlp.up_proj", t.hidden_size, t.intermediate_size, rnd, bias=False)
        _linear(sd, f"{p}.mlp.down_proj", t.intermediate_size, t.hidden_size, rnd, bias=False)
        sd[f"{p}.input_layernorm.weight"] = 1 + 0.1 * rnd(t.hidden_size)
        sd[f"{p}.post_attention_layernorm.weight"] = 1 + 0.1 * rnd(t.hidden_size)
    sd["llm.model.norm.weight"] = 1 + 0.1 * rnd(t.hidden_size)
    sd["llm.lm_head.weight"] = emb.clone()  # tied: an equal copy in the pickled file
    c, n, buf = m.width, m.seq_h * m.seq_w, m.buffer_size
    _linear(sd, "mar.z_proj", m.token_embed_dim, c, rnd)
    _ln(sd, "mar.z_proj_ln", c, rnd)
    sd["mar.encoder_pos_embed_learned"] = rnd(1, buf + n, c)
    for kind, depth in (("encoder", m.encoder_depth), ("decoder", m.decoder_depth)):
        for i in range(depth):
            p = f"mar.{kind}_blocks.{i}"
            _ln(sd, f"{p}.norm1", c, rnd)
            _linear(sd, f"{p}.attn.qkv", c, 3 * c, rnd)
            _linear(sd, f"{p}.attn.proj", c, c, rnd)
            _ln(sd, f"{p}.norm2", c, rnd)
            _linear(sd, f"{p}.mlp.fc1", c, int(c * m.mlp_ratio), rnd)
            _linear(sd, f"{p}.mlp.fc2", int(c * m.mlp_ratio), c, rnd)
        if kind == "encoder":
            _ln(sd, "mar.encoder_norm", c, rnd)
            _linear(sd, "mar.decoder_embed", c, c, rnd)
            sd["mar.mask_token"] = rnd(1, 1, c)
            sd["mar.decoder_pos_embed_learned"] = rnd(1, buf + n, c)
    _ln(sd, "mar.decoder_norm", c, rnd)
    sd["mar.diffusion_pos_embed_learned"] = rnd(1, n, c)
    sd["mar.class_emb.weight"] = rnd(m.num_classes, c)
    sd["mar.fake_latent"] = rnd(1, c)
    net, w = "mar.diffloss.net", h.width
    _linear(sd, f"{net}.time_embed.mlp.0", h.time_dim, w, rnd)
    _linear(sd, f"{net}.time_embed.mlp.2", w, w, rnd)
    _linear(sd, f"{net}.cond_embed", h.z_channels, w, rnd)
    _linear(sd, f"{net}.input_proj", h.in_channels, w, rnd)
    for r in range(h.depth):
        p = f"{net}.res_blocks.{r}"
        _ln(sd, f"{p}.in_ln", w, rnd)
        _linear(sd, f"{p}.mlp.0", w, w, rnd)
        _linear(sd, f"{p}.mlp.2", w, w, rnd)
        _linear(sd, f"{p}.adaLN_modulation.1", w, 3 * w, rnd)
    _linear(sd, f"{net}.final_layer.linear", w, h.out_channels, rnd)
    _linear(sd, f"{net}.final_layer.adaLN_modulation.1", w, 2 * w, rnd)
    _linear(sd, "proj_in.0", c, t.hidden_size, rnd)
    _linear(sd, "proj_in.2", t.hidden_size, t.hidden_size, rnd)
    _linear(sd, "proj_out.0", t.hidden_size, t.hidden_size, rnd)
    _linear(sd, "proj_out.2", t.hidden_size, c, rnd)
    return collections.OrderedDict((k, v.to(dtype)) for k, v in sd.items())


def siglip_junk(seed: int = 1) -> dict[str, torch.Tensor]:
    """A few SigLIP2 tensors as they appear in the released file (never used by the model)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "siglip2.vision_model.embeddings.patch_embedding.weight": torch.randn(24, 3, 4, 4, generator=g),
        "siglip2.vision_model.encoder.layers.0.self_attn.q_proj.weight": torch.randn(24, 24, generator=g),
        "siglip2.vision_model.post_layernorm.bias": torch.randn(24, generator=g),
        "siglip2_proj.0.weight": torch.randn(40, 24, generator=g),
        "siglip2_proj.2.bias": torch.randn(40, generator=g),
    }


@pytest.fixture(scope="module")
def tiny_cfg():
    return unipic.tiny()


@pytest.fixture(scope="module")
def published(tmp_path_factory, tiny_cfg):
    sd = published_state_dict(tiny_cfg)
    path = tmp_path_factory.mktemp("unipic_src") / "pytorch_model.bin"
    torch.save({**sd, **siglip_junk()}, str(path))
    return path, sd


@pytest.fixture(scope="module")
def imported(tmp_path_factory, published):
    path, _ = published
    out = tmp_path_factory.mktemp("unipic_ckpt") / "ckpt"
    summary = import_checkpoint(path, out, "unipic", config="tiny", progress=False)
    return out, summary


def test_scheme_is_detected(published):
    path, sd = published
    assert detect_scheme([*sd, *siglip_junk()]) == SCHEME


def test_import_skips_siglip_and_logs(published, tmp_path, caplog):
    path, sd = published
    with caplog.at_level(logging.WARNING, logger="conversion"):
        summary = import_checkpoint(path, tmp_path / "c", "unipic", config="tiny", progress=False)
    assert summary["scheme"] == SCHEME and summary["tensors_skipped"] == len(siglip_junk())
    assert summary["tensors_out"] == len(sd) - 1  # the tied lm_head folds into embed_tokens
    assert any("skipped 5 tensors" in r.getMessage() for r in caplog.records)


def test_imported_model_holds_the_torch_tensors(imported, published):
    out, _ = imported
    _, sd = published
    model = load_model(out)
    arrays = module_arrays(model)
    np.testing.assert_array_equal(arrays["mar.encoder_blocks.1.attn.qkv.kernel"],
                                  sd["mar.encoder_blocks.1.attn.qkv.weight"].numpy().T)
    np.testing.assert_array_equal(arrays["mar.diffloss.net.res_blocks.1.adaLN_modulation.1.kernel"],
                                  sd["mar.diffloss.net.res_blocks.1.adaLN_modulation.1.weight"].numpy().T)
    np.testing.assert_array_equal(arrays["proj_out.2.kernel"], sd["proj_out.2.weight"].numpy().T)
    np.testing.assert_array_equal(arrays["mar.class_emb.embedding"], sd["mar.class_emb.weight"].numpy())
    np.testing.assert_array_equal(arrays["llm.model.embed_tokens.embedding"], sd["llm.lm_head.weight"].numpy())
    for name in ("mask_token", "fake_latent", "diffusion_pos_embed_learned", "decoder_pos_embed_learned"):
        np.testing.assert_array_equal(arrays[f"mar.{name}"], sd[f"mar.{name}"].numpy())
    assert len(arrays) == len(sd) - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact(tmp_path, tiny_cfg, dtype):
    sd = published_state_dict(tiny_cfg, seed=3, dtype=dtype)
    src = tmp_path / "pytorch_model.bin"
    torch.save({**sd, **siglip_junk()}, str(src))
    import_checkpoint(src, tmp_path / "ckpt", "unipic", config="tiny", progress=False)
    export_checkpoint(tmp_path / "ckpt", tmp_path / "back", fmt="bin", progress=False)
    back = torch.load(str(tmp_path / "back" / "pytorch_model.bin"), weights_only=True)
    assert set(back) == set(sd), sorted(set(back) ^ set(sd))
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert torch.equal(back[k].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           v.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)), k
    assert back["llm.lm_head.weight"].data_ptr() != back["llm.model.embed_tokens.weight"].data_ptr()


def _import_bad(tmp_path, sd):
    path = tmp_path / "bad.bin"
    torch.save(sd, str(path))
    import_checkpoint(path, tmp_path / "out", "unipic", config="tiny", progress=False)


def test_missing_tensor_is_named(tmp_path, published):
    sd = dict(published[1])
    del sd["mar.diffloss.net.res_blocks.1.mlp.2.bias"]
    with pytest.raises(MissingTensorsError, match=r"mar\.diffloss\.net\.res_blocks\.1\.mlp\.2\.bias"):
        _import_bad(tmp_path, sd)
    assert not (tmp_path / "out").exists()


def test_extra_tensor_is_named(tmp_path, published):
    sd = {**published[1], "mar.extra_token": torch.zeros(3)}
    with pytest.raises(UnexpectedTensorsError, match=r"mar\.extra_token"):
        _import_bad(tmp_path, sd)


def test_misshaped_tensor_is_named(tmp_path, published):
    sd = dict(published[1])
    sd["mar.encoder_pos_embed_learned"] = torch.zeros(1, 7, sd["mar.encoder_pos_embed_learned"].shape[-1])
    with pytest.raises(ShapeMismatchError, match=r"mar\.encoder_pos_embed_learned has shape \(1, 7, 48\)"):
        _import_bad(tmp_path, sd)


def test_untied_lm_head_is_refused(tmp_path, published):
    sd = dict(published[1])
    sd["llm.lm_head.weight"] = sd["llm.lm_head.weight"].clone()
    sd["llm.lm_head.weight"][3, 5] += 1.0
    with pytest.raises(ConversionError, match=r"llm\.lm_head\.weight is not tied .*1 elements differ"):
        _import_bad(tmp_path, sd)
    assert not (tmp_path / "out").exists()


def test_tied_copy_shapes_and_table_plan(tiny_cfg):
    tied = TiedCopy()
    assert tied.torch_shapes([(5, 3)]) == [(5, 3), (5, 3)]
    with pytest.raises(ConversionError, match="tied"):
        tied.jax_shapes([(5, 3), (5, 4)])
    from conversion.tables.unipic import unipic_mapping

    table = unipic_mapping(tiny_cfg)
    torch_names = [n for r in table.concrete() for n in r.torch]
    assert len(torch_names) == len(set(torch_names))
    shapes = {k: tuple(v.shape) for k, v in published_state_dict(tiny_cfg).items()}
    assert set(engine.output_shapes(table, shapes, "to_jax")) >= {"mar.diffloss.net.final_layer.linear.kernel"}


def test_full_preset_matches_the_published_layout():
    """unipic.md section 5 shapes at full size (meta tensors) plan against the abstract full model; parameter
    counts per part equal unipic.md 2.1 (computed there from the module definitions)."""
    from flax import nnx

    from conversion.state import abstract_params
    from conversion.tables.unipic import unipic_mapping
    from nexus_jax.models.unipic.model import UniPic

    cfg = unipic.full()
    shapes = {k: tuple(v.shape) for k, v in published_state_dict(cfg, meta=True).items()}
    assert shapes["mar.encoder_pos_embed_learned"] == (1, 1088, 1280) and shapes["mar.class_emb.weight"] == (1000, 1280)
    _, target = abstract_params(lambda: UniPic(cfg, rngs=nnx.Rngs(0)))
    steps = engine.plan(unipic_mapping(cfg), shapes, {k: v.shape for k, v in target.items()}, "to_jax")
    assert sum(len(s.outputs) for s in steps) == len(target)

    def count(prefix, exclude=None):
        return sum(int(np.prod(v.shape)) for k, v in target.items()
                   if k.startswith(prefix) and not (exclude and k.startswith(exclude)))

    enc = count("mar.encoder_") + count("mar.z_proj")  # blocks, norm, pos embed; z_proj and z_proj_ln
    dec = count("mar.decoder_") + count("mar.mask_token") + count("mar.diffusion_pos_embed_learned")
    got = {"llm": count("llm."), "encoder": enc, "decoder": dec, "head": count("mar.diffloss."),
           "class+fake": count("mar.class_emb") + count("mar.fake_latent"), "proj_in": count("proj_in."),
           "proj_out": count("proj_out.")}
    want = {"llm": 1.544e9, "encoder": 395.0e6, "decoder": 397.9e6, "head": 151.2e6, "class+fake": 1.28e6,
            "proj_in": 4.33e6, "proj_out": 4.33e6}
    print("full UniPic-1 parameters:", {k: f"{v / 1e6:.2f}M" for k, v in got.items()})
    for k, v in want.items():
        assert abs(got[k] - v) <= 0.0005 * v + 0.005e6, (k, got[k], v)
