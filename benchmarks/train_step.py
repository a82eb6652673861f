"""Benchmark: one AR train step (forward + backward + AdamW, clipping) JAX vs a PyTorch reference, same tiny model
(transformers Qwen2.5-VL + vision_head + prefill embeds with identical weights) and the same batch; plus the input
pipeline's throughput.

``ratio`` = JAX steps/s / torch steps/s. ``loader_headroom`` = records/s the Grain loader delivers (JSONL + PNG decode,
preprocessing, tokenisation, collation) / records/s the JAX train step consumes. The first-step losses of both sides
are printed as a sanity check that they compute the same thing. Each side runs in its own child process pinned to
the same cores with the same ``--threads`` (benchmarks/harness.py; the loader is timed in the JAX child, on those
cores). The last line is JSON (plus ``load``, ``busy``, ``threads``, ``cores``).

    python benchmarks/train_step.py [--batch 4] [--steps 10] [--records 64] [--smoke]
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import ceiling, harness  # noqa: E402

harness.setup()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from flax import nnx  # noqa: E402

from configs import nexus_gen  # noqa: E402
from configs.training import DataConfig, OptimConfig  # noqa: E402
from conversion import load  # noqa: E402
from nexus_jax import sharding  # noqa: E402
from nexus_jax.data.ar_examples import ARCollator, AREncoder  # noqa: E402
from nexus_jax.data.pipeline import BatchIterator, build_dataset  # noqa: E402
from nexus_jax.data.sources import JsonlSource  # noqa: E402
from nexus_jax.data.synthetic import write_ar_dataset  # noqa: E402
from nexus_jax.models.nexus_ar import NexusGenAR  # noqa: E402
from nexus_jax.nexus.tiny import ByteTokenizer  # noqa: E402
from nexus_jax.training import state as state_lib  # noqa: E402
from nexus_jax.training.ar_loop import VIT_FROZEN, make_ar_loss  # noqa: E402
from tests.helpers.qwen2_5_vl_reference import build_hf_vl, hf_state_dict_numpy, zeros_like_module  # noqa: E402


def torch_pair(cfg):
    """(transformers model, torch vision_head, torch prefill, JAX twin) with identical random weights."""
    hf = build_hf_vl(cfg.vl, seed=0)
    h = cfg.hidden_size
    torch.manual_seed(0)
    head = torch.nn.Linear(h, h, bias=False)
    prefill = torch.nn.Parameter(torch.randn(cfg.num_slots, h) * 0.02)
    twin = zeros_like_module(lambda: NexusGenAR(cfg, rngs=nnx.Rngs(0)))
    load.nexus_ar(twin, {**hf_state_dict_numpy(hf), "vision_head.weight": head.weight.detach().numpy(),
                         "image_prefill_embeds.weight": prefill.detach().numpy()})
    for p in hf.model.visual.parameters():
        p.requires_grad_(False)
    return hf, head, prefill, twin


def torch_step_fn(hf, head, prefill, cfg, optim: OptimConfig, examples, batch):
    """A closure running one torch train step on micro-batch 0 of ``batch`` (ViT frozen, like the JAX side)."""
    img = cfg.tokens.image_pad
    ids = torch.from_numpy(batch["input_ids"][0]).long()
    labels = torch.from_numpy(batch["labels"][0]).long()
    mask = torch.from_numpy(batch["attention_mask"][0]).long()
    pos = torch.from_numpy(batch["positions"][0]).long()
    in_px = [e["input_pixels"] for e in examples if len(e["input_grid"])]
    in_grid = [e["input_grid"] for e in examples if len(e["input_grid"])]
    tg_px = [e["target_pixels"] for e in examples if len(e["target_grid"])]
    tg_grid = [e["target_grid"] for e in examples if len(e["target_grid"])]
    params = [p for p in hf.parameters() if p.requires_grad] + list(head.parameters()) + [prefill]
    opt = torch.optim.AdamW(params, lr=optim.learning_rate, betas=(optim.b1, optim.b2), eps=optim.eps,
                            weight_decay=optim.weight_decay)
    lm = hf.model.language_model

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        out_slots = labels == img
        emb = lm.embed_tokens(ids)
        with torch.no_grad():
            feats = hf.model.visual(torch.from_numpy(np.concatenate(in_px)),
                                    grid_thw=torch.from_numpy(np.concatenate(in_grid))).pooler_output
            targets = hf.model.visual(torch.from_numpy(np.concatenate(tg_px)),
                                      grid_thw=torch.from_numpy(np.concatenate(tg_grid))).pooler_output
        emb = emb.masked_scatter(((ids == img) & ~out_slots)[..., None].expand_as(emb), feats)
        emb = emb.masked_scatter(out_slots[..., None].expand_as(emb),
                                 prefill.repeat(int(out_slots.sum()) // cfg.num_slots, 1))
        hidden = lm(inputs_embeds=emb, position_ids=pos, attention_mask=mask).last_hidden_state
        logits, embeds = hf.lm_head(hidden).float(), head(hidden)
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                             labels.masked_fill(out_slots, -100)[:, 1:].reshape(-1))
        pred = embeds[:, :-1][labels[:, 1:] == img]
        img_loss = 0.5 * F.mse_loss(pred, targets) + 0.5 * (1 - F.cosine_similarity(pred, targets, dim=-1)).mean()
        loss = ce + img_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, optim.clip_norm)
        opt.step()
        return float(loss.detach())

    return step


def add_args(ap) -> None:
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--records", type=int, default=64)
    ap.add_argument("--loader-threads", type=int, default=4, help="Grain prefetch threads of the loader")


def _smoke(args) -> None:
    if args.smoke:
        args.steps, args.records = 1, 8


def best(fn, n: int) -> float:
    """Best single-step wall time over ``n`` steps (robust to other processes on a shared machine)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(side: str, args) -> tuple[dict, dict]:
    """One side's train step: first-step loss, best step seconds (JAX side: also the loader's records/s)."""
    _smoke(args)
    torch.set_grad_enabled(True)
    cfg = nexus_gen.tiny()
    optim = OptimConfig(learning_rate=1e-3, warmup_steps=0, decay_steps=1000, schedule="constant", weight_decay=0.0,
                        clip_norm=1.0, frozen=VIT_FROZEN)
    tmp = tempfile.mkdtemp()
    path = write_ar_dataset(tmp, args.records, seed=0)
    data = DataConfig(path=str(path), length_buckets=(256, 512), num_threads=args.loader_threads, prefetch=64)
    encoder = AREncoder(cfg, data, ByteTokenizer().encode, tmp)
    collate = ARCollator(cfg, data, grad_accum=1, micro_batch=args.batch)
    # One fixed batch with every task (understanding, generation, editing).
    examples = []
    for i, line in enumerate(JsonlSource(path)._lines[: args.batch]):
        ex = encoder(line)
        ex["record_id"] = np.asarray(i)
        examples.append(ex)
    batch = collate(examples)
    batch.pop("record_id")
    hf, head, prefill, twin = torch_pair(cfg)
    out = {"seq_len": int(batch["input_ids"].shape[-1])}
    # the step's matmuls (forward shapes of the text layers and lm_head over all tokens); at this tiny width the step
    # is bound by per-op overhead rather than by them, so the ceiling bounds it only loosely
    m, tc = args.batch * out["seq_len"], cfg.vl.text
    out["ceiling"] = ceiling.measure(side, [(m, tc.hidden_size, tc.q_size), (m, tc.hidden_size, tc.intermediate_size),
                                            (m, tc.intermediate_size, tc.hidden_size), (m, tc.hidden_size,
                                                                                       tc.vocab_size)])
    if side == "torch":
        tstep = torch_step_fn(hf, head, prefill, cfg, optim, examples, batch)
        out["loss0"] = tstep()
        best(tstep, 1)
        out["step_s"] = best(tstep, args.steps)
        return out, {}

    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    rules = sharding.TRAIN_RULES
    graphdef, state, abstract = state_lib.init_from_module(twin, optim, mesh, rules, 0)
    loss_fn = make_ar_loss(cfg, collate, 1.0, 1.0)
    batch_sh = state_lib.batch_shardings(batch, mesh, rules, lambda k, nd: (None,) * nd)
    jstep = state_lib.jit_train_step(
        state_lib.make_train_step(graphdef, loss_fn, optim, "float32", micro_batched=True),
        jax.tree.map(lambda a: a.sharding, abstract), batch_sh)
    dev_batch = {k: jax.device_put(v, batch_sh[k]) for k, v in batch.items()}
    state, m = jstep(state, dev_batch)
    out["loss0"] = float(m["loss"])

    def jax_once() -> None:
        nonlocal state
        state, mm = jstep(state, dev_batch)
        jax.block_until_ready(mm["loss"])

    best(jax_once, 1)
    out["step_s"] = best(jax_once, args.steps)
    ds = build_dataset(JsonlSource(path), encoder, seed=0, num_epochs=None)
    it = BatchIterator(ds, args.batch, collate, num_threads=data.num_threads, prefetch=data.prefetch)
    next(it)
    n_batches = max(4, args.records // args.batch)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    out["loader_records_per_s"] = n_batches * args.batch / (time.perf_counter() - t0)
    return out, {}


def combine(res: dict, arrays: dict, args) -> dict:
    _smoke(args)
    j, t = res["jax"], res["torch"]
    jax_s, torch_s, loader_rps = j["step_s"], t["step_s"], j["loader_records_per_s"]
    step_rps = args.batch / jax_s
    diff = abs(j["loss0"] - t["loss0"])
    print(f"first-step loss: JAX {j['loss0']:.6f}  torch {t['loss0']:.6f}  (abs diff {diff:.2e})")
    print(f"JAX {jax_s * 1e3:.1f} ms/step, torch {torch_s * 1e3:.1f} ms/step; loader {loader_rps:.1f} rec/s vs step "
          f"{step_rps:.1f} rec/s")
    return {
        "ratio": round(torch_s / jax_s, 3),  # = JAX steps/s / torch steps/s
        "loader_headroom": round(loader_rps / step_rps, 3),
        "jax_step_s": round(jax_s, 5),
        "torch_step_s": round(torch_s, 5),
        "loader_records_per_s": round(loader_rps, 1),
        "step_records_per_s": round(step_rps, 1),
        "batch": args.batch,
        "seq_len": j["seq_len"],
        "first_step_loss": {"jax": j["loss0"], "torch": t["loss0"]},
        "torch_threads": t["torch_threads"],
        "loader_threads": args.loader_threads,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, cpu",
        **ceiling.keys(j["ceiling"], t["ceiling"], torch_s / jax_s),
    }


if __name__ == "__main__":
    harness.main(__doc__, add_args, measure, combine)
