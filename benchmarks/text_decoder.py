"""Qwen2.5 text decoder throughput: JAX (this package) vs transformers (torch), CPU, float32, one run.

forward: tokens/s of one full forward (logits for every position) over a [batch, prompt_len] prompt.
decode:  tokens/s of greedy KV-cache generation after a short prompt, prefill excluded on both sides:
         time(prompt + N new) - time(prompt + 1 new).
JAX and torch repetitions are interleaved so both see the same machine load; medians are reported. Besides wall-clock
throughput (the headline ratios), throughput per CPU-second of the process is reported: on a shared, oversubscribed
machine it is the steadier figure (it does not count time spent descheduled). The last line printed is a JSON object
with forward_ratio and decode_ratio (JAX throughput / torch throughput, wall clock).

    python benchmarks/text_decoder.py [--layers 8 --hidden 512 --prompt-len 512 --new-tokens 32 --repeats 3 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "--threads" in sys.argv and sys.argv[sys.argv.index("--threads") + 1] == "1":  # must precede importing jax
    from benchmarks.timing import pin_xla_to_one_thread

    pin_xla_to_one_thread()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from configs.qwen2_5 import bench  # noqa: E402
from nexus_jax.generation import GenerationConfig, generate  # noqa: E402
from nexus_jax.models.qwen2.hf_reference import reference_pair  # noqa: E402


def timed(fn: Callable[[], object]) -> np.ndarray:
    """[wall seconds, process CPU seconds] of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return np.array([time.perf_counter() - wall, time.process_time() - cpu])


def interleaved(jax_fn, torch_fn, repeats: int) -> tuple[np.ndarray, np.ndarray]:
    """Median [wall, cpu] seconds of each function over interleaved repetitions."""
    tj, tt = [], []
    for _ in range(repeats):
        tj.append(jax_fn())
        tt.append(torch_fn())
    return np.median(tj, axis=0), np.median(tt, axis=0)


def matmul_gflops(n: int = 1024, repeats: int = 5) -> tuple[float, float]:
    """(JAX, torch) fp32 n x n matmul GFLOP/s (best wall time): the CPU dot ceiling of this machine right now."""
    a = np.random.default_rng(0).standard_normal((n, n), np.float32)
    ja, ta = jnp.asarray(a), torch.tensor(a)
    jdot = jax.jit(lambda x: x @ x)
    jdot(ja).block_until_ready()
    torch.mm(ta, ta)
    tj = min(timed(lambda: jdot(ja).block_until_ready())[0] for _ in range(repeats))
    tt = min(timed(lambda: torch.mm(ta, ta))[0] for _ in range(repeats))
    return 2 * n**3 / 1e9 / tj, 2 * n**3 / 1e9 / tt


def bench_forward(model, hf, cfg, args, rng) -> dict[str, float]:
    ids = rng.integers(0, cfg.vocab_size, (args.batch, args.prompt_len))
    jids, tids = jnp.asarray(ids, jnp.int32), torch.tensor(ids)
    pos = np.broadcast_to(np.arange(args.prompt_len), ids.shape)
    if cfg.mrope_section is not None:
        pos = np.broadcast_to(pos[None], (3, *ids.shape))
    jpos, tpos = jnp.asarray(pos), torch.tensor(np.ascontiguousarray(pos))  # explicit: no position logic timed
    graphdef, state = nnx.split(model)

    @jax.jit
    def jax_forward(state, ids, pos):
        return nnx.merge(graphdef, state)(ids, positions=pos).logits

    jax_forward(state, jids, jpos).block_until_ready()
    hf(input_ids=tids, position_ids=tpos)
    tj, tt = interleaved(
        lambda: timed(lambda: jax_forward(state, jids, jpos).block_until_ready()),
        lambda: timed(lambda: hf(input_ids=tids, position_ids=tpos)),
        args.repeats,
    )
    n_tok = args.batch * args.prompt_len
    flops_per_token = 2 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    flops_per_token -= 2 * cfg.vocab_size * cfg.hidden_size  # the embedding lookup is not a matmul
    flops_per_token += 4 * args.prompt_len / 2 * cfg.num_layers * cfg.q_size  # causal attention scores + values
    jax_gf, torch_gf = matmul_gflops()
    fwd_jax, fwd_torch = n_tok / tj, n_tok / tt  # [wall, cpu] tokens/s
    ceiling_fraction = fwd_jax[0] * flops_per_token / 1e9 / jax_gf
    print(f"forward [{args.batch}x{args.prompt_len}]: jax {fwd_jax[0]:,.0f} tok/s, torch {fwd_torch[0]:,.0f} tok/s, "
          f"ratio {fwd_jax[0] / fwd_torch[0]:.3f} (per CPU-second: ratio {fwd_jax[1] / fwd_torch[1]:.3f})")
    gf_jax, gf_torch = fwd_jax[0] * flops_per_token / 1e9, fwd_torch[0] * flops_per_token / 1e9
    print(f"  model GFLOP/s: jax {gf_jax:.1f}, torch {gf_torch:.1f}; 1024^2 matmul: jax {jax_gf:.1f}, "
          f"torch {torch_gf:.1f} GFLOP/s (ceiling ratio {jax_gf / torch_gf:.3f})")
    print(f"  jax forward runs at {ceiling_fraction:.1%} of the jax matmul ceiling; forward ratio / ceiling ratio = "
          f"{(fwd_jax[0] / fwd_torch[0]) / (jax_gf / torch_gf):.3f}")
    return {
        "forward_ratio": fwd_jax[0] / fwd_torch[0],
        "forward_cpu_ratio": fwd_jax[1] / fwd_torch[1],
        "forward_tok_s_jax": fwd_jax[0],
        "forward_tok_s_torch": fwd_torch[0],
        "matmul_ceiling_ratio": jax_gf / torch_gf,
        "forward_fraction_of_jax_matmul_ceiling": ceiling_fraction,
    }


def bench_decode(model, hf, cfg, args, rng, batch: int) -> dict[str, float]:
    prompt = rng.integers(0, cfg.vocab_size, (batch, args.decode_prompt_len))
    tprompt = torch.tensor(prompt)
    capacity = args.decode_prompt_len + args.new_tokens

    def run_jax(n):
        cfg_n = GenerationConfig(max_new_tokens=n, cache_capacity=capacity)
        return timed(lambda: generate(model, prompt, config=cfg_n).tokens.block_until_ready())

    def run_torch(n):
        return timed(lambda: hf.generate(tprompt, max_new_tokens=n, min_new_tokens=n, do_sample=False))

    for n in (1, args.new_tokens):  # compile / warm up
        run_jax(n)
        run_torch(n)
    tj, tt = interleaved(
        lambda: run_jax(args.new_tokens) - run_jax(1), lambda: run_torch(args.new_tokens) - run_torch(1), args.repeats
    )
    steps = batch * (args.new_tokens - 1)
    dec_jax, dec_torch = steps / tj, steps / tt
    print(f"decode batch {batch}: jax {dec_jax[0]:,.1f} tok/s, torch {dec_torch[0]:,.1f} tok/s, "
          f"ratio {dec_jax[0] / dec_torch[0]:.3f} (per CPU-second: ratio {dec_jax[1] / dec_torch[1]:.3f})")
    return {"ratio": dec_jax[0] / dec_torch[0], "cpu_ratio": dec_jax[1] / dec_torch[1],
            "tok_s_jax": dec_jax[0], "tok_s_torch": dec_torch[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--decode-prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads; 1 also makes XLA single-threaded")
    p.add_argument("--rope", choices=["1d", "mrope"], default="1d",
                   help="1d: transformers Qwen2ForCausalLM (leanest torch path, default); mrope: Qwen2.5-VL text model")
    args = p.parse_args(argv)

    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    head_dim = args.hidden // 8
    hw = (head_dim // 2 - head_dim // 8) // 2  # M-RoPE split in Qwen2.5-VL proportions (16, 24, 24 of 64)
    section = (head_dim // 2 - 2 * hw, hw, hw) if args.rope == "mrope" else None
    cfg = bench(num_layers=args.layers, hidden_size=args.hidden, head_dim=head_dim, mrope_section=section)
    hf, model = reference_pair(cfg, seed=0, std=0.02)
    rng = np.random.default_rng(0)
    load_before = os.getloadavg()[0]
    print(f"config: hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads}/{cfg.num_kv_heads} heads, "
          f"mlp {cfg.intermediate_size}, vocab {cfg.vocab_size}; jax {jax.__version__} ({jax.devices()[0].platform}), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads); load average {load_before:.1f} "
          f"on {os.cpu_count()} cores; reference {type(hf).__name__}")

    fwd = bench_forward(model, hf, cfg, args, rng)
    dec = {b: bench_decode(model, hf, cfg, args, rng, b) for b in args.decode_batches}
    first = args.decode_batches[0]
    result = {
        "forward_ratio": round(fwd["forward_ratio"], 4),
        "decode_ratio": round(dec[first]["ratio"], 4),
        "decode_batch": first,
        "decode_ratio_by_batch": {str(b): round(d["ratio"], 4) for b, d in dec.items()},
        "forward_cpu_ratio": round(fwd["forward_cpu_ratio"], 4),
        "decode_cpu_ratio_by_batch": {str(b): round(d["cpu_ratio"], 4) for b, d in dec.items()},
        "forward_tok_s": {"jax": round(fwd["forward_tok_s_jax"], 1), "torch": round(fwd["forward_tok_s_torch"], 1)},
        "decode_tok_s": {str(b): {"jax": round(d["tok_s_jax"], 1), "torch": round(d["tok_s_torch"], 1)}
                         for b, d in dec.items()},
        "matmul_ceiling_ratio": round(fwd["matmul_ceiling_ratio"], 4),
        "forward_fraction_of_jax_matmul_ceiling": round(fwd["forward_fraction_of_jax_matmul_ceiling"], 4),
        "reference": type(hf).__name__,
        "threads": torch.get_num_threads(),
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
