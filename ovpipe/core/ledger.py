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

from ovpipe.core.shards import LEDGER_DIR, MANIFEST_DIR, STAGE_FILE, Location

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
    """Committed ledger files only: a shard's ledger counts once its manifest entry exists (an
    attempt that died between writing its ledger and committing left one that is not)."""
    selector = pafs.FileSelector(root.path, recursive=True, allow_not_found=True)
    infos = root.fs.get_file_info(selector)
    files = {info.path for info in infos if info.type == pafs.FileType.File}
    out = []
    for path in files:
        parts = path.split("/")
        if len(parts) >= 2 and parts[-2] == LEDGER_DIR and path.endswith(".parquet") and not parts[-1].startswith("."):
            stage_dir = "/".join(parts[:-2])
            manifest = f"{stage_dir}/{MANIFEST_DIR}"
            has_manifest = f"{manifest}/{STAGE_FILE}" in files
            if not has_manifest or f"{manifest}/{parts[-1][: -len('.parquet')]}.json" in files:
                out.append(Location(root.fs, path))
    return sorted(out, key=lambda loc: loc.path)


def ledger_counts(root: Location) -> pl.DataFrame:
    """Counts by stage and reason, largest first within a stage."""
    df = read_ledger(root)
    return (
        df.group_by("stage", "reason")
        .agg(pl.len().alias("count"))
        .sort(["stage", "count", "reason"], descending=[False, True, False])
    )
