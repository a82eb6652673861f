"""Qwen2.5 text decoder throughput: JAX (this package) vs transformers (torch), CPU, float32, one run.

forward: tokens/s of one full forward (logits for every position) over a [batch, prompt_len] prompt.
decode:  tokens/s of greedy KV-cache generation after a short prompt, prefill excluded on both sides:
         time(prompt + N new) - time(prompt + 1 new).
Each side runs in its own child process pinned to the same cores with the same ``--threads``
(benchmarks/harness.py); medians are reported. Besides wall-clock throughput (the headline ratios), throughput per
CPU-second of the process is reported. The last line printed is a JSON object with forward_ratio and decode_ratio
(JAX throughput / torch throughput, wall clock) plus ``load``, ``busy``, ``threads``, ``cores``.

    python benchmarks/text_decoder.py [--layers 8 --hidden 512 --prompt-len 512 --new-tokens 32 --repeats 3 --threads 1]
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import harness  # noqa: E402

harness.setup()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import ceiling  # noqa: E402
from configs.qwen2_5 import bench  # noqa: E402
from nexus_jax.generation import GenerationConfig, generate  # noqa: E402
from nexus_jax.generation.generate import CPU_DECODE_COMPILER_OPTIONS, BackendTunedJit  # noqa: E402
from tests.helpers.qwen2_reference import reference_pair  # noqa: E402


def timed(fn: Callable[[], object]) -> np.ndarray:
    """[wall seconds, process CPU seconds] of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return np.array([time.perf_counter() - wall, time.process_time() - cpu])


def median(fn: Callable[[], np.ndarray], repeats: int) -> np.ndarray:
    """Median [wall, cpu] seconds of ``fn()`` over ``repeats`` calls."""
    return np.median([fn() for _ in range(repeats)], axis=0)


def matmul_gflops(side: str, n: int = 1024, repeats: int = 5) -> float:
    """fp32 n x n matmul GFLOP/s of ``side`` (best wall time): the CPU dot ceiling of this machine right now."""
    a = np.random.default_rng(0).standard_normal((n, n), np.float32)
    if side == "jax":
        ja = jnp.asarray(a)
        jdot = jax.jit(lambda x: x @ x)
        jdot(ja).block_until_ready()
        t = min(timed(lambda: jdot(ja).block_until_ready())[0] for _ in range(repeats))
    else:
        ta = torch.tensor(a)
        torch.mm(ta, ta)
        t = min(timed(lambda: torch.mm(ta, ta))[0] for _ in range(repeats))
    return 2 * n**3 / 1e9 / t


def decode_matmul_seconds(side: str, cfg, batch: int, repeats: int = 5) -> float:
    """Best wall seconds of one decode step's matmuls alone (per layer q, k, v, o, gate, up, down with their own
    weights, then the lm_head; x [batch, hidden]): the step with no attention, norms or sampling. Its batch-b /
    batch-1 throughput is the decode batch-scaling ceiling of this side's dot on this machine (weights stream from
    memory at batch 1; at batch 16 the small-M dot's speed decides). JAX compiles them as its decode program does."""
    rng = np.random.default_rng(1)
    h, q, kv, m = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    layer_shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, m), (h, m), (m, h)]
    weights = [[(0.02 * rng.standard_normal(s)).astype(np.float32) for s in layer_shapes]
               for _ in range(cfg.num_layers)]
    head = (0.02 * rng.standard_normal((h, cfg.vocab_size))).astype(np.float32)
    x = rng.standard_normal((batch, h)).astype(np.float32)

    def step(xp, act, x, weights, head):
        for wq, wk, wv, wo, wg, wu, wd in weights:
            k, v = x @ wk, x @ wv  # computed as the step does; folded into x so they are not dead code
            x = x + (x @ wq) @ wo + (k.sum() + v.sum()) * 1e-6
            x = x + (act(x @ wg) * (x @ wu)) @ wd
        return x @ head

    if side == "jax":
        args = jax.device_put((jnp.asarray(x), weights, head))
        # compiled as generation.generate.decode is (its options on CPU, through the same BackendTunedJit)
        fn = BackendTunedJit(lambda *a: step(jnp, jax.nn.silu, *a), static_argnames=(), platform="cpu",
                             options=CPU_DECODE_COMPILER_OPTIONS)
        fn(*args).block_until_ready()
        return min(timed(lambda: fn(*args).block_until_ready())[0] for _ in range(repeats))
    tw = [[torch.tensor(w) for w in layer] for layer in weights]
    tx, th = torch.tensor(x), torch.tensor(head)
    with torch.no_grad():
        step(torch, torch.nn.functional.silu, tx, tw, th)
        return min(timed(lambda: step(torch, torch.nn.functional.silu, tx, tw, th))[0] for _ in range(repeats))


def _config(args):
    head_dim = args.hidden // 8
    hw = (head_dim // 2 - head_dim // 8) // 2  # M-RoPE split in Qwen2.5-VL proportions (16, 24, 24 of 64)
    section = (head_dim // 2 - 2 * hw, hw, hw) if args.rope == "mrope" else None
    return bench(num_layers=args.layers, hidden_size=args.hidden, head_dim=head_dim, mrope_section=section)


def measure_forward(side, model, hf, cfg, args, rng) -> tuple[dict, np.ndarray]:
    """One side's full forward: [wall, cpu] seconds, matmul GFLOP/s, FLOPs per token; logits of the last position."""
    ids = rng.integers(0, cfg.vocab_size, (args.batch, args.prompt_len))
    pos = np.broadcast_to(np.arange(args.prompt_len), ids.shape)
    if cfg.mrope_section is not None:
        pos = np.broadcast_to(pos[None], (3, *ids.shape))
    if side == "jax":
        jids, jpos = jnp.asarray(ids, jnp.int32), jnp.asarray(pos)  # explicit positions: no position logic timed
        graphdef, state = nnx.split(model)

        @jax.jit
        def jax_forward(state, ids, pos):
            return nnx.merge(graphdef, state)(ids, positions=pos).logits

        def run():
            return jax_forward(state, jids, jpos).block_until_ready()
    else:
        tids, tpos = torch.tensor(ids), torch.tensor(np.ascontiguousarray(pos))

        def run():
            return hf(input_ids=tids, position_ids=tpos).logits

    out = np.asarray(run())[:, -1]
    t = median(lambda: timed(run), args.repeats)
    n_params = sum(p.numel() for p in hf.parameters()) if side == "torch" else sum(
        int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    flops_per_token = 2 * n_params - 2 * cfg.vocab_size * cfg.hidden_size  # the embedding lookup is not a matmul
    flops_per_token += 4 * args.prompt_len / 2 * cfg.num_layers * cfg.q_size  # causal attention scores + values
    return {"forward": t.tolist(), "matmul_gflops": matmul_gflops(side), "flops_per_token": flops_per_token}, out


def measure_decode(side, model, hf, cfg, args, rng, batch: int) -> list[float]:
    """[wall, cpu] seconds of (prompt + N new tokens) - (prompt + 1 new token), median over repeats."""
    prompt = rng.integers(0, cfg.vocab_size, (batch, args.decode_prompt_len))
    tprompt = torch.tensor(prompt)
    capacity = args.decode_prompt_len + args.new_tokens

    def run(n):
        if side == "jax":
            cfg_n = GenerationConfig(max_new_tokens=n, cache_capacity=capacity)
            return timed(lambda: generate(model, prompt, config=cfg_n).tokens.block_until_ready())
        return timed(lambda: hf.generate(tprompt, max_new_tokens=n, min_new_tokens=n, do_sample=False))

    for n in (1, args.new_tokens):  # compile / warm up
        run(n)
    return median(lambda: run(args.new_tokens) - run(1), args.repeats).tolist()


def add_args(p) -> None:
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--decode-prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16],
                   help="decode batch sizes; decode_batch_scaling = JAX tok/s at the last / at the first")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rope", choices=["1d", "mrope"], default="1d",
                   help="1d: transformers Qwen2ForCausalLM (leanest torch path, default); mrope: Qwen2.5-VL text model")


def _smoke(args) -> None:
    if args.smoke:
        args.layers, args.hidden, args.prompt_len, args.new_tokens, args.decode_batches, args.repeats = (
            1, 128, 16, 3, [1, 2], 1)


def measure(side: str, args) -> tuple[dict, dict]:
    _smoke(args)
    cfg = _config(args)
    hf, model = reference_pair(cfg, seed=0, std=0.02)
    rng = np.random.default_rng(0)
    fwd, logits = measure_forward(side, model, hf, cfg, args, rng)
    dec = {str(b): measure_decode(side, model, hf, cfg, args, rng, b) for b in args.decode_batches}
    m = args.batch * args.prompt_len  # the forward's dominant matmuls: projections, MLP, lm_head
    shapes = [(m, cfg.hidden_size, cfg.q_size), (m, cfg.hidden_size, cfg.kv_size), (m, cfg.q_size, cfg.hidden_size),
              (m, cfg.hidden_size, cfg.intermediate_size), (m, cfg.intermediate_size, cfg.hidden_size),
              (m, cfg.hidden_size, cfg.vocab_size)]
    dec_mm = {str(b): decode_matmul_seconds(side, cfg, b, repeats=1 if args.smoke else 5)
              for b in args.decode_batches}
    return fwd | {"decode": dec, "decode_matmuls": dec_mm, "reference": type(hf).__name__,
                  "ceiling": ceiling.measure(side, shapes, repeats=1 if args.smoke else 5)}, {"last_logits": logits}


def combine(res: dict, arrays: dict, args) -> dict:
    _smoke(args)
    cfg = _config(args)
    j, t = res["jax"], res["torch"]
    n_tok = args.batch * args.prompt_len
    fwd_jax, fwd_torch = n_tok / np.array(j["forward"]), n_tok / np.array(t["forward"])  # [wall, cpu] tokens/s
    jax_gf, torch_gf = j["matmul_gflops"], t["matmul_gflops"]
    fpt = j["flops_per_token"]
    ceiling_fraction = fwd_jax[0] * fpt / 1e9 / jax_gf
    err = float(np.abs(arrays["jax"]["last_logits"] - arrays["torch"]["last_logits"]).max())
    print(f"config: hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads}/{cfg.num_kv_heads} heads, "
          f"mlp {cfg.intermediate_size}, vocab {cfg.vocab_size}; {args.threads} thread(s) per side; "
          f"reference {t['reference']}")
    print(f"forward [{args.batch}x{args.prompt_len}]: jax {fwd_jax[0]:,.0f} tok/s, torch {fwd_torch[0]:,.0f} tok/s, "
          f"ratio {fwd_jax[0] / fwd_torch[0]:.3f} (per CPU-second: ratio {fwd_jax[1] / fwd_torch[1]:.3f}); "
          f"last-position logits max abs err {err:.2e}")
    print(f"  model GFLOP/s: jax {fwd_jax[0] * fpt / 1e9:.1f}, torch {fwd_torch[0] * fpt / 1e9:.1f}; 1024^2 matmul: "
          f"jax {jax_gf:.1f}, torch {torch_gf:.1f} GFLOP/s (ceiling ratio {jax_gf / torch_gf:.3f})")
    print(f"  jax forward runs at {ceiling_fraction:.1%} of the jax matmul ceiling; forward ratio / ceiling ratio = "
          f"{(fwd_jax[0] / fwd_torch[0]) / (jax_gf / torch_gf):.3f}")
    dec = {}
    for b in args.decode_batches:
        steps = b * (args.new_tokens - 1)
        dj, dt = steps / np.array(j["decode"][str(b)]), steps / np.array(t["decode"][str(b)])
        dec[b] = {"ratio": dj[0] / dt[0], "cpu_ratio": dj[1] / dt[1], "tok_s_jax": dj[0], "tok_s_torch": dt[0]}
        print(f"decode batch {b}: jax {dj[0]:,.1f} tok/s, torch {dt[0]:,.1f} tok/s, "
              f"ratio {dj[0] / dt[0]:.3f} (per CPU-second: ratio {dj[1] / dt[1]:.3f})")
    first, last = args.decode_batches[0], args.decode_batches[-1]
    scaling = dec[last]["tok_s_jax"] / dec[first]["tok_s_jax"]
    print(f"JAX decode batch {last} / batch {first} tok/s: {scaling:.2f}")
    mm = {side: {b: float(res[side]["decode_matmuls"][str(b)]) for b in args.decode_batches} for side in res}
    mm_scaling = {side: (last / v[last]) / (first / v[first]) for side, v in mm.items()}
    print(f"decode-step matmuls alone, batch {first} / {last}: jax {mm['jax'][first] * 1e3:.2f} / "
          f"{mm['jax'][last] * 1e3:.2f} ms, torch {mm['torch'][first] * 1e3:.2f} / {mm['torch'][last] * 1e3:.2f} ms; "
          f"scaling ceiling jax {mm_scaling['jax']:.2f}, torch {mm_scaling['torch']:.2f}; JAX decode scaling "
          f"{scaling:.2f} is {scaling / mm_scaling['jax']:.3f} of its ceiling")
    return {
        "forward_ratio": round(fwd_jax[0] / fwd_torch[0], 4),
        "decode_ratio": round(dec[first]["ratio"], 4),
        "decode_batch": first,
        "decode_batch_scaling": round(scaling, 3),
        "decode_batch_scaling_batches": [first, last],
        "decode_scaling_ceiling": round(mm_scaling["jax"], 3),
        "decode_scaling_fraction_of_ceiling": round(scaling / mm_scaling["jax"], 3),
        "decode_matmul_ms": {side: {str(b): round(t * 1e3, 3) for b, t in v.items()} for side, v in mm.items()},
        "decode_ratio_by_batch": {str(b): round(d["ratio"], 4) for b, d in dec.items()},
        "forward_cpu_ratio": round(fwd_jax[1] / fwd_torch[1], 4),
        "decode_cpu_ratio_by_batch": {str(b): round(d["cpu_ratio"], 4) for b, d in dec.items()},
        "forward_tok_s": {"jax": round(fwd_jax[0], 1), "torch": round(fwd_torch[0], 1)},
        "decode_tok_s": {str(b): {"jax": round(d["tok_s_jax"], 1), "torch": round(d["tok_s_torch"], 1)}
                         for b, d in dec.items()},
        "matmul_ceiling_ratio": round(jax_gf / torch_gf, 4),
        "forward_fraction_of_jax_matmul_ceiling": round(ceiling_fraction, 4),
        "forward_last_logits_max_abs_err": err,
        "reference": t["reference"],
        "load_average": [round(os.getloadavg()[0], 1)],
        **ceiling.keys(j["ceiling"], t["ceiling"], fwd_jax[0] / fwd_torch[0]),
    }


if __name__ == "__main__":
    harness.main(__doc__, add_args, measure, combine)
