"""Benchmark: slot-filling (one parallel forward over prompt + N slots) vs N sequential single-slot KV-cache steps.

Both paths start from the same prompt KV cache (the state of a decoding loop when the model emits
``<|vision_start|>``) and produce the same [B, N, hidden] embeddings (checked): the parallel path runs the N slot-phase
tokens in one forward, the sequential path is the reference implementation's loop (one jitted single-token step per
slot). ``ratio`` = sequential / parallel time of that slot phase (target >= 5 at N = 81). Also reported: the prompt
prefill time and the end-to-end ratio (prompt prefill + N steps vs one cache-free pass over prompt + slots, i.e.
:func:`fill_slots`). JAX only: it runs in one child process pinned by benchmarks/harness.py (``--threads``
cores). The last line is JSON (plus ``load``, ``busy``, ``threads``, ``cores``).

    python benchmarks/prefill_slots.py [--batch 1] [--slots-grid 18] [--repeats 5] [--tiny] [--smoke]
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
from flax import nnx  # noqa: E402

from configs import nexus_gen  # noqa: E402
from nexus_jax.models.nexus_ar import NexusGenAR  # noqa: E402
from nexus_jax.nexus import prefill as P  # noqa: E402
from nexus_jax.nexus.tiny import ByteTokenizer  # noqa: E402

PROMPT = (
    "A watercolor painting of a quiet harbor town at sunrise, fishing boats moored along a stone pier, gulls "
    "circling above, pastel pink and orange sky reflected in calm water, soft morning mist."
)


def _best_time(fn, make_input, repeats: int) -> float:
    """Best wall time of ``fn(make_input())`` over ``repeats`` runs after a warm-up; inputs are made untimed."""
    jax.block_until_ready(fn(make_input()))
    best = float("inf")
    for _ in range(repeats):
        arg = make_input()
        t0 = time.perf_counter()
        jax.block_until_ready(fn(arg))
        best = min(best, time.perf_counter() - t0)
    return best


def add_args(ap) -> None:
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--slots-grid", type=int, default=18, help="patch grid side of an output image (18 -> 81 slots)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="tiny model instead of the hidden-512 bench size")


def measure(side: str, args) -> tuple[dict, dict]:
    """The whole benchmark (JAX only), in the pinned child."""
    if args.smoke:
        args.tiny, args.repeats = True, 1
    grid = (1, args.slots_grid, args.slots_grid)
    cfg = (nexus_gen.tiny if args.tiny else nexus_gen.bench)("v2", slot_grid_thw=grid,
                                                             num_slots=args.slots_grid**2 // 4)
    model = NexusGenAR(cfg, rngs=nnx.Rngs(0))
    batch = P.slot_batch(P.generation_samples([PROMPT] * args.batch), ByteTokenizer().encode, cfg)
    n, length = cfg.num_slots, batch.shape[1]

    filler = P.SlotFiller(model, batch)
    prompt_cache = filler.prompt_cache()

    def cache_copies():
        # The slot phase consumes (donates) its cache: hand each run a fresh copy of the prompt cache.
        return jax.block_until_ready(jax.tree.map(jnp.copy, prompt_cache))

    par = filler.parallel(cache_copies())
    seq = filler.sequential(cache_copies())
    full = P.fill_slots(model, batch)
    err = max(float(jnp.abs(par - seq).max()), float(jnp.abs(full - seq).max()))
    t_par = _best_time(filler.parallel, cache_copies, args.repeats)
    t_seq = _best_time(filler.sequential, cache_copies, args.repeats)
    t_full = _best_time(lambda _: P.fill_slots(model, batch), lambda: None, args.repeats)
    t_prompt = _best_time(lambda c: filler.prompt_cache(), lambda: None, args.repeats)
    t = cfg.vl.text
    result = {
        "ratio": round(t_seq / t_par, 2),
        "num_slots": n,
        "batch": args.batch,
        "sequence_length": length,
        "parallel_s": round(t_par, 5),
        "sequential_s": round(t_seq, 5),
        "prompt_prefill_s": round(t_prompt, 5),
        "end_to_end_ratio": round((t_prompt + t_seq) / t_full, 2),
        "one_pass_full_forward_s": round(t_full, 5),
        "max_abs_err": err,
        "model": f"hidden {t.hidden_size}, {t.num_layers} layers, {t.num_heads}/{t.num_kv_heads} heads, "
        f"vocab {t.vocab_size}",
        "device": f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind}), {platform.machine()}",
    }
    print(f"prompt+slots {length} tokens, N={n}, batch {args.batch}, {result['model']}, {result['device']}")
    print(f"  prompt prefill into the KV cache (shared by both paths): {t_prompt * 1e3:9.2f} ms")
    print(f"  slot phase, one {n}-token forward:                      {t_par * 1e3:9.2f} ms")
    print(f"  slot phase, {n} single-token KV-cache steps:             {t_seq * 1e3:9.2f} ms")
    print(f"  whole request, one pass over prompt + slots (no cache): {t_full * 1e3:9.2f} ms")
    print(f"  slot-phase speed-up {result['ratio']:.2f}x; end to end (prompt + steps vs one pass) "
          f"{result['end_to_end_ratio']:.2f}x; max abs difference {err:.2e}")
    return result, {}


def combine(res: dict, arrays: dict, args) -> dict:
    return {k: v for k, v in res["jax"].items() if k not in ("affinity", "torch_threads")}


if __name__ == "__main__":
    harness.main(__doc__, add_args, measure, combine, sides=("jax",))
