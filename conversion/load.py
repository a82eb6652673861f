"""Fill nnx modules from in-memory foreign state dicts through the conversion tables (parity tests, benchmarks,
small tools): the same :class:`conversion.engine.Mapping` s the converter streams from files, applied to a dict.

Names are checked both ways (missing / unexpected tensors, wrong shapes: :class:`conversion.errors.ConversionError`)
and every parameter is written exactly once, cast to its dtype. :func:`build` creates the module abstractly (no random
initialisation) and can place each parameter straight into its sharding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from collections.abc import Mapping as AnyMapping
from typing import Any

import numpy as np

from conversion import engine
from conversion.io import DictReader, skip_tensors, torch_to_numpy
from conversion.state import assign, flat_variables, param_shapes


def as_numpy(state_dict: AnyMapping[str, Any]) -> dict[str, np.ndarray]:
    """name -> numpy array (torch tensors through :func:`conversion.io.torch_to_numpy`, same dtype)."""
    return {k: torch_to_numpy(v) if hasattr(v, "detach") else np.asarray(v) for k, v in state_dict.items()}


def convert(
    mapping: engine.Mapping,
    state_dict: AnyMapping[str, Any],
    target_shapes: AnyMapping[str, tuple[int, ...]],
    *,
    skip_prefixes: Sequence[str] = (),
    where: str = "the state dict",
) -> dict[str, np.ndarray]:
    """Torch-named arrays -> JAX path -> array for a model whose parameter shapes are ``target_shapes``."""
    reader = DictReader(as_numpy(state_dict), where)
    skip_tensors(reader, skip_prefixes)
    steps = engine.plan(mapping, reader.shapes, target_shapes, "to_jax", source_name=reader.where)
    return dict(engine.execute(steps, reader.read))


def load(module: Any, mapping: engine.Mapping, state_dict: AnyMapping[str, Any], *,
         skip_prefixes: Sequence[str] = (), where: str = "the state dict") -> Any:
    """Write ``state_dict`` (torch names) into ``module`` (concrete or from ``nnx.eval_shape``) in place; returns it."""
    arrays = convert(mapping, state_dict, param_shapes(module), skip_prefixes=skip_prefixes, where=where)
    return assign(module, arrays)


def build(ctor: Callable[[], Any], mapping: engine.Mapping, state_dict: AnyMapping[str, Any], *, mesh: Any = None,
          rules: Any = None, skip_prefixes: Sequence[str] = (), where: str = "the state dict") -> Any:
    """``ctor()`` built abstractly and filled from ``state_dict``; with ``mesh`` and ``rules`` (both or neither) each
    parameter is placed with its ``nexus_jax.sharding.state_shardings`` sharding."""
    if (mesh is None) != (rules is None):
        raise ValueError("pass both mesh and rules, or neither")
    import jax
    from flax import nnx

    module = nnx.eval_shape(ctor)
    arrays = convert(mapping, state_dict, param_shapes(module), skip_prefixes=skip_prefixes, where=where)
    if mesh is None:
        return assign(module, arrays)
    from nexus_jax.sharding import state_shardings

    shardings = {k: v.get_value() for k, v in flat_variables(state_shardings(nnx.state(module, nnx.Param), mesh,
                                                                            rules)).items()}
    dtypes = {k: v.get_value().dtype for k, v in flat_variables(module).items()}
    # engine.plan checked that ``arrays`` holds exactly the module's parameters
    return assign(module, {k: jax.device_put(np.asarray(a, dtypes[k]), shardings[k]) for k, a in arrays.items()},
                  cast=False)


# ------------------------------------------------------------------------ one call per foreign layout (tables inside)
def qwen2_text(model: Any, state_dict: AnyMapping[str, Any]) -> Any:
    """A JAX ``Qwen2ForCausalLM`` from a transformers Qwen2 / Qwen2.5-VL state dict (any key prefix of
    :data:`conversion.tables.qwen2_5_vl.TRANSFORMERS_TEXT_PREFIXES`; the vision tower, a tied lm_head skipped)."""
    from conversion.tables.qwen2_5_vl import transformers_text_mapping

    table, skip = transformers_text_mapping(model.config, state_dict.keys())
    return load(model, table, state_dict, skip_prefixes=skip, where="the transformers state dict")


def qwen2_5_vision(model: Any, state_dict: AnyMapping[str, Any], prefix: str = "") -> Any:
    """A JAX ``Qwen25VisionTransformer`` from transformers vision-tower tensors named ``{prefix}blocks.0...``."""
    from conversion.tables.qwen2_5_vl import vision_config_mapping

    return load(model, vision_config_mapping(model.config, torch_prefix=prefix), state_dict,
                where="the transformers vision state dict")


def qwen2_5_vl(model: Any, state_dict: AnyMapping[str, Any]) -> Any:
    """A JAX ``Qwen25VLForConditionalGeneration`` (or any module with ``language_model`` / ``visual`` and no other
    parameters) from a transformers Qwen2_5_VLForConditionalGeneration state dict (4.x or 5.x names)."""
    from conversion.tables.qwen2_5_vl import transformers_vl_mapping

    table, skip = transformers_vl_mapping(model.config, state_dict.keys())
    return load(model, table, state_dict, skip_prefixes=skip, where="the transformers state dict")


def nexus_ar(model: Any, state_dict: AnyMapping[str, Any]) -> Any:
    """A JAX ``NexusGenAR`` from a Nexus-Gen AR state dict: transformers Qwen2_5_VL tensors (4.x or 5.x names) plus
    ``vision_head.weight`` and, for V2, ``image_prefill_embeds.weight``."""
    from conversion.engine import combine
    from conversion.tables.qwen2_5_vl import nexus_heads_mapping, transformers_vl_mapping

    table, skip = transformers_vl_mapping(model.config.vl, state_dict.keys())
    table = combine("nexus_ar_transformers", table, nexus_heads_mapping(model.config.uses_prefill_embeds))
    return load(model, table, state_dict, skip_prefixes=skip, where="the Nexus-Gen AR state dict")


def flux_dit_diffusers(model: Any, state_dict: AnyMapping[str, Any]) -> Any:
    """A JAX ``FluxDiT`` from a diffusers ``FluxTransformer2DModel`` state dict (q / k / v fused on the way)."""
    from conversion.tables.flux_dit import diffusers_mapping

    return load(model, diffusers_mapping(model.cfg), state_dict, where="the diffusers FLUX state dict")


def flux_vae_diffusers(config: Any, state_dict: AnyMapping[str, Any], *, mesh: Any = None, rules: Any = None) -> Any:
    """A ``FluxVAE`` for ``config`` from a diffusers ``AutoencoderKL`` state dict, built abstractly (optionally
    straight into the shardings of ``rules`` on ``mesh``)."""
    from flax import nnx

    from conversion.tables.vae import diffusers_mapping
    from nexus_jax.models.vae import FluxVAE

    return build(lambda: FluxVAE(config, rngs=nnx.Rngs(0)), diffusers_mapping(config), state_dict, mesh=mesh,
                 rules=rules, where="the diffusers AutoencoderKL state dict")
