"""Qwen2.5-VL ViT forward throughput: JAX (jitted, this repo) vs torch (transformers), same weights and inputs.

    python benchmarks/vision.py [--preset bench|full|tiny] [--images 4] [--height 224 --width 336] [--iters 5] [--smoke]

Each side runs in its own pinned child process (benchmarks/harness.py: same cores, same ``--threads``). Prints a
human-readable summary and, as the last line, one JSON object with ``ratio`` = JAX / torch images/s plus ``load``,
``busy``, ``threads``, ``cores``. Compare only numbers taken in the same run.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import harness  # noqa: E402

harness.setup()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.timing import median_seconds  # noqa: E402
from configs.qwen2_5_vl import QWEN25_VISION_7B, QWEN25_VISION_TINY, Qwen25VisionConfig  # noqa: E402
from conversion import load  # noqa: E402
from nexus_jax.models.qwen2_5_vl.vision import Qwen25VisionTransformer, pad_pixels  # noqa: E402
from nexus_jax.models.qwen2_5_vl.vision_layout import vision_layout  # noqa: E402
from tests.helpers.qwen2_5_vl_reference import build_hf_vision  # noqa: E402

# A mid-size ViT with the full model's layout (window 112 px, 4 full-attention blocks of 8 => same ratio as 7B).
BENCH = Qwen25VisionConfig(
    depth=8, hidden_size=512, num_heads=8, intermediate_size=1376, fullatt_block_indexes=(1, 3, 5, 7),
    out_hidden_size=1024,
)
PRESETS = {"bench": BENCH, "full": QWEN25_VISION_7B, "tiny": QWEN25_VISION_TINY}


def add_args(parser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="bench")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--height", type=int, default=224)
    parser.add_argument("--width", type=int, default=336)
    parser.add_argument("--iters", type=int, default=5)


def _smoke(args) -> None:
    if args.smoke:
        args.preset, args.images, args.height, args.width, args.iters = "tiny", 1, 56, 56, 1


def measure(side: str, args) -> tuple[dict, dict]:
    """One side's ViT forward: (wall/CPU seconds per batch, first-call seconds), pooled output [tokens, out_hidden]."""
    _smoke(args)
    factor = 28
    if args.height % factor or args.width % factor:
        raise SystemExit(f"--height/--width must be multiples of {factor}, got {args.height}x{args.width}")
    cfg = PRESETS[args.preset]
    grid = np.array([[1, args.height // 14, args.width // 14]] * args.images)
    n = int(grid.prod(1).sum())
    pixels = np.random.default_rng(0).standard_normal((n, cfg.patch_dim)).astype(np.float32)
    torch_model = build_hf_vision(cfg, seed=0, std=0.02)
    if side == "jax":
        model = Qwen25VisionTransformer(cfg, rngs=nnx.Rngs(0))
        load.qwen2_5_vision(model, torch_model.state_dict())
        layout = vision_layout(grid, cfg)
        graphdef, state = nnx.split(model)
        arrays = {k: jax.numpy.asarray(v) for k, v in layout.arrays(frame_groups=True).items()}
        jax_pixels = pad_pixels(pixels, layout)

        @jax.jit
        def forward(state, px, idx):
            return nnx.merge(graphdef, state)(px, **idx)

        def run():
            return forward(state, jax_pixels, arrays).block_until_ready()
    else:
        t_pixels, t_grid = torch.from_numpy(pixels), torch.from_numpy(grid)

        def run():
            with torch.inference_mode():
                return torch_model(t_pixels, grid_thw=t_grid).pooler_output

    start = time.perf_counter()
    out = np.asarray(run())
    first = time.perf_counter() - start
    wall, cpu = median_seconds(run, args.iters)
    extra = {"torch_attn": torch_model.config._attn_implementation} if side == "torch" else {}
    return {"s_per_batch": wall, "cpu_s_per_batch": cpu, "first_call_s": first, "patches": n, **extra}, {"out": out}


def combine(res: dict, arrays: dict, args) -> dict:
    _smoke(args)
    cfg = PRESETS[args.preset]
    j, t = res["jax"], res["torch"]
    jax_s, torch_s = j["s_per_batch"], t["s_per_batch"]
    err = float(np.abs(arrays["jax"]["out"] - arrays["torch"]["out"]).max())
    result = {
        "benchmark": "qwen2_5_vl_vit_forward",
        "preset": args.preset,
        "config": dataclasses.asdict(cfg),
        "images": args.images,
        "image_hw": [args.height, args.width],
        "patches": j["patches"],
        "iters": args.iters,
        "torch_s_per_batch_by_threads": {str(args.threads): torch_s},
        "cpu_count": os.cpu_count(),
        "jax_s_per_batch": jax_s,
        "torch_s_per_batch": torch_s,
        "jax_images_per_s": args.images / jax_s,
        "torch_images_per_s": args.images / torch_s,
        "jax_compile_s": j["first_call_s"],
        "max_abs_err": err,
        "jax_backend": "cpu",
        "torch_attn": t["torch_attn"],
        "host": platform.processor() or platform.machine(),
        "ratio": torch_s / jax_s,
        "cpu_ratio": t["cpu_s_per_batch"] / j["cpu_s_per_batch"],
    }
    print(f"ViT {args.preset}: {args.images} images of {args.height}x{args.width} ({j['patches']} patches)")
    print(f"  JAX   {result['jax_images_per_s']:.2f} images/s ({jax_s * 1e3:.1f} ms/batch, "
          f"compile {j['first_call_s']:.1f} s)")
    print(f"  torch {result['torch_images_per_s']:.2f} images/s ({torch_s * 1e3:.1f} ms/batch)")
    print(f"  max abs error {err:.2e}; ratio (JAX/torch throughput) {result['ratio']:.3f}")
    return result


if __name__ == "__main__":
    harness.main(__doc__, add_args, measure, combine)
