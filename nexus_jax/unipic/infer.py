"""UniPic-1 behind ``nexus-jax infer``: same request JSONL, same ``images/*.png`` + ``results.jsonl`` + journal/resume
(the inference entry of :mod:`nexus_jax.families.unipic`: ``nexus_jax.inference.cli`` opens a :func:`open_session`
when ``--checkpoint`` is a converted UniPic-1 directory).

* generation: ``"Generate an image: {prompt}"`` (CFG row ``"Generate an image."``), masked-AR sampling
  (``nexus_jax.unipic.sample.text_to_image``);
* editing: the source image centre-cropped to a square and resized, instruction + ``"Repeat this image."`` CFG row
  (``sample.edit``);
* understanding: one image padded to a square with gray (or none: a text-only question), greedy answer
  (``understand.answer_ids``).

A request's randomness comes from its own seed only (generation order, the head's initial and per-step noise are drawn
per row from ``jax.random.key(seed)`` and passed as ``SampleNoise``), so an image does not depend on its batch.
Images are saved as UniPic does (``clamp(127.5 x + 128, 0, 255)`` truncated to uint8).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nexus_jax.inference.batching import Batch
from nexus_jax.inference.job import Job, Session
from nexus_jax.inference.requests import Request
from nexus_jax.models.vae.kl16 import pixels_to_uint8_unipic
from nexus_jax.unipic import prompts, sample
from nexus_jax.unipic.loading import UniPicCheckpoint, load
from nexus_jax.unipic.understand import answer_ids, preprocess_image

_NO_GRID = np.zeros((0, 3), np.int64)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A request ready for batching (the fields ``Batcher`` reads: ``request``, ``length``, ``grid``). ids: the
    conditional prompt; pixels [R, R, 3] in [-1, 1] for editing / understanding."""

    request: Request
    ids: np.ndarray
    pixels: np.ndarray | None
    grid: np.ndarray = dataclasses.field(default_factory=lambda: _NO_GRID)

    @property
    def length(self) -> int:
        return len(self.ids)


def load_checkpoint(args: argparse.Namespace, mesh: Any = None) -> UniPicCheckpoint:
    """The converted model with the CLI's sampling overrides (``--num-iter``, ``--cfg-scale``,
    ``--diffusion-steps``) applied to its config."""
    from conversion import orbax as orbax_io
    from conversion.families import get_family

    family = get_family("unipic")
    cfg = family.config_from_json(orbax_io.read_config(args.checkpoint)["config"])
    sampling = {k: v for k, v in (("num_iter", getattr(args, "num_iter", None)),
                                  ("cfg", getattr(args, "cfg_scale", None))) if v is not None}
    if sampling:
        cfg = cfg.replace(sampling=dataclasses.replace(cfg.sampling, **sampling))
    if getattr(args, "diffusion_steps", None) is not None:
        cfg = cfg.replace(diffusion=dataclasses.replace(cfg.diffusion, sampling_steps=str(args.diffusion_steps)))
    return load(args.checkpoint, mesh=mesh, config=cfg)


def open_session(args: argparse.Namespace, mesh: Any = None) -> Session:
    """The ``nexus-jax infer`` session of a converted UniPic-1 checkpoint (:func:`load_checkpoint`)."""
    ckpt = load_checkpoint(args, mesh)

    def job(out, progress):
        job = UniPicJob(None, ckpt, out, progress)
        job.max_new_tokens = args.max_new_tokens
        return job

    return Session(ckpt, lambda req: prepare_request(req, ckpt, args.max_new_tokens), job)


def prepare_request(req: Request, ckpt: UniPicCheckpoint, max_new_tokens: int) -> Prepared:
    """Tokenise and preprocess one request; raises ValueError for what UniPic-1 cannot do. The prompt is the user
    text of all user turns (``Request.prompt``): UniPic's template has one user turn and no system turn."""
    cfg = ckpt.config
    encode, tok = ckpt.codec.encode, cfg.tokens
    grid = _NO_GRID
    if req.task == "chat":
        raise ValueError("UniPic-1 has no free-form chat task; use understanding, generation or editing")
    if req.task == "generation":
        ids, pixels = prompts.encode_instruction(prompts.T2I_PROMPT.format(req.prompt), encode, tok), None
    elif req.task == "understanding" and not req.images:  # text-only question
        ids, pixels = prompts.encode_instruction(req.prompt, encode, tok), None
    else:
        if len(req.images) != 1:
            want = "exactly one image" if req.task == "editing" else "one image or none"
            raise ValueError(f"UniPic-1 {req.task} takes {want}, got {len(req.images)}")
        pixels = preprocess_image(req.images[0], cfg.resolution, "crop" if req.task == "editing" else "pad")
        ids = prompts.encode_instruction(req.prompt, encode, tok, cfg.image_tokens)
        grid = np.asarray([[1, cfg.grid, cfg.grid]], np.int64)  # keeps image and text-only questions apart in batches
    # the context is followed by the answer (understanding) or by one image segment of N + buffers tokens
    limit = cfg.text.max_position_embeddings - (max_new_tokens if req.task == "understanding" else cfg.image_tokens)
    if len(ids) > limit:
        raise ValueError(f"over-long prompt: {len(ids)} tokens exceed the limit {limit}")
    return Prepared(req, ids, pixels, grid)


def seed_noise(seeds: np.ndarray, model: Any, sampling: Any) -> sample.SampleNoise:
    """Per-row randomness of a text-to-image / editing batch from each row's own seed (batch-independent)."""
    cfg = model.config
    n, c = cfg.seq_len, cfg.mar.token_embed_dim
    _, max_pred = sample.step_tables(n, sampling)
    steps = sample.gaussian.make_schedule(cfg.diffusion).num_steps

    def row(seed):
        k_o, k_i, k_s = jax.random.split(jax.random.key(seed), 3)
        return (jax.random.permutation(k_o, n).astype(jnp.int32),
                jax.random.normal(k_i, (sampling.num_iter, max_pred, c), jnp.float32),
                jax.random.normal(k_s, (sampling.num_iter, steps, max_pred, c), jnp.float32))

    orders, init, step = jax.vmap(row)(jnp.asarray(seeds, jnp.uint32))
    return sample.SampleNoise(orders, jnp.moveaxis(init, 0, 1), jnp.moveaxis(step, 0, 2))


class UniPicJob(Job):
    """A :class:`~nexus_jax.inference.job.Job` whose batches run through UniPic-1 (``runner`` unused)."""

    def compute(self, batch: Batch) -> list[dict[str, Any]]:
        ck: UniPicCheckpoint = self.ckpt
        cfg, tok = ck.config, ck.config.tokens
        rows = batch.rows()
        if batch.task == "understanding":
            pb = prompts.right_pad([p.ids for p in rows], tok.pad, length=batch.length)
            pixels = None if rows[0].pixels is None else np.stack([p.pixels for p in rows])
            out = answer_ids(ck.model, ck.vae, pixels, pb, max_new_tokens=self.max_new_tokens)
            tokens, counts = np.asarray(out.tokens), np.asarray(out.num_generated)
            stops = {tok.im_end, tok.endoftext}
            return [{"text": ck.codec.decode([t for t in tokens[i, : counts[i]].tolist() if t not in stops])}
                    for i in range(batch.num_real)]
        if batch.task == "generation":
            uncond = prompts.encode_instruction(prompts.T2I_UNCOND, ck.codec.encode, tok)
        else:
            uncond = prompts.encode_instruction(prompts.EDIT_UNCOND, ck.codec.encode, tok, cfg.image_tokens)
        length = max(batch.length, len(uncond))
        pb = prompts.right_pad([p.ids for p in rows] + [uncond] * len(rows), tok.pad, length=length)
        noise = seed_noise(np.asarray([p.request.seed for p in rows], np.uint32), ck.model, cfg.sampling)
        if batch.task == "generation":
            out = sample.text_to_image(ck.model, ck.vae, pb, noise=noise)
        else:
            out = sample.edit(ck.model, ck.vae, pb, np.stack([p.pixels for p in rows]), noise=noise)
        images = np.asarray(pixels_to_uint8_unipic(out.pixels))
        results = []
        for i, p in enumerate(batch.items):
            # OutputDir's PNG encoder maps [-1, 1] with round((x + 1) * 127.5): u / 127.5 - 1 gives back u exactly
            path, digest = self.out.write_image(p.request.id, images[i].astype(np.float32) / 127.5 - 1.0)
            results.append({"image": path, "image_sha256": digest, "height": int(images.shape[1]),
                            "width": int(images.shape[2])})
        return results
