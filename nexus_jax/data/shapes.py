"""Procedural "coloured shape on a background" data: images, captions, Nexus-Gen records and a pixel checker.

Vocabulary: :data:`COLOURS` (6) x :data:`SHAPES` (circle, square, triangle) x a background colour different from the
shape's: 90 combinations. Captions read ``"a red circle on a blue background"``. Images are ``SIZE x SIZE`` RGB with
one centred shape (small size / position jitter). :data:`HELD_OUT` combinations never appear in training records
(neither as inputs nor as targets), so the quality test can ask for unseen combinations.

Records (the Nexus-Gen messages JSONL of :mod:`nexus_jax.data.records`) cycle through understanding ("<image>\\n"
+ the understanding prompt -> the caption), generation (the caption -> the image) and editing (source image + "make
the circle green" / "make the background red" / "turn the circle into a square" -> the edited image).

:func:`classify` reads (colour, shape, background) back from pixels: background = the border's median colour,
foreground mask = pixels far from it, colour = nearest palette entry of the mask's median, shape = the template
(circle, square, triangle drawn in the mask's bounding box) with the highest IoU with the mask.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 84  # 84x84: the tiny ViT sees 9 merged tokens (the shape fills the centre one)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
    "yellow": (240, 220, 40), "white": (245, 245, 245), "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
UNDERSTANDING_PROMPT = "Please give a brief description of the image."  # nexus_jax.nexus.templates' default
Combo = tuple[str, str, str]  # (colour, shape, background)

ALL_COMBOS: tuple[Combo, ...] = tuple((c, s, b) for c, s, b in itertools.product(COLOURS, SHAPES, COLOURS) if c != b)
# every 7th combination (12 of 90): each colour, shape and background still occurs in training
HELD_OUT: tuple[Combo, ...] = ALL_COMBOS[3::7][:12]
TRAIN_COMBOS: tuple[Combo, ...] = tuple(c for c in ALL_COMBOS if c not in HELD_OUT)
_CAPTION = re.compile(r"\ba (\w+) (\w+) on an? (\w+) background\b")


def caption(combo: Combo) -> str:
    colour, shape, background = combo
    return f"a {colour} {shape} on a {background} background"


def parse_caption(text: str) -> Combo | None:
    """The (colour, shape, background) a caption names, or None when it names no known ones."""
    m = _CAPTION.search(text.lower())
    if not m or m.group(1) not in COLOURS or m.group(2) not in SHAPES or m.group(3) not in COLOURS:
        return None
    return m.group(1), m.group(2), m.group(3)


def draw(combo: Combo, rng: np.random.Generator | None = None, size: int = SIZE) -> np.ndarray:
    """[size, size, 3] uint8: the shape (side ~0.6 of the image, jittered) centred (jittered) on the background."""
    colour, shape, background = combo
    if shape not in SHAPES or colour not in COLOURS or background not in COLOURS:
        raise ValueError(f"unknown combination {combo}; colours {list(COLOURS)}, shapes {list(SHAPES)}")
    return draw_rgb(shape, COLOURS[colour], COLOURS[background], rng, size)


def draw_rgb(shape: str, fill: tuple[int, int, int], background: tuple[int, int, int],
             rng: np.random.Generator | None = None, size: int = SIZE) -> np.ndarray:
    """:func:`draw` with any RGB colours: [size, size, 3] uint8."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; shapes {list(SHAPES)}")
    rng = rng or np.random.default_rng(0)
    half = size * (0.3 + rng.uniform(-0.03, 0.03))
    cx, cy = size / 2 + rng.uniform(-2, 2), size / 2 + rng.uniform(-2, 2)
    scale = 4  # drawn at 4x and downsampled: smooth edges
    img = Image.new("RGB", (size * scale, size * scale), tuple(background))
    d = ImageDraw.Draw(img)
    box = [(cx - half) * scale, (cy - half) * scale, (cx + half) * scale, (cy + half) * scale]
    fill = tuple(fill)
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=fill)
    return np.asarray(img.resize((size, size), Image.Resampling.BOX), np.uint8)


def draw_random_colours(rng: np.random.Generator, size: int = SIZE,
                        exclude: tuple[Combo, ...] = HELD_OUT) -> np.ndarray:
    """A shape in a uniformly random RGB colour on another random colour (at least 100 apart, above
    :func:`classify`'s 80), never one that reads as a combination in ``exclude``: nearest palette colours + shape.
    The autoencoder's generic images (FLUX's VAE, too, was trained on all kinds of images, not on captions)."""
    while True:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        fill, background = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if np.linalg.norm(fill - background) < 100.0:
            continue
        if (_nearest(fill), shape, _nearest(background)) in exclude:
            continue
        return draw_rgb(shape, tuple(int(v) for v in fill), tuple(int(v) for v in background), rng, size)


def _nearest(rgb: np.ndarray) -> str:
    names = list(COLOURS)
    dist = [float(np.sum((rgb.astype(np.float32) - np.asarray(COLOURS[n], np.float32)) ** 2)) for n in names]
    return names[int(np.argmin(dist))]


def classify(image: np.ndarray) -> dict:
    """[H, W, 3] uint8 -> {"colour", "shape", "background", "fill", "area", "iou"}; "none" when nothing stands out."""
    img = np.asarray(image, np.float32)[..., :3]
    h, w, _ = img.shape
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3),
                             img[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    mask = np.sqrt(np.sum((img - bg) ** 2, axis=-1)) > 80.0
    area = float(mask.mean())
    out = {"background": _nearest(bg), "colour": "none", "shape": "none", "fill": 0.0, "area": area}
    if mask.sum() < 0.02 * h * w:
        return out
    out["colour"] = _nearest(np.median(img[mask], axis=0))
    ys, xs = np.nonzero(mask)
    # robust bounding box: 1st-99th percentiles (stray pixels do not stretch it)
    y0, y1 = np.percentile(ys, [1, 99])
    x0, x1 = np.percentile(xs, [1, 99])
    box = max((y1 - y0 + 1) * (x1 - x0 + 1), 1.0)
    out["fill"] = float(mask[int(y0):int(y1) + 1, int(x0):int(x1) + 1].sum() / box)
    # shape: the template (each shape drawn in that box) with the highest IoU with the mask
    ious = {}
    for shape in SHAPES:
        t = Image.new("L", (w, h), 0)
        d, bb = ImageDraw.Draw(t), [x0, y0, x1, y1]
        if shape == "circle":
            d.ellipse(bb, fill=1)
        elif shape == "square":
            d.rectangle(bb, fill=1)
        else:
            d.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=1)
        tm = np.asarray(t, bool)
        ious[shape] = float((tm & mask).sum() / max((tm | mask).sum(), 1))
    out["iou"] = ious
    out["shape"] = max(ious, key=ious.get)
    return out


def edit_instruction(source: Combo, target: Combo) -> str:
    """The instruction that turns ``source`` into ``target`` (exactly one of colour / shape / background differs)."""
    (c0, s0, b0), (c1, s1, b1) = source, target
    if [c0 != c1, s0 != s1, b0 != b1].count(True) != 1:
        raise ValueError(f"an edit changes exactly one attribute: {source} -> {target}")
    if c0 != c1:
        return f"make the {s0} {c1}"
    if b0 != b1:
        return f"make the background {b1}"
    return f"turn the {s0} into a {s1}"


def random_edit(source: Combo, rng: np.random.Generator, allowed: tuple[Combo, ...] = ALL_COMBOS) -> Combo:
    """A target combination in ``allowed`` that differs from ``source`` in one random attribute."""
    c, s, b = source
    options = [(c2, s, b) for c2 in COLOURS if c2 not in (c, b)] + [(c, s, b2) for b2 in COLOURS if b2 not in (c, b)] \
        + [(c, s2, b) for s2 in SHAPES if s2 != s]
    options = [o for o in options if o in allowed]
    if not options:
        raise ValueError(f"no allowed edit of {source}")
    return options[int(rng.integers(len(options)))]


def _save(directory: Path, name: str, arr: np.ndarray) -> str:
    Image.fromarray(arr).save(directory / name)
    return name


def write_shapes_dataset(directory: str | Path, num_records: int, seed: int = 0,
                         combos: tuple[Combo, ...] = TRAIN_COMBOS) -> Path:
    """``records.jsonl`` + PNGs under ``directory`` (relative image paths): understanding, generation and editing
    records in turn over ``combos`` (edit targets are in ``combos`` too). Returns the JSONL path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(num_records):
        kind = ("understanding", "generation", "editing")[i % 3]
        combo = combos[int(rng.integers(len(combos)))]
        jitter = int(rng.integers(2**31))
        if kind == "understanding":
            images = [_save(d, f"shape_{i}.png", draw(combo, np.random.default_rng(jitter)))]
            msgs = [{"role": "user", "content": "<image>\n" + UNDERSTANDING_PROMPT},
                    {"role": "assistant", "content": caption(combo)}]
        elif kind == "generation":
            images = [_save(d, f"shape_{i}.png", draw(combo, np.random.default_rng(jitter)))]
            msgs = [{"role": "user", "content": "Generate an image according to the following description: "
                     + caption(combo)},
                    {"role": "assistant", "content": "Here is an image based on the description: <image>"}]
        else:
            target = random_edit(combo, rng, combos)
            images = [_save(d, f"shape_{i}_src.png", draw(combo, np.random.default_rng(jitter))),
                      _save(d, f"shape_{i}_out.png", draw(target, np.random.default_rng(jitter)))]
            msgs = [{"role": "user", "content": "<image> " + edit_instruction(combo, target)},
                    {"role": "assistant", "content": "Here is the image: <image>"}]
        rec = {"id": f"shapes{i}", "source": f"shapes_{kind}", "images": images, "messages": msgs}
        lines.append(json.dumps(rec))
    path = d / "records.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
