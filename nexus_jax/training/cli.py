"""``nexus-jax train``: run the AR or a decoder trainer from a preset plus command-line overrides.

    nexus-jax train --preset tiny_ar --data records.jsonl --run-dir runs/ar [--steps 40] [--resume latest-valid]
        [--init-from CONVERTED_DIR] [--set optim.decay_steps=500 --set loop.log_every=5 ...]

Presets are in :mod:`configs.training` (``ar_stage1..3``, ``generation_decoder``, ``editing_decoder``, ``unipic_t2i``,
``unipic_edit``, ``unipic_understanding``, ``tiny_*``).
``--init-from`` starts from a converted checkpoint (``nexus-jax convert import`` output; a resumed train checkpoint
wins over it); the learning-rate decay spans the run's total steps unless ``--set optim.decay_steps=N`` is given.
Exit codes: 0 done, 2 bad arguments, 3 checkpoint error (e.g. ``--resume latest`` on a damaged checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from configs.training import PRESETS, REMAT_CHOICES, TrainConfig, apply_overrides, override_keys
from nexus_jax import families
from nexus_jax.paths import dir_arg, join, path_arg
from nexus_jax.sharding import MeshConfig, parse_mesh_spec


def presets() -> dict[str, TrainConfig]:
    """``configs.training.PRESETS`` and the presets families keep in their own folders
    (:func:`nexus_jax.families.train_presets`)."""
    extra = families.train_presets()
    clash = sorted(set(extra) & set(PRESETS))
    if clash:
        raise ValueError(f"training presets {clash} are declared both in configs.training.PRESETS and by a family")
    return {**PRESETS, **extra}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nexus-jax train", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True, choices=sorted(presets()))
    p.add_argument("--data", required=True, type=path_arg,
                   help="records: a JSONL file or an array_record dataset directory (local or gs://)")
    p.add_argument("--eval-data", default="", type=path_arg, help="held-out records for periodic eval")
    p.add_argument("--image-root", default="", type=path_arg,
                   help="directory (or gs:// URL) relative image paths are resolved against")
    p.add_argument("--run-dir", required=True, type=dir_arg,
                   help="checkpoints/, steps.jsonl and TensorBoard logs go here (local or gs://)")
    p.add_argument("--steps", type=int, help="total optimiser steps")
    p.add_argument("--batch-size", type=int, help="global batch per optimiser step")
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int, help="model init / step PRNG seed")
    p.add_argument("--data-seed", type=int, help="shuffle seed")
    p.add_argument("--resume", help="none | latest | latest-valid | <step> (default: the preset's, latest-valid)")
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--keep-last", type=int)
    p.add_argument("--sync-checkpoints", action="store_true", help="disable async checkpointing")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--tensorboard", action="store_true", help="write TensorBoard events to <run-dir>/tb")
    p.add_argument("--mesh", default="", help="data,fsdp,tensor sizes, one may be -1 (default 1,-1,1)")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"))
    p.add_argument("--remat", choices=REMAT_CHOICES, help="rematerialise each decoder layer / DiT block (default none)")
    p.add_argument("--tokenizer", default="", help="HF tokenizer directory (full-size AR); tiny presets use bytes")
    p.add_argument("--init-from", default="", metavar="CONVERTED_DIR",
                   help="start from a converted checkpoint (`nexus-jax convert import` output: ar/ or "
                        "generation_decoder|edit_decoder/ + vae/ + empty_prompt.safetensors); model config read there")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any TrainConfig field, e.g. optim.decay_steps=500 or loop.log_every=5 (repeatable)")
    p.add_argument("--step-delay", type=float, default=0.0, help=argparse.SUPPRESS)  # fault-injection tests
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The preset with the command-line overrides applied."""
    cfg = presets()[args.preset]
    r = dataclasses.replace

    def pick(value, default):
        return default if value is None else value

    optim = r(cfg.optim, grad_accum=pick(args.grad_accum, cfg.optim.grad_accum),
              learning_rate=pick(args.lr, cfg.optim.learning_rate))
    ckpt = r(cfg.checkpoint, resume=pick(args.resume, cfg.checkpoint.resume),
             every_steps=pick(args.ckpt_every, cfg.checkpoint.every_steps),
             keep_last=pick(args.keep_last, cfg.checkpoint.keep_last),
             async_save=cfg.checkpoint.async_save and not args.sync_checkpoints)
    data = r(cfg.data, path=args.data, eval_path=args.eval_data, image_root=args.image_root,
             seed=pick(args.data_seed, cfg.data.seed))
    loop = r(cfg.loop, total_steps=pick(args.steps, cfg.loop.total_steps),
             batch_size=pick(args.batch_size, cfg.loop.batch_size), seed=pick(args.seed, cfg.loop.seed),
             eval_every=pick(args.eval_every, cfg.loop.eval_every), log_every=pick(args.log_every, cfg.loop.log_every),
             compute_dtype=pick(args.compute_dtype, cfg.loop.compute_dtype), remat=pick(args.remat, cfg.loop.remat),
             log_dir=str(join(args.run_dir, "tb")) if args.tensorboard else cfg.loop.log_dir)
    mesh = cfg.mesh
    if args.mesh:
        try:
            mesh = MeshConfig(*parse_mesh_spec(args.mesh))
        except ValueError as e:
            raise ValueError(f"--mesh must be three integers data,fsdp,tensor, got {args.mesh!r} ({e})") from None
    cfg = apply_overrides(r(cfg, optim=optim, checkpoint=ckpt, data=data, loop=loop, mesh=mesh), args.overrides)
    if "optim.decay_steps" not in override_keys(args.overrides):  # the schedule spans the whole run
        cfg = r(cfg, optim=r(cfg.optim, decay_steps=cfg.loop.total_steps))
    return cfg


def make_task(cfg: TrainConfig, tokenizer_dir: str = "", setup=None):
    """The :class:`~nexus_jax.training.loop.TrainTask` of ``cfg.task``, built by the family that trains it
    (:func:`nexus_jax.families.for_task`); models per ``setup``, a :class:`~nexus_jax.training.init_from.ModelSetup`
    (default: the preset's, randomly initialised)."""
    from nexus_jax.training.init_from import model_setup

    setup = setup or model_setup(cfg)
    task = families.resolve(families.for_task(cfg.task).training.task)(cfg, setup, tokenizer_dir)
    return dataclasses.replace(task, init_params=setup.init_params) if setup.init_params else task


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    import jax

    from nexus_jax.training.checkpoint import CheckpointError
    from nexus_jax.training.init_from import model_setup, write_run_info
    from nexus_jax.training.loop import train

    try:
        cfg = config_from_args(args)
        setup = model_setup(cfg, args.init_from)
        task = make_task(cfg, args.tokenizer, setup)
        if jax.process_index() == 0:
            write_run_info(args.run_dir, cfg, setup, args.preset, args.tokenizer)
        result = train(cfg, task, args.run_dir, step_delay_s=args.step_delay)
    except CheckpointError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: step {result.final_step}" + (f" (resumed from {result.resumed_from})" if result.resumed_from
                                              else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
