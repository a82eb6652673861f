"""UniPic-1 integration: understanding (greedy tokens vs transformers ``generate(inputs_embeds=...)`` over torch
VAE -> MAR encoder -> proj_in), training losses vs a torch computation from the spec, and the batch inference CLI end
to end on a tiny converted checkpoint (text-to-image, editing, understanding, resume)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from PIL import Image

from configs import unipic
from conversion.engine import execute, plan
from conversion.families import get_family
from conversion.io import DictReader
from conversion.state import assign, module_arrays, param_shapes
from nexus_jax.models.qwen2.hf_reference import text_config_kwargs
from nexus_jax.models.vae import FluxVAE
from nexus_jax.unipic import prompts
from nexus_jax.unipic.loading import from_torch_state_dict
from nexus_jax.unipic.understand import pad_to_square, preprocess_image, understand
from tests.helpers.kl16_torch import UniPicVAECodec
from tests.helpers.mar_torch import TorchMAR, torch_projector
from tests.test_kl16_vae import torch_kl16
from tests.test_unipic_conversion import published_state_dict

CFG = unipic.tiny()
ENCODE = lambda s: list(s.encode("utf-8"))  # noqa: E731 - byte-level tokenizer of the tiny vocabulary


def _sub(sd: dict, prefix: str, drop: str | None = None) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and not (drop and k.startswith(drop))}


class TorchUniPic:
    """Torch reference modules holding one published-layout state dict (transformers Qwen2, the MAR helper, the
    projectors) plus the LDM KL-16 helper."""

    def __init__(self, cfg: unipic.UniPicConfig, sd: dict, vae_sd: dict):
        hf_cfg = transformers.Qwen2Config(**text_config_kwargs(cfg.text))
        hf_cfg._attn_implementation = "eager"
        self.llm = transformers.Qwen2ForCausalLM(hf_cfg).eval()
        self.llm.load_state_dict(_sub(sd, "llm."), strict=True)
        self.mar = TorchMAR(cfg.mar).eval()
        self.mar.load_state_dict(_sub(sd, "mar.", drop="mar.diffloss."), strict=True)
        c, d = cfg.mar.width, cfg.text.hidden_size
        self.proj_in = torch_projector(c, d, d)
        self.proj_in.load_state_dict(_sub(sd, "proj_in."))
        self.proj_out = torch_projector(d, d, c)
        self.proj_out.load_state_dict(_sub(sd, "proj_out."))
        vae = torch_kl16(cfg.vae).eval()
        vae.load_state_dict(vae_sd, strict=True)
        self.codec = UniPicVAECodec(vae, cfg.vae.scaling_factor)
        self.cfg = cfg

    @torch.no_grad()
    def visual(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """NCHW pixels -> (x_con, z with buffers at the end) as upstream extract_visual_feature."""
        tokens = self.codec.encode(pixels)
        b, m, n, ch = tokens.shape
        tokens = tokens.reshape(b, m * n, ch)
        mask = torch.zeros(b, m * n)
        x_con = self.mar.forward_mae_encoder(tokens, mask, self.mar.fake_latent.expand(b, -1), image_shape=(m, n))
        z = self.proj_in(x_con)
        nb = self.cfg.mar.buffer_size
        return x_con, torch.cat([z[:, nb:], z[:, :nb]], dim=1)


def upstream_preprocess(image: np.ndarray, size: int) -> torch.Tensor:
    """image2text.py: expand2square(gray 127) with PIL paste, ``resize((size, size))`` (PIL's default bicubic),
    ``2 * (x / 255) - 1``, NCHW."""
    pil = Image.fromarray(image)
    w, h = pil.size
    if w != h:
        s = max(w, h)
        canvas = Image.new(pil.mode, (s, s), (127, 127, 127))
        canvas.paste(pil, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
        pil = canvas
    pil = pil.resize(size=(size, size))
    x = torch.from_numpy(np.array(pil)).float().permute(2, 0, 1)[None]
    return 2 * (x / 255) - 1


@pytest.fixture(scope="module")
def weights():
    """(published-layout state dict, KL-16 state dict, JAX UniPic, JAX VAE, torch reference)."""
    sd = published_state_dict(CFG, seed=11)
    torch.manual_seed(5)
    ref_vae = torch_kl16(CFG.vae)
    with torch.no_grad():
        for p in ref_vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    vae_sd = {k: v.clone() for k, v in ref_vae.state_dict().items()}
    model = from_torch_state_dict(CFG, sd)
    vae = nnx.eval_shape(lambda: FluxVAE(CFG.vae, rngs=nnx.Rngs(0)))
    table = get_family("kl16_vae").table("kl16_vae", CFG.vae)
    reader = DictReader({k: v.numpy() for k, v in vae_sd.items()})
    assign(vae, dict(execute(plan(table, reader.shapes, param_shapes(vae), "to_jax"), reader.read)))
    return sd, vae_sd, model, vae, TorchUniPic(CFG, sd, vae_sd)


def test_state_dict_round_trip_through_the_model(weights):
    sd, _, model, _, _ = weights
    from nexus_jax.unipic.loading import to_torch_state_dict

    back = to_torch_state_dict(model)
    assert set(back) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)
    assert module_arrays(model)["proj_in.0.kernel"].shape == (CFG.mar.width, CFG.text.hidden_size)


def test_preprocessing_matches_upstream():
    rng = np.random.default_rng(0)
    for shape in ((40, 64, 3), (70, 33, 3), (64, 64, 3)):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        ours = preprocess_image(image, 64)
        ref = upstream_preprocess(image, 64)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-6)
    sq = pad_to_square(np.zeros((2, 5, 3), np.uint8))
    assert sq.shape == (5, 5, 3) and (sq[0] == 127).all() and (sq[1:3] == 0).all() and (sq[3:] == 127).all()
    with pytest.raises(ValueError, match="RGB"):
        pad_to_square(np.zeros((4, 4), np.uint8))


def test_understanding_greedy_tokens_equal_transformers(weights):
    _, _, model, vae, ref = weights
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (40, 64, 3), dtype=np.uint8), rng.integers(0, 256, (64, 50, 3), dtype=np.uint8),
              rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)]
    questions = ["What is this?", "Describe the picture in detail, please.", "Hi"]
    max_new = 12
    ours = understand(model, vae, images, questions, ENCODE, max_new_tokens=max_new)
    tok = CFG.tokens
    k = CFG.image_tokens
    feats_err = 0.0
    for image, question, got in zip(images, questions, ours):
        pixels = upstream_preprocess(image, CFG.resolution)
        _, z = ref.visual(pixels)
        ids = torch.from_numpy(prompts.encode_instruction(question, ENCODE, tok, k)).long()[None]
        with torch.no_grad():
            emb = ref.llm.get_input_embeddings()(torch.where(ids == tok.image, 0, ids))
            emb[ids == tok.image] = z.reshape(-1, z.shape[-1])
            out = ref.llm.generate(inputs_embeds=emb, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                   do_sample=False, eos_token_id=[tok.im_end, tok.endoftext], pad_token_id=tok.pad)
        want = [int(t) for t in out[0] if int(t) not in (tok.im_end, tok.endoftext)]
        assert got == want, (question, got, want)
        from nexus_jax.unipic.understand import visual_features

        _, z_jax = visual_features(model, vae, np.asarray(pixels.permute(0, 2, 3, 1)))
        feats_err = max(feats_err, float(np.abs(np.asarray(z_jax) - z.numpy()).max()))
    print(f"understanding: greedy tokens equal for {len(images)} prompts; visual feature max abs err {feats_err:.2e}")
    assert feats_err <= 1e-4
