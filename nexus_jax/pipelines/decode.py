"""Nexus-Gen image embeddings -> PNG images: conditioner + N-step FLUX sampler + VAE decode in one jitted program.

Generation: ``adapter(embeds)`` as context (zero text ids), CLIP("") pooled, guidance 3.5, true CFG 3.0 against the
empty-prompt FLUX conditioning (T5("") + CLIP("")). Editing: ``merger(embeds, ref_embeds)`` with positional text ids,
cfg 1.0. The empty-prompt encoder outputs are precomputed arrays (:class:`EmptyPrompt`); no text encoder is needed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.nexus_decoders import SamplerConfig
from nexus_jax.diffusion.sampler import sample, schedule_sigmas
from nexus_jax.models.flux.packing import latent_size
from nexus_jax.models.nexus_decoders import EditingDecoder, GenerationDecoder, negative_conditioning
from nexus_jax.models.vae import pixels_to_uint8


@dataclasses.dataclass(frozen=True)
class EmptyPrompt:
    """FLUX text-encoder outputs for the empty prompt: pooled CLIP-L [1, 768], T5-XXL sequence [1, 512, 4096]."""

    pooled: np.ndarray
    t5: np.ndarray

    @classmethod
    def load(cls, path: str | Path) -> EmptyPrompt:
        """From the one empty-prompt file format: ``empty_prompt.safetensors`` with ``pooled`` [pooled_dim] (or
        [1, pooled_dim]) and ``t5`` [Lt, context_dim] (or [1, Lt, context_dim]), as ``convert nexus-gen`` writes it
        and converted checkpoints hold it."""
        from safetensors.numpy import load

        from nexus_jax import paths

        p = paths.as_path(path)
        if not p.name.endswith(".safetensors"):
            raise ValueError(f"empty-prompt file must be a .safetensors file, got {path}")
        d = load(p.read_bytes())
        missing = {"pooled", "t5"} - set(d)
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}; it needs 'pooled' [pooled_dim] and 't5' "
                             "[Lt, context_dim]")
        t5 = np.asarray(d["t5"], np.float32)
        return cls(np.asarray(d["pooled"], np.float32).reshape(1, -1), t5.reshape(1, *t5.shape[-2:]))

    def save(self, path: str | Path) -> None:
        """Write ``pooled`` [pooled_dim] and ``t5`` [Lt, context_dim] (float32) as ``.safetensors``, atomically."""
        from safetensors.numpy import save

        from nexus_jax import paths

        data = save({"pooled": np.ascontiguousarray(self.pooled, np.float32).reshape(-1),
                     "t5": np.ascontiguousarray(self.t5, np.float32).reshape(self.t5.shape[-2:])})
        paths.atomic_write_bytes(path, data)


def check_finite(name: str, x: np.ndarray | jax.Array) -> None:
    """Raise ValueError if ``x`` holds NaN or Inf (checked on the host, before compilation)."""
    arr = np.asarray(x)
    bad = ~np.isfinite(arr)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name} contains {int(bad.sum())} non-finite values (first at index {first}, "
            f"value {arr[first]}); conditioning must be finite"
        )


class DecodePipeline:
    """Embeddings -> uint8 images [B, H, W, 3] (and PNG files). One compiled program per input shape."""

    def __init__(
        self,
        decoder: GenerationDecoder | EditingDecoder,
        vae: nnx.Module,
        empty: EmptyPrompt,
        sampler: SamplerConfig | None = None,
    ):
        self.decoder, self.vae, self.empty = decoder, vae, empty
        self.sampler = sampler or decoder.cfg.sampler
        self.height, self.width = self.sampler.height, self.sampler.width
        self.latent_hw = latent_size(self.height, self.width)
        check_finite("empty-prompt pooled", empty.pooled)
        check_finite("empty-prompt T5 context", empty.t5)
        self._dec_graph = nnx.graphdef(decoder)
        self._vae_graph = nnx.graphdef(vae)
        self._jitted = jax.jit(self._run)

    def _run(self, dec_state, vae_state, key, embeds, ref_embeds, pooled, t5):
        dec = nnx.merge(self._dec_graph, dec_state)
        vae = nnx.merge(self._vae_graph, vae_state)
        b = embeds.shape[0]
        if isinstance(dec, EditingDecoder):
            cond = dec.conditioning(embeds, ref_embeds, pooled, self.latent_hw)
        else:
            cond = dec.conditioning(embeds, pooled)
        neg = negative_conditioning(t5, pooled, b) if self.sampler.cfg_scale != 1.0 else None
        sigmas = jnp.asarray(schedule_sigmas(self.sampler, self.height, self.width))
        out = sample(
            dec.dit,
            vae,
            key,
            cond,
            neg,
            sigmas,
            self.sampler.guidance,
            self.sampler.cfg_scale,
            height=self.height,
            width=self.width,
        )
        return pixels_to_uint8(out.images)

    def __call__(
        self, key: jax.Array, embeds: np.ndarray | jax.Array, ref_embeds: np.ndarray | jax.Array | None = None
    ) -> np.ndarray:
        """embeds [B, 81, 3584] (AR output); ref_embeds [B, 324, 3584] (editing only) -> uint8 [B, H, W, 3]."""
        embeds = jnp.asarray(embeds)
        check_finite("embeds", embeds)
        if ref_embeds is not None:
            if not isinstance(self.decoder, EditingDecoder):
                raise ValueError("ref_embeds are only used by the editing decoder")
            ref_embeds = jnp.asarray(ref_embeds)
            check_finite("ref_embeds", ref_embeds)
        images = self._jitted(
            nnx.state(self.decoder),
            nnx.state(self.vae),
            key,
            embeds,
            ref_embeds,
            jnp.asarray(self.empty.pooled),
            jnp.asarray(self.empty.t5),
        )
        return np.asarray(images)


def save_pngs(images: np.ndarray, paths: Sequence[str | Path]) -> list[Path]:
    """Write uint8 [B, H, W, 3] images as PNG files (one path per image)."""
    from PIL import Image

    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [B, H, W, 3], got {images.dtype} {images.shape}")
    if len(paths) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(paths)} paths")
    out = []
    for img, p in zip(images, paths):
        p = Path(p)
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(p, format="PNG")
        out.append(p)
    return out
