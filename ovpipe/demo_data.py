"""Synthetic, seeded demo input: image-text Parquet shards from several sources.

Writes ``OUT/<source>/part-NNNNN.parquet`` with img2dataset-like columns ``key``, ``image``
(encoded bytes: JPEG, PNG or WebP of varied sizes), ``text`` (English or Chinese alt-text) and
``license``. A few deliberately bad records (zero bytes, corrupt bytes, a decompression bomb, a
truncated JPEG, and the first source's first image again in the second source) make the demo's
ledger show each reason.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from ovpipe.core.shards import Location, write_table

# (English, Chinese) names of colours and shapes that the synthetic images show.
COLOURS = [
    ("red", "红色", (220, 30, 30)), ("green", "绿色", (30, 170, 60)), ("blue", "蓝色", (40, 70, 220)),
    ("yellow", "黄色", (240, 210, 30)), ("purple", "紫色", (140, 50, 170)), ("orange", "橙色", (245, 140, 20)),
    ("black", "黑色", (15, 15, 15)), ("white", "白色", (245, 245, 245)),
]
SHAPES = [("circle", "圆形"), ("square", "正方形"), ("stripes", "条纹")]
SOURCES = [  # name, language of its alt-texts, share of the rows
    ("coyo", "en", 0.4),
    ("datacomp", "en", 0.3),
    ("laion_cn", "zh", 0.3),
]
FORMATS = ["JPEG", "PNG", "WEBP"]


def _draw(rng: np.random.Generator, width: int, height: int, fg, bg, shape: str) -> Image.Image:
    img = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        r = int(min(width, height) * rng.uniform(0.2, 0.45))
        cx, cy = int(rng.integers(r, width - r + 1)), int(rng.integers(r, height - r + 1))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "square":
        s = int(min(width, height) * rng.uniform(0.3, 0.8))
        x, y = int(rng.integers(0, width - s + 1)), int(rng.integers(0, height - s + 1))
        draw.rectangle([x, y, x + s, y + s], fill=fg)
    else:
        step = max(int(rng.integers(6, 24)), 2)
        for x in range(0, width, 2 * step):
            draw.rectangle([x, 0, x + step - 1, height], fill=fg)
    noise = rng.integers(0, 12, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8))


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 85} if fmt in ("JPEG", "WEBP") else {}))
    return buf.getvalue()


def _alt_text(lang: str, fg, bg, shape) -> str:
    if lang == "zh":
        return f"{bg[1]}背景上的{fg[1]}{shape[1]}"
    return f"a {fg[0]} {shape[0]} on a {bg[0]} background"


def decompression_bomb() -> bytes:
    """A small PNG that claims 12,000 x 12,000 pixels (over the default max_pixels)."""
    buf = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _bad_records(first_image: bytes | None) -> list[tuple[str, bytes]]:
    """One of each kind the ingest ledger knows, spread over the sources in turn."""
    out = [("empty", b""), ("corrupt", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40 + b"this is not really a png"),
           ("decompression-bomb", decompression_bomb()), ("truncated", truncated_jpeg())]
    if first_image is not None:  # the first source gets none of these (indices 0 and 3 above)
        out.append(("duplicate", first_image))
    return out


def truncated_jpeg() -> bytes:
    """A JPEG cut off halfway through its entropy-coded data."""
    rng = np.random.default_rng(7)
    data = _encode(Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)), "JPEG")
    return data[: len(data) // 2]


def make_demo_data(out: str, n: int = 240, seed: int = 0, rows_per_shard: int = 40,
                   bad_records: bool = True) -> dict[str, int]:
    """Write about ``n`` good rows (plus the bad records) as shards per source."""
    if n < len(SOURCES):
        raise ValueError(f"--n must be at least {len(SOURCES)}, got {n}")
    rng = np.random.default_rng(seed)
    root = Location.parse(out)
    counts = {}
    first_image = None  # the first source's first image, copied into the second as a duplicate
    for s_index, (source, lang, share) in enumerate(SOURCES):
        rows = {"key": [], "image": [], "text": [], "license": []}
        count = max(int(round(n * share)), 1)
        for i in range(count):
            fg, bg = rng.choice(len(COLOURS), size=2, replace=False)
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            width, height = int(rng.integers(48, 400)), int(rng.integers(48, 400))
            img = _draw(rng, width, height, COLOURS[fg][2], COLOURS[bg][2], shape[0])
            rows["key"].append(f"{source}-{i:06d}")
            rows["image"].append(_encode(img, FORMATS[int(rng.integers(len(FORMATS)))]))
            rows["text"].append(_alt_text(lang, COLOURS[fg], COLOURS[bg], shape))
            rows["license"].append("cc-by-4.0" if i % 3 else None)
        if bad_records:
            for j, (kind, data) in enumerate(_bad_records(first_image)):
                if j % len(SOURCES) == s_index:
                    rows["key"].append(f"{source}-bad-{kind}")
                    rows["image"].append(data)
                    rows["text"].append(f"a deliberately bad record: {kind}")
                    rows["license"].append(None)
        first_image = first_image or rows["image"][0]
        table = pa.table({"key": rows["key"], "image": pa.array(rows["image"], pa.binary()),
                          "text": rows["text"], "license": pa.array(rows["license"], pa.string())})
        for shard, start in enumerate(range(0, table.num_rows, rows_per_shard)):
            write_table(root.join(source, f"part-{shard:05d}.parquet"), table.slice(start, rows_per_shard))
        counts[source] = table.num_rows
    return counts
