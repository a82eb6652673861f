"""conversion.load: in-memory foreign state dicts into nnx modules through the conversion tables (key prefixes of the
transformers layouts, skipped parts, same-name tables, error messages)."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from configs.qwen2_5 import tiny
from conversion import engine, load
from conversion.errors import ConversionError
from conversion.state import assign, module_arrays, param_shapes
from conversion.tables.qwen2_5_vl import TRANSFORMERS_TEXT_PREFIXES, text_mapping, transformers_prefixes
from nexus_jax.models.qwen2.model import Qwen2ForCausalLM

CFG = tiny(num_layers=1, vocab_size=64, tie_word_embeddings=False)


def _zeros(cfg=CFG) -> Qwen2ForCausalLM:
    model = nnx.eval_shape(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)))
    return assign(model, {k: np.zeros(s, np.float32) for k, s in param_shapes(model).items()})


@pytest.fixture(scope="module")
def source():
    """A random JAX model and its tensors in transformers names (``model.`` prefix, untied lm_head)."""
    rng = np.random.default_rng(0)
    model = _zeros()
    arrays = {k: rng.standard_normal(s).astype(np.float32) for k, s in param_shapes(model).items()}
    assign(model, arrays)
    steps = engine.plan(text_mapping(CFG.num_layers), param_shapes(model), None, "to_torch")
    return arrays, dict(engine.execute(steps, module_arrays(model).__getitem__))


@pytest.mark.parametrize("prefix", TRANSFORMERS_TEXT_PREFIXES)
def test_qwen2_text_reads_every_transformers_prefix(source, prefix):
    arrays, torch_sd = source
    sd = {(k.replace("model.", prefix, 1) if k.startswith("model.") else k): v for k, v in torch_sd.items()}
    sd["model.visual.blocks.0.attn.qkv.weight"] = np.zeros((3, 1), np.float32)  # a vision tower is skipped
    got = module_arrays(load.qwen2_text(_zeros(), sd))
    assert sorted(got) == sorted(arrays)
    for k, v in arrays.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_tied_lm_head_is_skipped_and_errors_name_the_tensor(source):
    _, torch_sd = source
    tied = tiny(num_layers=1, vocab_size=64, tie_word_embeddings=True)
    model = load.qwen2_text(_zeros(tied), torch_sd)  # lm_head.weight present but tied: skipped
    assert model.lm_head is None
    bad = {**torch_sd, "model.layers.0.mlp.up_proj.weight": np.zeros((3, 3), np.float32)}
    with pytest.raises(ConversionError, match=r"model.layers.0.mlp.up_proj.weight has shape \(3, 3\)"):
        load.qwen2_text(_zeros(), bad)
    extra = {**torch_sd, "model.layers.0.mlp.extra.weight": np.zeros((1,), np.float32)}
    with pytest.raises(ConversionError, match="unexpected tensors.*model.layers.0.mlp.extra.weight"):
        load.qwen2_text(_zeros(), extra)
    with pytest.raises(ConversionError, match="no embed_tokens.weight"):
        transformers_prefixes(["lm_head.weight"])


def test_same_names_lays_out_kernels_and_embeddings():
    shapes = {"a.kernel": (4, 3), "c.kernel": (3, 3, 2, 5), "e.embedding": (7, 2), "n.bias": (5,)}
    table = engine.same_names("t", shapes)
    by_jax = {r.jax[0]: r for r in table.rules}
    assert by_jax["a.kernel"].torch == ("a.weight",) and by_jax["a.kernel"].transform == engine.LINEAR
    assert by_jax["c.kernel"].transform == engine.CONV2D and by_jax["e.embedding"].torch == ("e.weight",)
    assert by_jax["n.bias"].transform == engine.IDENTITY
    with pytest.raises(ConversionError, match="rank-3 kernel"):
        engine.same_names("t", {"x.kernel": (1, 2, 3)})
