"""Untrusted images: probing sizes without a full decode, and fetching bytes by reference.

Every check that can reject an image raises ``BadImage(reason, detail)``; stages turn that into
a ledger row. Reasons: ``missing_image`` (null), ``empty_image`` (zero bytes),
``image_too_large`` (encoded bytes over the limit), ``not_an_image`` (no known format),
``corrupt_image`` (header unreadable), ``truncated_image`` (the encoded stream ends early),
``too_many_pixels`` (decompression-bomb guard, checked from the header before any decode),
``too_small``.

Sizes come from the header alone. Truncation is checked structurally without decoding (JPEG ends
with its EOI marker, PNG with IEND, GIF with its trailer, WebP's RIFF length matches); only an
image that fails that cheap check is fully decoded to decide (some valid files carry trailing
bytes). ``verify="decode"`` decodes every image instead (slower, stricter).

CMYK, 16-bit, palette, alpha and animated images are kept; their PIL ``mode`` and frame count
are reported so later stages convert them (``to_rgb``) knowingly.

An image reference is three ingest columns (docs/data-contracts.md):
``image_uri`` (the file, or the container holding it), ``image_member`` (the column of a
Parquet container, the member of a tar; null for a plain file) and ``image_row`` (row in a
Parquet container; null otherwise).
"""

from __future__ import annotations

import io
import tarfile
import warnings
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash
from PIL import Image, ImageOps, UnidentifiedImageError

from ovpipe.core.shards import Location

# We check pixel counts ourselves (max_pixels, from the header, before any decode); PIL's own
# warning below its hard limit is noise here. Set once: a catch_warnings per image costs more
# than reading the header.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# EXIF orientations 5-8 are transposes: the displayed image has width and height swapped.
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112


# Leading bytes of the formats we expect; a file that starts like one but will not open is
# corrupt rather than "not an image".
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


# The formats ovpipe opens. Pillow knows 40+ (EPS runs Ghostscript, others are rarely exercised
# parsers); untrusted bytes only ever reach these. (JPEG's opener also yields MPO files.)
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")


def open_image(data: bytes) -> Image.Image:
    """PIL image from untrusted bytes, restricted to IMAGE_FORMATS (lazy: header only)."""
    return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)


def _looks_like_image(data: bytes) -> bool:
    return data.startswith(_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


class BadImage(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    width: int  # after EXIF orientation
    height: int
    format: str
    mode: str = "RGB"  # PIL mode: RGB, RGBA, L, LA, P, PA, CMYK, I;16, ...
    frames: int = 1  # > 1 for animated GIF / WebP / PNG


def _structurally_complete(data: bytes, fmt: str) -> bool | None:
    """Cheap end-of-stream check per format; None when the format has none."""
    tail = data[-64:].rstrip(b"\x00\r\n ")
    if fmt == "JPEG":
        return tail.endswith(b"\xff\xd9")
    if fmt == "PNG":
        return b"IEND" in data[-12:]
    if fmt == "GIF":
        return tail.endswith(b";")
    if fmt == "WEBP":
        return int.from_bytes(data[4:8], "little") + 8 <= len(data)
    return None


def _decodes(img: Image.Image, max_pixels: int) -> str | None:
    """Full decode of the frames (pages) within a budget of max_pixels decoded in all; the error
    text, or None if they decode. Frames past the budget are not decoded (later stages use the
    first frame only); a single frame larger than max_pixels is a bomb (BadImage)."""
    budget = max_pixels
    try:
        for frame in range(getattr(img, "n_frames", 1)):
            img.seek(frame)
            pixels = img.size[0] * img.size[1]
            if pixels > max_pixels:
                raise BadImage("too_many_pixels", f"frame {frame} is {img.size[0]}x{img.size[1]} = {pixels:,} px "
                                                  f"> limit {max_pixels:,}")
            if frame > 0 and pixels > budget:
                break
            img.load()
            budget -= pixels
        img.seek(0)
        return None
    except BadImage:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error ...
        return f"{type(e).__name__}: {e}"


def probe_image(data: bytes | None, max_bytes: int, max_pixels: int, min_side: int = 1,
                verify: str = "structure") -> ImageInfo:
    """Sizes and format from the header alone, plus a truncation check (see the module
    docstring); raises BadImage with a ledger reason."""
    if data is None:
        raise BadImage("missing_image", "the image field is null")
    if len(data) == 0:
        raise BadImage("empty_image", "zero bytes")
    if len(data) > max_bytes:
        raise BadImage("image_too_large", f"{len(data):,} bytes > limit {max_bytes:,}")
    try:
        img = open_image(data)
    except Image.DecompressionBombError as e:
        raise BadImage("too_many_pixels", str(e)) from None
    except UnidentifiedImageError:
        if _looks_like_image(data):
            raise BadImage("corrupt_image", f"header of a {data[:4]!r}... file does not parse") from None
        raise BadImage("not_an_image", f"not one of {', '.join(IMAGE_FORMATS)} "
                                           f"(first bytes {data[:8]!r})") from None
    except Exception as e:  # PIL raises many types on garbage headers
        reason = "truncated_image" if "truncated" in str(e).lower() else "corrupt_image"
        raise BadImage(reason, f"{type(e).__name__}: {e}") from None
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise BadImage("too_many_pixels", f"{width}x{height} = {width * height:,} px > limit {max_pixels:,}")
        orientation = None
        if "exif" in img.info or img.format in ("TIFF", "MPO"):  # parsing EXIF only where there is some
            try:
                orientation = img.getexif().get(_EXIF_ORIENTATION_TAG)
            except Exception:  # a broken EXIF block does not make the pixels unusable
                pass
        if orientation in _TRANSPOSED_ORIENTATIONS:
            width, height = height, width
        if min(width, height) < min_side:
            raise BadImage("too_small", f"{width}x{height} has a side under {min_side} px")
        fmt = img.format or "UNKNOWN"
        if verify == "decode" or not _structurally_complete(data, fmt):
            error = _decodes(img, max_pixels)
            if error is not None:
                truncated = "truncated" in error.lower() or "end of" in error.lower()
                raise BadImage("truncated_image" if truncated else "corrupt_image", error)
        return ImageInfo(width, height, fmt, img.mode, int(getattr(img, "n_frames", 1) or 1))


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB pixels from any mode: first frame of animations, alpha composited on white, CMYK and
    16-bit converted. Later stages (embedding, packing) call this before using pixels."""
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I;16") or img.mode == "I":
        array = np.asarray(img, dtype=np.float64)
        scale = 255.0 / max(float(array.max()), 1.0) if array.max() > 255 else 1.0
        return Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


# Pixels of an encoded image any stage accepts (PIL's bomb-warning limit, ingest.max_pixels
# default): the packer refuses more, so the trainer never meets an image it must refuse.
MAX_SOURCE_PIXELS = 89_478_485

# Bytes read back by reference: no image ingest accepted is this large (ingest.max_image_bytes is
# 32 MiB by default), so anything bigger was swapped in after ingest.
MAX_FETCH_BYTES = 256 * 1024 * 1024


def fetch_image_bytes(refs: pa.Table, filesystem=None, *, problems: dict[int, tuple[str, str]] | None = None,
                      max_bytes: int = MAX_FETCH_BYTES) -> list[bytes | None]:
    """Image bytes for rows with image_uri / image_member / image_row, in row order.

    Rows that point into the same Parquet container are read with one column read per
    container. A row comes back None when its file, row or member is gone (``image_not_found``),
    is over max_bytes (``image_too_large``) or, when refs has ``sample_id`` (the xxh3-64 of the
    bytes ingest saw), holds other bytes than ingest saw (``image_changed``); pass a dict as
    ``problems`` to get {row: (reason, detail)} for those rows, for the ledger."""
    uris = refs.column("image_uri").to_pylist()
    members = refs.column("image_member").to_pylist()
    rows = refs.column("image_row").to_pylist()
    out: list[bytes | None] = [None] * len(uris)
    found: dict[int, tuple[str, str]] = {}
    by_container: dict[tuple[str, str], list[int]] = defaultdict(list)
    by_tar: dict[str, list[int]] = defaultdict(list)
    for i, (uri, member, row) in enumerate(zip(uris, members, rows)):
        if row is not None:
            by_container[(uri, member)].append(i)
        elif member is not None:
            by_tar[uri].append(i)
        else:
            out[i] = _read_file(uri, filesystem, max_bytes, found, i)
    for uri, idxs in by_tar.items():
        for i, data in zip(idxs, _read_tar_members(uri, [members[i] for i in idxs], filesystem, max_bytes)):
            if isinstance(data, BadImage):
                found[i] = (data.reason, data.detail)
            else:
                out[i] = data
    for (uri, column), idxs in by_container.items():
        try:
            loc = Location.parse(uri, filesystem)
            table = pq.read_table(loc.path, filesystem=loc.fs, columns=[column])
        except (OSError, ValueError, pa.ArrowException) as e:
            found.update({i: ("image_not_found", f"{uri}: {type(e).__name__}: {e}"[:300]) for i in idxs})
            continue
        col = table.column(column)
        if pa.types.is_struct(col.type):  # Hugging Face image struct {bytes, path}
            col = pa.chunked_array([c.field("bytes") for c in col.chunks])
        for i in idxs:
            value = col[rows[i]].as_py() if 0 <= rows[i] < len(col) else None
            if not isinstance(value, bytes):
                found[i] = ("image_not_found", f"{uri} has no image bytes in column {column!r} row {rows[i]}")
            else:
                out[i] = value
    for i, data in enumerate(out):  # before hashing: never hash what is refused anyway
        if data is not None and len(data) > max_bytes:
            out[i], found[i] = None, ("image_too_large", f"more than the limit of {max_bytes:,} bytes")
    if "sample_id" in refs.column_names:
        _check_identity(out, refs.column("sample_id").to_pylist(), found)
    if problems is not None:
        problems.update(found)
    return out


def _check_identity(out: list[bytes | None], sample_ids: list[str | None], found: dict) -> None:
    """A reference must still point at the bytes ingest hashed into sample_id."""
    for i, (data, sid) in enumerate(zip(out, sample_ids)):
        digest = xxhash.xxh3_64_hexdigest(data) if data is not None and sid is not None else sid
        if digest != sid:
            out[i] = None
            found[i] = ("image_changed", f"the referenced bytes hash to {digest}, not sample_id {sid}: "
                                         "the file was replaced after ingest")


def _read_tar_members(uri: str, names: list[str], filesystem, max_bytes: int) -> list[bytes | BadImage]:
    """Members of one tar by name (one open, random access through the tar index). Where a name
    repeats, the first member is the one ingest read."""
    try:
        loc = Location.parse(uri, filesystem)
        with loc.fs.open_input_file(loc.path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            first: dict[str, tarfile.TarInfo] = {}
            for member in tar.getmembers():
                first.setdefault(member.name, member)
            out: list[bytes | BadImage] = []
            for name in names:
                member = first.get(name)
                if member is None or not member.isfile():
                    out.append(BadImage("image_not_found", f"{uri} has no member {name!r}"))
                elif member.size > max_bytes:
                    out.append(BadImage("image_too_large", f"{member.size:,} bytes > limit {max_bytes:,}"))
                else:
                    try:
                        out.append(tar.extractfile(member).read())
                    except (tarfile.TarError, OSError) as e:
                        out.append(BadImage("image_not_found", f"{uri}#{name}: {type(e).__name__}: {e}"[:300]))
            return out
    except (OSError, ValueError, tarfile.TarError) as e:
        return [BadImage("image_not_found", f"{uri}: {type(e).__name__}: {e}"[:300])] * len(names)


def _read_file(uri: str, filesystem, max_bytes: int, found: dict, i: int) -> bytes | None:
    """One bounded read: one byte past max_bytes is enough for the size check after it."""
    try:
        return Location.parse(uri, filesystem).read_bytes(limit=max_bytes + 1)
    except (OSError, ValueError) as e:
        found[i] = ("image_not_found", f"{uri}: {type(e).__name__}: {e}"[:300])
        return None
