"""Readers for every input format ingest accepts, all yielding the same ``Record``.

An input shard is one of:

* ``*.parquet`` — one row per sample, with an image-bytes column (raw bytes, or a Hugging Face
  image struct ``{bytes, path}``) or an image-path column (paths relative to the Parquet file's
  folder, absolute paths, or URIs). img2dataset's Parquet output works as it comes: its ``jpg``
  column holds the bytes, ``caption`` the text, ``key`` the key, and rows whose download failed
  (``status`` != "success") carry their ``error_message`` into the ledger.
* ``*.tar`` — a WebDataset shard: members grouped into samples by key (the member path up to the
  first '.' of its file name), image from ``jpg``/``jpeg``/``png``/``webp``/..., text from ``txt``,
  metadata from ``json`` (``caption``/``text``, ``key``, ``license``, ``source``). img2dataset's
  WebDataset output works as it comes; its sidecar ``NNNNN.parquet`` next to ``NNNNN.tar`` is
  metadata, not a shard: the downloads it records as failed (in no tar) are ledgered
  ``missing_image`` with the tar's shard, with status, error and URL.
* a folder of image files (non-recursive: each folder that directly holds images is one shard),
  with optional sidecar captions ``<stem>.txt``. Folders count as shards only when the input holds
  no Parquet or tar files (otherwise images beside them are what the path columns reference).

``row`` is the sample's position in its shard, stable across runs (Parquet row, tar sample index,
index in the folder's sorted file list). Everything read is bounded: encoded image bytes by
``ingest.max_image_bytes`` (checked from sizes before reading where the format gives them), text
by ``ingest.max_text_bytes``. Nothing here decodes pixels.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from curation.config import IngestSection
from ovpipe.core.shards import Location

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
_TAR_IMAGE_KEYS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


@dataclass
class Record:
    row: int
    locator: str  # where a person finds this input: URI + #row=N / #member=NAME
    data: bytes | None = None  # encoded image bytes (None when unreadable: see error)
    error: tuple[str, str] | None = None  # (ledger reason, detail) when no bytes could be read
    text: str | None = None
    key: str | None = None
    source: str | None = None
    license: str | None = None
    image_uri: str = ""
    image_member: str | None = None
    image_row: int | None = None


def _clip_text(value, limit: int) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    if len(text.encode("utf-8", "replace")) > limit:
        text = text.encode("utf-8", "replace")[:limit].decode("utf-8", "ignore")
    return text


# ----------------------------------------------------------------------------- listing


def list_ingest_shards(root: Location, cfg: IngestSection) -> list[Location]:
    """Parquet files, tars, and folders that directly hold images, below ``root`` (sorted)."""
    if not root.exists():
        raise FileNotFoundError(f"input {root.uri()!r} does not exist")
    if not root.is_dir():
        return [root]
    files = root.list_files((".parquet", ".tar", *IMAGE_EXTENSIONS, *(e.upper() for e in IMAGE_EXTENSIONS)))
    tars = {f.path[: -len(".tar")] for f in files if f.path.endswith(".tar")}
    shards: list[Location] = []
    image_dirs: set[str] = set()
    for f in files:
        if f.path.endswith(".parquet"):
            if f.path[: -len(".parquet")] in tars:  # img2dataset's per-tar metadata sidecar
                continue
            shards.append(f)
        elif f.path.endswith(".tar"):
            shards.append(f)
        else:
            image_dirs.add(posixpath.dirname(f.path))
    # Images next to Parquet/tar shards are usually what those shards' path columns point at,
    # so folders count as shards only when the input has no Parquet or tar files at all.
    if not shards:
        shards = [Location(root.fs, d) for d in image_dirs]
    return sorted(shards, key=lambda loc: loc.path)


def read_shard(shard: Location, cfg: IngestSection, only_rows: set[int] | None = None) -> Iterator[Record]:
    """Every sample of one input shard, in order (``only_rows``: only those rows, for `ovpipe
    retry`; a Parquet shard then reads no image path of the other rows)."""
    info = shard.fs.get_file_info(shard.path)
    if info.type == pafs.FileType.Directory:
        records = read_image_folder(shard, cfg)
    elif shard.path.endswith(".tar"):
        records = read_webdataset_tar(shard, cfg)
    else:
        records = read_parquet(shard, cfg, only_rows)
    for rec in records:
        if only_rows is None or rec.row in only_rows:
            yield rec


# ----------------------------------------------------------------------------- Parquet


def _first_present(candidates: list[str], names: list[str]) -> str | None:
    return next((c for c in candidates if c in names), None)


def _check_image_column_type(schema: pa.Schema, name: str, holds_bytes: bool, uri: str) -> None:
    """Image bytes: binary, or a struct with a binary `bytes` field (Hugging Face Image); paths:
    string, or a struct with a string `path` field. Anything else is a wrong column choice."""
    t = schema.field(name).type
    want, field = (("binary", "bytes") if holds_bytes else ("string", "path"))
    ok = pa.types.is_binary(t) or pa.types.is_large_binary(t) if holds_bytes else \
        pa.types.is_string(t) or pa.types.is_large_string(t)
    if pa.types.is_struct(t) and t.get_field_index(field) >= 0:
        return _check_image_column_type(pa.schema([t.field(field).with_name(name)]), name, holds_bytes, uri)
    if not ok:
        setting = "ingest.image_columns" if holds_bytes else "ingest.path_columns"
        raise ValueError(f"input shard {uri!r}: column {name!r} is {t}, not {want} (or a struct with a "
                         f"{want} {field!r} field); point {setting} at the column that holds the image "
                         f"{'bytes' if holds_bytes else 'paths'}.")


def read_parquet(shard: Location, cfg: IngestSection, only_rows: set[int] | None = None) -> Iterator[Record]:
    uri = shard.uri()
    with shard.fs.open_input_file(shard.path) as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        image_col = _first_present(cfg.image_columns, names)
        path_col = None if image_col else _first_present(cfg.path_columns, names)
        if image_col is None and path_col is None:
            raise ValueError(
                f"input shard {uri!r} has none of the image columns {cfg.image_columns} and none of "
                f"the image-path columns {cfg.path_columns}; its columns are {names}. Set "
                "ingest.image_columns or ingest.path_columns."
            )
        _check_image_column_type(pf.schema_arrow, image_col or path_col, bool(image_col), uri)
        optional = {
            "text": _first_present(cfg.text_columns, names),
            "key": _first_present(cfg.key_columns, names),
            "source": cfg.source_column if cfg.source_column in names else None,
            "license": cfg.license_column if cfg.license_column in names else None,
            "status": "status" if "status" in names else None,  # img2dataset
            "error": "error_message" if "error_message" in names else None,
            "url": "url" if "url" in names else None,
        }
        wanted = [c for c in (image_col or path_col, *optional.values()) if c]
        folder = posixpath.dirname(shard.path)
        row = 0
        for batch in pf.iter_batches(batch_size=cfg.batch_rows, columns=wanted):
            column = batch.column(image_col or path_col)
            if pa.types.is_struct(column.type):
                column = column.field("bytes" if image_col else "path")
            values = column.to_pylist()
            extra = {k: (batch.column(c).to_pylist() if c else [None] * len(values)) for k, c in optional.items()}
            for i, value in enumerate(values):
                if only_rows is not None and row not in only_rows:
                    row += 1
                    continue
                rec = Record(
                    row=row, locator=f"{uri}#row={row}",
                    text=_clip_text(extra["text"][i], cfg.max_text_bytes),
                    key=_clip_text(extra["key"][i], 1024),
                    source=_clip_text(extra["source"][i], 256),
                    license=_clip_text(extra["license"][i], 1024),
                )
                if image_col:
                    rec.data, rec.image_uri, rec.image_member, rec.image_row = value, uri, image_col, row
                    status = extra["status"][i]
                    if value is None and status not in (None, "success"):
                        rec.error = ("missing_image", _download_failure(status, extra["error"][i],
                                                                        _clip_text(extra["url"][i], 2048)))
                else:
                    _read_path_into(rec, value, shard.fs, folder, cfg.max_image_bytes)
                yield rec
                row += 1


def _read_path_into(rec: Record, path, fs: pafs.FileSystem, folder: str, max_bytes: int) -> None:
    if not path:
        rec.error = ("missing_image", "the image path is empty")
        return
    path = str(path)
    try:
        target = Location.parse(path) if "://" in path else Location(fs, posixpath.join(folder, path))
    except (ValueError, OSError) as e:  # an unknown scheme, a bucket we cannot reach
        rec.image_uri, rec.error = path[:1024], ("unreadable_path", f"{path[:300]!r}: {type(e).__name__}: {e}"[:500])
        return
    rec.image_uri = target.uri()
    rec.data, rec.error = read_bounded(target, max_bytes)


def read_bounded(target: Location, max_bytes: int) -> tuple[bytes | None, tuple[str, str] | None]:
    """A whole file, refused (without reading it) when larger than max_bytes."""
    try:
        info = target.fs.get_file_info(target.path)
        if info.type != pafs.FileType.File:
            return None, ("unreadable_path", f"{target.uri()} does not exist or is not a file")
        if info.size is not None and info.size > max_bytes:
            return None, ("image_too_large", f"{info.size:,} bytes > limit {max_bytes:,}")
        return target.read_bytes(), None
    except (OSError, ValueError) as e:
        return None, ("unreadable_path", f"{target.uri()}: {type(e).__name__}: {e}")


# ----------------------------------------------------------------------------- WebDataset


def _tar_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first '.' of the file name."""
    folder, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


def read_webdataset_tar(shard: Location, cfg: IngestSection) -> Iterator[Record]:
    uri = shard.uri()
    row = 0
    sample: dict | None = None
    try:
        with shard.fs.open_input_file(shard.path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if not member.isfile():  # directories, links and devices are never followed
                    continue
                key, ext = _tar_key(member.name)
                if sample is not None and key != sample["key"]:
                    yield _tar_record(sample, row, uri, cfg)
                    row += 1
                    sample = None
                if sample is None:
                    sample = {"key": key, "members": set()}
                sample["members"].add(ext)
                _read_small_members(sample, member, ext, tar, cfg)
            if sample is not None:
                yield _tar_record(sample, row, uri, cfg)
                row += 1
            _check_end_of_archive(f, tar.offset)
    except (tarfile.TarError, OSError, EOFError) as e:
        # A truncated or corrupt tar: what was read is kept; the break itself is one ledger row.
        yield Record(row=row, locator=f"{uri}#member-index={row}",
                     error=("unreadable_shard", f"tar cannot be read past sample {row}: {type(e).__name__}: {e}"),
                     image_uri=uri)
        row += 1
    yield from _failed_downloads(shard, row)


def _failed_downloads(tar: Location, first_row: int) -> Iterator[Record]:
    """img2dataset's WebDataset output keeps the samples it failed to download only in the sidecar
    ``NNNNN.parquet`` beside ``NNNNN.tar`` (status, error_message, url, key): each becomes a
    ``missing_image`` ledger row of the tar's shard, with status, error and URL, numbered after the
    tar's samples (the locator names the sidecar row)."""
    sidecar = Location(tar.fs, tar.path[: -len(".tar")] + ".parquet")
    try:
        if not sidecar.exists():
            return
        with sidecar.fs.open_input_file(sidecar.path) as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            if "status" not in names:
                return
            columns = [c for c in ("status", "error_message", "url", "key") if c in names]
            table = pf.read(columns=columns)
    except (OSError, pa.ArrowException) as e:
        yield Record(row=first_row, locator=sidecar.uri(), image_uri=sidecar.uri(),
                     error=("unreadable_shard", f"img2dataset sidecar cannot be read: {type(e).__name__}: {e}"[:500]))
        return
    values = {c: table.column(c).to_pylist() if c in columns else [None] * table.num_rows
              for c in ("status", "error_message", "url", "key")}
    row = first_row
    for i, status in enumerate(values["status"]):
        if status in (None, "success"):
            continue
        url = _clip_text(values["url"][i], 2048)
        yield Record(row=row, locator=f"{sidecar.uri()}#row={i}", key=_clip_text(values["key"][i], 1024),
                     image_uri=url or "", error=("missing_image", _download_failure(status, values["error_message"][i], url)))
        row += 1


def _download_failure(status, error, url: str | None) -> str:
    """The ledger detail of a failed img2dataset download: status, error and (last) ``url=URL``,
    so the failed URLs can be handed back to the downloader."""
    text = f"img2dataset status {status!r}: {_clip_text(error, 500)}"
    return text + (f" url={url}" if url else "")


def _check_end_of_archive(f, offset: int) -> None:
    """tarfile stops quietly at the first header it cannot parse; every tar writer ends the
    archive with two zero blocks, so anything else where iteration stopped means samples after
    it were lost: the file was cut at a member boundary, or a header is corrupt."""
    f.seek(offset)
    end = f.read(2 * tarfile.BLOCKSIZE)
    if len(end) < 2 * tarfile.BLOCKSIZE:
        raise tarfile.ReadError("the archive ends without its end-of-archive blocks")
    if end.count(0) != len(end):
        raise tarfile.ReadError(f"unreadable member header at byte {offset:,}")


def _read_small_members(sample: dict, member: tarfile.TarInfo, ext: str, tar: tarfile.TarFile,
                        cfg: IngestSection) -> None:
    """Read members while the tar stream is positioned on them (tars are read front to back)."""
    if ext in _TAR_IMAGE_KEYS and "image" not in sample:
        if member.size > cfg.max_image_bytes:
            sample["image"] = (member.name, None, ("image_too_large",
                                                   f"{member.size:,} bytes > limit {cfg.max_image_bytes:,}"))
        else:
            sample["image"] = (member.name, tar.extractfile(member).read(), None)
    elif ext == "txt":  # an overlong caption is cut (by _clip_text), never read whole
        sample["txt"] = tar.extractfile(member).read(4 * cfg.max_text_bytes).decode("utf-8", "replace")
    elif ext == "json" and member.size <= 1024 * 1024:
        try:
            meta = json.loads(tar.extractfile(member).read())
            sample["json"] = meta if isinstance(meta, dict) else {}
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
            sample["json"] = {}


def _tar_record(sample: dict, row: int, uri: str, cfg: IngestSection) -> Record:
    meta = sample.get("json", {})
    text = sample.get("txt")
    if text is None:
        text = meta.get("caption", meta.get("text"))
    rec = Record(
        row=row, locator=f"{uri}#member={sample['key']}",
        text=_clip_text(text, cfg.max_text_bytes),
        key=_clip_text(meta.get("key", posixpath.basename(sample["key"])), 1024),
        source=_clip_text(meta.get("source"), 256),
        license=_clip_text(meta.get("license"), 1024),
        image_uri=uri,
    )
    if "image" not in sample:
        rec.error = ("missing_image", f"sample {sample['key']!r} has no image member "
                                      f"(members: {sorted(sample['members'])})")
        return rec
    rec.image_member, rec.data, rec.error = sample["image"]
    return rec


# ----------------------------------------------------------------------------- image folders


def read_image_folder(folder: Location, cfg: IngestSection) -> Iterator[Record]:
    selector = pafs.FileSelector(folder.path, recursive=False)
    infos = sorted((i for i in folder.fs.get_file_info(selector) if i.type == pafs.FileType.File),
                   key=lambda i: i.path)
    by_name = {posixpath.basename(i.path): i for i in infos}
    images = [i for i in infos if i.path.lower().endswith(IMAGE_EXTENSIONS)
              and not posixpath.basename(i.path).startswith(("_", "."))]
    for row, info in enumerate(images):
        target = Location(folder.fs, info.path)
        rec = Record(row=row, locator=target.uri(), image_uri=target.uri(),
                     key=posixpath.splitext(posixpath.basename(info.path))[0])
        rec.data, rec.error = read_bounded(target, cfg.max_image_bytes)
        sidecar = by_name.get(rec.key + ".txt")
        if sidecar is not None:
            try:
                with folder.fs.open_input_stream(sidecar.path) as f:
                    raw = f.read(4 * cfg.max_text_bytes)  # an overlong caption is cut, never read whole
                rec.text = _clip_text(raw.decode("utf-8", "replace").strip(), cfg.max_text_bytes)
            except OSError:
                pass  # a missing caption is not a reason to lose the image
        yield rec
