"""Decontaminate stage: planted evaluation images and their altered copies are all ledgered with the
right benchmark name, nothing else is; the eval set is embedded once (cached)."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.decontaminate import DecontaminateStage, load_benchmark_images
from curation.embed import EmbedStage
from curation.ingest import IngestStage
from ovpipe.config import load_config
from ovpipe.core.ledger import read_ledger
from ovpipe.core.shards import Location, list_input_shards, read_table
from ovpipe.core.stage import run_stage
from ovpipe.testing.near_dups import make_corpus, write_parquet

THUMB = ["embed.model=ovpipe-thumbnail", "embed.pretrained=random", "embed.batch_size=32", "run.executor=local"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Training set: 30 base images with 3 altered copies each + 30 unrelated images. Bases 0-7 are
    the evaluation images of 'mmbench-mini' (a folder), bases 8-11 of 'textvqa-mini' (Parquet)."""
    root = tmp_path_factory.mktemp("decon")
    items = make_corpus(n_base=30, copies=3, n_unrelated=30, seed=7)
    originals = {i.group: i for i in items if i.alteration == "original"}
    folder = root / "evals" / "mmbench-mini"
    folder.mkdir(parents=True)
    for g in range(8):
        (folder / f"q{g}.jpg").write_bytes(originals[g].data)
    pq.write_table(pa.table({"benchmark": ["textvqa-mini"] * 4, "id": [f"tv{g}" for g in range(8, 12)],
                             "image": pa.array([originals[g].data for g in range(8, 12)], pa.binary())}),
                   root / "evals" / "tv.parquet")
    write_parquet(items, str(root / "raw"), shards=3)
    cfg = load_config(overrides=THUMB)
    run_stage(IngestStage(), str(root / "raw"), str(root / "ingest"), cfg, quiet=True)
    run_stage(EmbedStage(), str(root / "ingest"), str(root / "embed"), cfg, quiet=True)
    key_group = {i.key: i.group for i in items}
    groups = {}
    for f in list_input_shards(Location.parse(str(root / "embed"))):
        for r in read_table(f, columns=["sample_id", "input_key"]).to_pylist():
            groups[r["sample_id"]] = key_group[r["input_key"]]
    return root, groups


def benchmarks_flags(root):
    return [f"decontaminate.benchmarks={json.dumps([str(root / 'evals' / 'mmbench-mini'), str(root / 'evals' / 'tv.parquet')])}",
            f"decontaminate.cache_dir={root / 'cache'}"]


@pytest.mark.parametrize("method", ["both", "embedding", "phash"])
def test_planted_eval_images_and_copies_are_ledgered_with_their_benchmark(setup, tmp_path, method):
    root, groups = setup
    cfg = load_config(overrides=THUMB + benchmarks_flags(root) + [f"decontaminate.method={method}"])
    summary = run_stage(DecontaminateStage(), str(root / "embed"), str(tmp_path / "out"), cfg, quiet=True)
    ledger = read_ledger(Location.parse(str(tmp_path / "out"))).to_dicts()
    assert {r["reason"] for r in ledger} == {"benchmark_overlap"}
    found = {r["sample_id"]: re.search(r"benchmark=(\S+)", r["detail"]).group(1) for r in ledger}
    expected = {s: ("mmbench-mini" if g < 8 else "textvqa-mini") for s, g in groups.items() if g < 12}
    if method == "both":
        assert found == expected  # every planted image and copy, with its benchmark; nothing else
    else:  # one test alone: nothing wrong is ledgered; most copies are found
        assert all(expected.get(s) == b for s, b in found.items())
        assert len(found) >= 0.85 * len(expected)
    assert summary.input_rows == summary.kept_rows + summary.dropped_rows
    report = json.loads((tmp_path / "out" / "_report" / "decontaminate_report.json").read_text())
    assert sum(report["overlaps_per_benchmark"].values()) == len(found)


def test_eval_set_is_cached_by_content(setup, tmp_path, capsys):
    root, _ = setup
    cfg = load_config(overrides=THUMB + benchmarks_flags(root))
    run_stage(DecontaminateStage(), str(root / "embed"), str(tmp_path / "a"), cfg)
    capsys.readouterr()
    run_stage(DecontaminateStage(), str(root / "embed"), str(tmp_path / "b"), cfg)
    assert "eval cache hit" in capsys.readouterr().err


def test_benchmark_inputs_are_checked(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        load_benchmark_images([str(tmp_path / "empty")], 10)
    with pytest.raises(ValueError, match="neither a folder"):
        load_benchmark_images([str(tmp_path / "nothing.txt")], 10)
    pq.write_table(pa.table({"x": [1]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="image columns"):
        load_benchmark_images([str(tmp_path / "bad.parquet")], 10)
    with pytest.raises(ValueError, match="no evaluation sets"):
        DecontaminateStage().check(load_config(), str(tmp_path / "o"))


def test_command_line_takes_repeated_benchmarks(setup, tmp_path):
    from ovpipe import cli

    root, groups = setup
    argv = ["decontaminate", "--input", str(root / "embed"), "--output", str(tmp_path / "cli"), "--quiet",
            "--benchmarks", str(root / "evals" / "mmbench-mini"), "--benchmarks", f"tv={root / 'evals' / 'tv.parquet'}",
            "--set", f"decontaminate.cache_dir={root / 'cache'}", *[x for kv in THUMB for x in ("--set", kv)]]
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "cli" / "_report" / "decontaminate_report.json").read_text())
    expected = sum(g < 12 for g in groups.values())
    assert set(report["overlaps_per_benchmark"]) == {"mmbench-mini", "tv"}  # NAME=PATH names the set
    assert sum(report["overlaps_per_benchmark"].values()) == expected


def test_names_with_spaces_in_the_report_and_another_models_width_is_a_clear_error(setup, tmp_path):
    """Eval file and folder names with spaces (a ledger detail is not split on spaces); eval images
    embedded by a model of another width than the input's is one clear error, not a matmul error."""
    root, groups = setup
    folder = tmp_path / "My Bench"
    folder.mkdir()
    (folder / "copy of q0.jpg").write_bytes((root / "evals" / "mmbench-mini" / "q0.jpg").read_bytes())
    flags = [f"decontaminate.benchmarks={json.dumps([str(folder)])}", f"decontaminate.cache_dir={root / 'cache'}"]
    run_stage(DecontaminateStage(), str(root / "embed"), str(tmp_path / "out"), load_config(overrides=THUMB + flags),
              quiet=True)
    report = json.loads((tmp_path / "out" / "_report" / "decontaminate_report.json").read_text())
    assert report["overlaps_per_benchmark"] == {"My Bench": sum(g == 0 for g in groups.values())}
    assert {e["eval_id"] for e in report["examples"]["My Bench"]} == {"copy of q0.jpg"}
    tiny = ["embed.model=ovpipe-tiny-clip", "embed.pretrained=random", "run.executor=local",
            "decontaminate.method=embedding"]
    with pytest.raises(RuntimeError, match="64-d.*--set embed.model"):
        run_stage(DecontaminateStage(), str(root / "embed"), str(tmp_path / "other"),
                  load_config(overrides=tiny + flags), quiet=True)
