"""Reproduce the shipped default model (``nexus_jax/assets/default_model``): a tiny Nexus-Gen trained on shapes.

    .venv/bin/python scripts/train_default_model.py [--work-dir DIR] [--out nexus_jax/assets/default_model]

Stages (each skipped when its output exists, so a killed run resumes; timings go to ``<work-dir>/timings.json``):

1. ``data``: procedural records (:mod:`nexus_jax.data.shapes`, training combinations only) -> ``data/records.jsonl``;
2. ``init``: random tiny Nexus-Gen in the upstream PyTorch layout (:func:`nexus_jax.default_checkpoint.build`, decoder
   samplers at 64x64, no CFG);
3. ``vae``: the tiny FLUX-structured VAE trained on the shape images (a small optax loop: ``nexus-jax train`` has no
   VAE stage), written over ``init/ae.safetensors``; then ``init`` is converted (``init_converted``);
4. ``ar``: ``nexus-jax train --preset tiny_ar --init-from init_converted`` (ViT frozen), ``convert from-run``;
5. ``embeds``: the trained AR's slot predictions (and the editing references' ViT features) for the decoder records,
   through the inference runner (so the decoders train on what they get at inference);
6. ``gen`` / ``edit``: ``nexus-jax train --preset tiny_generation_decoder / tiny_editing_decoder --init-from``;
7. ``export``: the trained parts -> the upstream PyTorch layout in ``--out`` (AR safetensors shards + index,
   ``generation_decoder.bin``, ``edit_decoder.bin``, ``ae.safetensors``, empty prompt, configs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SEED = 0
AR_RECORDS = 6000  # a third each: understanding, generation, editing
DECODER_RECORDS = 900  # per decoder
VAE_PHASES = ((1000, 2e-3), (1200, 1e-3))  # (steps, peak lr): phase 2 restarts Adam from phase 1's weights
STEPS = {"vae": 2200, "ar": 6000, "gen": 9000, "edit": 5000}
BATCH = {"vae": 16, "ar": 8, "gen": 16, "edit": 16}
LR = {"vae": 2e-3, "ar": 2e-3, "gen": 1e-3, "edit": 1e-3}
SAMPLER = dict(num_steps=20, cfg_scale=1.0, height=32, width=32)
IMAGE = 32  # decoder / VAE image size (the AR sees the 84x84 records: 9 input tokens, 9 slots)


def log(msg: str) -> None:
    print(f"[train_default_model] {msg}", file=sys.stderr, flush=True)


class Timings:
    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def run(self, name: str, done: bool, fn) -> None:
        if done:
            log(f"{name}: reusing")
            return
        t = time.perf_counter()
        fn()
        self.data[name] = round(time.perf_counter() - t, 1)
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")
        log(f"{name}: {self.data[name]}s")


def model_configs() -> dict:
    from nexus_jax import default_checkpoint

    cfgs = default_checkpoint.default_configs()
    for key in ("generation", "editing"):
        cfgs[key] = dataclasses.replace(cfgs[key], sampler=cfgs[key].sampler.replace(**SAMPLER))
    return cfgs


# --- VAE ---------------------------------------------------------------------------------------------------------
def train_vae(cfg, steps: int, batch: int, lr: float, seed: int, vae=None):
    """The tiny VAE on shape images: L1 + L2 reconstruction of a posterior sample + a small KL of the *model-space*
    latents to N(0, 1) (so the flow-matching decoders see roughly unit-variance latents). ``vae``: continue from
    this module (default: a fresh one). Returns the module."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from nexus_jax.data import shapes
    from nexus_jax.models.vae import FluxVAE

    vae = vae if vae is not None else FluxVAE(cfg, rngs=nnx.Rngs(seed))
    opt = nnx.Optimizer(vae, optax.adamw(optax.cosine_decay_schedule(lr, steps, 0.05), weight_decay=0.0),
                        wrt=nnx.Param)
    scale, shift = cfg.scaling_factor, cfg.shift_factor

    def loss_fn(model, x, key):
        mean, logvar = model.encode_moments(x)
        raw = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        rec = model.decoder(raw)
        m, v = (mean - shift) * scale, jnp.exp(logvar) * scale**2
        kl = 0.5 * jnp.mean(m**2 + v - 1.0 - jnp.log(v))
        return jnp.mean(jnp.abs(rec - x)) + jnp.mean((rec - x) ** 2) + 1e-3 * kl, kl

    @nnx.jit
    def step(model, opt, x, key):
        (loss, kl), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, x, key)
        opt.update(model, grads)
        return loss, kl

    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    for i in range(steps):
        combos = [shapes.TRAIN_COMBOS[j] for j in rng.integers(len(shapes.TRAIN_COMBOS), size=batch)]
        x = np.stack([shapes.draw(c, np.random.default_rng(rng.integers(2**31)), IMAGE) for c in combos])
        key, sub = jax.random.split(key)
        loss, kl = step(vae, opt, jnp.asarray(x, jnp.float32) / 127.5 - 1.0, sub)
        if i % 100 == 0 or i == steps - 1:
            log(f"vae step {i}: loss {float(loss):.4f} kl {float(kl):.3f}")
    return vae


def write_vae(vae, cfg, directory: Path) -> None:
    from conversion import io
    from conversion.tables.vae import bfl_mapping
    from nexus_jax.default_checkpoint import _torch_arrays

    state = _torch_arrays(vae, bfl_mapping(cfg))
    (directory / "ae.safetensors").unlink(missing_ok=True)
    w = io.SafetensorsWriter(directory, [(k, v.shape, v.dtype) for k, v in state.items()], 2**62, prefix="ae")
    for k, v in state.items():
        w.write(k, np.asarray(v, np.float32))
    w.close()


# --- decoder records from the trained AR ---------------------------------------------------------------------------
def write_decoder_records(converted: Path, out: Path, num: int, seed: int) -> None:
    """``out/gen.jsonl`` and ``out/edit.jsonl``: target image + the AR's predicted slot embeddings (+ the source's
    ViT features for editing), computed through the inference runner exactly as ``nexus-jax infer`` does."""
    from PIL import Image

    from nexus_jax.data import shapes
    from nexus_jax.inference import loading
    from nexus_jax.inference.batching import collate, collate_references, group_batches
    from nexus_jax.inference.reader import prepare_request
    from nexus_jax.inference.requests import parse_request
    from nexus_jax.inference.runner import Runner

    ckpt = loading.load(converted)
    runner = Runner(ckpt.ar, vae=ckpt.vae, generation=ckpt.generation, editing=ckpt.editing, empty=ckpt.empty,
                    max_new_tokens=8)
    cfg = ckpt.ar.config
    ref_grid = ckpt.editing.model.cfg.merger.ref_grid
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for task in ("generation", "editing"):
        prepared, targets = [], []
        for i in range(num):
            combo = shapes.TRAIN_COMBOS[int(rng.integers(len(shapes.TRAIN_COMBOS)))]
            jitter = int(rng.integers(2**31))
            if task == "generation":
                target = combo
                doc = {"id": f"g{i}", "task": task, "messages": [{"role": "user", "content": shapes.caption(combo)}]}
            else:
                target = shapes.random_edit(combo, rng, shapes.TRAIN_COMBOS)
                src = f"e{i}_src.png"
                Image.fromarray(shapes.draw(combo, np.random.default_rng(jitter))).save(out / src)
                doc = {"id": f"e{i}", "task": task, "images": [src],
                       "messages": [{"role": "user", "content": "<image> " + shapes.edit_instruction(combo, target)}]}
            name = f"{doc['id']}.png"
            Image.fromarray(shapes.draw(target, np.random.default_rng(jitter))).save(out / name)
            targets.append(name)
            req = parse_request(json.dumps(doc), i, str(out))
            prepared.append(prepare_request(req, cfg, ckpt.codec.encode, 8, ref_grid if task == "editing" else None))
        lines = []
        for batch in group_batches(prepared, 16):
            embeds = np.asarray(runner.slot_embeddings(collate(batch, cfg)), np.float32)
            refs = None
            if task == "editing":
                refs = np.asarray(runner.reference_embeddings(collate_references(batch, cfg), batch.size), np.float32)
            for row, p in enumerate(batch.items):
                rid = p.request.id
                np.save(out / f"{rid}_embed.npy", embeds[row])
                rec = {"id": rid, "image": targets[p.request.index], "embed": f"{rid}_embed.npy"}
                if refs is not None:
                    np.save(out / f"{rid}_ref.npy", refs[row])
                    rec["ref_embed"] = f"{rid}_ref.npy"
                lines.append(json.dumps(rec))
        (out / f"{task}.jsonl").write_text("\n".join(lines) + "\n")
        log(f"{task}: {len(lines)} decoder records")


# --- training through the project's own CLI -----------------------------------------------------------------------
def nexus_train(preset: str, init_from: Path, data: Path, run_dir: Path, stage: str, extra: list[str]) -> None:
    from nexus_jax.training import cli

    steps = STEPS[stage]
    args = ["--preset", preset, "--init-from", str(init_from), "--data", str(data), "--run-dir", str(run_dir),
            "--steps", str(steps), "--batch-size", str(BATCH[stage]), "--lr", str(LR[stage]), "--seed", str(SEED),
            "--ckpt-every", str(steps // 3), "--log-every", "50", "--sync-checkpoints",
            "--set", f"optim.warmup_steps={steps // 20}", "--set", "optim.min_lr_ratio=0.05", *extra]
    log("nexus-jax train " + " ".join(args))
    rc = cli.main(args)
    if rc != 0:
        raise SystemExit(f"nexus-jax train ({stage}) failed with status {rc}")


def from_run(run_dir: Path, out: Path, base: Path) -> None:
    from conversion.from_run import from_run as convert_run

    convert_run(run_dir, out, base=base)


STAGES = ("data", "init", "vae", "ar", "embeds", "gen", "edit", "export")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", default="/tmp/nexus_default_model")
    p.add_argument("--out", default=str(REPO / "nexus_jax" / "assets" / "default_model"))
    p.add_argument("--stages", default=",".join(STAGES),
                   help="comma-separated stages to run (vae and ar are independent: two processes may run them)")
    args = p.parse_args(argv)
    stages = args.stages.split(",")
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        p.error(f"unknown stages {unknown}; choose from {STAGES}")

    from nexus_jax import default_checkpoint, main_job
    from nexus_jax.data import shapes

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t = Timings(work / f"timings_{'_'.join(stages)}.json")
    cfgs = model_configs()

    def run(name: str, done: bool, fn) -> None:
        if name in stages:
            t.run(name, done, fn)

    run("data", (work / "data" / "records.jsonl").exists(),
        lambda: shapes.write_shapes_dataset(work / "data", AR_RECORDS, seed=SEED))

    def init_stage():  # random weights, upstream layout, converted (its VAE is replaced after the vae stage)
        default_checkpoint.build(work / "init", SEED, configs=cfgs, own_init=True)
        if main_job.convert(work / "init", work / "init_converted") != 0:
            raise SystemExit("converting the initial checkpoint failed")

    run("init", (work / "init_converted" / "vae").exists(), init_stage)

    def vae_stage():
        from conversion import cli as convert_cli
        from conversion import io
        from conversion.pipeline import load_model

        vae = None
        for phase, (steps, lr) in enumerate(VAE_PHASES, 1):
            done = work / f"vae_phase{phase}"
            if done.exists():
                vae = load_model(done)
                log(f"vae phase {phase}: reusing {done}")
                continue
            vae = train_vae(cfgs["vae"], steps, BATCH["vae"], lr, SEED + phase - 1, vae)
            up = work / f"vae_upstream{phase}"
            up.mkdir(exist_ok=True)
            write_vae(vae, cfgs["vae"], up)
            io.write_json(up / "ae_config.json", json.loads((work / "init" / "ae_config.json").read_text()))
            rc = convert_cli.main(["import", str(up / "ae.safetensors"), str(done), "--family", "vae",
                                   "--config", str(up / "ae_config.json"), "--no-progress", "--overwrite"])
            if rc != 0:
                raise SystemExit(f"converting the trained VAE failed with status {rc}")
        shutil.copytree(work / f"vae_phase{len(VAE_PHASES)}", work / "vae_converted")

    run("vae", (work / "vae_converted").exists(), vae_stage)

    def ar_stage():
        nexus_train("tiny_ar", work / "init_converted", work / "data" / "records.jsonl", work / "runs" / "ar", "ar",
                    ["--set", "ar_loss.image_weight=3.0", "--set", "data.length_buckets=256,512"])
        from_run(work / "runs" / "ar", work / "ar_converted", work / "init_converted")

    run("ar", (work / "ar_converted").exists(), ar_stage)
    run("embeds", (work / "dec_data" / "editing.jsonl").exists(),
        lambda: write_decoder_records(work / "ar_converted", work / "dec_data", DECODER_RECORDS, SEED + 1))

    def dec_init() -> Path:  # the trained AR + the trained VAE
        d = work / "dec_init"
        if not d.exists():
            shutil.copytree(work / "ar_converted", work / "dec_init.tmp")
            shutil.rmtree(work / "dec_init.tmp" / "vae")
            shutil.copytree(work / "vae_converted", work / "dec_init.tmp" / "vae")
            (work / "dec_init.tmp").rename(d)
        return d

    for stage, preset, task in (("gen", "tiny_generation_decoder", "generation"),
                                ("edit", "tiny_editing_decoder", "editing")):
        def dec_stage(stage=stage, preset=preset, task=task):
            base = dec_init()
            nexus_train(preset, base, work / "dec_data" / f"{task}.jsonl", work / "runs" / stage, stage,
                        ["--set", f"data.image_size={IMAGE}"])
            from_run(work / "runs" / stage, work / f"{stage}_converted", base)

        run(stage, (work / f"{stage}_converted").exists(), dec_stage)

    def export_stage():
        final = work / "final_converted"
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(dec_init(), final)
        for sub, stage in (("generation_decoder", "gen"), ("edit_decoder", "edit")):
            shutil.rmtree(final / sub)
            shutil.copytree(work / f"{stage}_converted" / sub, final / sub)
        out = Path(args.out)
        if out.exists():
            shutil.rmtree(out)
        timings = {}
        for f in sorted(work.glob("timings_*.json")):
            timings |= json.loads(f.read_text())
        info = default_checkpoint.export_converted(final, out, note={
            "trained_by": "scripts/train_default_model.py", "steps": STEPS, "batch": BATCH, "lr": LR,
            "timings_s": timings, "held_out": [list(c) for c in shapes.HELD_OUT]})
        log(f"exported {info}")

    run("export", False, export_stage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
