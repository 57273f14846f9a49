"""Ingest of Parquet image bytes through the real stage runner on a local Ray cluster."""

import io
import subprocess
import time

import pyarrow.parquet as pq
import pytest
import xxhash
from PIL import Image

from curation.ingest import INGEST_SCHEMA, IngestStage
from ovpipe.config import load_config
from ovpipe.core.images import BadImage, fetch_image_bytes, probe_image
from ovpipe.core.shards import Location, read_table
from ovpipe.core.stage import OutputConflict, run_stage
from tests.conftest import python_exe, sigkill_after_commits, subprocess_env
from tests.helpers import data_files


def ingest(raw, out, *overrides, **kw):
    return run_stage(IngestStage(), str(raw), str(out), load_config(overrides=list(overrides)), quiet=True, **kw)


def test_output_schema_identity_and_accounting(ray_address, demo_raw, tmp_path):
    summary = ingest(demo_raw, tmp_path / "out")
    raw_rows = sum(pq.read_metadata(p).num_rows for p in demo_raw.rglob("*.parquet"))
    kept = pq.read_table(tmp_path / "out", schema=INGEST_SCHEMA)  # reads only data shards
    ledger = pq.read_table(tmp_path / "out" / "_ledger")
    assert raw_rows == summary.input_rows == kept.num_rows + ledger.num_rows
    assert kept.schema.equals(INGEST_SCHEMA)
    assert sorted(set(ledger["reason"].to_pylist())) == [
        "corrupt_image", "duplicate", "empty_image", "too_many_pixels", "truncated_image"]
    # identity: the sample id is the content hash of the referenced bytes
    images = fetch_image_bytes(kept)
    assert [xxhash.xxh3_64_hexdigest(b) for b in images] == kept["sample_id"].to_pylist()
    assert [xxhash.xxh3_64_intdigest(b) for b in images] == kept["sample_hash"].to_pylist()
    assert set(kept["source"].to_pylist()) == {"coyo", "datacomp", "laion_cn"}
    # sizes agree with a full decode
    for data, w, h in list(zip(images, kept["width"].to_pylist(), kept["height"].to_pylist()))[:20]:
        assert Image.open(io.BytesIO(data)).size == (w, h)


def test_byte_identical_across_worker_counts_and_batch_sizes(ray_address, demo_raw, tmp_path):
    ingest(demo_raw, tmp_path / "w1", "run.workers=1")
    ingest(demo_raw, tmp_path / "w2", "run.workers=2", "ingest.batch_rows=3")
    one, two = data_files(tmp_path / "w1"), data_files(tmp_path / "w2")
    assert len(one) == 10 + 3 and one == two


def test_rerun_skips_finished_shards(ray_address, demo_raw, tmp_path):
    first = ingest(demo_raw, tmp_path / "o")
    again = ingest(demo_raw, tmp_path / "o")
    assert first.shards_skipped == 0 and again.shards_skipped == again.shards == 10
    assert again.kept_rows == first.kept_rows


def test_changed_config_is_refused_then_overwritten(ray_address, demo_raw, tmp_path):
    ingest(demo_raw, tmp_path / "o")
    with pytest.raises(OutputConflict, match=r"ingest\.max_pixels: 89478485 -> 1000.*--overwrite"):
        ingest(demo_raw, tmp_path / "o", "ingest.max_pixels=1000")
    summary = ingest(demo_raw, tmp_path / "o", "ingest.max_pixels=1000", overwrite=True)
    assert summary.kept_rows == 0 and summary.dropped_by_reason["too_many_pixels"] == 93


def test_foreign_output_folder_is_refused(ray_address, demo_raw, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    with pytest.raises(OutputConflict, match="not an ovpipe stage output"):
        ingest(demo_raw, tmp_path / "o", overwrite=True)
    assert (tmp_path / "o" / "notes.txt").exists()


def test_sigkill_mid_stage_then_rerun_is_byte_identical(ray_address, demo_raw, tmp_path):
    reference = tmp_path / "ref"
    ingest(demo_raw, reference)
    out = tmp_path / "killed"
    cmd = [python_exe(), "-m", "ray_jobs.ingest", "--input", str(demo_raw), "--output", str(out),
           "--workers", "1"]
    env = subprocess_env(ray_address, OVPIPE_FAULT_SHARD_DELAY_S="0.4")
    manifest = out / "_manifest"
    committed = len(sigkill_after_commits(cmd, env, manifest, at_least=3))
    assert 3 <= committed < 10, "the kill must land mid-stage"
    assert not (manifest / "_summary.json").exists()
    time.sleep(1.0)  # let Ray reap the dead driver's workers
    resumed = ingest(demo_raw, out)
    assert resumed.shards_skipped >= 3
    assert data_files(out) == data_files(reference)
    ids = pq.read_table(out, schema=INGEST_SCHEMA)["sample_id"].to_pylist()
    assert len(ids) == len(pq.read_table(reference, schema=INGEST_SCHEMA))  # no duplicate rows


def test_ray_job_entrypoint_runs_the_stage(ray_address, demo_raw, tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [python_exe(), "-m", "ray_jobs.ingest", "--input", str(demo_raw), "--output", str(out),
         "--source", "fixed", "--seed", "3"],
        env=subprocess_env(ray_address), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ingest" in result.stdout and "corrupt_image=1" in result.stdout
    assert set(read_table(Location.parse(str(out / "data" / "coyo__part-00000.parquet")))["source"].to_pylist()) == {"fixed"}
    ledger = subprocess.run([python_exe(), "-m", "ovpipe.cli", "ledger", str(out)],
                            env=subprocess_env(), capture_output=True, text=True)
    assert "too_many_pixels" in ledger.stdout and "total dropped: 5" in ledger.stdout


def test_missing_image_column_fails_with_a_clear_message(ray_address, tmp_path):
    import pyarrow as pa

    pq.write_table(pa.table({"url": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(RuntimeError, match=r"none of the image columns.*Set ingest.image_columns"):
        ingest(tmp_path / "bad.parquet", tmp_path / "o")


def _jpeg_with_orientation(w, h, orientation):
    img = Image.new("RGB", (w, h), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize("orientation,expected", [(1, (40, 20)), (3, (40, 20)), (6, (20, 40)), (8, (20, 40))])
def test_exif_orientation_swaps_sizes(orientation, expected):
    info = probe_image(_jpeg_with_orientation(40, 20, orientation), 10**6, 10**6)
    assert (info.width, info.height) == expected and info.format == "JPEG"


@pytest.mark.parametrize("data,reason", [
    (None, "missing_image"), (b"", "empty_image"), (b"hello world", "not_an_image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "corrupt_image"), (b"x" * 2000, "image_too_large"),
])
def test_bad_bytes_get_a_reason(data, reason):
    with pytest.raises(BadImage) as err:
        probe_image(data, 1000, 10**6)
    assert err.value.reason == reason
