"""Ingest stage: raw image(-text) shards -> one row per sample, image referenced not copied.

Reads:  Parquet shards with an image-bytes column (``ingest.image_columns``: raw bytes, or a
        Hugging Face image struct {bytes, path}); optional text / key / source / licence columns.
Writes: ``OUT/<shard>.parquet`` in INGEST_SCHEMA (below, and docs/data-contracts.md), and
        ledger rows (stage ``ingest``) for images that cannot be used.

Identity: ``sample_id`` is the xxh3-64 of the image bytes (16 hex digits), and ``sample_hash``
the same 64 bits as a uint64, so later stages hash and bucket vectorised. The input's own key is
provenance, not identity.
"""

from __future__ import annotations

import posixpath

import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from ovpipe.images import BadImage, probe_image
from ovpipe.ledger import Ledger
from ovpipe.stage import ShardOutput, ShardTask

INGEST_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("sample_hash", pa.uint64(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("input_key", pa.string()),
        pa.field("input_shard", pa.string(), nullable=False),
        pa.field("input_row", pa.int64(), nullable=False),
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("image_member", pa.string()),
        pa.field("image_row", pa.int64()),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("format", pa.string(), nullable=False),
        pa.field("num_bytes", pa.int64(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("license", pa.string()),
    ]
)


def _first_present(candidates: list[str], names: list[str]) -> str | None:
    return next((c for c in candidates if c in names), None)


def default_source(task: ShardTask) -> str:
    """The folder an input shard sits in, below the input root (the root's name if none)."""
    rel = posixpath.relpath(task.input.path, task.input_root.path)
    folder = posixpath.dirname(rel)
    return folder.split("/")[0] if folder else (task.input_root.name.removesuffix(".parquet") or "input")


class IngestStage:
    name = "ingest"
    config_sections = ("ingest",)
    schema_version = 1
    input_suffixes = (".parquet",)

    def process(self, task: ShardTask) -> ShardOutput:
        cfg = task.config.ingest
        with task.input.fs.open_input_file(task.input.path) as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            image_col = _first_present(cfg.image_columns, names)
            if image_col is None:
                raise ValueError(
                    f"input shard {task.input.uri()!r} has none of the image columns "
                    f"{cfg.image_columns}; its columns are {names}. Set ingest.image_columns."
                )
            text_col = _first_present(cfg.text_columns, names)
            key_col = _first_present(cfg.key_columns, names)
            source_col = cfg.source_column if cfg.source_column in names else None
            license_col = cfg.license_column if cfg.license_column in names else None
            wanted = [c for c in (image_col, text_col, key_col, source_col, license_col) if c]
            fixed_source = cfg.source or default_source(task)
            ledger = Ledger(self.name)
            rows: dict[str, list] = {f.name: [] for f in INGEST_SCHEMA}
            uri = task.input.uri()
            row = 0
            for batch in pf.iter_batches(batch_size=cfg.batch_rows, columns=wanted):
                images = batch.column(image_col)
                if pa.types.is_struct(images.type):
                    images = images.field("bytes")
                images = images.to_pylist()
                texts = batch.column(text_col).to_pylist() if text_col else [None] * len(images)
                keys = batch.column(key_col).to_pylist() if key_col else [None] * len(images)
                sources = batch.column(source_col).to_pylist() if source_col else [None] * len(images)
                licenses = batch.column(license_col).to_pylist() if license_col else [None] * len(images)
                for data, text, key, source, lic in zip(images, texts, keys, sources, licenses):
                    locator = f"{uri}#row={row}"
                    sample_id = xxhash.xxh3_64_hexdigest(data) if data else None
                    try:
                        info = probe_image(data, cfg.max_image_bytes, cfg.max_pixels, cfg.min_side)
                    except BadImage as bad:
                        ledger.drop(locator, bad.reason, bad.detail, sample_id)
                        row += 1
                        continue
                    rows["sample_id"].append(sample_id)
                    rows["sample_hash"].append(xxhash.xxh3_64_intdigest(data))
                    rows["source"].append(str(source) if source else fixed_source)
                    rows["input_key"].append(None if key is None else str(key))
                    rows["input_shard"].append(uri)
                    rows["input_row"].append(row)
                    rows["image_uri"].append(uri)
                    rows["image_member"].append(image_col)
                    rows["image_row"].append(row)
                    rows["width"].append(info.width)
                    rows["height"].append(info.height)
                    rows["format"].append(info.format)
                    rows["num_bytes"].append(len(data))
                    rows["text"].append(text if isinstance(text, str) else None)
                    rows["license"].append(None if lic is None else str(lic))
                    row += 1
        table = pa.Table.from_pydict(rows, schema=INGEST_SCHEMA)
        return ShardOutput(table, ledger, row)
