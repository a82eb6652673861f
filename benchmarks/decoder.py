"""FLUX decoder throughput: one denoising step and a full sample (N steps + VAE decode), JAX vs diffusers torch.

    python benchmarks/decoder.py [--steps 4] [--batch 1] [--height 256 --width 256] [--iters 3] [--threads 1] [--smoke]

Same small config and weights on both sides (fp32): DiT width 256 (4 heads x 64), 2 double + 4 single blocks,
81 context tokens (the Nexus-Gen adapter output length), embedded guidance; VAE at a quarter of FLUX's width.
JAX runs the whole sample as one jitted program (lax.fori_loop + VAE decode); torch drives
FluxTransformer2DModel + FlowMatchEulerDiscreteScheduler + AutoencoderKL in a Python loop.
Each side runs in its own pinned child process (benchmarks/harness.py: same cores, same ``--threads``; the old
``--single-thread`` is ``--threads 1``). Wall-clock and process-CPU-time ratios are both reported.
Last line: JSON with ``step_ratio`` and ``sample_ratio`` (JAX / torch throughput, wall clock) plus ``load``,
``busy``, ``threads``, ``cores``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import harness  # noqa: E402

harness.setup()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import ceiling  # noqa: E402
from benchmarks.timing import median_seconds  # noqa: E402
from configs.flux import FluxDiTConfig  # noqa: E402
from configs.nexus_decoders import SamplerConfig  # noqa: E402
from configs.vae import FluxVAEConfig  # noqa: E402
from conversion import load  # noqa: E402
from nexus_jax.diffusion import flow_match as fm  # noqa: E402
from nexus_jax.diffusion.sampler import Conditioning, initial_noise, make_sampler  # noqa: E402
from nexus_jax.models.flux import FluxDiT, image_ids, pack_latents  # noqa: E402

DIT = FluxDiTConfig(num_double_blocks=2, num_single_blocks=4, num_heads=4, head_dim=64, rope_axes_dim=(8, 28, 28),
                    context_dim=128, pooled_dim=64)
VAE = FluxVAEConfig(block_out_channels=(32, 64, 128, 128), norm_num_groups=16)


timed = median_seconds  # (wall, CPU) seconds per call


def add_args(parser) -> None:
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--iters", type=int, default=3)


def _smoke(args) -> None:
    if args.smoke:
        args.steps, args.height, args.width, args.iters = 1, 32, 32, 1


def measure(side: str, args) -> tuple[dict, dict]:
    """One side's denoising step and full sample: (wall, CPU) seconds of each; step output and sample images."""
    _smoke(args)
    cfg = SamplerConfig(num_steps=args.steps, height=args.height, width=args.width, cfg_scale=1.0, guidance=3.5)
    b, h, w = args.batch, args.height // 8, args.width // 8

    torch.manual_seed(0)
    dit_t = FluxTransformer2DModel(in_channels=64, num_layers=DIT.num_double_blocks,
                                   num_single_layers=DIT.num_single_blocks, attention_head_dim=DIT.head_dim,
                                   num_attention_heads=DIT.num_heads, joint_attention_dim=DIT.context_dim,
                                   pooled_projection_dim=DIT.pooled_dim, guidance_embeds=True,
                                   axes_dims_rope=DIT.rope_axes_dim).eval()
    vae_t = AutoencoderKL(**VAE.diffusers_kwargs()).eval()
    rng = np.random.default_rng(0)
    cond = Conditioning(jnp.asarray(rng.standard_normal((b, 81, DIT.context_dim)), jnp.float32),
                        jnp.asarray(rng.standard_normal((b, DIT.pooled_dim)), jnp.float32),
                        jnp.zeros((81, 3), jnp.float32))
    key = jax.random.key(0)
    noise = np.asarray(initial_noise(key, b, h, w, DIT.latent_channels))
    tokens = pack_latents(jnp.asarray(noise))
    ids = image_ids(h, w)

    if side == "jax":
        dit_j = FluxDiT(DIT, rngs=nnx.Rngs(0))
        sd = {k: v.numpy() for k, v in dit_t.state_dict().items()}
        load.flux_dit_diffusers(dit_j, sd)
        vae_j = load.flux_vae_diffusers(VAE, vae_t.state_dict())
        guidance = jnp.full((b,), cfg.guidance, jnp.float32)
        graph, state = nnx.split(dit_j)

        @jax.jit
        def step(state, x, sigma, sigma_next):
            v = nnx.merge(graph, state)(x, jnp.full((b,), sigma), cond.context, cond.pooled, cond.txt_ids, ids,
                                        guidance)
            return fm.euler_step(x, v, sigma, sigma_next)

        s0, s1 = jnp.float32(1.0), jnp.float32(0.75)
        step_out = np.asarray(step(state, tokens, s0, s1))
        step_t = timed(lambda: step(state, tokens, s0, s1).block_until_ready(), args.iters)
        sampler = make_sampler(dit_j, vae_j, cfg)
        images = np.asarray(sampler(key, cond).images)
        sample_t = timed(lambda: sampler(key, cond).images.block_until_ready(), args.iters)
    else:
        x_t = torch.from_numpy(np.asarray(tokens))
        t_ctx, t_pool = torch.from_numpy(np.asarray(cond.context)), torch.from_numpy(np.asarray(cond.pooled))
        t_txt, t_img = torch.zeros(81, 3), torch.from_numpy(np.asarray(ids))
        t_g = torch.full((b,), cfg.guidance)

        def torch_velocity(x, sigma):
            return dit_t(hidden_states=x, timestep=torch.full((b,), sigma), guidance=t_g, pooled_projections=t_pool,
                         encoder_hidden_states=t_ctx, txt_ids=t_txt, img_ids=t_img).sample

        def torch_step():
            return x_t + (0.75 - 1.0) * torch_velocity(x_t, 1.0)

        def torch_sample():
            sched = FlowMatchEulerDiscreteScheduler(shift=cfg.shift)
            sched.set_timesteps(sigmas=np.linspace(1.0, fm.DIFFSYNTH_SIGMA_MIN, cfg.num_steps).tolist())
            lat = FluxPipeline._pack_latents(torch.from_numpy(noise.transpose(0, 3, 1, 2).copy()), b, 16, h, w)
            for t in sched.timesteps:
                lat = sched.step(torch_velocity(lat, float(t) / 1000), t, lat).prev_sample
            z = FluxPipeline._unpack_latents(lat, args.height, args.width, 8)
            return vae_t.decode(z / VAE.scaling_factor + VAE.shift_factor).sample

        step_out = torch_step().numpy()
        step_t = timed(torch_step, args.iters)
        images = torch_sample().numpy().transpose(0, 2, 3, 1)
        sample_t = timed(torch_sample, args.iters)
    m = b * ((h // 2) * (w // 2) + 81)  # the DiT's tokens: its dominant matmuls (double / single block projections)
    d, mlp = DIT.hidden_size, DIT.mlp_dim
    shapes = [(m, d, 3 * d), (m, d, d), (m, d, mlp), (m, mlp, d), (m, d, 3 * d + mlp), (m, d + mlp, d)]
    dots = ceiling.measure(side, shapes, repeats=1 if args.smoke else 5)
    return {"step": step_t, "sample": sample_t, "ceiling": dots}, {"step": step_out, "images": images}


def combine(res: dict, arrays: dict, args) -> dict:
    _smoke(args)
    b, h, w = args.batch, args.height // 8, args.width // 8
    jax_step, torch_step_t = res["jax"]["step"], res["torch"]["step"]
    jax_sample, torch_sample_t = res["jax"]["sample"], res["torch"]["sample"]
    step_err = float(np.abs(arrays["jax"]["step"] - arrays["torch"]["step"]).max())
    img_err = float(np.abs(arrays["jax"]["images"] - arrays["torch"]["images"]).max())
    step_ratio = torch_step_t[0] / jax_step[0]
    sample_ratio = torch_sample_t[0] / jax_sample[0]
    print(f"DiT width {DIT.hidden_size}, {DIT.num_double_blocks}+{DIT.num_single_blocks} blocks, batch {b}, "
          f"{args.height}x{args.width} px ({(h // 2) * (w // 2)} image + 81 context tokens), {args.steps} steps, "
          f"{args.threads} thread(s) per side")
    print(f"step   JAX {jax_step[0] * 1e3:8.1f} ms (cpu {jax_step[1] * 1e3:8.1f})  torch "
          f"{torch_step_t[0] * 1e3:8.1f} ms (cpu {torch_step_t[1] * 1e3:8.1f})  ratio {step_ratio:.3f}  "
          f"max abs err {step_err:.2e}")
    print(f"sample JAX {jax_sample[0] * 1e3:8.1f} ms (cpu {jax_sample[1] * 1e3:8.1f})  torch "
          f"{torch_sample_t[0] * 1e3:8.1f} ms (cpu {torch_sample_t[1] * 1e3:8.1f})  ratio {sample_ratio:.3f}  "
          f"image max abs err {img_err:.2e}")
    return dict(
        step_ratio=round(step_ratio, 3), sample_ratio=round(sample_ratio, 3),
        step_cpu_ratio=round(torch_step_t[1] / jax_step[1], 3),
        sample_cpu_ratio=round(torch_sample_t[1] / jax_sample[1], 3),
        jax_step_ms=round(jax_step[0] * 1e3, 2), torch_step_ms=round(torch_step_t[0] * 1e3, 2),
        jax_sample_ms=round(jax_sample[0] * 1e3, 2), torch_sample_ms=round(torch_sample_t[0] * 1e3, 2),
        step_max_abs_err=step_err, sample_image_max_abs_err=img_err, steps=args.steps, batch=b,
        height=args.height, width=args.width, iters=args.iters, load_avg=round(os.getloadavg()[0], 1),
        single_thread=args.threads == 1, torch_threads=res["torch"]["torch_threads"],
        **ceiling.keys(res["jax"]["ceiling"], res["torch"]["ceiling"], step_ratio),
        sample_fraction_of_ceiling=round(sample_ratio * res["torch"]["ceiling"]["gflops"]
                                         / res["jax"]["ceiling"]["gflops"], 3),
    )


if __name__ == "__main__":
    harness.main(__doc__, add_args, measure, combine)
