"""Qwen2.5-VL ViT forward throughput: JAX (jitted, this repo) vs torch (transformers), same weights and inputs.

    python benchmarks/vision.py [--preset bench|full] [--images 4] [--height 224 --width 336] [--iters 5]

Prints a human-readable summary and, as the last line, one JSON object with ``ratio`` = JAX / torch images/s.
torch runs at each ``--threads`` count (default 1 and all cores) and its fastest time is the baseline: on a
shared, oversubscribed CPU torch's multi-threaded kernels can be several times slower than one thread.
One run; compare only numbers taken in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.timing import median_seconds  # noqa: E402
from configs.qwen2_5_vl import QWEN25_VISION_7B, Qwen25VisionConfig  # noqa: E402
from nexus_jax.models.qwen2_5_vl.hf_reference import build_hf_vision  # noqa: E402
from nexus_jax.models.qwen2_5_vl.hf_weights import load_hf_vision  # noqa: E402
from nexus_jax.models.qwen2_5_vl.vision import Qwen25VisionTransformer, pad_pixels  # noqa: E402
from nexus_jax.models.qwen2_5_vl.vision_layout import vision_layout  # noqa: E402

# A mid-size ViT with the full model's layout (window 112 px, 4 full-attention blocks of 8 => same ratio as 7B).
BENCH = Qwen25VisionConfig(
    depth=8, hidden_size=512, num_heads=8, intermediate_size=1376, fullatt_block_indexes=(1, 3, 5, 7),
    out_hidden_size=1024,
)
PRESETS = {"bench": BENCH, "full": QWEN25_VISION_7B}


def timed(fn, iters: int) -> float:
    """Median wall seconds per call of ``fn`` over ``iters`` calls (after the caller's warm-up)."""
    return median_seconds(fn, iters)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="bench")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--height", type=int, default=224)
    parser.add_argument("--width", type=int, default=336)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}),
                        help="torch thread counts to try; the fastest is the baseline")
    args = parser.parse_args()
    factor = 28
    if args.height % factor or args.width % factor:
        raise SystemExit(f"--height/--width must be multiples of {factor}, got {args.height}x{args.width}")
    cfg = PRESETS[args.preset]

    grid = np.array([[1, args.height // 14, args.width // 14]] * args.images)
    n = int(grid.prod(1).sum())
    pixels = np.random.default_rng(0).standard_normal((n, cfg.patch_dim)).astype(np.float32)

    torch_model = build_hf_vision(cfg, seed=0, std=0.02)
    model = Qwen25VisionTransformer(cfg, rngs=nnx.Rngs(0))
    load_hf_vision(model, {k: v.numpy() for k, v in torch_model.state_dict().items()})
    layout = vision_layout(grid, cfg)
    graphdef, state = nnx.split(model)
    arrays = {k: jax.numpy.asarray(v) for k, v in layout.arrays(frame_groups=True).items()}
    jax_pixels = pad_pixels(pixels, layout)

    @jax.jit
    def forward(state, px, idx):
        return nnx.merge(graphdef, state)(px, **idx)

    t_pixels, t_grid = torch.from_numpy(pixels), torch.from_numpy(grid)

    def run_torch():
        with torch.inference_mode():
            return torch_model(t_pixels, grid_thw=t_grid).pooler_output

    def run_jax():
        return forward(state, jax_pixels, arrays).block_until_ready()

    compile_start = time.perf_counter()
    out_jax = np.asarray(run_jax())
    compile_s = time.perf_counter() - compile_start
    out_torch = run_torch().numpy()
    err = float(np.abs(out_jax - out_torch).max())
    torch_by_threads = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        run_torch()  # warm-up at this thread count
        torch_by_threads[threads] = timed(run_torch, args.iters)
    torch_s = min(torch_by_threads.values())
    jax_s = timed(run_jax, args.iters)

    result = {
        "benchmark": "qwen2_5_vl_vit_forward",
        "preset": args.preset,
        "config": dataclasses.asdict(cfg),
        "images": args.images,
        "image_hw": [args.height, args.width],
        "patches": n,
        "iters": args.iters,
        "torch_s_per_batch_by_threads": torch_by_threads,
        "cpu_count": os.cpu_count(),
        "jax_s_per_batch": jax_s,
        "torch_s_per_batch": torch_s,
        "jax_images_per_s": args.images / jax_s,
        "torch_images_per_s": args.images / torch_s,
        "jax_compile_s": compile_s,
        "max_abs_err": err,
        "jax_backend": jax.default_backend(),
        "torch_attn": torch_model.config._attn_implementation,
        "host": platform.processor() or platform.machine(),
        "ratio": torch_s / jax_s,
    }
    print(f"ViT {args.preset}: {args.images} images of {args.height}x{args.width} ({n} patches)")
    print(f"  JAX   {result['jax_images_per_s']:.2f} images/s ({jax_s * 1e3:.1f} ms/batch, compile {compile_s:.1f} s)")
    for threads, sec in torch_by_threads.items():
        print(f"  torch {args.images / sec:.2f} images/s ({sec * 1e3:.1f} ms/batch) with {threads} thread(s)")
    print(f"  max abs error {err:.2e}; ratio (JAX/torch throughput) {result['ratio']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
