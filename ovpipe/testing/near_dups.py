"""A seeded near-duplicate image corpus, for the dedup / decontamination tests and the thumbnail demo.

``make_corpus(n_base, copies, n_unrelated, seed)`` returns ``Item``s: ``n_base`` base images,
``copies`` altered copies of each (resized 0.5-0.9x, re-encoded as JPEG quality 50-90, cropped by
up to 5 % per side, or converted to PNG; every copy draws its own alteration), and ``n_unrelated``
images with no copy. ``group`` names the base image an item was made from (its own index for a
base or unrelated image), so a test knows which pairs are true duplicates. Images are random
shapes over smooth random backgrounds (low-frequency content, like photographs), 96-256 px.
``make_plain_corpus`` makes low-detail images (solid colours, text on white, screenshots) and their
copies: distinct images whose perceptual hashes collide. ``write_parquet`` writes them in N shards
with ``image`` bytes (ingest's input).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter

ALTERATIONS = ("resize", "jpeg", "crop", "png")


@dataclass(frozen=True)
class Item:
    key: str
    group: int  # the base image it derives from (or its own index)
    alteration: str  # "original", "unrelated", or one of ALTERATIONS
    data: bytes


def base_image(rng: np.random.Generator) -> Image.Image:
    w, h = (int(v) for v in rng.integers(96, 257, 2))
    grid = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)  # a smooth random background
    img = Image.fromarray(grid).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 7))):
        x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
        x1, y1 = x0 + int(rng.integers(10, w // 2 + 11)), y0 + int(rng.integers(10, h // 2 + 11))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    return img.filter(ImageFilter.GaussianBlur(1))


def encode(img: Image.Image, fmt: str = "PNG", quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def alter(img: Image.Image, kind: str, rng: np.random.Generator) -> bytes:
    """One altered copy: the kinds of the issue (resize, JPEG re-encode, crop, PNG)."""
    w, h = img.size
    if kind == "resize":
        s = rng.uniform(0.5, 0.9)
        return encode(img.resize((max(int(w * s), 8), max(int(h * s), 8)), Image.BICUBIC), "JPEG", 90)
    if kind == "jpeg":
        return encode(img, "JPEG", int(rng.integers(50, 91)))
    if kind == "crop":
        l, t, r, b = (rng.uniform(0, 0.05, 4) * [w, h, w, h]).astype(int)
        return encode(img.crop((l, t, w - r, h - b)), "JPEG", 90)
    if kind == "png":
        return encode(img.convert("P", palette=Image.ADAPTIVE).convert("RGB"), "PNG")
    raise ValueError(kind)


def make_corpus(n_base: int = 40, copies: int = 4, n_unrelated: int = 40, seed: int = 0) -> list[Item]:
    rng = np.random.default_rng(seed)
    items: list[Item] = []
    for g in range(n_base):
        img = base_image(rng)
        items.append(Item(f"base{g:04d}", g, "original", encode(img, "JPEG", 95)))
        for c in range(copies):
            kind = ALTERATIONS[(g + c) % len(ALTERATIONS)]
            items.append(Item(f"base{g:04d}-copy{c}", g, kind, alter(img, kind, rng)))
    for u in range(n_unrelated):
        items.append(Item(f"other{u:04d}", n_base + u, "unrelated", encode(base_image(rng), "JPEG", 95)))
    return items


PLAIN_KINDS = ("solid", "text", "screenshot", "split")
WORDS = ("the", "model", "data", "image", "table", "result", "figure", "page", "total", "value", "score",
         "train", "report", "loss", "step", "batch", "token", "sample", "order", "invoice", "date", "name")


def plain_image(kind: str, rng: np.random.Generator) -> Image.Image:
    """A low-detail image of the kinds whose perceptual hashes collide: a solid colour, text on white
    (a document), a screenshot (flat panels, a title bar, lines of text), two flat halves."""
    w, h = (int(v) for v in rng.integers(160, 321, 2))
    colour = lambda: tuple(int(c) for c in rng.integers(0, 256, 3))  # noqa: E731
    if kind == "solid":
        return Image.new("RGB", (w, h), colour())
    if kind == "split":
        img = Image.new("RGB", (w, h), colour())
        box = [0, 0, w // 2, h] if rng.random() < 0.5 else [0, 0, w, h // 2]
        ImageDraw.Draw(img).rectangle(box, fill=colour())
        return img
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    top = 6
    if kind == "screenshot":
        grey = int(rng.integers(200, 245))
        draw.rectangle([0, 0, w, 20], fill=colour())  # a title bar
        side = int(rng.integers(30, w // 3))
        draw.rectangle([0, 20, side, h], fill=(grey, grey, grey))  # a side panel
        draw.rectangle([side + 10, h - 40, side + 90, h - 15], fill=colour())  # a button
        top = 28
    font_size = int(rng.integers(9, 15))
    x0 = 6 if kind == "text" else w // 3
    for y in range(top, h - 10, font_size + 4):
        line = " ".join(WORDS[int(k)] for k in rng.integers(0, len(WORDS), int(rng.integers(2, 9))))
        draw.text((x0, y), line, fill=(0, 0, 0))
    return img


def make_plain_corpus(n: int = 60, copies: int = 2, seed: int = 0) -> list[Item]:
    """``n`` distinct low-detail images (solid colours, text on white, screenshots, flat halves; kinds
    in turn), each with ``copies`` altered copies (the ALTERATIONS of ``make_corpus``): the images a
    perceptual hash cannot tell apart; ``group`` as in make_corpus."""
    rng = np.random.default_rng(seed)
    items: list[Item] = []
    for g in range(n):
        kind = PLAIN_KINDS[g % len(PLAIN_KINDS)]
        img = plain_image(kind, rng)
        items.append(Item(f"plain{g:04d}-{kind}", g, "original", encode(img, "PNG")))
        for c in range(copies):
            alt = ALTERATIONS[(g + c) % len(ALTERATIONS)]
            items.append(Item(f"plain{g:04d}-copy{c}", g, alt, alter(img, alt, rng)))
    return items


def write_parquet(items: list[Item], folder: str, shards: int = 1, prefix: str = "part") -> list[str]:
    """Round-robin over `shards` Parquet files (columns key, image, text)."""
    import os

    os.makedirs(folder, exist_ok=True)
    paths = []
    for s in range(shards):
        part = items[s::shards]
        table = pa.table({"key": [i.key for i in part], "image": pa.array([i.data for i in part], pa.binary()),
                          "text": [f"{i.alteration} of group {i.group}" for i in part]})
        path = os.path.join(folder, f"{prefix}-{s:05d}.parquet")
        pq.write_table(table, path)
        paths.append(path)
    return paths
