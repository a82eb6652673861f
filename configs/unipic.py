"""Skywork UniPic-1 configuration: Qwen2.5 LLM + MAR encoder/decoder + per-token diffusion head + KL-16 VAE."""

from __future__ import annotations

import dataclasses
from typing import Any

from configs import qwen2_5
from configs.mar import MARConfig
from configs.qwen2_5 import Qwen2TextConfig
from configs.unipic_diffusion import DiffusionHeadConfig, GaussianDiffusionConfig
from configs.vae import FluxVAEConfig

CFG_SCHEDULES = ("constant", "linear")  # how the CFG scale ramps over MAR iterations (nexus_jax.diffusion.maskgit)


@dataclasses.dataclass(frozen=True)
class UniPicTokens:
    """Special token ids: ``<image>`` (added after Qwen2.5's 151665 tokens), chat markers, eos/pad (= im_end)."""

    image: int = 151665
    im_start: int = 151644
    im_end: int = 151645
    endoftext: int = 151643
    pad: int = 151645

    def __post_init__(self) -> None:
        ids = dataclasses.asdict(self)
        for name, value in ids.items():
            if value < 0:
                raise ValueError(f"UniPicTokens.{name} must be >= 0, got {value}")
        if len({self.image, self.im_start, self.im_end, self.endoftext}) != 4:
            raise ValueError(f"image / im_start / im_end / endoftext ids must be distinct, got {ids}")


# Tiny ids after the 256 byte ids of nexus_jax.nexus.tiny.ByteTokenizer.encode.
TINY_TOKENS = UniPicTokens(image=259, im_start=256, im_end=257, endoftext=258, pad=257)
TINY_VOCAB = 264


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Masked-AR sampling defaults (unipic.md 3.1 / 3.4): iterations, CFG scale and schedule, noise temperature.

    ``visible_buckets`` (JAX only): 1 runs the LLM bridge on all N image slots every iteration (one compiled
    iteration); k > 1 gathers the visible tokens into a segment of one of at most k capacities (+ the empty first
    step), chosen over the whole schedule to minimise the image slots the LLM runs on
    (:func:`nexus_jax.unipic.sample.segment_capacities`), which saves most of the LLM work of the early, mostly-masked
    iterations.
    """

    num_iter: int = 32
    cfg: float = 3.0
    cfg_schedule: str = "constant"
    temperature: float = 1.0
    visible_buckets: int = 4

    def __post_init__(self) -> None:
        if self.num_iter < 1:
            raise ValueError(f"num_iter must be >= 1, got {self.num_iter}")
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule={self.cfg_schedule!r} is not one of {CFG_SCHEDULES}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.visible_buckets < 1:
            raise ValueError(f"visible_buckets must be >= 1, got {self.visible_buckets}")


@dataclasses.dataclass(frozen=True)
class UniPicConfig:
    """The whole model. ``resolution`` is the square pixel size; the token grid is ``resolution / vae_stride``.

    Invariants (checked): ``mar.llm_hidden == text.hidden_size`` (proj_in / proj_out), the MAR token width equals the
    VAE latent channels, the head's token and condition widths match the MAR, and the tied-embedding 1-D RoPE LLM.
    """

    text: Qwen2TextConfig
    mar: MARConfig
    head: DiffusionHeadConfig
    diffusion: GaussianDiffusionConfig
    vae: FluxVAEConfig
    tokens: UniPicTokens = UniPicTokens()
    sampling: SamplingConfig = SamplingConfig()
    resolution: int = 1024
    vae_stride: int = 16

    def __post_init__(self) -> None:
        if self.mar.llm_hidden != self.text.hidden_size:
            raise ValueError(
                f"mar.llm_hidden={self.mar.llm_hidden} must equal the LLM hidden_size={self.text.hidden_size} "
                "(proj_in maps MAR width -> LLM width, proj_out back)"
            )
        if not self.text.tie_word_embeddings or self.text.mrope_section is not None:
            raise ValueError("UniPic's LLM is plain Qwen2.5: tie_word_embeddings=True and mrope_section=None")
        if self.resolution < 1 or self.resolution % self.vae_stride:
            raise ValueError(f"resolution {self.resolution} must be a positive multiple of vae_stride "
                             f"{self.vae_stride}")
        ids = dataclasses.asdict(self.tokens)
        too_big = {k: v for k, v in ids.items() if v >= self.text.vocab_size and k != "image"}
        if too_big:
            raise ValueError(f"token ids {too_big} are outside the vocabulary of {self.text.vocab_size}")
        self._check_parts()

    def _check_parts(self) -> None:
        if self.vae.latent_channels != self.mar.token_embed_dim:
            raise ValueError(
                f"VAE latent_channels {self.vae.latent_channels} != MAR token_embed_dim {self.mar.token_embed_dim}"
            )
        if self.vae.downsample_factor != self.vae_stride:
            raise ValueError(f"VAE downsamples x{self.vae.downsample_factor}, vae_stride is {self.vae_stride}")
        for name, want in (("in_channels", self.mar.token_embed_dim), ("z_channels", self.mar.width)):
            if getattr(self.head, name) != want:
                raise ValueError(f"diffusion head {name}={getattr(self.head, name)} must be {want} "
                                 "(MAR token width / MAR width)")
        if self.head.learn_sigma != self.diffusion.learn_sigma:
            raise ValueError(f"head learn_sigma={self.head.learn_sigma} != diffusion learn_sigma="
                             f"{self.diffusion.learn_sigma} (out_channels must be 2 * in_channels for learned sigma)")

    @property
    def grid(self) -> int:
        """Latent tokens per side."""
        return self.resolution // self.vae_stride

    @property
    def seq_len(self) -> int:
        """Image tokens N = grid ** 2."""
        return self.grid**2

    @property
    def image_tokens(self) -> int:
        """``<image>`` slots per source image for editing / understanding: N + buffer_size."""
        return self.seq_len + self.mar.buffer_size

    def replace(self, **changes: Any) -> UniPicConfig:
        return dataclasses.replace(self, **changes)


def tiny_text(**overrides: Any) -> Qwen2TextConfig:
    """Tiny plain Qwen2.5 for tests: 3 query / 1 KV heads of 16, hidden 48, 2 layers, tied embeddings, 1-D RoPE."""
    base = qwen2_5.tiny(
        vocab_size=TINY_VOCAB, hidden_size=48, intermediate_size=72, num_heads=3, num_kv_heads=1, head_dim=16,
        mrope_section=None, tie_word_embeddings=True,
    )
    return base.replace(**overrides)


def full(**overrides: Any) -> UniPicConfig:
    """Skywork-UniPic-1.5B at 1024 px: Qwen2.5-1.5B, MAR-Huge (+ 12-block head), KL-16 VAE, 32 iterations, CFG 3."""
    base: dict[str, Any] = dict(
        text=qwen2_5.qwen2_5_1_5b(),
        mar=MARConfig.full(),
        head=DiffusionHeadConfig.full(),
        diffusion=GaussianDiffusionConfig.full(),
        vae=FluxVAEConfig.kl16(),
    )
    base.update(overrides)
    return UniPicConfig(**base)


def tiny(**overrides: Any) -> UniPicConfig:
    """Test size: 64 px (4x4 tokens of 16 channels), MAR width 48 / 3 heads / 4 buffers, head width 33,
    10 sampling steps, LLM 48 wide with 3 query / 1 KV heads, byte-level vocabulary, 4 iterations."""
    text = tiny_text()
    base: dict[str, Any] = dict(
        text=text,
        mar=MARConfig.tiny(llm_hidden=text.hidden_size),
        head=DiffusionHeadConfig.tiny(in_channels=16, out_channels=32, z_channels=48),
        diffusion=GaussianDiffusionConfig.tiny(),
        vae=FluxVAEConfig.kl16_tiny(),
        tokens=TINY_TOKENS,
        sampling=SamplingConfig(num_iter=4, visible_buckets=2),
        resolution=64,
    )
    base.update(overrides)
    return UniPicConfig(**base)
