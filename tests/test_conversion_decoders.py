"""Nexus-Gen decoder checkpoints (torch ``.bin`` pickles) in the three upstream key schemes.

torch originals: a diffusers ``FluxTransformer2DModel`` (tiny, random) whose weights are written under DiffSynth
names, the generation adapter (Linear -> LayerNorm -> ReLU -> Linear -> LayerNorm) and the editing merger (one
transformers Qwen2 decoder layer + RMSNorm/Linear projector), saved as V1 ``decoder_81_512.bin`` (unprefixed),
V2 ``generation_decoder.bin`` (``adapter.*`` + ``pipe.dit.*``) and ``edit_decoder.bin`` (``embedding_merger.*`` +
``pipe.dit.*``).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Qwen2Config, Qwen2Model

from configs.nexus_decoders import NexusDecoderConfig
from conversion import engine, io
from conversion.cli import main as convert
from conversion.pipeline import load_arrays, load_model, load_submodule
from conversion.tables import flux_dit
from nexus_jax.models.flux import FluxDiT
from nexus_jax.models.nexus_decoders import EditingDecoder, GenerationDecoder, apply_adapter
from tests.test_conversion_diffusion import flux_inputs, torch_flux

CFG = NexusDecoderConfig.tiny()


def diffsynth_dit_state(ref) -> dict[str, torch.Tensor]:
    """The diffusers model's weights under DiffSynth FluxDiT names (diffusers -> JAX layout -> DiffSynth)."""
    sd = {k: io.torch_to_numpy(v) for k, v in ref.state_dict().items()}
    steps = engine.plan(flux_dit.diffusers_mapping(CFG.dit), {k: v.shape for k, v in sd.items()}, None, "to_jax")
    jax_side = dict(engine.execute(steps, sd.__getitem__))
    back = engine.plan(flux_dit.diffsynth_mapping(CFG.dit), {k: v.shape for k, v in jax_side.items()}, None,
                       "to_torch")
    return {k: io.numpy_to_torch(v).clone() for k, v in engine.execute(back, jax_side.__getitem__)}


def torch_adapter(seed: int = 1) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    a = CFG.adapter
    m = torch.nn.Sequential(torch.nn.Linear(a.in_dim, a.out_dim), torch.nn.LayerNorm(a.out_dim), torch.nn.ReLU(),
                            torch.nn.Linear(a.out_dim, a.out_dim), torch.nn.LayerNorm(a.out_dim))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


class TorchMerger(torch.nn.Module):
    """Key layout of Nexus-Gen's ImageEmbeddingMerger (``layers.*`` + ``projector.{0..5}``)."""

    def __init__(self, seed: int = 2):
        super().__init__()
        torch.manual_seed(seed)
        t = CFG.merger.layer
        qcfg = Qwen2Config(vocab_size=8, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                           num_hidden_layers=CFG.merger.num_layers, num_attention_heads=t.num_heads,
                           num_key_value_heads=t.num_kv_heads)
        self.layers = Qwen2Model(qcfg).layers
        d, p, o = t.hidden_size, CFG.merger.projector_dim, CFG.merger.out_dim
        self.projector = torch.nn.Sequential(torch.nn.RMSNorm(d, eps=1e-6), torch.nn.Linear(d, p),
                                             torch.nn.RMSNorm(p, eps=1e-6), torch.nn.SiLU(), torch.nn.Linear(p, o),
                                             torch.nn.RMSNorm(o, eps=1e-6))
        with torch.no_grad():
            for q in self.parameters():
                q.add_(0.1 * torch.randn_like(q))


@pytest.fixture(scope="module")
def originals():
    ref = torch_flux(CFG.dit, seed=3)
    dit = diffsynth_dit_state(ref)
    adapter, merger = torch_adapter(), TorchMerger()
    files = {
        "nexus_v1_decoder": {**adapter.state_dict(), **dit},
        "nexus_v2_generation": {**{f"adapter.{k}": v for k, v in adapter.state_dict().items()},
                                **{f"pipe.dit.{k}": v for k, v in dit.items()}},
        "nexus_v2_editing": {**{f"embedding_merger.{k}": v for k, v in merger.state_dict().items()},
                             **{f"pipe.dit.{k}": v for k, v in dit.items()}},
    }
    return ref, adapter, merger, files


FAMILY = {"nexus_v1_decoder": "generation_decoder", "nexus_v2_generation": "generation_decoder",
          "nexus_v2_editing": "editing_decoder"}


@pytest.mark.parametrize("scheme", sorted(FAMILY))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decoder_bin_round_trip_is_bit_exact(originals, tmp_path, scheme, dtype):
    sd = {k: v.detach().to(dtype).contiguous() for k, v in originals[3][scheme].items()}
    torch.save(sd, tmp_path / "decoder.bin")
    assert convert(["detect", str(tmp_path / "decoder.bin")]) == 0
    assert convert(["import", str(tmp_path / "decoder.bin"), str(tmp_path / "jax"), "--family", FAMILY[scheme],
                    "--config", "tiny", "--no-progress"]) == 0
    assert convert(["export", str(tmp_path / "jax"), str(tmp_path / "back"), "--format", "bin", "--no-progress"]) == 0
    (out,) = list((tmp_path / "back").glob("*.bin"))
    back = torch.load(out, weights_only=True)
    assert list(back) == list(sd) or sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert back[k].dtype == dtype and back[k].shape == v.shape and torch.equal(back[k], v), k


def test_v1_converts_to_v2_layout(originals, tmp_path):
    files = originals[3]
    torch.save(files["nexus_v1_decoder"], tmp_path / "v1.bin")
    assert convert(["import", str(tmp_path / "v1.bin"), str(tmp_path / "jax"), "--family", "generation_decoder",
                    "--config", "tiny", "--no-progress"]) == 0
    assert convert(["export", str(tmp_path / "jax"), str(tmp_path / "v2"), "--scheme", "nexus_v2_generation",
                    "--no-progress"]) == 0
    with io.open_checkpoint(tmp_path / "v2") as r:
        want = files["nexus_v2_generation"]
        assert sorted(r.shapes) == sorted(want)
        assert all(np.array_equal(r.read(k), v.detach().numpy()) for k, v in want.items())


@pytest.fixture(scope="module")
def imported(originals, tmp_path_factory):
    root = tmp_path_factory.mktemp("dec")
    for scheme in ("nexus_v2_generation", "nexus_v2_editing"):
        torch.save(originals[3][scheme], root / f"{scheme}.bin")
        assert convert(["import", str(root / f"{scheme}.bin"), str(root / scheme), "--family", FAMILY[scheme],
                        "--config", "tiny", "--no-progress"]) == 0
    return root


def test_imported_decoder_dit_matches_diffusers(originals, imported):
    ref = originals[0]
    dit = load_submodule(imported / "nexus_v2_generation", "dit.", FluxDiT(CFG.dit, rngs=nnx.Rngs(0)))
    x = flux_inputs(CFG.dit, 2, 6, 10, 81)  # 81 adapter tokens as context, non-square latent
    out = np.asarray(nnx.jit(lambda m, a: m(**a))(dit, {k: jnp.asarray(v) for k, v in x.items()}))
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    with torch.no_grad():
        want = ref(hidden_states=t["tokens"], encoder_hidden_states=t["context"], pooled_projections=t["pooled"],
                   timestep=t["sigma"], img_ids=t["img_ids"], txt_ids=t["txt_ids"], guidance=t["guidance"]).sample
    err = np.abs(out - want.numpy()).max()
    print(f"decoder DiT (pipe.dit.* of a V2 .bin) vs diffusers: max abs err {err:.2e}")
    assert err <= 1e-4


def _rms_norm(x, w, eps=1e-6):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def test_imported_adapter_and_projector_compute_like_torch(originals, imported):
    _, adapter, merger, _ = originals
    model = load_model(imported / "nexus_v2_generation")
    assert isinstance(model, GenerationDecoder)
    e = np.random.default_rng(0).standard_normal((2, 81, CFG.adapter.in_dim)).astype(np.float32)
    out = np.asarray(apply_adapter(model.adapter, jnp.asarray(e)))
    with torch.no_grad():
        want = adapter(torch.from_numpy(e)).numpy()
    err = np.abs(out - want).max()
    print(f"generation adapter vs torch: max abs err {err:.2e}")
    assert err <= 1e-5

    editing = load_model(imported / "nexus_v2_editing")
    assert isinstance(editing, EditingDecoder)
    p = load_arrays(imported / "nexus_v2_editing", "embedding_merger.projector.")
    x = np.random.default_rng(1).standard_normal((405, CFG.merger.layer.hidden_size)).astype(np.float32)
    y = _rms_norm(_rms_norm(x, p["0.weight"]) @ p["1.kernel"] + p["1.bias"], p["2.weight"])
    y = _rms_norm((y / (1 + np.exp(-y))) @ p["4.kernel"] + p["4.bias"], p["5.weight"])
    with torch.no_grad():
        want = merger.projector(torch.from_numpy(x)).numpy()
    assert np.abs(y - want).max() <= 1e-5
    np.testing.assert_array_equal(np.asarray(editing.embedding_merger.layers[0].self_attn.k_proj.kernel[...]),
                                  merger.layers[0].self_attn.k_proj.weight.detach().numpy().T)
