"""Batch-inference generation throughput: JAX runner vs a PyTorch pipeline built from the same tiny components.

    python benchmarks/inference.py [--steps 8] [--size 64] [--iters 2]
    python benchmarks/inference.py --smoke    # 2 steps, 32x32, batch 1, 1 iteration: checks it runs and agrees

One generation request = AR slot prediction (one parallel forward over the 81 slots of a tiny Nexus-Gen V2 model)
+ generation adapter + flow-matching sampling with true CFG (2 DiT passes per step) + VAE decode. Both sides hold
the same weights (fp32) and start from the same noise:
- JAX: ``nexus_jax.inference.runner.Runner.images`` (jitted fill_slots + one jitted conditioning/sampler/VAE
  program, compiled once per batch size; compile time excluded).
- torch: transformers ``Qwen2_5_VLForConditionalGeneration`` text model + vision_head + prefill embeddings, a torch
  adapter, diffusers ``FluxTransformer2DModel`` in a Python Euler loop with CFG, diffusers ``AutoencoderKL`` decode.
Host-side preprocessing (tokenising, padding, positions) is shared and not timed. The pixel outputs are compared
(max abs error printed). Each side runs in its own child process pinned to the same cores with the same
``--threads`` (benchmarks/harness.py). Batch sizes 1, 4 and 8, one run; last line JSON ``ratio_b1/b4/b8`` (JAX /
torch req/s, wall clock) plus ``cpu_ratio_b*`` (torch / JAX process CPU seconds per batch), ``max_abs_err_b*``,
``load``, ``busy``, ``threads``, ``cores``.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import harness  # noqa: E402

harness.setup()

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, FluxTransformer2DModel  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.timing import median_seconds  # noqa: E402
from configs import nexus_gen  # noqa: E402
from configs.nexus_decoders import NexusDecoderConfig  # noqa: E402
from configs.vae import FluxVAEConfig  # noqa: E402
from conversion import load  # noqa: E402
from nexus_jax.diffusion.sampler import schedule_sigmas  # noqa: E402
from nexus_jax.inference.batching import collate, group_batches  # noqa: E402
from nexus_jax.inference.reader import prepare_request  # noqa: E402
from nexus_jax.inference.requests import parse_request  # noqa: E402
from nexus_jax.inference.runner import EmptyPrompt, ImageDecoder, Runner, seed_noise  # noqa: E402
from nexus_jax.models.flux import image_ids, pack_latents, unpack_latents  # noqa: E402
from nexus_jax.models.nexus_ar import NexusGenAR  # noqa: E402
from nexus_jax.models.nexus_decoders import GenerationDecoder  # noqa: E402
from nexus_jax.nexus.tiny import ByteTokenizer  # noqa: E402
from tests.helpers.qwen2_5_vl_reference import build_hf_vl, zeros_like_module  # noqa: E402

PROMPTS = ["a red fox in the snow", "a lighthouse at dusk, waves, storm clouds", "a bowl of fruit on a table",
           "a watercolor city skyline in the rain", "an astronaut riding a horse", "a cat wearing sunglasses",
           "mountains at sunrise over a lake", "a steaming cup of coffee"]


def build(steps: int, size: int):
    torch.manual_seed(0)
    ar_cfg = nexus_gen.tiny("v2", slot_grid_thw=(1, 18, 18))  # the real 81 slots
    dec_cfg = NexusDecoderConfig.tiny(num_steps=steps, height=size, width=size, cfg_scale=3.0)
    d, vae_cfg = dec_cfg.dit, FluxVAEConfig.tiny()
    hf = build_hf_vl(ar_cfg.vl, seed=0)
    ar = zeros_like_module(lambda: NexusGenAR(ar_cfg, rngs=nnx.Rngs(0)))
    hidden = ar_cfg.hidden_size
    vision_head = torch.nn.Linear(hidden, hidden, bias=False)
    prefill = torch.randn(ar_cfg.num_slots, hidden) * 0.5
    load.nexus_ar(ar, {**hf.state_dict(), "vision_head.weight": vision_head.weight,
                       "image_prefill_embeds.weight": prefill})
    a = dec_cfg.adapter
    adapter = torch.nn.Sequential(torch.nn.Linear(a.in_dim, a.out_dim), torch.nn.LayerNorm(a.out_dim, eps=a.eps),
                                  torch.nn.ReLU(), torch.nn.Linear(a.out_dim, a.out_dim),
                                  torch.nn.LayerNorm(a.out_dim, eps=a.eps)).eval()
    for m in (adapter[1], adapter[4]):
        torch.nn.init.normal_(m.weight, 1.0, 0.1)
        torch.nn.init.normal_(m.bias, 0.0, 0.1)
    dit_t = FluxTransformer2DModel(in_channels=64, num_layers=d.num_double_blocks,
                                   num_single_layers=d.num_single_blocks, attention_head_dim=d.head_dim,
                                   num_attention_heads=d.num_heads, joint_attention_dim=d.context_dim,
                                   pooled_projection_dim=d.pooled_dim, guidance_embeds=True,
                                   axes_dims_rope=d.rope_axes_dim).eval()
    vae_t = AutoencoderKL(**vae_cfg.diffusers_kwargs()).eval()
    gen = zeros_like_module(lambda: GenerationDecoder(dec_cfg, rngs=nnx.Rngs(0)))
    load.flux_dit_diffusers(gen.dit, dit_t.state_dict())
    for i in (0, 3):
        gen.adapter[i].kernel.set_value(jnp.asarray(adapter[i].weight.detach().numpy().T))
        gen.adapter[i].bias.set_value(jnp.asarray(adapter[i].bias.detach().numpy()))
    for i in (1, 4):
        gen.adapter[i].weight.set_value(jnp.asarray(adapter[i].weight.detach().numpy()))
        gen.adapter[i].bias.set_value(jnp.asarray(adapter[i].bias.detach().numpy()))
    vae = load.flux_vae_diffusers(vae_cfg, vae_t.state_dict())
    rng = np.random.default_rng(0)
    empty = EmptyPrompt(rng.standard_normal(d.pooled_dim).astype(np.float32),
                        rng.standard_normal((16, d.context_dim)).astype(np.float32))
    runner = Runner(ar, vae=vae, generation=ImageDecoder(gen, dec_cfg.sampler), empty=empty)
    torch_parts = dict(hf=hf, vision_head=vision_head, prefill=prefill, adapter=adapter, dit=dit_t, vae=vae_t)
    return ar_cfg, dec_cfg, vae_cfg, runner, torch_parts, empty


@torch.no_grad()
def torch_generate(parts, nb, seeds, ar_cfg, dec_cfg, vae_cfg, empty) -> np.ndarray:
    """The same request batch through the torch components -> pixels [B, H, W, 3]."""
    n, s = ar_cfg.num_slots, dec_cfg.sampler
    ids, mask = torch.from_numpy(nb.input_ids).long(), torch.from_numpy(nb.attention_mask).long()
    slots = torch.from_numpy(nb.slot_index).long()
    lm = parts["hf"].model.language_model
    emb = lm.embed_tokens(ids)
    emb = torch.where((slots >= 0)[..., None], parts["prefill"][slots.clamp(min=0)], emb)
    h = lm(inputs_embeds=emb, position_ids=torch.from_numpy(nb.positions).long(), attention_mask=mask)
    embeds = parts["vision_head"](h.last_hidden_state[:, -n - 1 : -1])
    context = parts["adapter"](embeds)
    b = context.shape[0]
    hl, wl = s.height // 8, s.width // 8
    noise = np.asarray(seed_noise(jnp.asarray(seeds, jnp.uint32), hl, wl, 16))
    x = torch.from_numpy(np.array(pack_latents(jnp.asarray(noise))))
    img_ids = torch.from_numpy(np.array(image_ids(hl, wl)))
    pooled = torch.from_numpy(empty.pooled)[None].expand(b, -1)
    neg = torch.from_numpy(empty.t5)[None].expand(b, -1, -1)  # EmptyPrompt.t5: T5("") [16, context_dim]
    g = torch.full((b,), s.guidance)
    sig = schedule_sigmas(s, s.height, s.width)
    dit = parts["dit"]
    for i in range(len(sig) - 1):
        t = torch.full((b,), float(sig[i]))
        vp = dit(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                 img_ids=img_ids, txt_ids=torch.zeros(n, 3), guidance=g).sample
        vn = dit(hidden_states=x, encoder_hidden_states=neg, pooled_projections=pooled, timestep=t,
                 img_ids=img_ids, txt_ids=torch.zeros(neg.shape[1], 3), guidance=g).sample
        x = x + (vn + s.cfg_scale * (vp - vn)) * float(sig[i + 1] - sig[i])
    lat = torch.from_numpy(np.asarray(unpack_latents(jnp.asarray(x.numpy()), hl, wl))).permute(0, 3, 1, 2)
    lat = lat / vae_cfg.scaling_factor + vae_cfg.shift_factor
    return parts["vae"].decode(lat).sample.permute(0, 2, 3, 1).numpy()


timed = median_seconds  # (wall, CPU) seconds per call


def add_args(p) -> None:
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--iters", type=int, default=3)


def _batch_sizes(args) -> tuple[int, ...]:
    if args.smoke:
        args.steps, args.size, args.iters = 2, 32, 1
        return (1,)
    return (1, 4, 8)


def measure(side: str, args) -> tuple[dict, dict]:
    """One side's generation requests per batch size: (wall, CPU) seconds per batch; pixels per batch size."""
    batch_sizes = _batch_sizes(args)
    ar_cfg, dec_cfg, vae_cfg, runner, parts, empty = build(args.steps, args.size)
    tok = ByteTokenizer()
    reqs = [prepare_request(parse_request(json.dumps({"id": f"r{i}", "task": "generation", "seed": i,
                                                      "messages": [{"role": "user", "content": pr}]}), i),
                            ar_cfg, tok.encode, 1) for i, pr in enumerate(PROMPTS)]
    times, pixels = {}, {}
    for bs in batch_sizes:
        batch = group_batches(reqs[:bs], bs, length_multiple=256)
        assert len(batch) == 1, "the prompts must fall in one length bucket"
        nb = collate(batch[0], ar_cfg)
        seeds = np.asarray([r.request.seed for r in batch[0].rows()], np.uint32)
        if side == "jax":
            def fn(nb=nb, seeds=seeds):
                return runner.images("generation", nb, seeds)
        else:
            def fn(nb=nb, seeds=seeds):
                return torch_generate(parts, nb, seeds, ar_cfg, dec_cfg, vae_cfg, empty)
        pixels[f"b{bs}"] = np.asarray(fn())  # JAX: compile
        times[str(bs)] = list(timed(fn, args.iters))
    return {"times": times}, pixels


def combine(res: dict, arrays: dict, args) -> dict:
    report = {}
    for bs in _batch_sizes(args):
        (w_jax, c_jax), (w_torch, c_torch) = res["jax"]["times"][str(bs)], res["torch"]["times"][str(bs)]
        err = float(np.max(np.abs(arrays["jax"][f"b{bs}"] - arrays["torch"][f"b{bs}"])))
        report[bs] = dict(jax_rps=bs / w_jax, torch_rps=bs / w_torch, cpu_ratio=c_torch / c_jax, max_abs_err=err)
        print(f"batch {bs}: JAX {bs / w_jax:.3f} req/s, torch {bs / w_torch:.3f} req/s, wall ratio "
              f"{w_torch / w_jax:.2f}, CPU-seconds ratio {c_torch / c_jax:.2f}, max |JAX - torch| pixels {err:.2e}")
    print(f"{args.threads} thread(s) per side, {args.steps} steps, {args.size}x{args.size}, CFG 3.0, 81 slots")
    return ({f"ratio_b{b}": round(r["jax_rps"] / r["torch_rps"], 3) for b, r in report.items()}
            | {f"cpu_ratio_b{b}": round(r["cpu_ratio"], 3) for b, r in report.items()}
            | {f"max_abs_err_b{b}": r["max_abs_err"] for b, r in report.items()})


if __name__ == "__main__":
    harness.main(__doc__, add_args, measure, combine)
