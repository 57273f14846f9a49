"""`ray job submit` against a real Ray head started on 127.0.0.1 for this test, then stopped."""

import json
import subprocess

import pyarrow.parquet as pq
import pytest

from curation.ingest import INGEST_SCHEMA
from tests.conftest import REPO
from tests.ray_head import ray_head, submit_job


@pytest.mark.timeout(600)
def test_ray_job_submit_runs_ingest(demo_raw, tmp_path):
    out = tmp_path / "out"
    with ray_head() as head:
        result = submit_job(head["dashboard"], "python", "-m", "ray_jobs.ingest", "--input",
                            str(demo_raw), "--output", str(out), "--quiet", working_dir=str(REPO))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "succeeded" in result.stdout + result.stderr
    summary = json.loads((out / "_manifest" / "_summary.json").read_text())
    kept = pq.read_table(out, schema=INGEST_SCHEMA).num_rows
    ledger = pq.read_table(out / "_ledger").num_rows
    assert summary["input_rows"] == 95 == kept + ledger
    assert kept == 90
    leftovers = subprocess.run(["pgrep", "-f", head["temp_dir"]], capture_output=True, text=True)
    assert leftovers.stdout == "", f"ray processes left behind: {leftovers.stdout}"
