"""Every stage's kept rows open as a dataset: its output's `data/` folder holds nothing but the kept
rows' Parquet shards, so polars (read_parquet, scan_parquet), pyarrow.dataset and Hugging Face
`datasets.load_dataset("parquet", data_dir=...)` read it as it is, and see exactly the rows the
manifest committed. The chain is the demo's (tests/conftest.py's ingest and embed outputs, then
assign, balance, caption and pack with the demo's settings)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow.dataset as pads
import pytest

from ovpipe import registry
from ovpipe.config import load_config
from ovpipe.core.shards import DATA_DIR, Location, read_manifest_entries
from ovpipe.demo import demo_config
from tests.helpers import TINY_EMBED

STAGES = ["ingest", "embed", "assign", "balance", "caption", "pack"]


@pytest.fixture(scope="module")
def stage_outputs(demo_ingested, demo_embedded, tmp_path_factory) -> dict[str, Path]:
    cfg = demo_config(load_config(overrides=[*TINY_EMBED, "run.progress_interval_s=60"]))
    outs = {"ingest": demo_ingested, "embed": demo_embedded}
    root = tmp_path_factory.mktemp("readers")
    for before, name in zip(STAGES[1:], STAGES[2:]):
        outs[name] = root / name
        registry.entry(name).load().run(str(outs[before]), str(outs[name]), cfg, quiet=True)
    return outs


def committed_rows(out: Path) -> int:
    entries = read_manifest_entries(Location.parse(str(out)))
    assert all(e["output"].startswith(f"{DATA_DIR}/") for e in entries.values())
    return sum(e.get("output_rows", e["kept_rows"]) for e in entries.values())


@pytest.mark.parametrize("stage", STAGES)
def test_every_reader_opens_the_data_folder(stage_outputs, stage, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = stage_outputs[stage]
    folder = out / DATA_DIR
    rows = committed_rows(out)
    assert rows > 0
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        Path(e["output"]).name for e in read_manifest_entries(Location.parse(str(out))).values())
    assert pl.read_parquet(str(folder)).height == rows
    assert pl.scan_parquet(str(folder)).select(pl.len()).collect().item() == rows
    assert pads.dataset(str(folder), format="parquet").count_rows() == rows
    assert pads.dataset(str(folder)).count_rows() == rows  # the default format too
    ds = datasets.load_dataset("parquet", data_dir=str(folder), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == rows
    if stage == "pack":
        assert {"pack_id", "sample_ids", "sample_lens"} <= set(ds.column_names)
