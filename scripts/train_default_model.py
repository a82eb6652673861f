"""Reproduce the shipped default model (``nexus_jax/assets/default_model``): a tiny Nexus-Gen trained on shapes.

    .venv/bin/python scripts/train_default_model.py [--work-dir DIR] [--out nexus_jax/assets/default_model]

Stages (each skipped when its output exists, so a killed run resumes; timings go to
``<work-dir>/timings_<stages>.json``):

1. ``data``: procedural records (:mod:`nexus_jax.data.shapes`, training combinations only) -> ``data/records.jsonl``;
2. ``init``: tiny Nexus-Gen with the modules' own initialisers whose vision tower is first pre-trained to classify
   colour / shape / background (:func:`pretrain_vision`: upstream starts from a pre-trained Qwen2.5-VL ViT too),
   written in the upstream PyTorch layout (:func:`nexus_jax.default_checkpoint.build`; decoder samplers at 32x32,
   CFG 3 for generation, none for editing);
3. ``vae``: the tiny FLUX-structured VAE trained on the shape images (:data:`VAE_PHASES`; a small optax loop:
   ``nexus-jax train`` has no VAE stage);
4. ``ar``: ``nexus-jax train --preset tiny_ar --init-from init_converted`` (ViT frozen), ``convert from-run``;
5. ``embeds``: the trained AR's slot predictions (and the editing references' ViT features) for the decoder records,
   through the inference runner (so the decoders train on what they get at inference), plus generation records on
   ViT features (:func:`vit_feature_records`);
6. ``gen`` / ``edit``: ``nexus-jax train --preset shapes_generation_decoder`` (a wider tiny DiT, conditioning
   dropout for CFG) / ``tiny_editing_decoder``, ``--init-from`` the trained AR + VAE;
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
AR_RECORDS = 18000  # a third each: understanding, generation, editing
DECODER_RECORDS = 2400  # per decoder
# the generation decoder's extra records conditioned on ViT features (vit_feature_records): of its own targets, and
# of shapes in random colours
GENERATION_VIT_RECORDS, GENERIC_RECORDS, GENERIC_SEED = True, 2400, 12345
VAE_PHASES = ((1000, 2e-3), (1200, 1e-3))  # (steps, peak lr): phase 2 restarts Adam from phase 1's weights
STEPS = {"vision": 800, "vae": 2200, "ar": 12000, "gen": 15000, "edit": 12000}
BATCH = {"vision": 32, "vae": 16, "ar": 8, "gen": 16, "edit": 16}
LR = {"vision": 2e-3, "vae": 2e-3, "ar": 2e-3, "gen": 1e-3, "edit": 1e-3}
SAMPLER = dict(num_steps=50, height=32, width=32)
# true CFG: upstream's defaults (generation 3.0 against the empty prompt, editing 1.0 = one DiT pass a step); the
# generation decoder learns the empty prompt's velocity from conditioning dropout (FLOW_LOSS)
CFG_SCALE = {"generation": 3.0, "editing": 1.0}
FLOW_LOSS = {"gen": {"cond_dropout": 0.25}, "edit": {}}  # per decoder stage: `--set flow_loss.<key>=<value>`
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
    from configs.nexus_decoders import NexusDecoderConfig
    from nexus_jax import default_checkpoint

    cfgs = default_checkpoint.default_configs()
    # the generation decoder's DiT wider and deeper than the tiny preset's (NexusDecoderConfig.shapes): its flow loss
    # ends at ~0.015 instead of ~0.28 and the drawn shapes are sharp, not blobs (held-out shape 0.708 -> 0.79-0.81)
    cfgs["generation"] = dataclasses.replace(cfgs["generation"], dit=NexusDecoderConfig.shapes().dit)
    for key in ("generation", "editing"):
        cfgs[key] = dataclasses.replace(cfgs[key], sampler=cfgs[key].sampler.replace(**SAMPLER,
                                                                                    cfg_scale=CFG_SCALE[key]))
    # the editing reference at the records' own 84x84 (6x6 patches), where the vision tower was pre-trained, instead
    # of the tiny preset's stretched 112x168
    cfgs["editing"] = dataclasses.replace(cfgs["editing"], merger=dataclasses.replace(cfgs["editing"].merger,
                                                                                      ref_grid=(6, 6)))
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


# --- vision tower ------------------------------------------------------------------------------------------------
def pretrain_vision(ar, steps: int, batch: int, lr: float, seed: int) -> dict:
    """Pre-train ``ar``'s vision tower in place: linear heads on its mean merged token classify the colour, shape and
    background of training-combination images (cross-entropy). Stands in for the pre-trained Qwen2.5-VL ViT that
    upstream Nexus-Gen starts from and keeps frozen (a randomly initialised tower separates colours but hardly shapes:
    the AR then learns colour pair -> shape shortcuts). Returns the last training batch's and a held-out batch's
    accuracies."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from nexus_jax.data import shapes
    from nexus_jax.models.qwen2_5_vl.vision_layout import vision_layout
    from nexus_jax.nexus.batch import process_input_images

    v = ar.config.vl.vision
    grid = process_input_images([shapes.draw(shapes.TRAIN_COMBOS[0])], ar.config)[1][0]  # the AR's input images'
    layout = {k: jnp.asarray(a) for k, a in vision_layout(np.tile(grid, (batch, 1)), v).arrays().items()}
    per_image = int(np.prod(grid)) // v.spatial_merge_size**2
    colours, names = list(shapes.COLOURS), list(shapes.SHAPES)
    sizes = (len(colours), len(names), len(colours))

    class Probe(nnx.Module):
        def __init__(self, model, rngs):
            self.model = model  # only its vision tower gets gradients
            self.heads = nnx.Linear(v.out_hidden_size, sum(sizes), rngs=rngs)

        def __call__(self, pixels):
            feats = self.model.image_features(pixels, layout)[: batch * per_image].reshape(batch, per_image, -1)
            return self.heads(feats.mean(axis=1))

    probe = Probe(ar, nnx.Rngs(seed))
    opt = nnx.Optimizer(probe, optax.adamw(optax.cosine_decay_schedule(lr, steps, 0.05), weight_decay=0.0),
                        wrt=nnx.Param)

    def loss_fn(model, pixels, labels):
        logits = jnp.split(model(pixels), np.cumsum(sizes)[:-1], axis=-1)
        losses = [optax.softmax_cross_entropy_with_integer_labels(lg, labels[:, i]).mean()
                  for i, lg in enumerate(logits)]
        accs = jnp.stack([jnp.mean(jnp.argmax(lg, -1) == labels[:, i]) for i, lg in enumerate(logits)])
        return sum(losses), accs

    @nnx.jit
    def step(model, opt, pixels, labels):
        (loss, accs), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, pixels, labels)
        opt.update(model, grads)
        return loss, accs

    def batch_of(combos):  # preprocessed as the AR's input images are
        pixels = process_input_images([shapes.draw(c, np.random.default_rng(rng.integers(2**31))) for c in combos],
                                      ar.config)[0]
        labels = np.asarray([(colours.index(c), names.index(s), colours.index(b)) for c, s, b in combos], np.int32)
        return jnp.asarray(pixels), jnp.asarray(labels)

    def token_norm(images: jnp.ndarray) -> float:  # mean L2 norm of the tower's merged tokens
        return float(jnp.linalg.norm(ar.image_features(images, layout), axis=-1).mean())

    def training_batch():
        return batch_of([shapes.TRAIN_COMBOS[j] for j in rng.integers(len(shapes.TRAIN_COMBOS), size=batch)])

    rng = np.random.default_rng(seed)
    probe_images = training_batch()[0]
    norm_before = token_norm(probe_images)
    for i in range(steps):
        loss, accs = step(probe, opt, *training_batch())
        if i % 100 == 0 or i == steps - 1:
            log(f"vision step {i}: loss {float(loss):.4f} accuracy colour/shape/background {np.round(accs, 3)}")
    # the held-out combinations (never trained on): does the tower read their attributes too?
    held = [shapes.HELD_OUT[i % len(shapes.HELD_OUT)] for i in range(batch)]
    held_accs = nnx.jit(loss_fn)(probe, *batch_of(held))[1]
    # Classification drives the token norms up ~200x (35 vs 0.18); the 2-layer LLM then sees image rows that swamp
    # its 0.2-norm token embeddings and learned captions by heart (held-out answers were garbled). The merger ends
    # in a Linear: scaling it brings the tokens back to the initial tower's norm without changing what they encode.
    norm_after = token_norm(probe_images)
    last = ar.visual.merger.mlp_2
    for p in (last.kernel, last.bias):
        p.value = p.value * (norm_before / norm_after)
    out = {"token_norm": {"initial": norm_before, "trained": norm_after, "rescaled": token_norm(probe_images)},
           "train_batch": dict(zip(("colour", "shape", "background"), np.asarray(accs).tolist())),
           "held_out": dict(zip(("colour", "shape", "background"), np.asarray(held_accs).tolist()))}
    log(f"vision tower: {out}")
    return out


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
        if task == "generation":
            lines = vit_feature_records(runner, ckpt, out, [json.loads(x) for x in lines]) + lines
        (out / f"{task}.jsonl").write_text("\n".join(lines) + "\n")
        log(f"{task}: {len(lines)} decoder records")


def vit_feature_records(runner, ckpt, out: Path, generation: list[dict]) -> list[str]:
    """Extra generation-decoder records conditioned on ViT features (what the AR's slots imitate) instead of AR
    predictions: the features of each generation record's own target image (``gt<id>``, when
    :data:`GENERATION_VIT_RECORDS`) and :data:`GENERIC_RECORDS` shapes in random RGB colours (``r<i>``; never one
    that reads as a held-out combination: ``shapes.draw_random_colours``). Returns the JSONL lines."""
    from PIL import Image

    from nexus_jax.data import shapes
    from nexus_jax.inference.batching import collate_references, group_batches
    from nexus_jax.inference.reader import prepare_request
    from nexus_jax.inference.requests import parse_request

    cfg, ref_grid = ckpt.ar.config, ckpt.editing.model.cfg.merger.ref_grid
    images = [(f"gt{r['id']}", r["image"]) for r in generation] if GENERATION_VIT_RECORDS else []
    rng = np.random.default_rng(GENERIC_SEED)
    for i in range(GENERIC_RECORDS):
        Image.fromarray(shapes.draw_random_colours(rng)).save(out / f"r{i}.png")
        images.append((f"r{i}", f"r{i}.png"))
    prepared = [prepare_request(parse_request(json.dumps({"id": rid, "task": "editing", "images": [image], "messages": [
        {"role": "user", "content": "<image> x"}]}), i, str(out)), cfg, ckpt.codec.encode, 8, ref_grid)
        for i, (rid, image) in enumerate(images)]
    lines = []
    for batch in group_batches(prepared, 16):  # the ViT features as the editing references get them
        refs = np.asarray(runner.reference_embeddings(collate_references(batch, cfg), batch.size), np.float32)
        for row, p in enumerate(batch.items):
            rid, image = images[p.request.index]
            np.save(out / f"{rid}_embed.npy", refs[row])
            lines.append(json.dumps({"id": rid, "image": image, "embed": f"{rid}_embed.npy"}))
    return lines


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


def apply_samplers(converted: Path, cfgs: dict) -> None:
    """Write :func:`model_configs`' sampler settings into the converted decoders' ``config.json`` (inference-only: no
    weight depends on them, so a work dir made before a sampler change exports the current ones)."""
    from conversion import orbax as orbax_io

    for sub, key in (("generation_decoder", "generation"), ("edit_decoder", "editing")):
        doc = orbax_io.read_config(converted / sub)
        config = {**doc.pop("config"), "sampler": dataclasses.asdict(cfgs[key].sampler)}
        orbax_io.write_config(converted / sub, doc.pop("family"), config,
                              **{k: v for k, v in doc.items() if k != "format_version"})


def from_run(run_dir: Path, out: Path, base: Path) -> None:
    from conversion.from_run import from_run as convert_run

    convert_run(run_dir, out, base=base)


STAGES = ("data", "init", "vae", "ar", "embeds", "gen", "edit", "export")
# (stage, `nexus-jax train` preset, model_configs() key = decoder records' task)
DECODER_STAGES = (("gen", "shapes_generation_decoder", "generation"), ("edit", "tiny_editing_decoder", "editing"))


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

    def init_stage():  # own-init weights + a pre-trained vision tower, upstream layout, converted (its VAE is
        # replaced after the vae stage)
        from flax import nnx

        from nexus_jax.models.nexus_ar import NexusGenAR

        ar = NexusGenAR(cfgs["ar"], rngs=nnx.Rngs(SEED))
        accs = pretrain_vision(ar, STEPS["vision"], BATCH["vision"], LR["vision"], SEED)
        (work / "vision_accuracy.json").write_text(json.dumps(accs) + "\n")
        default_checkpoint.build(work / "init", SEED, configs=cfgs, own_init=True, ar_module=ar)
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
                    ["--set", "ar_loss.image_weight=3.0", "--set", "data.length_buckets=256,512",
                     "--set", "optim.weight_decay=0.05"])
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

    for stage, preset, task in DECODER_STAGES:
        def dec_stage(stage=stage, preset=preset, task=task):
            base = dec_init()
            flow = [a for k, v in FLOW_LOSS[stage].items() for a in ("--set", f"flow_loss.{k}={v}")]
            nexus_train(preset, base, work / "dec_data" / f"{task}.jsonl", work / "runs" / stage, stage,
                        ["--set", f"data.image_size={IMAGE}", *flow])
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
        apply_samplers(final, cfgs)
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
