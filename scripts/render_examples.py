"""The README / docs image of the main job's outputs: one tile per request (input image, output image or answer, task
and prompt), from a finished ``nexus-jax infer`` output directory.

    .venv/bin/python scripts/render_examples.py [--outputs outputs] [--requests examples/requests.jsonl]
        [--out docs/default_model_examples.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nexus_jax.inference.requests import Request, parse_request  # noqa: E402

TILE, CELL, TEXT_H, COLUMNS = 96, 200, 52, 4  # image side, tile width, caption height, tiles per row


def tile(request: Request, result: dict, outputs: Path) -> Image.Image:
    """[TEXT_H + TILE, CELL] tile: the first input image, then the output image or the answer; task + prompt below."""
    canvas = Image.new("RGB", (2 * TILE + 8, TILE + TEXT_H), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for path in request.images[:1]:
        canvas.paste(Image.open(path).convert("RGB").resize((TILE, TILE)), (x, 0))
        x += TILE + 4
    if result.get("image"):
        canvas.paste(Image.open(outputs / result["image"]).convert("RGB").resize((TILE, TILE)), (x, 0))
    else:
        draw.multiline_text((x + 2, 4), "\n".join(textwrap.wrap("-> " + result.get("text", "?"), 16)), fill="black")
    caption = f"{request.task}:\n" + "\n".join(textwrap.wrap(request.prompt, 30)[:2])
    draw.multiline_text((0, TILE + 4), caption, fill=(60, 60, 60))
    return canvas


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--outputs", default=str(REPO / "outputs"))
    p.add_argument("--requests", default=str(REPO / "examples" / "requests.jsonl"))
    p.add_argument("--out", default=str(REPO / "docs" / "default_model_examples.png"))
    args = p.parse_args(argv)
    outputs, requests_path = Path(args.outputs), Path(args.requests)
    results = {r["id"]: r for r in map(json.loads, (outputs / "results.jsonl").read_text().splitlines())}
    lines = [line for line in requests_path.read_text().splitlines() if line.strip()]
    requests = [parse_request(line, i, str(requests_path.parent)) for i, line in enumerate(lines)]
    missing = [r.id for r in requests if r.id not in results]
    if missing:
        raise SystemExit(f"{outputs / 'results.jsonl'} has no result for {missing}: run the main job first")
    tiles = [tile(r, results[r.id], outputs) for r in requests]
    rows = -(-len(tiles) // COLUMNS)
    sheet = Image.new("RGB", (COLUMNS * CELL, rows * (TILE + TEXT_H + 8)), "white")
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % COLUMNS) * CELL, (i // COLUMNS) * (TILE + TEXT_H + 8)))
    tmp = Path(args.out).with_suffix(".tmp.png")
    sheet.save(tmp)
    tmp.replace(args.out)
    print(f"wrote {args.out} ({len(tiles)} requests)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
