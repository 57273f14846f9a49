"""Ingest stage: raw image(-text) shards -> one row per unique sample, image referenced not copied.

Reads:  input shards of any kind curation/readers.py knows — Parquet with image bytes or image
        paths (img2dataset's Parquet as it comes), WebDataset tars (img2dataset's WebDataset as it
        comes), folders of images with optional ``<stem>.txt`` captions.
Writes: ``OUT/<shard>.parquet`` in INGEST_SCHEMA (below, and docs/data-contracts.md), and
        ledger rows (stage ``ingest``) for inputs that cannot be used or are duplicates.

Identity: ``sample_id`` is the xxh3-64 of the image bytes (16 hex digits), and ``sample_hash``
the same 64 bits as a uint64, so later stages hash and bucket vectorised. The input's own key is
provenance, not identity.

Exact dedup (``ingest.dedup``): before any shard is processed, ``prepare`` hashes every input
image (a map over shards as Ray tasks) and shuffles (hash, shard, row) into hash partitions
(reduce tasks) that pick one winner per hash. The rule, deterministic and stable when later runs
add shards: **a sample already kept in this output folder by an earlier run stays the winner;
otherwise the occurrence with the smallest (shard name, row) wins.** Every other occurrence is
ledgered as ``duplicate`` with a pointer to the winner. Only the duplicates travel back to the
driver, as one int64 array (32 bytes per duplicate; no per-sample Python objects), which reaches
the shard tasks with the stage through the object store once per node (NumPy: no copy per task);
each task makes the ledger details of its own shard's rows only.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from curation.readers import list_ingest_shards, read_shard
from ovpipe.core.config import config_hash
from ovpipe.core.images import BadImage, probe_image
from ovpipe.core.executor import ensure_ray, uses_ray
from ovpipe.core.ledger import Ledger
from ovpipe.core.progress import Progress
from ovpipe.core.shards import MANIFEST_DIR, STAGE_FILE, Location, default_source, read_json, read_manifest_entries
from ovpipe.core.stage import (PassContext, Shard, ShardOutput, ShardTask, SinglePassStage, file_shards,
                               pass_payload)

if TYPE_CHECKING:  # annotations only: the root config composes every stage's section
    from ovpipe.config import Config

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
        pa.field("mode", pa.string(), nullable=False),
        pa.field("num_frames", pa.int32(), nullable=False),
    ]
)

# One occurrence of an image in the dedup shuffle. prio 0 = already kept by an earlier run.
_OCCURRENCE = np.dtype([("hash", "<u8"), ("prio", "u1"), ("shard", "<i4"), ("row", "<i8")])
_UNHASHED = -1  # the row of the one marker occurrence of a shard the dedup pass could not read
_NO_LOSERS = np.zeros((0, 4), np.int64)


class IngestStage(SinglePassStage):
    name = "ingest"
    config_sections = ("ingest",)
    schema_version = 2
    input_suffixes = (".parquet", ".tar")

    def __init__(self) -> None:
        self._losers = _NO_LOSERS  # (shard index, row, winner's shard index, winner's row), sorted
        self._shard_index: dict[str, int] = {}  # shard name -> index into _losers' shard columns
        self._shard_uris: list[str] = []  # input URI by shard index (the winner pointer's text)
        self._unhashed: set[str] = set()  # shards the dedup pass could not read

    def list_shards(self, ctx: PassContext) -> list[Shard]:
        return file_shards(ctx.input, list_ingest_shards(ctx.input, ctx.cfg.ingest))

    # ------------------------------------------------------------------ global dedup

    def prepare(self, ctx: PassContext, shards: list[Shard]) -> dict[str, Any]:
        """Find every duplicate occurrence before any shard runs. Returns no digest: adding
        input shards must not invalidate the output (incremental runs)."""
        self._losers, self._shard_index, self._shard_uris, self._unhashed = _NO_LOSERS, {}, [], set()
        cfg = ctx.cfg
        if not cfg.ingest.dedup:
            return {}
        start = time.monotonic()
        names = [s.name for s in shards]
        shards = [s.input for s in shards]
        committed = self._committed_outputs(cfg, ctx.output, set(names))
        jobs = [(committed.get(n, s), n in committed, i) for i, (s, n) in enumerate(zip(shards, names))]
        losers = _find_duplicates(jobs, cfg, ctx.quiet)
        marks = losers[:, 1] == _UNHASHED
        self._unhashed = {names[shard] for shard in losers[marks, 0].tolist()}
        self._losers = np.ascontiguousarray(losers[~marks])  # still sorted by (shard, row)
        self._shard_index = {n: i for i, n in enumerate(names)}
        self._shard_uris = [s.uri() for s in shards]
        self.dedup_seconds = round(time.monotonic() - start, 3)
        return {}

    def duplicate_count(self) -> int:
        return len(self._losers)

    def _duplicates(self, shard: str) -> dict[int, str]:
        """{row: pointer to the winner} for one shard's duplicate rows. The same text whether the
        winner was committed by this run or an earlier one, so a killed-and-resumed run writes
        exactly what an uninterrupted run writes."""
        i = self._shard_index.get(shard)
        if i is None or not len(self._losers):
            return {}
        lo, hi = np.searchsorted(self._losers[:, 0], [i, i + 1])
        return {row: f"same bytes as the sample kept at {self._shard_uris[w_shard]} row {w_row}"
                for _, row, w_shard, w_row in self._losers[lo:hi].tolist()}

    def _committed_outputs(self, cfg: Config, out: Location, names: set[str]) -> dict[str, Location]:
        """Data files of shards an earlier run with this same config already committed."""
        header = out.join(MANIFEST_DIR, STAGE_FILE)
        if not header.exists():
            return {}
        if read_json(header).get("config_hash") != config_hash(pass_payload(self, cfg)):
            return {}  # run_stage refuses this output anyway
        entries = read_manifest_entries(out)
        return {name: out.join(e["output"]) for name, e in entries.items() if name in names}

    # ------------------------------------------------------------------ one shard

    def process(self, task: ShardTask) -> ShardOutput:
        return self._process(task)

    def process_rows(self, task: ShardTask, rows: list[int]) -> ShardOutput:
        """`ovpipe retry`: only these rows are read (paths resolve against the shard's own folder,
        so the default's filtered copy would not do). A recovered image whose bytes another kept
        row already has is a duplicate of that row: the sample already kept stays the winner, as
        in an incremental run."""
        result = self._process(task, set(rows))
        return _recovered_duplicates(task, result) if task.config.ingest.dedup else result

    def _process(self, task: ShardTask, only_rows: set[int] | None = None) -> ShardOutput:
        cfg = task.config.ingest
        duplicates = self._duplicates(task.shard)
        fixed_source = cfg.source or default_source(task.input, task.input_root)
        uri = task.input.uri()
        ledger = Ledger(self.name)
        rows: dict[str, list] = {f.name: [] for f in INGEST_SCHEMA}
        count = 0
        for rec in read_shard(task.input, cfg, only_rows):
            count += 1
            if rec.error is not None:
                ledger.drop(rec.locator, rec.error[0], rec.error[1])
                continue
            sample_id = xxhash.xxh3_64_hexdigest(rec.data) if rec.data else None
            try:
                info = probe_image(rec.data, cfg.max_image_bytes, cfg.max_pixels, cfg.min_side, cfg.verify)
            except BadImage as bad:
                ledger.drop(rec.locator, bad.reason, bad.detail, sample_id)
                continue
            if rec.row in duplicates:
                ledger.drop(rec.locator, "duplicate", duplicates[rec.row], sample_id)
                continue
            values = {
                "sample_id": sample_id, "sample_hash": xxhash.xxh3_64_intdigest(rec.data),
                "source": rec.source or fixed_source, "input_key": rec.key, "input_shard": uri,
                "input_row": rec.row, "image_uri": rec.image_uri, "image_member": rec.image_member,
                "image_row": rec.image_row, "width": info.width, "height": info.height,
                "format": info.format, "num_bytes": len(rec.data), "text": rec.text,
                "license": rec.license, "mode": info.mode, "num_frames": info.frames,
            }
            for k, v in values.items():
                rows[k].append(v)
        if task.shard in self._unhashed:  # it reads now, but its duplicates were never looked for
            raise RuntimeError(f"{uri} could not be read during the dedup pass, so its duplicates are "
                               "unknown; the shard is left uncommitted and the next run retries it")
        return ShardOutput(pa.Table.from_pydict(rows, schema=INGEST_SCHEMA), ledger, count)


def _recovered_duplicates(task: ShardTask, result: ShardOutput) -> ShardOutput:
    """Rows a retry recovered whose bytes a kept row already has (in any committed shard, or an
    earlier recovered row of this shard) are ledgered ``duplicate``, with the same detail as the
    dedup shuffle writes. Memory: the recovered rows' hashes only; every shard's hash column is read."""
    table = result.table
    if not table.num_rows:
        return result
    hashes = table.column("sample_hash").to_pylist()
    wanted = pa.array(sorted(set(hashes)), pa.uint64())
    winner: dict[int, str] = {}
    for e in sorted(read_manifest_entries(task.output_root).values(), key=lambda e: e["shard"]):
        kept = pq.read_table(task.output_root.join(e["output"]).path, filesystem=task.output_root.fs,
                             columns=["sample_hash", "input_shard", "input_row"])
        kept = kept.filter(pc.is_in(kept.column("sample_hash"), value_set=wanted))
        for h, uri, row in zip(*(kept.column(c).to_pylist() for c in kept.column_names)):
            winner.setdefault(h, f"same bytes as the sample kept at {uri} row {row}")
    keep = []
    ids, rows = table.column("sample_id").to_pylist(), table.column("input_row").to_pylist()
    for i, h in enumerate(hashes):
        if h in winner:
            result.ledger.drop(f"{task.input.uri()}#row={rows[i]}", "duplicate", winner[h], ids[i])
        else:
            winner[h] = f"same bytes as the sample kept at {task.input.uri()} row {rows[i]}"
            keep.append(i)
    result.table = table.take(pa.array(keep, pa.int64()))
    return result


# ---------------------------------------------------------------------- the dedup shuffle


def _hash_occurrences(shard: Location, committed: bool, index: int, cfg: Config, partitions: int):
    """Map: every image occurrence of one shard, split into hash partitions."""
    if committed:  # an earlier run's kept rows: winners by rule
        table = pq.read_table(shard.path, filesystem=shard.fs, columns=["sample_hash", "input_row"])
        occ = np.zeros(table.num_rows, _OCCURRENCE)
        occ["hash"] = table.column("sample_hash").to_numpy()
        occ["row"] = table.column("input_row").to_numpy()
        occ["prio"] = 0
    else:
        try:
            found = _parquet_image_hashes(shard, cfg)
            if found is None:  # tars, folders, path columns: the general reader
                found = [(xxhash.xxh3_64_intdigest(r.data), r.row) for r in read_shard(shard, cfg.ingest)
                         if r.error is None and r.data]
        except Exception:  # unreadable now: one marker row (row -1) instead; process() fails the shard
            found = [(0, _UNHASHED)]
        occ = np.zeros(len(found), _OCCURRENCE)
        if found:
            occ["hash"], occ["row"] = zip(*found)
        occ["prio"] = 1
    occ["shard"] = index
    part = occ["hash"] % np.uint64(partitions)
    split = [occ[part == p] for p in range(partitions)]
    return split if partitions > 1 else split[0]


def _parquet_image_hashes(shard: Location, cfg: Config) -> list[tuple[int, int]] | None:
    """Fast path for Parquet with an image-bytes column: read that one column and hash it, with
    the same row numbers the reader gives (None when the shard is not of that kind)."""
    if not shard.path.endswith(".parquet"):
        return None
    with shard.fs.open_input_file(shard.path) as f:
        pf = pq.ParquetFile(f)
        column = next((c for c in cfg.ingest.image_columns if c in pf.schema_arrow.names), None)
        if column is None:
            return None
        found, row = [], 0
        for batch in pf.iter_batches(batch_size=cfg.ingest.batch_rows, columns=[column]):
            values = batch.column(0)
            if pa.types.is_struct(values.type):
                values = values.field("bytes")
            for data in values.to_pylist():
                if data:
                    found.append((xxhash.xxh3_64_intdigest(data), row))
                row += 1
        return found


def _losers(*parts: np.ndarray) -> np.ndarray:
    """Reduce: per hash, the winner is the first by (prio, shard, row); return the other new
    occurrences as rows of (shard, row, winner shard, winner row), and shards whose images could
    not be read as (shard, -1, -1, -1)."""
    occ = np.concatenate(parts) if parts else np.zeros(0, _OCCURRENCE)
    unhashed = occ["shard"][occ["row"] == _UNHASHED]
    occ = occ[occ["row"] != _UNHASHED]
    marks = np.stack([unhashed] + [np.full(len(unhashed), -1)] * 3, axis=1).astype(np.int64)
    return np.concatenate([marks, _winners_and_losers(occ)])


def _winners_and_losers(occ: np.ndarray) -> np.ndarray:
    occ = occ[np.lexsort((occ["row"], occ["shard"], occ["prio"], occ["hash"]))]
    if len(occ) == 0:
        return np.zeros((0, 4), np.int64)
    first = np.ones(len(occ), bool)
    first[1:] = occ["hash"][1:] != occ["hash"][:-1]
    winner_idx = np.maximum.accumulate(np.where(first, np.arange(len(occ)), 0))
    lose = ~first & (occ["prio"] == 1)
    winners = occ[winner_idx[lose]]
    return np.stack([occ["shard"][lose], occ["row"][lose], winners["shard"], winners["row"]], axis=1).astype(np.int64)


def _find_duplicates(jobs: list[tuple[Location, bool, int]], cfg: Config, quiet: bool = False) -> np.ndarray:
    partitions = cfg.ingest.dedup_partitions
    progress = Progress("ingest:dedup", len(jobs), cfg.run.progress_interval_s, quiet=quiet)
    if not uses_ray(cfg):
        maps = []
        for loc, committed, i in jobs:
            out = _hash_occurrences(loc, committed, i, cfg, partitions)
            maps.append(out if partitions > 1 else [out])
            progress.update(1)
        result = [_losers(*[m[p] for m in maps]) for p in range(partitions)]
    else:
        import ray

        ensure_ray(cfg)
        mapper = ray.remote(num_cpus=1, max_retries=3, num_returns=partitions)(_hash_occurrences)
        cfg_ref = ray.put(cfg)
        maps = [mapper.remote(loc, committed, i, cfg_ref, partitions) for loc, committed, i in jobs]
        maps = [m if partitions > 1 else [m] for m in maps]
        reducer = ray.remote(num_cpus=1, max_retries=3)(_losers)
        result = ray.get([reducer.remote(*[m[p] for m in maps]) for p in range(partitions)])
        progress.update(len(jobs))
    losers = np.concatenate(result) if result else np.zeros((0, 4), np.int64)
    return losers[np.lexsort((losers[:, 1], losers[:, 0]))] if len(losers) else losers
