"""The runner of ovpipe/core/stage.py on a multi-pass toy stage (tests/toy_stage.py): passes run
in order, each in its own folder, with one accounting; --overwrite clears every redone pass
before any runs; a changed config is refused before any pass writes; an output inside its input
is refused."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ovpipe.config import load_config
from ovpipe.core.stage import OutputConflict, run_stage
from tests.toy_stage import KeepEvenStage, TwoPassToy


def _input(folder, **shards):
    folder.mkdir(parents=True)
    for name, xs in shards.items():
        pq.write_table(pa.table({"sample_id": [f"{x:016x}" for x in xs], "x": xs}), folder / f"{name}.parquet")
    return str(folder)


def _cfg(*overrides):
    return load_config(overrides=["run.executor=local", *overrides])


def _mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_two_passes_in_their_folders_with_one_accounting(tmp_path):
    raw = _input(tmp_path / "in", a=[0, 1, 2], b=[3, 4])
    out = tmp_path / "out"
    summary = run_stage(TwoPassToy(), raw, str(out), _cfg(), quiet=True)
    assert (summary.stage, summary.input_rows, summary.kept_rows, summary.dropped_rows) == ("two_pass_toy", 5, 3, 2)
    assert summary.shards == 4 and summary.shards_skipped == 0  # 2 shards in each pass
    assert sorted(p.name for p in (out / "_marked" / "data").glob("*.parquet")) == ["a.parquet", "b.parquet"]
    assert pq.read_table(out / "data" / "a.parquet").column("seed").to_pylist() == [0, 0]  # pass 2 read pass 1
    headers = [json.loads((f / "_manifest" / "_stage.json").read_text())["stage"] for f in (out / "_marked", out)]
    assert headers == ["mark", "keep_even_marked"]
    assert json.loads((out / "_manifest" / "_summary.json").read_text())["stage"] == "two_pass_toy"
    again = run_stage(TwoPassToy(), raw, str(out), _cfg(), quiet=True)
    assert again.shards_skipped == again.shards == 4


def test_a_changed_config_is_refused_before_any_pass_writes(tmp_path):
    raw = _input(tmp_path / "in", a=[0, 1, 2], b=[3, 4])
    out = tmp_path / "out"
    run_stage(TwoPassToy(), raw, str(out), _cfg(), quiet=True)
    before = _mtimes(out)
    with pytest.raises(OutputConflict, match=r"'two_pass_toy' \(pass 'mark'\).*run\.seed: 0 -> 5"):
        run_stage(TwoPassToy(), raw, str(out), _cfg("run.seed=5"), quiet=True)
    assert _mtimes(out) == before
    # a change only the second pass hashes is refused before the first pass (complete) writes
    with pytest.raises(OutputConflict, match=r"pass 'keep_even_marked'.*pack\.max_len: 8192 -> 100"):
        run_stage(TwoPassToy(), raw, str(out), _cfg("pack.max_len=100"), quiet=True)
    assert _mtimes(out) == before
    # another stage's output is refused before this stage's first pass writes into it
    with pytest.raises(OutputConflict, match="keep_even_marked"):
        run_stage(KeepEvenStage(), raw, str(out), _cfg(), quiet=True)
    assert _mtimes(out) == before


def test_overwrite_clears_every_redone_pass_first_so_a_crash_can_resume(tmp_path):
    """A first pass that fails under --overwrite must not leave the old config's final output
    beside the new passes: a plain re-run then finishes the new config."""
    raw = _input(tmp_path / "in", a=[0, 1, 2], b=[3, 4])
    out = tmp_path / "out"
    run_stage(TwoPassToy(), raw, str(out), _cfg(), quiet=True)
    with pytest.raises(RuntimeError, match="toy failure in b"):
        run_stage(TwoPassToy(fail=("b",)), raw, str(out), _cfg("run.seed=5"), quiet=True, overwrite=True)
    assert not (out / "a.parquet").exists() and not (out / "_manifest" / "_stage.json").exists()
    resumed = run_stage(TwoPassToy(), raw, str(out), _cfg("run.seed=5"), quiet=True)
    assert resumed.shards_skipped == 1  # pass 1's shard a, committed before the failure
    assert pq.read_table(out / "data" / "a.parquet").column("seed").to_pylist() == [5, 5]


def test_an_output_inside_its_input_is_refused(tmp_path):
    raw = _input(tmp_path / "in", a=[0, 1])
    for output in (tmp_path / "in" / "out", tmp_path / "in"):
        with pytest.raises(OutputConflict, match="overlap"):
            run_stage(KeepEvenStage(), raw, str(output), _cfg(), quiet=True)
    with pytest.raises(OutputConflict, match="overlap"):  # nor an input inside its output
        run_stage(KeepEvenStage(), raw, str(tmp_path), _cfg(), quiet=True)


def test_a_rerun_removes_an_uncommitted_retry_generation(tmp_path):
    """An `ovpipe retry` killed between writing a shard's next generation and committing it leaves
    files no entry names; the next run of the stage removes them, so data/ holds the kept rows once."""
    raw = _input(tmp_path / "in", a=[0, 1, 2], b=[3, 4])
    out = tmp_path / "out"
    run_stage(KeepEvenStage(), raw, str(out), _cfg(), quiet=True)
    before = pq.read_table(out / "data").num_rows
    stray = [out / "data" / "a.retry1.parquet", out / "_ledger" / "a.retry1.parquet"]
    stray[0].write_bytes((out / "data" / "a.parquet").read_bytes())
    stray[1].write_bytes((out / "_ledger" / "a.parquet").read_bytes())
    assert pq.read_table(out / "data").num_rows > before  # a dataset reader would count a's rows twice
    again = run_stage(KeepEvenStage(), raw, str(out), _cfg(), quiet=True)
    assert again.shards_skipped == again.shards == 2
    assert not any(p.exists() for p in stray)
    assert pq.read_table(out / "data").num_rows == before
