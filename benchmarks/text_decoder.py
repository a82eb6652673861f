"""Qwen2.5 text decoder throughput: JAX (this package) vs transformers (torch), CPU, float32, one run.

forward: tokens/s of one full forward (logits for every position) over a [batch, prompt_len] prompt.
decode:  tokens/s of greedy KV-cache generation of ``new_tokens`` tokens after a short prompt (prefill excluded on
both sides: time(prompt + N new) - time(prompt + 1 new)).
Timings are medians of interleaved JAX / torch repetitions so both see the same machine load. The last line printed
is a JSON object with forward_ratio and decode_ratio (JAX throughput / torch throughput).

    python benchmarks/text_decoder.py [--layers 8 --hidden 512 --prompt-len 512 --new-tokens 32 --repeats 3 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--threads" in sys.argv and sys.argv[sys.argv.index("--threads") + 1] == "1":  # must precede importing jax
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    )
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from configs.qwen2_5 import bench  # noqa: E402
from nexus_jax.generation import GenerationConfig, generate  # noqa: E402
from nexus_jax.models.qwen2.hf_reference import reference_pair  # noqa: E402


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def matmul_gflops(n: int = 1024, repeats: int = 5) -> tuple[float, float]:
    """(JAX, torch) fp32 n x n matmul GFLOP/s: the CPU dot ceiling for this machine right now."""
    a = np.random.default_rng(0).standard_normal((n, n), np.float32)
    ja = jnp.asarray(a)
    jdot = jax.jit(lambda x: x @ x)
    jdot(ja).block_until_ready()
    ta = torch.tensor(a)
    torch.mm(ta, ta)
    tj = min(_timed(lambda: jdot(ja).block_until_ready()) for _ in range(repeats))
    tt = min(_timed(lambda: torch.mm(ta, ta)) for _ in range(repeats))
    flops = 2 * n**3 / 1e9
    return flops / tj, flops / tt


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
    args = p.parse_args(argv)

    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = bench(num_layers=args.layers, hidden_size=args.hidden, head_dim=args.hidden // 8)
    hf, model = reference_pair(cfg, seed=0, std=0.02)
    rng = np.random.default_rng(0)
    print(f"config: hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads}/{cfg.num_kv_heads} heads, "
          f"mlp {cfg.intermediate_size}, vocab {cfg.vocab_size}; jax {jax.__version__} ({jax.devices()[0].platform}), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads); load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")

    # ---- forward -----------------------------------------------------------------------------------------------
    ids = rng.integers(0, cfg.vocab_size, (args.batch, args.prompt_len))
    jids, tids = jnp.asarray(ids, jnp.int32), torch.tensor(ids)
    graphdef, state = nnx.split(model)

    @jax.jit
    def jax_forward(state, ids):
        return nnx.merge(graphdef, state)(ids).logits

    jax_forward(state, jids).block_until_ready()
    hf(input_ids=tids)
    tj, tt = [], []
    for _ in range(args.repeats):
        tj.append(_timed(lambda: jax_forward(state, jids).block_until_ready()))
        tt.append(_timed(lambda: hf(input_ids=tids)))
    n_tok = args.batch * args.prompt_len
    fwd_jax, fwd_torch = n_tok / statistics.median(tj), n_tok / statistics.median(tt)
    flops_per_token = 2 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    flops_per_token -= 2 * cfg.vocab_size * cfg.hidden_size  # the embedding lookup is not a matmul
    flops_per_token += 4 * args.prompt_len / 2 * cfg.num_layers * cfg.q_size  # causal attention scores + values
    jax_gf, torch_gf = matmul_gflops()
    print(f"forward [{args.batch}x{args.prompt_len}]: jax {fwd_jax:,.0f} tok/s, torch {fwd_torch:,.0f} tok/s, "
          f"ratio {fwd_jax / fwd_torch:.3f}")
    gf_jax, gf_torch = fwd_jax * flops_per_token / 1e9, fwd_torch * flops_per_token / 1e9
    print(f"  achieved GFLOP/s: jax {gf_jax:.1f}, torch {gf_torch:.1f}; 1024^2 matmul ceiling: "
          f"jax {jax_gf:.1f}, torch {torch_gf:.1f} (ratio {jax_gf / torch_gf:.3f})")
    print(f"  jax forward at {fwd_jax * flops_per_token / 1e9 / jax_gf:.1%} of the jax matmul ceiling; "
          f"ratio / ceiling ratio = {(fwd_jax / fwd_torch) / (jax_gf / torch_gf):.3f}")

    # ---- decode ------------------------------------------------------------------------------------------------
    decode_ratios = {}
    for b in args.decode_batches:
        prompt = rng.integers(0, cfg.vocab_size, (b, args.decode_prompt_len))
        tprompt = torch.tensor(prompt)
        capacity = args.decode_prompt_len + args.new_tokens

        def run_jax(n, prompt=prompt, capacity=capacity):
            cfg_n = GenerationConfig(max_new_tokens=n, cache_capacity=capacity)
            generate(model, prompt, config=cfg_n).tokens.block_until_ready()

        def run_torch(n, tprompt=tprompt):
            hf.generate(tprompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)

        for n in (1, args.new_tokens):
            run_jax(n)
            run_torch(n)
        dj, dt = [], []
        for _ in range(args.repeats):
            dj.append(_timed(lambda: run_jax(args.new_tokens)) - _timed(lambda: run_jax(1)))
            dt.append(_timed(lambda: run_torch(args.new_tokens)) - _timed(lambda: run_torch(1)))
        steps = b * (args.new_tokens - 1)
        dec_jax, dec_torch = steps / statistics.median(dj), steps / statistics.median(dt)
        decode_ratios[b] = dec_jax / dec_torch
        print(f"decode batch {b}: jax {dec_jax:,.1f} tok/s, torch {dec_torch:,.1f} tok/s, "
              f"ratio {dec_jax / dec_torch:.3f}")

    first = args.decode_batches[0]
    result = {
        "forward_ratio": round(fwd_jax / fwd_torch, 4),
        "decode_ratio": round(decode_ratios[first], 4),
        "decode_batch": first,
        "decode_ratio_by_batch": {str(k): round(v, 4) for k, v in decode_ratios.items()},
        "matmul_ceiling_ratio": round(jax_gf / torch_gf, 4),
        "forward_tok_s": {"jax": round(fwd_jax, 1), "torch": round(fwd_torch, 1)},
        "forward_fraction_of_jax_matmul_ceiling": round(fwd_jax * flops_per_token / 1e9 / jax_gf, 4),
        "load_average": round(os.getloadavg()[0], 1),
        "threads": args.threads or torch.get_num_threads(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
