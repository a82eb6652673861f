"""Nexus-Gen behind ``nexus-jax infer`` (the default inference family, :mod:`nexus_jax.families.nexus_gen`): load a
converted directory (:mod:`nexus_jax.inference.loading`), prepare requests with the Qwen2.5-VL chat template
(:func:`nexus_jax.inference.reader.prepare_request`) and run their batches with the compiled programs of
:class:`nexus_jax.inference.runner.Runner`."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import numpy as np

from nexus_jax.inference.batching import Batch, collate, collate_references
from nexus_jax.inference.job import Job, Session
from nexus_jax.inference.reader import prepare_request


class InferenceJob(Job):
    """Nexus-Gen batches: understanding (greedy answer), generation / editing (AR image embeddings -> decoder ->
    PNG) and chat (text, then the images the answer opens)."""

    def compute(self, batch: Batch) -> list[dict[str, Any]]:
        """One result dict per real request of ``batch`` (images written); raises on failure."""
        nb = collate(batch, self.ckpt.ar.config)
        if batch.task == "understanding":
            tokens, counts = self.runner.understand(nb)
            return [{"text": self.ckpt.codec.decode(tokens[i, : counts[i]].tolist())} for i in range(batch.num_real)]
        seeds = np.asarray([p.request.seed for p in batch.rows()], np.uint32)
        if batch.task == "chat":
            return self.chat(batch, nb, seeds)
        refs = collate_references(batch, self.ckpt.ar.config) if batch.task == "editing" else None
        pixels = self.runner.images(batch.task, nb, seeds, refs)
        results = []
        for i, p in enumerate(batch.items):
            path, digest = self.out.write_image(p.request.id, pixels[i])
            results.append({"image": path, "image_sha256": digest, "height": int(pixels.shape[1]),
                            "width": int(pixels.shape[2])})
        return results

    def chat(self, batch: Batch, nb: Any, seeds: np.ndarray) -> list[dict[str, Any]]:
        """Free-form answers: text, plus one PNG per image the answer opened (generation decoder; image j of a
        request uses seed + j). ``text`` is the answer without its images, ``segments`` the text around them
        (image j between segments j and j + 1); ``images`` / ``images_sha256`` list the PNGs, and ``image`` /
        ``image_sha256`` repeat the first one."""
        limits = [self.runner.max_images if p.request.max_images is None else p.request.max_images
                  for p in batch.rows()]
        out = self.runner.text_then_image(nb, np.asarray(limits))
        codec = self.ckpt.codec
        pixels = [self.runner.decode_images("generation", out.image_embeds[:, j], seeds + np.uint32(j))
                  for j in range(int(out.num_images[: batch.num_real].max(initial=0)))]
        results = []
        for i, p in enumerate(batch.items):
            segments = [codec.decode(s.tolist()) for s in out.segments[i]]
            res: dict[str, Any] = {"text": codec.decode(out.text_tokens(i).tolist()), "segments": segments}
            written = [self.out.write_image(p.request.id, pixels[j][i], j) for j in range(int(out.num_images[i]))]
            if written:
                res.update(image=written[0][0], image_sha256=written[0][1], images=[w[0] for w in written],
                           images_sha256=[w[1] for w in written], height=int(pixels[0].shape[1]),
                           width=int(pixels[0].shape[2]))
            results.append(res)
        return results


def open_session(args: argparse.Namespace, mesh: Any = None) -> Session:
    """Load the converted checkpoint ``args.checkpoint`` and build its runner (``--max-new-tokens``,
    ``--max-images``); chat requests without ``max_images`` get ``--max-images``."""
    from nexus_jax.inference import loading
    from nexus_jax.inference.runner import Runner

    ckpt = loading.load(args.checkpoint, mesh=mesh)
    runner = Runner(ckpt.ar, vae=ckpt.vae, generation=ckpt.generation, editing=ckpt.editing, empty=ckpt.empty,
                    max_new_tokens=args.max_new_tokens, max_images=args.max_images, mesh=mesh)
    cfg = ckpt.ar.config
    ref_grid = ckpt.editing.model.cfg.merger.ref_grid if ckpt.editing is not None else None

    def prepare(req):
        if req.task == "chat" and req.max_images is None:  # the CLI default, also for the length check
            req = dataclasses.replace(req, max_images=args.max_images)
        return prepare_request(req, cfg, ckpt.codec.encode, args.max_new_tokens, ref_grid)

    def job(out, progress):
        job = InferenceJob(runner, ckpt, out, progress)
        job.max_new_tokens = args.max_new_tokens
        return job

    return Session(ckpt, prepare, job)
