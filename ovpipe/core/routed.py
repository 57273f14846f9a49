"""Routed files: the map side of a shuffle, one Arrow IPC file per map task holding one record
batch per destination (reduce task), so a reducer reads only its own batch of every file.

Used by caption's global dedup (scratch files) and by pack (the staged payload, grouped by
bucket, and the pool files, grouped by repair shard).

Why Arrow IPC and not Parquet: a shuffle reads S x R blocks (S map files, R destinations), and
the cost of reading one must not grow with R. A Parquet footer describes every row group's every
column chunk and is parsed whole on each open (58 ms per read at 8,192 row groups on this
machine), so S x R reads cost S x R x R. An IPC footer is a flatbuffer of 24 bytes per batch,
read without parsing: ~0.4 ms a read at 32 or 8,192 destinations alike. ``columns`` reads only
those columns' buffers (pack's length pass reads ``num_tokens`` and skips the image bytes).

Layout: batch d is destination d, empty batches included, so a file's batch count is always its
destination count. A destination whose rows do not fit one batch (binary data over 2 GiB) spans
several; then the schema's ``ovpipe.route_starts`` metadata (JSON: n + 1 batch indices) says
which, and only then.
"""

from __future__ import annotations

import json
from typing import Iterable

import numpy as np
import pyarrow as pa

from ovpipe.core.shards import Location, write_bytes_atomic

STARTS_KEY = b"ovpipe.route_starts"
WRITE_OPTIONS = pa.ipc.IpcWriteOptions(compression="zstd")


def write_routed(dest: Location, table: pa.Table, route: np.ndarray, n: int) -> str:
    """Rows of ``table`` grouped by ``route`` (ints in 0..n-1; stable: input order within a
    destination) into n destinations; written whole (through a temporary name on a local disk).
    Returns ``dest.path``, the name in ``dest.fs`` (a URI would not open on an object store's)."""
    route = np.asarray(route, dtype=np.int64)
    if len(route) and (route.min() < 0 or route.max() >= n):
        raise ValueError(f"{dest.uri()}: routes must lie in 0..{n - 1} (got {route.min()}..{route.max()})")
    order = np.argsort(route, kind="stable")
    table = table.take(pa.array(order)).replace_schema_metadata(None)
    bounds = np.searchsorted(route[order], np.arange(n + 1))
    per_dest = []
    for d in range(n):
        part = table.slice(int(bounds[d]), int(bounds[d + 1] - bounds[d])).combine_chunks()
        per_dest.append(part.to_batches() or [pa.RecordBatch.from_pylist([], schema=table.schema)])
    schema = table.schema
    if any(len(b) != 1 for b in per_dest):
        starts = np.r_[0, np.cumsum([len(b) for b in per_dest])].tolist()
        schema = schema.with_metadata({STARTS_KEY: json.dumps(starts).encode()})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema, options=WRITE_OPTIONS) as w:
        for batches in per_dest:
            for b in batches:
                w.write_batch(b.replace_schema_metadata(schema.metadata))
    write_bytes_atomic(dest, sink.getvalue())
    return dest.path


def read_routed(files: Iterable[Location], index: int, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """Destination ``index``'s rows of every file, in the files' order (``columns``: only those;
    ``schema``: the files' schema). A missing file raises FileNotFoundError (``filename``: its URI)."""
    fields = None if columns is None else sorted(schema.get_field_index(c) for c in columns)  # file order
    want = schema if fields is None else pa.schema([schema.field(i) for i in fields])
    batches = []
    for loc in files:
        try:
            f = loc.fs.open_input_file(loc.path)
        except FileNotFoundError:
            raise FileNotFoundError(2, "no such routed file", loc.uri()) from None
        with f:
            reader = pa.ipc.open_file(f, options=pa.ipc.IpcReadOptions(included_fields=fields))
            meta = reader.schema.metadata or {}
            if STARTS_KEY in meta:
                starts = json.loads(meta[STARTS_KEY])
                span = range(starts[index], starts[index + 1])
            elif index < reader.num_record_batches:
                span = range(index, index + 1)
            else:
                raise ValueError(f"{loc.uri()}: has {reader.num_record_batches} destinations, not {index + 1}")
            for i in span:
                b = reader.get_batch(i)
                if b.num_rows:
                    batches.append(b.replace_schema_metadata(None))
    if not batches:
        return want.empty_table()
    return pa.Table.from_batches(batches).cast(want)
