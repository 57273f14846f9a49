"""Shard I/O, manifest and ledger on local and non-local pyarrow filesystems."""

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from curation.ingest import IngestStage
from ovpipe.config import load_config
from ovpipe.core.ledger import AccountingError, Ledger, ledger_counts
from ovpipe.core.shards import (
    Location,
    list_input_shards,
    read_manifest_entries,
    read_table,
    shard_name_for,
    write_json,
    write_table,
)
from ovpipe.core.stage import OutputConflict, ShardOutput, check_accounting, run_stage
from tests.toy_stage import KeepEvenStage


@pytest.fixture
def memory_fs():
    mem = fsspec.filesystem("memory")
    mem.store.clear()
    mem.pseudo_dirs.clear()
    mem.pseudo_dirs.append("")
    return pafs.PyFileSystem(pafs.FSSpecHandler(mem))


def test_write_read_and_list_on_memory_filesystem(memory_fs):
    root = Location.parse("/data", memory_fs)
    table = pa.table({"a": [1, 2, 3]})
    write_table(root.join("x", "p0.parquet"), table)
    write_table(root.join("x", "p1.parquet"), table.slice(1))
    write_json(root.join("_manifest", "p0.json"), {"shard": "p0", "output": "x/p0.parquet"})
    assert read_table(root.join("x", "p0.parquet")).equals(table)
    listed = [loc.path for loc in root.list_files((".parquet",))]
    assert listed == ["/data/x/p0.parquet", "/data/x/p1.parquet"]  # _manifest is skipped
    # a folder with a manifest is read through it: only committed shards count
    assert [loc.path for loc in list_input_shards(root)] == ["/data/x/p0.parquet"]


def test_local_writes_leave_no_temporary_files(tmp_path):
    root = Location.parse(str(tmp_path))
    for i in range(3):
        write_table(root.join("out.parquet"), pa.table({"a": [i]}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.parquet"]
    assert read_table(root.join("out.parquet"))["a"].to_pylist() == [2]


def test_shard_names_are_deterministic_and_flat():
    root = Location.parse("/in")
    assert shard_name_for(root, root.join("coyo", "part-00001.parquet")) == "coyo__part-00001"
    single = Location.parse("/in/one.parquet")
    assert shard_name_for(single, single) == "one"


def test_ingest_end_to_end_on_memory_filesystem(memory_fs, demo_raw):
    """The whole stage (manifest, ledger, accounting) on a non-local filesystem, in-process."""
    src = Location.parse(str(demo_raw))
    for loc in src.list_files((".parquet",)):
        rel = loc.path[len(src.path):]
        with memory_fs.open_output_stream("/raw" + rel) as f:
            f.write(loc.read_bytes())
    cfg = load_config(overrides=["run.executor=local"])
    summary = run_stage(IngestStage(), "/raw", "/out", cfg, filesystem=memory_fs, quiet=True)
    assert summary.input_rows == 95 and summary.kept_rows == 90 and summary.dropped_rows == 5
    out = Location.parse("/out", memory_fs)
    assert sum(read_table(s).num_rows for s in list_input_shards(out)) == 90
    counts = dict(zip(*ledger_counts(out).select("reason", "count").to_dict(as_series=False).values()))
    assert counts == {"corrupt_image": 1, "duplicate": 1, "empty_image": 1, "too_many_pixels": 1,
                      "truncated_image": 1}


def test_ingest_through_ray_on_subtree_filesystem(ray_address, demo_raw, tmp_path):
    """A non-local filesystem object travels into Ray tasks; writes go straight to final names."""
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    src = Location.parse(str(demo_raw))
    for loc in src.list_files((".parquet",)):
        rel = loc.path[len(src.path):]
        fs.create_dir("raw" + rel.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream("raw" + rel) as f:
            f.write(loc.read_bytes())
    summary = run_stage(IngestStage(), "raw", "out", load_config(), filesystem=fs, quiet=True)
    assert (summary.input_rows, summary.kept_rows) == (95, 90)
    assert (tmp_path / "out" / "_manifest" / "_summary.json").exists()


class SilentlyDroppingStage(IngestStage):
    """A broken stage: loses one row without a ledger entry."""

    def process(self, task):
        out = super().process(task)
        return ShardOutput(out.table.slice(1), out.ledger, out.input_rows)


def test_a_silently_dropped_row_fails_loudly(demo_raw, tmp_path):
    cfg = load_config(overrides=["run.executor=local"])
    with pytest.raises(AccountingError, match="kept 9 and ledgered 0"):
        run_stage(SilentlyDroppingStage(), str(demo_raw / "coyo" / "part-00000.parquet"),
                  str(tmp_path / "o"), cfg, quiet=True)


def test_manifest_that_disagrees_with_files_fails_accounting(demo_raw, tmp_path):
    cfg = load_config(overrides=["run.executor=local"])
    summary = run_stage(IngestStage(), str(demo_raw), str(tmp_path / "o"), cfg, quiet=True)
    out = Location.parse(str(tmp_path / "o"))
    entries = read_manifest_entries(out)
    name = sorted(entries)[0]
    write_table(out.join(entries[name]["output"]), read_table(out.join(entries[name]["output"])).slice(2))
    with pytest.raises(AccountingError, match=f"shard {name} holds"):
        check_accounting(summary, out, entries)


def test_ledger_rows_round_trip():
    ledger = Ledger("ingest")
    ledger.drop("s.parquet#row=3", "corrupt_image", "bad header", None)
    table = ledger.table()
    assert table.num_rows == 1 and table["stage"][0].as_py() == "ingest"


def _shards(folder, **shards):
    folder.mkdir(parents=True, exist_ok=True)
    for name, xs in shards.items():
        write_table(Location.parse(str(folder / f"{name}.parquet")), pa.table({"x": xs}))


def test_an_input_shard_gone_since_the_last_run_is_refused_or_retired(tmp_path):
    """Its rows must not keep flowing to later stages (a renamed input would double them)."""
    local = ["run.executor=local"]
    _shards(tmp_path / "in", a=[0, 1, 2], b=[4])
    run_stage(KeepEvenStage(), str(tmp_path / "in"), str(tmp_path / "o"), load_config(overrides=local), quiet=True)
    (tmp_path / "in" / "a.parquet").rename(tmp_path / "in" / "a2.parquet")
    with pytest.raises(OutputConflict, match=r"no longer in the input.*\['a'\].*retire_missing_inputs"):
        run_stage(KeepEvenStage(), str(tmp_path / "in"), str(tmp_path / "o"), load_config(overrides=local), quiet=True)
    cfg = load_config(overrides=local + ["run.retire_missing_inputs=true"])
    summary = run_stage(KeepEvenStage(), str(tmp_path / "in"), str(tmp_path / "o"), cfg, quiet=True)
    out = Location.parse(str(tmp_path / "o"))
    assert sorted(s.name for s in list_input_shards(out)) == ["a2.parquet", "b.parquet"]  # what a later stage reads
    assert summary.input_rows == 4 and summary.kept_rows == 3
    assert not (tmp_path / "o" / "a.parquet").exists() and not (tmp_path / "o" / "_ledger" / "a.parquet").exists()
    assert ledger_counts(out)["count"].sum() == 1  # a2's odd row, once


def test_a_retry_that_drops_nothing_leaves_no_stale_ledger(tmp_path):
    """An attempt that ledgered rows and died before its commit must not leave them counted."""
    _shards(tmp_path / "in", a=[1, 2])
    cfg = load_config(overrides=["run.executor=local"])
    run_stage(KeepEvenStage(), str(tmp_path / "in"), str(tmp_path / "o"), cfg, quiet=True)
    out = Location.parse(str(tmp_path / "o"))
    (tmp_path / "o" / "_manifest" / "a.json").unlink()  # as if killed between ledger and commit
    assert ledger_counts(out).height == 0  # an uncommitted ledger file is not counted
    # the retry (the transient failure gone) keeps both rows and removes the dead attempt's ledger
    run_stage(KeepEvenStage(drop_odd=False), str(tmp_path / "in"), str(tmp_path / "o"), cfg, quiet=True)
    assert not (tmp_path / "o" / "_ledger" / "a.parquet").exists()
    assert read_table(out.join("data", "a.parquet")).num_rows == 2 and ledger_counts(out).height == 0


@pytest.mark.parametrize("key", ["raw/part 1.parquet", "raw/a#1.parquet", "raw/猫.parquet"])
def test_object_store_keys_with_spaces_hash_and_non_ascii_round_trip(key):
    """uri() writes keys as they are (ledgers, image_uri); parse() must read them back to the same key."""
    options = "?region=us-east-1&scheme=http&endpoint_override=127.0.0.1:9"  # nothing is contacted
    loc = Location.parse(f"s3://bucket/{key}{options}")
    assert loc.path == f"bucket/{key}"
    assert Location.parse(loc.uri() + options).path == loc.path


def test_a_shard_whose_input_was_rewritten_is_redone_on_resume(tmp_path):
    """An upstream stage redone (say with --overwrite) rewrites this stage's inputs: a plain
    re-run must not keep the outputs made from the old ones."""
    _shards(tmp_path / "in", a=[0, 2, 4], b=[6])
    cfg = load_config(overrides=["run.executor=local"])
    run_stage(KeepEvenStage(), str(tmp_path / "in"), str(tmp_path / "o"), cfg, quiet=True)
    _shards(tmp_path / "in", a=[8])  # rewritten under the same name
    summary = run_stage(KeepEvenStage(), str(tmp_path / "in"), str(tmp_path / "o"), cfg, quiet=True)
    out = Location.parse(str(tmp_path / "o"))
    assert read_table(out.join("data", "a.parquet"))["x"].to_pylist() == [8]
    assert summary.shards_skipped == 1 and summary.input_rows == 2  # b was left as it was
