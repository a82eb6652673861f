"""FLUX VAE decode throughput: JAX (jitted, this repo) vs torch (diffusers AutoencoderKL), same weights and latents.

    python benchmarks/vae.py [--preset bench|tiny|full] [--batch 2] [--height 256 --width 384] [--iters 5]

Prints a human-readable summary and, as the last line, one JSON object with ``ratio`` = JAX / torch images/s.
One run; compare only numbers taken in the same run (the machine is shared). fp32 on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.timing import median_seconds  # noqa: E402
from configs.vae import FluxVAEConfig  # noqa: E402
from nexus_jax.models.vae.torch_weights import vae_from_diffusers  # noqa: E402

# FLUX's layout (4 levels, 2 resnets per level, mid attention, 16 latents) at a quarter of its width.
PRESETS = {
    "bench": FluxVAEConfig(block_out_channels=(32, 64, 128, 128), norm_num_groups=16),
    "tiny": FluxVAEConfig.tiny(),
    "full": FluxVAEConfig.full(),
}


def timed(fn, iters: int) -> float:
    """Median wall seconds per call of ``fn`` over ``iters`` calls (after the caller's warm-up)."""
    return median_seconds(fn, iters)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="bench")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    cfg = PRESETS[args.preset]
    f = cfg.downsample_factor
    if args.height % f or args.width % f:
        raise SystemExit(f"--height/--width must be multiples of {f}, got {args.height}x{args.width}")
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    ref = AutoencoderKL(**cfg.diffusers_kwargs()).eval()
    vae = vae_from_diffusers(cfg, {k: v.numpy() for k, v in ref.state_dict().items()})
    latent_shape = (args.batch, args.height // f, args.width // f, cfg.latent_channels)
    latents = np.random.default_rng(0).standard_normal(latent_shape).astype(np.float32)

    graphdef, state = nnx.split(vae)

    @jax.jit
    def decode(state, z):
        return nnx.merge(graphdef, state).decode(z)

    z_jax = jnp.asarray(latents)
    start = time.perf_counter()
    out_jax = np.asarray(decode(state, z_jax))
    compile_s = time.perf_counter() - start
    jax_s = timed(lambda: decode(state, z_jax).block_until_ready(), args.iters)

    raw = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()) / cfg.scaling_factor + cfg.shift_factor
    with torch.no_grad():
        out_torch = ref.decode(raw).sample.numpy().transpose(0, 2, 3, 1)
        torch_s = timed(lambda: ref.decode(raw), args.iters)

    max_err = float(np.abs(out_jax - out_torch).max())
    jax_ips, torch_ips = args.batch / jax_s, args.batch / torch_s
    print(f"device {jax.devices()[0].platform} ({platform.processor() or platform.machine()}), threads {args.threads}")
    print(f"config {args.preset}: channels {cfg.block_out_channels}, batch {args.batch}, {args.height}x{args.width} px")
    print(f"JAX   decode: {jax_s * 1e3:8.1f} ms/batch  {jax_ips:7.2f} images/s  (compile {compile_s:.1f} s)")
    print(f"torch decode: {torch_s * 1e3:8.1f} ms/batch  {torch_ips:7.2f} images/s")
    print(f"max abs err JAX vs torch: {max_err:.2e}")
    print(
        json.dumps(
            dict(
                ratio=round(jax_ips / torch_ips, 3),
                jax_images_per_s=round(jax_ips, 3),
                torch_images_per_s=round(torch_ips, 3),
                preset=args.preset,
                batch=args.batch,
                height=args.height,
                width=args.width,
                iters=args.iters,
                max_abs_err=max_err,
            )
        )
    )


if __name__ == "__main__":
    main()
