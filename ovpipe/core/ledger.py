"""The ledger: one Parquet row per dropped sample, so inputs = kept + dropped always holds.

Schema (docs/data-contracts.md): ``sample_id`` (null when the input never yielded one, e.g.
unreadable bytes), ``locator`` (input shard URI + ``#row=N``: where to look), ``stage``,
``reason`` (a short fixed vocabulary per stage), ``detail`` (free text for a person).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ovpipe.core.shards import LEDGER_DIR, MANIFEST_DIR, STAGE_FILE, Location, read_json, read_manifest_entries

RETRY_COUNTS = ("retried", "recovered", "still_failing")  # per reason, in manifest entries' "retried"

LEDGER_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string()),
        pa.field("locator", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
    ]
)


class AccountingError(RuntimeError):
    """Inputs != kept + dropped: a sample vanished or was counted twice."""


@dataclass
class Ledger:
    """Collects dropped rows of one input shard for one stage."""

    stage: str
    rows: dict[str, list] = field(default_factory=lambda: {f.name: [] for f in LEDGER_SCHEMA})

    def drop(self, locator: str, reason: str, detail: str = "", sample_id: str | None = None) -> None:
        self.rows["sample_id"].append(sample_id)
        self.rows["locator"].append(locator)
        self.rows["stage"].append(self.stage)
        self.rows["reason"].append(reason)
        self.rows["detail"].append(detail)

    def __len__(self) -> int:
        return len(self.rows["locator"])

    def table(self) -> pa.Table:
        return pa.Table.from_pydict(self.rows, schema=LEDGER_SCHEMA)


def read_ledger(root: Location) -> pl.DataFrame:
    """Every ledger row below a folder (a stage output, or a demo folder of several stages)."""
    tables = []
    for loc in _ledger_files(root):
        tables.append(pq.read_table(loc.path, filesystem=loc.fs).cast(LEDGER_SCHEMA))
    if not tables:
        return pl.from_arrow(LEDGER_SCHEMA.empty_table())
    return pl.from_arrow(pa.concat_tables(tables))


def _ledger_files(root: Location) -> list[Location]:
    """Committed ledger files only: the ones a shard's manifest entry names (an attempt that died
    between writing its ledger and committing left one that is not, and so does an `ovpipe retry`
    that died before its new generation was committed)."""
    selector = pafs.FileSelector(root.path, recursive=True, allow_not_found=True)
    infos = root.fs.get_file_info(selector)
    files = {info.path for info in infos if info.type == pafs.FileType.File}
    committed: dict[str, set[str] | None] = {}  # stage folder -> the ledgers its entries name
    out = []
    for path in files:
        parts = path.split("/")
        if len(parts) >= 2 and parts[-2] == LEDGER_DIR and path.endswith(".parquet") and not parts[-1].startswith("."):
            stage_dir = "/".join(parts[:-2])
            if stage_dir not in committed:
                committed[stage_dir] = (_named_ledgers(Location(root.fs, stage_dir))
                                        if f"{stage_dir}/{MANIFEST_DIR}/{STAGE_FILE}" in files else None)
            if committed[stage_dir] is None or path in committed[stage_dir]:
                out.append(Location(root.fs, path))
    return sorted(out, key=lambda loc: loc.path)


def _named_ledgers(stage_dir: Location) -> set[str]:
    return {stage_dir.join(e["ledger"]).path for e in read_manifest_entries(stage_dir).values() if e.get("ledger")}


def retry_counts(root: Location) -> pl.DataFrame:
    """`ovpipe retry` per stage and reason: rows retried, recovered (now kept) and still failing,
    summed over the committed manifest entries of every stage output below ``root``."""
    selector = pafs.FileSelector(root.path, recursive=True, allow_not_found=True)
    headers = sorted(i.path for i in root.fs.get_file_info(selector)
                     if i.type == pafs.FileType.File and i.path.endswith(f"/{MANIFEST_DIR}/{STAGE_FILE}"))
    rows = []
    for header in headers:
        stage_dir = Location(root.fs, header[: -len(f"/{MANIFEST_DIR}/{STAGE_FILE}")])
        stage = read_json(Location(root.fs, header)).get("stage", stage_dir.name)
        for entry in read_manifest_entries(stage_dir).values():
            for reason, c in entry.get("retried", {}).items():
                rows.append({"stage": stage, "reason": reason, **{k: c.get(k, 0) for k in RETRY_COUNTS}})
    schema = {"stage": pl.String, "reason": pl.String, **{k: pl.Int64 for k in RETRY_COUNTS}}
    if not rows:
        return pl.DataFrame(schema=schema)
    return (pl.DataFrame(rows, schema=schema).group_by("stage", "reason").agg(pl.col(list(RETRY_COUNTS)).sum())
            .sort(["stage", "reason"]))


def ledger_counts(root: Location) -> pl.DataFrame:
    """Counts by stage and reason, largest first within a stage."""
    df = read_ledger(root)
    return (
        df.group_by("stage", "reason")
        .agg(pl.len().alias("count"))
        .sort(["stage", "count", "reason"], descending=[False, True, False])
    )
