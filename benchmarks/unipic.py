"""UniPic-1 generation: one masked-AR iteration (MAR encoder + LLM bridge, MAR decoder, diffusion-head sampling of that
step's tokens with CFG), JAX vs the torch reference loop of tests/helpers/unipic_torch.py, same weights (fp32).

    python benchmarks/unipic.py [--iters 3] [--head-steps 100] [--threads 1] [--smoke]

Small-but-not-tiny config (below): LLM 512 wide x 4 layers (8 q / 2 kv heads), MAR 512 wide 4 + 4 blocks (8 heads),
16x16 tokens (256 px) + 16 buffers, head 512 wide x 3 blocks, 2 images (CFG batch 4), 16 iterations; the timed step
is the middle one. JAX runs the jitted static-shape iteration (warm; MAR encoder and LLM on the visible tokens
gathered into the step's bucket of 128 slots, as the iteration does; the encoder + bridge part is timed the same
way); torch runs upstream's token-dropping step with a DynamicCache prefix (cropped after the step). ``ratio`` =
torch seconds / JAX seconds (wall clock; > 1 means JAX is faster); per-part timings too, and the matmul ceiling of
the encoder + bridge shapes (benchmarks/ceiling.py: ``ceiling``, ``fraction_of_ceiling`` of encoder_bridge_ratio).
Each side runs in its own child process pinned to the same cores with the same
``--threads`` (benchmarks/harness.py; the old ``--single-thread`` is ``--threads 1``). The last line is JSON (plus
``load``, ``busy``, ``threads``, ``cores``); it is also stored in benchmarks/results/unipic.json under
``single_thread`` or ``threads_<n>`` (not with ``--smoke`` or ``--no-write``).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import harness  # noqa: E402

harness.setup()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import ceiling  # noqa: E402
from benchmarks.timing import median_seconds  # noqa: E402
from configs import unipic as unipic_configs  # noqa: E402
from configs.mar import MARConfig  # noqa: E402
from configs.unipic import SamplingConfig  # noqa: E402
from configs.unipic_diffusion import DiffusionHeadConfig, GaussianDiffusionConfig  # noqa: E402
from nexus_jax.diffusion import gaussian, maskgit  # noqa: E402
from nexus_jax.unipic import bridge as jbridge  # noqa: E402
from nexus_jax.unipic import sample as jsample  # noqa: E402
from tests.helpers import unipic_torch  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "unipic.json")
G = 2  # images; the CFG batch is 2G
# Dominant matmuls of the encoder + bridge: 2G rows x (16 buffers + a 128-slot visible bucket), MAR blocks (512 wide,
# MLP 2048) and LLM layers (512 wide, MLP 1376, 2 KV heads of 64); a speed ratio at that scale (the timed step's
# bucket is 96 slots since the buckets follow the schedule: segment_capacities).
CEILING_SHAPES = ((576, 512, 1536), (576, 512, 512), (576, 512, 2048), (576, 2048, 512), (576, 512, 1376),
                  (576, 1376, 512))


def bench_config(head_steps: int, visible_buckets: int | None = None) -> unipic_configs.UniPicConfig:
    text = unipic_configs.tiny_text(vocab_size=2048, hidden_size=512, intermediate_size=1376, num_layers=4,
                                    num_heads=8, num_kv_heads=2, head_dim=64)
    return unipic_configs.tiny(
        text=text,
        mar=MARConfig(width=512, encoder_depth=4, decoder_depth=4, num_heads=8, buffer_size=16, seq_h=16, seq_w=16,
                      num_classes=10, llm_hidden=512),
        head=DiffusionHeadConfig(in_channels=16, width=512, out_channels=32, z_channels=512, depth=3),
        diffusion=GaussianDiffusionConfig(sampling_steps=str(head_steps)),
        sampling=SamplingConfig(num_iter=16, **({} if visible_buckets is None else
                                                {"visible_buckets": visible_buckets})),
        resolution=256,
    )


def write_result(result: dict, key: str) -> None:
    """Store ``result`` under ``key`` in benchmarks/results/unipic.json, keeping the other thread settings' runs."""
    old = {}
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            old = json.load(f)
    old[key] = result
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS + ".tmp", "w") as f:
        json.dump(old, f, indent=1)
    os.replace(RESULTS + ".tmp", RESULTS)


def add_args(parser) -> None:
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--head-steps", type=int, default=100, help="diffusion-head sampling steps (UniPic: 100)")
    parser.add_argument("--visible-buckets", type=int, default=None,
                        help="SamplingConfig.visible_buckets (default: the config's; more buckets = less padding of "
                             "the gathered visible tokens, more compiled iteration shapes)")
    parser.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/unipic.json")


def _smoke(args) -> None:
    if args.smoke:
        args.iters, args.head_steps, args.no_write = 1, 2, True


def measure(side: str, args) -> tuple[dict, dict]:
    """One side's iteration and parts: (wall, CPU) seconds each; encoder+bridge, decoder and iteration outputs."""
    _smoke(args)
    cfg = bench_config(args.head_steps, args.visible_buckets)
    sampling = cfg.sampling
    n, nb, c = cfg.seq_len, cfg.mar.buffer_size, cfg.mar.token_embed_dim
    tu, diffusion, _, model, _ = unipic_torch.reference_models(cfg, vae=False)

    # ---- inputs: right-padded prompts [cond; uncond], the middle step's state
    rng = np.random.default_rng(0)
    lengths = [57, 41, 24, 24]
    ids = np.full((2 * G, max(lengths)), cfg.tokens.pad, np.int64)
    ctx_mask = np.zeros_like(ids)
    for i, length in enumerate(lengths):
        ids[i, :length], ctx_mask[i, :length] = rng.integers(0, 256, length), 1
    step = sampling.num_iter // 2
    tables, max_pred = jsample.step_tables(n, sampling)
    capacity = jsample.segment_capacities(n, sampling)[step]
    sched = maskgit.mask_schedule(n, sampling.num_iter)
    count = int(sched.num_pred[step])
    orders = np.stack([rng.permutation(n) for _ in range(G)])
    cond_tokens = rng.standard_normal((G, n, c)).astype(np.float32)
    mask = np.zeros((G, n), np.float32)
    for g in range(G):
        mask[g, orders[g, : int(np.asarray(tables.remaining)[step])]] = 1
    cond_tokens[mask.astype(bool)] = 0.0
    s = int(args.head_steps)
    init = rng.standard_normal((G, max_pred, c)).astype(np.float32)
    steps = rng.standard_normal((s, G, max_pred, c)).astype(np.float32)
    z_np = rng.standard_normal((2 * G * max_pred, cfg.mar.width)).astype(np.float32)
    keep = np.concatenate([np.ones((2 * G, nb), bool), np.concatenate([mask, mask]) == 0], axis=1)
    if side == "torch":
        return _measure_torch(args, cfg, tu, diffusion, ids, ctx_mask, cond_tokens, mask, orders, init, steps, z_np,
                              step, count)

    # ---- JAX: the whole jitted iteration, plus its parts jitted alone
    graphdef, state = nnx.split(model)
    embeds = model.llm.model.embed_tokens(jnp.asarray(ids))
    j_ctx = jnp.asarray(ctx_mask, jnp.int32)
    prefix = nnx.jit(jbridge.prefill_context, static_argnums=(3,))(model.llm, embeds, j_ctx, n + nb)
    schedule = gaussian.make_schedule(cfg.diffusion)
    j_tokens = jnp.asarray(np.concatenate([cond_tokens, cond_tokens]))
    j_orders = jnp.asarray(np.concatenate([orders, orders]), jnp.int32)
    j_mask = jnp.asarray(np.concatenate([mask, mask]), bool)
    j_init, j_steps = jnp.asarray(init), jnp.asarray(steps)
    temp = jnp.float32(sampling.temperature)

    def jax_iteration():
        return jsample.iteration(graphdef, state, j_tokens, j_orders, jnp.int32(step), tables, prefix, j_ctx, schedule,
                                 None, None, j_init, j_steps, temp, max_pred=max_pred, visible_capacity=capacity)

    @jax.jit
    def enc_bridge(state, tokens, m):
        mdl = nnx.merge(graphdef, state)
        x = mdl.mar.forward_mae_encoder(tokens, m, mdl.mar.fake_class_embedding(tokens.shape[0]), capacity=capacity)
        return jbridge.bridge(mdl.llm, mdl.project_in, mdl.project_out, x, ~m, prefix, j_ctx, capacity)

    @jax.jit
    def decoder(state, x_enc, m):
        return nnx.merge(graphdef, state).mar.forward_mae_decoder(x_enc, m)

    z_rows = jnp.asarray(z_np)

    @jax.jit
    def head(state, z):
        noise, step_noise = jsample._head_noise(j_init, j_steps)
        return gaussian.sample(nnx.merge(graphdef, state).mar.diffloss, schedule, z, noise=noise,
                               step_noise=step_noise, temperature=temp, cfg_scale=tables.cfg[step], guided=True)

    x_enc = enc_bridge(state, j_tokens, j_mask)
    parts_jax = {
        "iteration": lambda: jax_iteration().block_until_ready(),
        "encoder_bridge": lambda: enc_bridge(state, j_tokens, j_mask).block_until_ready(),
        "decoder": lambda: decoder(state, x_enc, j_mask).block_until_ready(),
        "head": lambda: head(state, z_rows).block_until_ready(),
    }
    jax_t = {}
    for name, fn in parts_jax.items():
        fn()  # compile + warm
        jax_t[name] = median_seconds(fn, args.iters)

    x_enc_np = np.asarray(x_enc)
    arrays = {"x_enc": x_enc_np[keep].reshape(2 * G, -1, x_enc_np.shape[-1]),
              "z": np.asarray(decoder(state, x_enc, j_mask)), "tokens": np.asarray(jax_iteration())[:G]}
    return {**{k: list(v) for k, v in jax_t.items()}, "ceiling": ceiling.measure("jax", CEILING_SHAPES)}, arrays


def _measure_torch(args, cfg, tu, diffusion, ids, ctx_mask, cond_tokens, mask, orders, init, steps, z_rows, step,
                   count) -> tuple[dict, dict]:
    """The torch side: upstream's iteration and its parts, timed; its outputs for the cross-side comparison."""
    sampling, nb, c, s = cfg.sampling, cfg.mar.buffer_size, cfg.mar.token_embed_dim, int(args.head_steps)
    # upstream's step (token dropping, DynamicCache prefix cropped after the bridge)
    t_ctx = torch.tensor(ctx_mask)
    with torch.no_grad():
        kv = unipic_torch.prefill(tu.llm.model, tu.llm.model.embed_tokens(torch.tensor(ids)))
    t_tokens, t_mask, t_orders = torch.tensor(cond_tokens), torch.tensor(mask), torch.tensor(orders)
    t_init = torch.tensor(init[:, :count].reshape(G * count, c))
    t_steps = torch.tensor(steps[:, :, :count].reshape(s, G * count, c))
    kw = dict(num_iter=sampling.num_iter, cfg=sampling.cfg, cfg_schedule=sampling.cfg_schedule,
              temperature=sampling.temperature, buffer_size=nb)

    def torch_iteration():
        return unipic_torch.iteration(tu, diffusion, kv, t_ctx, t_tokens, t_mask, t_orders, step, t_init, t_steps,
                                      **kw)

    m2 = torch.cat([t_mask, t_mask])
    t2 = torch.cat([t_tokens, t_tokens])

    @torch.no_grad()
    def torch_enc_bridge():
        x = tu.mar.forward_mae_encoder(t2, m2, tu.mar.fake_latent.expand(2 * G, -1))
        return unipic_torch.bridge(tu.llm.model, tu.proj_in, tu.proj_out, x, kv, t_ctx, nb)

    t_x_enc = torch_enc_bridge()
    t_z = torch.tensor(np.asarray(z_rows)[: 2 * G * count].reshape(2 * G * count, -1))
    t_x_t = torch.cat([t_init, t_init])
    t_noise = torch.cat([t_steps, t_steps], dim=1)
    parts_torch = {
        "iteration": torch_iteration,
        "encoder_bridge": torch_enc_bridge,
        "decoder": torch.no_grad()(lambda: tu.mar.forward_mae_decoder(t_x_enc, m2)),
        "head": torch.no_grad()(lambda: diffusion.p_sample_loop(tu.mar.diffloss.net, t_z, t_x_t, t_noise,
                                                                 sampling.temperature, cfg=sampling.cfg)),
    }
    torch_t = {}
    for name, fn in parts_torch.items():
        fn()
        torch_t[name] = median_seconds(fn, args.iters)

    arrays = {"x_enc": t_x_enc.numpy(), "z": parts_torch["decoder"]().numpy(), "tokens": torch_iteration()[0].numpy()}
    return {**{k: list(v) for k, v in torch_t.items()}, "ceiling": ceiling.measure("torch", CEILING_SHAPES)}, arrays


def combine(res: dict, arrays: dict, args) -> dict:
    _smoke(args)
    cfg = bench_config(args.head_steps, args.visible_buckets)
    sampling = cfg.sampling
    n, nb = cfg.seq_len, cfg.mar.buffer_size
    tables, max_pred = jsample.step_tables(n, sampling)
    step = sampling.num_iter // 2
    capacities = jsample.segment_capacities(n, sampling)  # None: all N image slots (visible_buckets 1)
    capacity = capacities[step]
    sched = maskgit.mask_schedule(n, sampling.num_iter)
    count = int(sched.num_pred[step])
    s, lengths = int(args.head_steps), [57, 41, 24, 24]
    jax_t = {k: v for k, v in res["jax"].items() if k not in ("affinity", "torch_threads", "ceiling")}
    torch_t = {k: v for k, v in res["torch"].items() if k not in ("affinity", "torch_threads", "ceiling")}
    aj, at = arrays["jax"], arrays["torch"]
    enc_err = float(np.abs(aj["x_enc"] - at["x_enc"]).max())
    z_err = float(np.abs(aj["z"] - at["z"]).max())
    err = float(np.abs(aj["tokens"] - at["tokens"]).max())
    scale = float(np.abs(at["tokens"]).max())
    enc_scale, z_scale = float(np.abs(at["x_enc"]).max()), float(np.abs(at["z"]).max())
    ratio = torch_t["iteration"][0] / jax_t["iteration"][0]
    print(f"LLM {cfg.text.hidden_size}x{cfg.text.num_layers}, MAR {cfg.mar.width} {cfg.mar.encoder_depth}+"
          f"{cfg.mar.decoder_depth} blocks, {n}+{nb} tokens, head {cfg.head.width}x{cfg.head.depth} x {s} steps, "
          f"CFG batch {2 * G}, step {step}/{sampling.num_iter}: {count} tokens predicted (padded to {max_pred}), "
          f"{n - int(np.asarray(tables.remaining)[step])} visible (LLM segment {capacity} + {nb})")
    for name in jax_t:
        (jw, jc), (tw, tc) = jax_t[name], torch_t[name]
        print(f"{name:15s} JAX {jw * 1e3:9.1f} ms (cpu {jc * 1e3:9.1f})  torch {tw * 1e3:9.1f} ms (cpu {tc * 1e3:9.1f})"
              f"  ratio {tw / jw:.3f}")
    print(f"max abs err: encoder + bridge {enc_err:.2e} (max |x| {enc_scale:.1f}), decoder z {z_err:.2e} (max |z| "
          f"{z_scale:.1f}), iteration tokens {err:.2e} "
          f"(max |token| {scale:.1f}; random heads amplify eps errors by up to 1/sqrt(alpha_bar_T) ~ 200)")
    enc_ratio = torch_t["encoder_bridge"][0] / jax_t["encoder_bridge"][0]
    result = dict(
        ratio=round(ratio, 3),
        cpu_ratio=round(torch_t["iteration"][1] / jax_t["iteration"][1], 3),
        **{f"jax_{k}_ms": round(v[0] * 1e3, 2) for k, v in jax_t.items()},
        **{f"torch_{k}_ms": round(v[0] * 1e3, 2) for k, v in torch_t.items()},
        **{f"{k}_ratio": round(torch_t[k][0] / jax_t[k][0], 3) for k in jax_t},
        iteration_max_abs_err=err, max_abs_token=scale, encoder_bridge_max_abs_err=enc_err, decoder_max_abs_err=z_err,
        encoder_bridge_max_abs=enc_scale, decoder_max_abs=z_scale,
        config=dict(llm_hidden=cfg.text.hidden_size, llm_layers=cfg.text.num_layers, heads=cfg.text.num_heads,
                    kv_heads=cfg.text.num_kv_heads, mar_width=cfg.mar.width, mar_blocks=cfg.mar.encoder_depth,
                    tokens=n, buffers=nb, head_width=cfg.head.width, head_depth=cfg.head.depth, head_steps=s,
                    cfg_batch=2 * G, prompt_lengths=lengths, step=step, num_iter=sampling.num_iter,
                    predicted=count, padded_to=max_pred, visible_buckets=sampling.visible_buckets,
                    llm_segment_image_slots=capacity,
                    # the whole sampling: image slots the LLM runs on (the buckets) vs visible tokens (torch's count)
                    schedule_llm_image_slots=sum(n if c is None else c for c in capacities),
                    schedule_visible_tokens=int(sched.num_visible.sum())),
        iters=args.iters, single_thread=args.threads == 1, torch_threads=res["torch"]["torch_threads"],
        jax_device="cpu", load_avg=round(os.getloadavg()[0], 1),
        **ceiling.keys(res["jax"]["ceiling"], res["torch"]["ceiling"], enc_ratio),
    )
    return result


def store(result: dict, args) -> None:
    if not args.no_write:
        write_result(result, "single_thread" if args.threads == 1 else f"threads_{args.threads}")


if __name__ == "__main__":
    harness.main(__doc__, add_args, measure, combine, on_result=store)
