"""Readers of the merge stage (curation/merge.py): instruction datasets in the layouts they ship in,
each turned into one shape, a LLaVA conversation with its images.

Formats, detected per file (docs/stage2.md):

* LLaVA ``.json`` (a list of records) / ``.jsonl``: ``{"conversations": [{"from", "value"}, ...],
  "image": path | [paths] | "images": [...]}``, ``<image>`` placeholders in the turns, paths
  relative to the source's image folder (``merge.image_folders``, default: the file's folder);
* Hugging Face Parquet in FineVision's layout: ``images`` (list of ``{bytes, path}``) and ``texts``
  (list of ``{user, assistant}``); the turns carry no placeholders, so one ``<image>`` per image
  is put before the first user turn;
* Parquet with OpenAI-style ``messages`` (list of ``{role, content}``, or its JSON text): content
  is text or a list of parts; ``image_url`` parts (``data:`` URLs or paths) become ``<image>``
  placeholders, or the turns hold ``<image>`` placeholders and an ``images`` column the images;
* Parquet with a ``conversations`` column (what ``ovpipe pack`` reads, and the merge output: its
  ``image_ids`` are resolved through the output's image store, ``OUT/images/``).

A per-row ``category`` column is read when present. Every record becomes a ``Record``: turns as
``[{"from": "human"|"gpt"|"system", "value"}]`` and images as bytes, or an error (``Bad``) that the
stage ledgers. Nothing here decides identity or duplicates.
"""

from __future__ import annotations

import base64
import codecs
import json
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ovpipe.core.shards import DATA_DIR, Location, list_input_shards

SOURCE_SUFFIXES = (".json", ".jsonl", ".parquet")
IMAGE = "<image>"
ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt", "system": "system"}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
BATCH_ROWS = 256
CHUNK = 1 << 20  # bytes read at a time from a JSON / JSONL source
_WS = re.compile(r"[ \t\n\r]*")


class Bad(ValueError):
    """A record that cannot be merged; ledgered with this reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Record:
    locator: str  # file URI + #row=N
    turns: list[dict[str, str]] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)
    category: str | None = None
    error: Bad | None = None


@dataclass(frozen=True)
class Source:
    name: str
    root: Location  # a file or a folder (or an ovpipe stage output)
    rank: int  # priority: 0 = most trusted
    image_root: str = ""


# ------------------------------------------------------------------------------ sources


def parse_source(spec: str) -> tuple[str, str]:
    """'NAME=PATH' -> (NAME, PATH); a bare PATH -> (its folder or file stem, PATH)."""
    name, sep, path = spec.partition("=")
    if sep and _NAME.match(name) and path:
        return name, path
    stem = posixpath.basename(spec.rstrip("/"))
    for ext in SOURCE_SUFFIXES:
        stem = stem.removesuffix(ext)
    if not stem:
        raise ValueError(f"merge source {spec!r}: cannot name it; write NAME=PATH")
    return stem, spec


def canonical_path(path: str) -> str:
    """A source or image folder as the config records (and hashes) it: a URL as given without a
    trailing '/', a local path absolute and normalised ('x', './x', 'x/' are one path)."""
    if "://" in path and not path.startswith("file://"):
        scheme, _, rest = path.partition("://")
        return f"{scheme}://{rest.rstrip('/')}"
    return os.path.abspath(os.path.expanduser(path.removeprefix("file://")))


def normalise_source(spec: str) -> str:
    """'NAME=PATH' or a bare PATH -> 'NAME=<canonical PATH>', the name kept as the user gave it
    (a bare path's name is its folder or file stem)."""
    name, path = parse_source(spec)
    path = canonical_path(path)
    if path != spec and not spec.startswith(f"{name}="):  # a bare path: its stem, once resolved ('.')
        name = parse_source(path)[0]
    return f"{name}={path}"


def resolve_sources(specs: list[str], priority: list[str], image_folders: dict[str, str]) -> list[Source]:
    """The sources in priority order (merge.priority first, then the order given)."""
    named = [parse_source(s) for s in specs]
    names = [n for n, _ in named]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ValueError(f"merge sources named twice: {clash}; give each its own NAME=PATH")
    unknown = sorted(set(priority) - set(names))
    if unknown:
        raise ValueError(f"merge.priority names {unknown}, which are not sources ({names})")
    order = list(priority) + [n for n in names if n not in priority]
    paths = dict(named)
    return [Source(n, Location.parse(paths[n]), rank, image_folders.get(n, "")) for rank, n in enumerate(order)]


def list_source_files(src: Source) -> list[Location]:
    files = list_input_shards(src.root, SOURCE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"merge source {src.name!r}: no {', '.join(SOURCE_SUFFIXES)} files under "
                                f"{src.root.uri()!r}")
    return files


# ------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class Limits:
    max_images: int
    max_image_bytes: int
    max_text_bytes: int


def read_records(file: Location, image_root: Location, limits: Limits) -> Iterator[Record]:
    """Every record of one source file, in file order (row numbers are the locators)."""
    if file.path.endswith((".json", ".jsonl")):
        yield from _read_llava(file, image_root, limits)
        return
    with file.fs.open_input_file(file.path) as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if "texts" in names:
            convert = _finevision
        elif "messages" in names:
            convert = _openai
        elif "conversations" in names:
            convert = _conversations
        else:
            raise ValueError(f"{file.uri()}: cannot tell the format (columns {names}); merge reads "
                             "FineVision Parquet (images + texts), OpenAI messages Parquet (messages [+ images]) "
                             "or conversations Parquet (conversations [+ image/images])")
        cols = [c for c in ("texts", "messages", "conversations", "images", "image", "category") if c in names]
        by_id = None
        if convert is _conversations and "image_ids" in names and not {"image", "images"} & set(names):
            by_id, store = _store_images(file, pf)  # a merge output: images stored once, by id
            cols.append("image_ids")
        row = 0
        for batch in pf.iter_batches(columns=cols, batch_size=BATCH_ROWS):
            for rec in _rows(batch):
                locator = f"{file.uri()}#row={row}"
                row += 1
                if by_id is not None and isinstance(rec, dict):
                    ids = rec.pop("image_ids") or []
                    lacking = [i for i in ids if i not in by_id]
                    rec = (Bad("missing_image", f"image {lacking[0]!r} is not in the image store {store}")
                           if lacking else {**rec, "images": [by_id[i] for i in ids]})
                yield _record(locator, rec, lambda r: convert(r, image_root, limits), limits)


def _store_images(file: Location, pf: pq.ParquetFile) -> tuple[dict[str, bytes], str]:
    """The images a merge output's data shard (``OUT/data/<shard>.parquet``) names, from the
    output's image store ``OUT/images/``; and the store's URI."""
    from packing.stage import IMAGE_STORE_DIR, ImageStore  # the one reader of the store

    folder = posixpath.dirname(file.path)
    store = (ImageStore.of(Location(file.fs, posixpath.dirname(folder)))
             if posixpath.basename(folder) == DATA_DIR else None)
    if store is None:
        raise ValueError(f"{file.uri()}: its rows name their images by image_ids (no image/images column), "
                         f"but it is not in the data/ folder of an `ovpipe merge` output with an "
                         f"{IMAGE_STORE_DIR}/ store; give the merge output folder as the source")
    ids = pc.list_flatten(pf.read(columns=["image_ids"]).column("image_ids")).drop_null().to_pylist()
    return store.lookup(ids), store.root.uri()


def _rows(batch: pa.RecordBatch) -> list[Any]:
    """The batch's rows as dicts; a row whose text is not UTF-8 becomes a Bad instead of failing
    the batch."""
    try:
        return batch.to_pylist()
    except UnicodeDecodeError:
        out: list[Any] = []
        for i in range(batch.num_rows):
            try:
                out.extend(batch.slice(i, 1).to_pylist())
            except UnicodeDecodeError as e:
                out.append(Bad("bad_encoding", f"text is not UTF-8: {e}"[:200]))
        return out


def _record(locator: str, rec: Any, convert, limits: Limits) -> Record:
    if isinstance(rec, Bad):
        return Record(locator, error=rec)
    try:
        if not isinstance(rec, dict):
            raise Bad("bad_record", "record is not an object")
        turns, images = convert(rec)
        _check_turns(turns, images, limits)
        category = rec.get("category")
        return Record(locator, turns, images, category if isinstance(category, str) and category else None)
    except Bad as e:
        return Record(locator, error=e)
    except (ValueError, TypeError, AttributeError, KeyError) as e:  # malformed structure
        return Record(locator, error=Bad("bad_record", f"{type(e).__name__}: {e}"[:300]))


def _read_llava(file: Location, image_root: Location, limits: Limits) -> Iterator[Record]:
    """Streamed: a .jsonl file a line at a time, a .json list a record at a time, so a task holds
    one record (at most ``record_bytes(limits)``) and a read buffer, never the whole file."""
    uri = file.uri()
    convert = lambda r: _llava(r, image_root, limits)  # noqa: E731
    with file.fs.open_input_stream(file.path) as stream:
        records = (_jsonl_records(stream, limits) if file.path.endswith(".jsonl")
                   else _json_array_records(stream, uri, limits))
        for row, rec in enumerate(records):
            yield _record(f"{uri}#row={row}", rec, convert, limits)


def record_bytes(limits: Limits) -> int:
    """The largest JSON record read: its text (JSON escapes may take up to 6 characters per
    character) plus the image paths around it."""
    return 6 * limits.max_text_bytes + 1024 * limits.max_images + 64 * 1024


def _jsonl_records(stream, limits: Limits) -> Iterator[Any]:
    """Each non-blank line, parsed (or a Bad); a line over record_bytes is a Bad without being held."""
    for line in _lines(stream, record_bytes(limits)):
        if line is None:
            yield Bad("text_too_long", f"line over {record_bytes(limits):,} bytes")
            continue
        if not line.strip():
            continue
        try:
            yield json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield Bad("bad_encoding", f"line is not UTF-8: {e}"[:200])
        except json.JSONDecodeError as e:
            yield Bad("bad_record", f"not JSON: {e}"[:200])


def _lines(stream, limit: int) -> Iterator[bytes | None]:
    """The stream's lines without their newline, read CHUNK bytes at a time; None for a line
    longer than ``limit`` (skipped to its end, never held)."""
    tail, over = b"", False
    for chunk in iter(lambda: stream.read(CHUNK), b""):
        pieces = chunk.split(b"\n")
        for k, piece in enumerate(pieces):
            if not over:
                tail += piece
                over = len(tail) > limit
                tail = b"" if over else tail
            if k < len(pieces) - 1:  # the piece ended with a newline
                yield None if over else tail
                tail, over = b"", False
    if tail or over:
        yield None if over else tail


def _json_array_records(stream, uri: str, limits: Limits) -> Iterator[Any]:
    """The records of a JSON list, parsed one at a time from a sliding buffer. Bytes that are not
    UTF-8 survive as lone surrogates, so only the records that hold them are ledgered
    (bad_encoding, in _check_turns), not the whole file."""
    decode = codecs.getincrementaldecoder("utf-8")("surrogateescape").decode
    decoder, limit = json.JSONDecoder(), record_bytes(limits)
    buf, pos, eof = "", 0, False

    def fill() -> None:
        nonlocal buf, pos, eof
        chunk = stream.read(CHUNK)
        eof = not chunk
        buf, pos = buf[pos:] + decode(chunk, final=eof), 0

    def peek() -> str:  # the next character that is not white space ("" at the end)
        nonlocal pos
        while True:
            pos = _WS.match(buf, pos).end()
            if pos < len(buf) or eof:
                return buf[pos:pos + 1]
            fill()

    def invalid(what: str) -> ValueError:
        return ValueError(f"{uri} is not a valid JSON list of records ({what}); repair it, or give one record "
                          "per line as .jsonl (a bad line is then one ledger row)")

    if peek() != "[":
        raise ValueError(f"{uri}: a LLaVA .json file holds a list of records")
    pos += 1
    row = 0
    while True:
        c = peek()
        if c == "]":
            pos += 1
            if peek():
                raise invalid("data after the closing ']'")
            return
        if row:
            if c != ",":
                raise invalid(f"expected ',' or ']' after record {row - 1}, found {c!r}")
            pos += 1
            peek()
        while True:
            try:
                rec, end = decoder.raw_decode(buf, pos)
                if end < len(buf) or eof:  # a number at the buffer's end may go on in the next chunk
                    break
            except json.JSONDecodeError as e:
                if eof:
                    raise invalid(f"record {row}: {e}") from None
            if len(buf) - pos > limit:
                raise invalid(f"record {row} is not valid JSON or is over {limit:,} bytes")
            fill()
        pos = end
        row += 1
        yield rec


# ------------------------------------------------------------------------------ formats


def _llava(rec: dict, root: Location, limits: Limits) -> tuple[list[dict], list[bytes]]:
    conv = rec.get("conversations")
    if isinstance(conv, str):
        conv = json.loads(conv)
    if not isinstance(conv, list):
        raise Bad("bad_record", "no 'conversations' list")
    refs = rec.get("image", rec.get("images"))
    refs = [] if refs is None else list(refs) if isinstance(refs, (list, tuple)) else [refs]
    return [_turn(t.get("from", t.get("role")), t.get("value", t.get("content"))) for t in conv], \
        _images(refs, root, limits)


def _conversations(rec: dict, root: Location, limits: Limits) -> tuple[list[dict], list[bytes]]:
    return _llava(rec, root, limits)


def _finevision(rec: dict, root: Location, limits: Limits) -> tuple[list[dict], list[bytes]]:
    texts = rec.get("texts")
    if not isinstance(texts, list):
        raise Bad("bad_record", "'texts' is not a list of {user, assistant}")
    images = _images(rec.get("images") or [], root, limits)
    turns: list[dict] = []
    for t in texts:
        turns += [_turn("user", t.get("user")), _turn("assistant", t.get("assistant"))]
    if images and turns and not any(IMAGE in t["value"] for t in turns):
        turns[0]["value"] = IMAGE * len(images) + "\n" + turns[0]["value"]  # FineVision has no placeholders
    return turns, images


def _openai(rec: dict, root: Location, limits: Limits) -> tuple[list[dict], list[bytes]]:
    messages = rec.get("messages")
    if isinstance(messages, str):
        messages = json.loads(messages)
    if not isinstance(messages, list):
        raise Bad("bad_record", "'messages' is not a list")
    turns, refs = [], []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            pieces = []
            for part in content:
                kind = part.get("type")
                if kind == "text":
                    pieces.append(part.get("text") or "")
                elif kind in ("image_url", "image"):
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if url is not None:
                        refs.append(_from_url(url, limits))
                    pieces.append(IMAGE)
                else:
                    raise Bad("bad_record", f"content part of type {kind!r}")
            content = "\n".join(pieces)
        turns.append(_turn(m.get("role"), content))
    column = rec.get("images")
    if column:
        refs += list(column) if isinstance(column, (list, tuple)) else [column]
    return turns, _images(refs, root, limits)


def _turn(role: Any, value: Any) -> dict[str, str]:
    who = ROLES.get(str(role).lower()) if role is not None else None
    if who is None:
        raise Bad("non_alternating", f"turn role {role!r} is none of {sorted(ROLES)}")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Bad("bad_encoding", f"turn text is not UTF-8: {e}"[:200]) from None
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise Bad("bad_record", f"turn value is a {type(value).__name__}, not text")
    return {"from": who, "value": value}


# ------------------------------------------------------------------------------ images


def _from_url(url: str, limits: Limits) -> bytes | str:
    """A data: URL -> its bytes (size checked before decoding); anything else is a path."""
    if not url.startswith("data:"):
        return url.removeprefix("file://") if url.startswith("file://") else url
    head, _, payload = url.partition(",")
    if len(payload) * 3 // 4 > limits.max_image_bytes:
        raise Bad("image_too_large", f"data URL of ~{len(payload) * 3 // 4:,} bytes > {limits.max_image_bytes:,}")
    try:
        return base64.b64decode(payload, validate=True) if head.endswith(";base64") else payload.encode()
    except ValueError as e:
        raise Bad("corrupt_image", f"data URL does not decode: {e}"[:200]) from None


def _images(refs: list, root: Location, limits: Limits) -> list[bytes]:
    if len(refs) > limits.max_images:
        raise Bad("too_many_images", f"{len(refs)} > {limits.max_images}")
    out = []
    for ref in refs:
        if isinstance(ref, dict):  # Hugging Face {bytes, path}
            ref = ref.get("bytes") or ref.get("path")
        if isinstance(ref, (bytes, bytearray)):
            if len(ref) > limits.max_image_bytes:
                raise Bad("image_too_large", f"{len(ref):,} bytes > {limits.max_image_bytes:,}")
            out.append(bytes(ref))
        elif isinstance(ref, str) and ref:
            out.append(_load(root, ref, limits))
        else:
            raise Bad("missing_image", f"image reference {ref!r} is empty")
    return out


def _load(root: Location, rel: str, limits: Limits) -> bytes:
    if rel.startswith("/") or "://" in rel or ".." in rel.split("/"):
        raise Bad("bad_image_path", f"image path {rel!r} must be relative, inside the image folder")
    loc = root.join(rel)
    try:
        data = loc.read_bytes(limits.max_image_bytes + 1)
    except (OSError, ValueError) as e:
        raise Bad("missing_image", f"{loc.uri()}: {e}"[:300]) from None
    if len(data) > limits.max_image_bytes:
        raise Bad("image_too_large", f"{loc.uri()} is over {limits.max_image_bytes:,} bytes")
    return data


# ------------------------------------------------------------------------------ validation


def _check_turns(turns: list[dict[str, str]], images: list[bytes], limits: Limits) -> None:
    """Empty turns, order (optional system, then user/assistant alternating, user first, assistant
    last), text encoding and size, and placeholders == images."""
    if not turns:
        raise Bad("empty_turn", "the conversation has no turns")
    size = 0
    for i, t in enumerate(turns):
        try:
            size += len(t["value"].encode("utf-8"))
        except UnicodeEncodeError:  # a lone surrogate: bytes that were not UTF-8 in a .json file
            raise Bad("bad_encoding", f"turn {i} holds bytes that are not UTF-8") from None
        if not t["value"].replace(IMAGE, "").strip():
            raise Bad("empty_turn", f"turn {i} ({t['from']}) has no text")
    if size > limits.max_text_bytes:
        raise Bad("text_too_long", f"{size:,} bytes of text > {limits.max_text_bytes:,}")
    roles = [t["from"] for t in turns]
    body = roles[1:] if roles[0] == "system" else roles
    expected = ["human", "gpt"] * (len(body) // 2)
    if not body or len(body) % 2 or body != expected:
        raise Bad("non_alternating", f"turns {roles[:12]} do not alternate human/gpt (human first, gpt last)")
    placeholders = sum(t["value"].count(IMAGE) for t in turns)
    if placeholders != len(images):
        raise Bad("image_count_mismatch", f"{placeholders} {IMAGE} placeholders but {len(images)} images")
