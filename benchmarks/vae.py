"""FLUX VAE decode throughput: JAX (jitted, this repo) vs torch (diffusers AutoencoderKL), same weights and latents.

    python benchmarks/vae.py [--preset bench|tiny|full] [--batch 2] [--height 256 --width 384] [--iters 5] [--smoke]

Each side runs in its own pinned child process (benchmarks/harness.py: same cores, same thread count). Prints a
human-readable summary and, as the last line, one JSON object with ``ratio`` = JAX / torch images/s plus ``load``,
``busy``, ``threads``, ``cores``. fp32 on both sides.
"""

from __future__ import annotations

import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import harness  # noqa: E402

harness.setup()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import ceiling  # noqa: E402
from benchmarks.timing import median_seconds  # noqa: E402
from configs.vae import FluxVAEConfig  # noqa: E402
from conversion import load  # noqa: E402

# FLUX's layout (4 levels, 2 resnets per level, mid attention, 16 latents) at a quarter of its width.
PRESETS = {
    "bench": FluxVAEConfig(block_out_channels=(32, 64, 128, 128), norm_num_groups=16),
    "tiny": FluxVAEConfig.tiny(),
    "full": FluxVAEConfig.full(),
}


def add_args(parser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="bench")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--iters", type=int, default=5)


def _smoke(args) -> None:
    if args.smoke:
        args.preset, args.batch, args.height, args.width, args.iters = "tiny", 1, 32, 32, 1


def measure(side: str, args) -> tuple[dict, dict]:
    """One side's decode: (wall/CPU seconds per batch, compile seconds), decoded images [B, H, W, 3]."""
    _smoke(args)
    cfg = PRESETS[args.preset]
    f = cfg.downsample_factor
    if args.height % f or args.width % f:
        raise SystemExit(f"--height/--width must be multiples of {f}, got {args.height}x{args.width}")
    torch.manual_seed(0)
    ref = AutoencoderKL(**cfg.diffusers_kwargs()).eval()
    latent_shape = (args.batch, args.height // f, args.width // f, cfg.latent_channels)
    latents = np.random.default_rng(0).standard_normal(latent_shape).astype(np.float32)
    if side == "jax":
        vae = load.flux_vae_diffusers(cfg, ref.state_dict())
        graphdef, state = nnx.split(vae)

        @jax.jit
        def decode(state, z):
            return nnx.merge(graphdef, state).decode(z)

        z_jax = jnp.asarray(latents)
        start = time.perf_counter()
        out = np.asarray(decode(state, z_jax))
        compile_s = time.perf_counter() - start
        wall, cpu = median_seconds(lambda: decode(state, z_jax).block_until_ready(), args.iters)
    else:
        raw = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()) / cfg.scaling_factor + cfg.shift_factor
        start = time.perf_counter()
        out = ref.decode(raw).sample.numpy().transpose(0, 2, 3, 1)
        compile_s = time.perf_counter() - start
        wall, cpu = median_seconds(lambda: ref.decode(raw), args.iters)
    conv = ceiling.measure_conv(side, conv_shapes(cfg, args), repeats=1 if args.smoke else 3)
    return {"s_per_batch": wall, "cpu_s_per_batch": cpu, "first_call_s": compile_s, "ceiling": conv}, {"images": out}


def conv_shapes(cfg: FluxVAEConfig, args, keep: int = 4) -> list[tuple[int, int, int, int, int]]:
    """The decoder's ``keep`` costliest 3x3 convolutions (batch, h, w, in, out): one resnet conv per level and each
    upsampler's conv (at twice the level's size), by FLOPs."""
    f = cfg.downsample_factor
    h, w = args.height // f, args.width // f
    chans = list(reversed(cfg.block_out_channels))
    shapes = []
    for j, c in enumerate(chans):
        shapes.append((args.batch, h << j, w << j, c, c))
        if j < len(chans) - 1:
            shapes.append((args.batch, h << (j + 1), w << (j + 1), c, c))
    return sorted(shapes, key=lambda s: -s[1] * s[2] * s[3] * s[4])[:keep]


def combine(res: dict, arrays: dict, args) -> dict:
    _smoke(args)
    j, t = res["jax"], res["torch"]
    max_err = float(np.abs(arrays["jax"]["images"] - arrays["torch"]["images"]).max())
    jax_ips, torch_ips = args.batch / j["s_per_batch"], args.batch / t["s_per_batch"]
    cfg = PRESETS[args.preset]
    print(f"device cpu ({platform.processor() or platform.machine()}), threads {args.threads} per side")
    print(f"config {args.preset}: channels {cfg.block_out_channels}, batch {args.batch}, {args.height}x{args.width} px")
    print(f"JAX   decode: {j['s_per_batch'] * 1e3:8.1f} ms/batch  {jax_ips:7.2f} images/s  "
          f"(compile {j['first_call_s']:.1f} s)")
    print(f"torch decode: {t['s_per_batch'] * 1e3:8.1f} ms/batch  {torch_ips:7.2f} images/s")
    print(f"max abs err JAX vs torch: {max_err:.2e}")
    return dict(
        ratio=round(jax_ips / torch_ips, 3),
        cpu_ratio=round(t["cpu_s_per_batch"] / j["cpu_s_per_batch"], 3),
        jax_images_per_s=round(jax_ips, 3),
        torch_images_per_s=round(torch_ips, 3),
        preset=args.preset,
        batch=args.batch,
        height=args.height,
        width=args.width,
        iters=args.iters,
        max_abs_err=max_err,
        **ceiling.keys(j["ceiling"], t["ceiling"], jax_ips / torch_ips),
    )


if __name__ == "__main__":
    harness.main(__doc__, add_args, measure, combine)
