"""Shard I/O shared by every stage: Parquet through pyarrow filesystems.

Paths are local paths or URIs (``s3://``, ``gs://``, ``file://``); a caller may also pass a
pyarrow ``FileSystem`` explicitly (tests use ``SubTreeFileSystem`` and fsspec's memory
filesystem). Layout of a stage's output folder::

    OUT/data/<shard>.parquet      kept rows, one shard per input shard (deterministic name); the
                                  folder holds nothing else, so polars, pyarrow.dataset and
                                  `datasets.load_dataset("parquet", data_dir=OUT/data)` open it
    OUT/_ledger/<shard>.parquet   dropped samples of that input shard (only if any)
    OUT/_manifest/_stage.json     stage name + config + config hash (written before any shard)
    OUT/_manifest/<shard>.json    commit record of one input shard (written last)
    OUT/_manifest/_summary.json   totals, written when the stage finishes

A data shard counts as written only once its manifest entry exists. On a local disk every
file is written to a temporary name and renamed; object stores have no rename, so there the
manifest entry (a single small PUT) is the commit and readers never list data files. Data
shards are written through OUT/_tmp/ (not a hidden name inside data/), so a crash mid-write
leaves no stray file in the dataset folder.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import urllib.parse
import uuid
from dataclasses import dataclass
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

MANIFEST_DIR = "_manifest"
DATA_DIR = "data"
TMP_DIR = "_tmp"
LEDGER_DIR = "_ledger"
STAGE_FILE = "_stage.json"
SUMMARY_FILE = "_summary.json"

# Fixed writer settings: same rows in => same bytes out, whatever the worker count.
PARQUET_WRITE_OPTIONS: dict[str, Any] = dict(
    compression="zstd", row_group_size=64 * 1024, write_statistics=True, use_dictionary=True
)


def _escaped(uri: str) -> str:
    """A URI pyarrow parses back to the same object key: spaces, '#' and non-ASCII in a key are
    percent-encoded (uri() writes keys as they are); '%' escapes already there and '?options'
    (region=..., endpoint_override=...) are kept."""
    scheme, rest = uri.split("://", 1)
    key, query = rest.split("?", 1) if "?" in rest else (rest, "")
    return f"{scheme}://{urllib.parse.quote(key, safe='/%:@')}" + (f"?{query}" if query else "")


@dataclass(frozen=True)
class Location:
    """A folder or file on some filesystem; picklable, so it travels into Ray tasks."""

    fs: pafs.FileSystem
    path: str

    @classmethod
    def parse(cls, path_or_uri: str, fs: pafs.FileSystem | None = None) -> "Location":
        if fs is not None:
            return cls(fs, path_or_uri.rstrip("/") or "/")
        if "://" in path_or_uri and not path_or_uri.startswith("file://"):
            try:
                fs, path = pafs.FileSystem.from_uri(_escaped(path_or_uri))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
                raise ValueError(
                    f"cannot open {path_or_uri!r}: {e}. Use a local path or a URI pyarrow "
                    "understands (s3://bucket/prefix, gs://bucket/prefix)."
                ) from None
            return cls(fs, path.rstrip("/"))
        local = path_or_uri.removeprefix("file://")
        return cls(pafs.LocalFileSystem(), os.path.abspath(local))

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def join(self, *parts: str) -> "Location":
        return Location(self.fs, posixpath.join(self.path, *parts))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    def uri(self) -> str:
        """A human-readable string for messages, ledgers and provenance."""
        if self.is_local:
            return self.path
        scheme = getattr(self.fs, "type_name", "fs")
        return f"{scheme}://{self.path.lstrip('/')}"

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.Directory

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def read_bytes(self, limit: int = -1) -> bytes:
        """The file's bytes; with a limit, at most that many (one request either way)."""
        with self.fs.open_input_stream(self.path) as f:
            return f.read() if limit < 0 else f.read(limit)

    def delete_if_exists(self) -> None:
        if self.exists():
            self.fs.delete_file(self.path)

    def size(self) -> int:
        return self.fs.get_file_info(self.path).size

    def delete_tree(self) -> None:
        if self.is_dir():
            self.fs.delete_dir(self.path)
        elif self.exists():
            self.fs.delete_file(self.path)

    def list_files(self, suffixes: tuple[str, ...] = ("",), recursive: bool = True) -> list["Location"]:
        """Files under this folder, sorted by path, skipping names starting with '_' or '.'
        (manifests, ledgers, temporary files)."""
        selector = pafs.FileSelector(self.path, recursive=recursive, allow_not_found=True)
        out = []
        for info in self.fs.get_file_info(selector):
            rel = posixpath.relpath(info.path, self.path)
            if info.type != pafs.FileType.File:
                continue
            if any(part.startswith(("_", ".")) for part in rel.split("/")):
                continue
            if info.path.endswith(suffixes):
                out.append(Location(self.fs, info.path))
        return sorted(out, key=lambda loc: loc.path)


def _tmp_name(final: Location, tmp_dir: Location | None = None) -> Location:
    folder, name = posixpath.split(final.path)
    if tmp_dir is not None:
        tmp_dir.mkdir()
        folder = tmp_dir.path
    return Location(final.fs, posixpath.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp"))


def write_bytes_atomic(dest: Location, data: bytes | list, tmp_dir: Location | None = None) -> None:
    """Write a whole file (``data``: bytes, or a list of parts written one after the other); on a
    local disk through a temporary name (in tmp_dir, default: beside the file) and a rename."""
    dest.fs.create_dir(posixpath.dirname(dest.path), recursive=True)
    target = _tmp_name(dest, tmp_dir) if dest.is_local else dest
    with dest.fs.open_output_stream(target.path) as f:
        for part in data if isinstance(data, list) else [data]:
            f.write(part)
    if target is not dest:
        dest.fs.move(target.path, dest.path)


def table_to_parquet_bytes(table: pa.Table, row_group_size: int | None = None) -> bytes:
    sink = io.BytesIO()
    _write_parquet(sink, table, row_group_size)
    return sink.getvalue()


def _write_parquet(sink: Any, table: pa.Table, row_group_size: int | None = None) -> None:
    options = PARQUET_WRITE_OPTIONS if row_group_size is None else {**PARQUET_WRITE_OPTIONS,
                                                                     "row_group_size": row_group_size}
    if table.num_rows == 0:  # no row group at all: `datasets` refuses a file with one of 0 rows
        with pq.ParquetWriter(sink, table.schema, **{k: v for k, v in options.items() if k != "row_group_size"}):
            pass
    else:
        pq.write_table(table, sink, **options)


def write_table(dest: Location, table: pa.Table, row_group_size: int | None = None,
                tmp_dir: Location | None = None) -> None:
    """Write one Parquet shard with the fixed writer settings (deterministic bytes); a reader that
    reads a row group at a time may ask for its own row-group size (packs)."""
    if not dest.is_local:  # an object store: one whole-object write
        write_bytes_atomic(dest, table_to_parquet_bytes(table, row_group_size), tmp_dir)
        return
    # A local disk: streamed to a temporary name (a row group at a time, not the whole file in
    # memory) and renamed; the same bytes.
    dest.fs.create_dir(posixpath.dirname(dest.path), recursive=True)
    tmp = _tmp_name(dest, tmp_dir)
    with dest.fs.open_output_stream(tmp.path) as f:
        _write_parquet(f, table, row_group_size)
    dest.fs.move(tmp.path, dest.path)


def read_table(src: Location, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(src.path, filesystem=src.fs, columns=columns)


def parquet_num_rows(src: Location) -> int:
    with src.fs.open_input_file(src.path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def write_json(dest: Location, payload: dict[str, Any]) -> None:
    text = json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    write_bytes_atomic(dest, text.encode("utf-8"))


def read_json(src: Location) -> dict[str, Any]:
    try:
        return json.loads(src.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as e:  # say which file (a manifest damaged by hand or by a full disk)
        raise json.JSONDecodeError(f"{src.uri()!r} is not valid JSON ({e.msg}); repair or remove it", e.doc,
                                   e.pos) from None


def shard_name_for(input_root: Location, shard: Location) -> str:
    """Deterministic output name for an input shard: its path below the input root,
    folders joined by '__', extension dropped. `coyo/part-00001.parquet` -> `coyo__part-00001`."""
    if shard.path == input_root.path:
        rel = shard.name
    else:
        rel = posixpath.relpath(shard.path, input_root.path)
    stem = rel
    for ext in (".parquet", ".tar", ".jsonl", ".json"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    return stem.replace("/", "__")


def list_input_shards(root: Location, suffixes: tuple[str, ...] = (".parquet",)) -> list[Location]:
    """Input shards of a stage. An ovpipe stage output is read through its manifest (only
    committed shards count); anything else is listed: a single file, or every matching file
    below a folder."""
    manifest = root.join(MANIFEST_DIR)
    if manifest.is_dir():
        entries = read_manifest_entries(root)
        return [root.join(e["output"]) for e in sorted(entries.values(), key=lambda e: e["output"])
                if e.get("output")]
    if not root.exists():
        raise FileNotFoundError(f"input {root.uri()!r} does not exist")
    if not root.is_dir():
        return [root]
    return root.list_files(suffixes)


def read_manifest_entries(out: Location) -> dict[str, dict[str, Any]]:
    """Committed shards of a stage output, keyed by shard name."""
    folder = out.join(MANIFEST_DIR)
    selector = pafs.FileSelector(folder.path, recursive=False, allow_not_found=True)
    entries = {}
    for info in out.fs.get_file_info(selector):
        name = posixpath.basename(info.path)
        if info.type == pafs.FileType.File and name.endswith(".json") and not name.startswith(("_", ".")):
            entry = read_json(Location(out.fs, info.path))
            entries[entry["shard"]] = entry
    return entries


def concat_or_empty(tables: Iterable[pa.Table], schema: pa.Schema) -> pa.Table:
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables).cast(schema)


def default_source(shard: Location, input_root: Location) -> str:
    """A sample's source when the input names none: the first folder below the input root (the
    root's own name if none)."""
    rel = posixpath.relpath(shard.path, input_root.path)
    is_dir = shard.fs.get_file_info(shard.path).type == pafs.FileType.Directory
    folder = rel if is_dir and rel != "." else posixpath.dirname(rel)
    return folder.split("/")[0] if folder else (input_root.name.removesuffix(".parquet") or "input")
