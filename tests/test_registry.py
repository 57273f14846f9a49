"""The registry is the one list of stages: `ovpipe <stage>`, `python -m ray_jobs.<stage>` and
`ovpipe run`'s steps all come from it. A toy stage added in-process runs through all three."""

from __future__ import annotations

import contextlib
import io
import runpy
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ovpipe import cli, registry
from ovpipe.config import load_config
from ovpipe.pipeline import run_pipeline
from ovpipe.registry import SHARED, Flag, StageEntry

TOY = StageEntry(
    "keep_even", "rows with x -> the rows whose x is even (odd ones ledgered)", "tests.toy_stage:KeepEvenStage",
    scope=SHARED, flags={"--every-nth": Flag("run.progress_interval_s", float, "a toy flag")},
    example="ovpipe keep_even --input in/ --output out/")


@pytest.fixture()
def toy_registered(monkeypatch):
    monkeypatch.setattr(registry, "STAGES", [*registry.STAGES, TOY])
    return TOY


def _toy_input(folder) -> str:
    folder.mkdir()
    pq.write_table(pa.table({"sample_id": [f"{i:016x}" for i in range(6)], "x": list(range(6))}),
                   folder / "part-0.parquet")
    pq.write_table(pa.table({"sample_id": [f"{i:016x}" for i in range(6, 9)], "x": list(range(6, 9))}),
                   folder / "part-1.parquet")
    return str(folder)


def _kept(out) -> list[int]:
    return sorted(x for f in (out / "data").glob("*.parquet") for x in pq.read_table(f).column("x").to_pylist())


def _help(argv: list[str], run) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as e:
        run(argv)
    assert e.value.code == 0
    return buf.getvalue()


def _run_module(name: str, argv: list[str]) -> int:
    saved = sys.argv
    sys.argv = [name, *argv]
    try:
        with pytest.raises(SystemExit) as e:
            runpy.run_module(name, run_name="__main__")
        return e.value.code
    finally:
        sys.argv = saved


@pytest.mark.parametrize("entry", registry.STAGES, ids=registry.names())
def test_every_stage_command_and_job_come_from_its_registry_line(entry):
    from_cli = _help([entry.name, "--help"], cli.main)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert _run_module(f"ray_jobs.{entry.name}", ["--help"]) == 0
    from_job = buf.getvalue()
    for text in (from_cli, from_job):
        assert " ".join(entry.summary.split())[:40] in " ".join(text.split())
        for flag, f in entry.all_flags().items():
            assert flag in text and f.key in text.replace("\n", " ").replace("  ", " ")
        assert ("--overwrite" in text) == entry.run_flags
    assert "usage: python -m ray_jobs." + entry.name in from_job


def test_unregistered_names_are_not_jobs():
    with pytest.raises(ImportError):
        runpy.run_module("ray_jobs.no_such_stage", run_name="__main__")


def test_pipeline_steps_are_the_registry_in_order():
    from ovpipe.pipeline import step_names

    assert step_names() == registry.names()
    known = {registry.INPUT, *registry.names()}
    for i, e in enumerate(registry.STAGES):
        for r in e.read_candidates:  # each candidate is an earlier stage (or the raw input)
            assert r in known and (r == registry.INPUT or registry.names().index(r) < i)


def test_a_toy_stage_added_to_the_registry_runs_through_cli_pipeline_and_ray_job(toy_registered, tmp_path, capsys):
    raw = _toy_input(tmp_path / "in")
    local = ["--set", "run.executor=local"]

    assert "keep_even" in _help(["--help"], cli.main)
    assert "keep_even" in _help(["run", "--help"], cli.main)  # a step of `ovpipe run` too
    assert cli.main(["keep_even", "--input", raw, "--output", str(tmp_path / "cli"), "--quiet", *local]) == 0
    assert "keep_even" in capsys.readouterr().out  # the summary table names it
    assert _kept(tmp_path / "cli") == [0, 2, 4, 6, 8]

    assert _run_module("ray_jobs.keep_even", ["--input", raw, "--output", str(tmp_path / "job"), *local]) == 0
    assert _kept(tmp_path / "job") == [0, 2, 4, 6, 8]

    cfg = load_config(overrides=["run.executor=local"])
    manifest = run_pipeline(raw, str(tmp_path / "run"), cfg, steps=["keep_even"], run_id="r1")
    [record] = manifest["stages"]
    assert (record["stage"], record["input_rows"], record["kept_rows"]) == ("keep_even", 9, 5)
    assert record["dropped_by_reason"] == {"odd": 4}
    assert _kept(tmp_path / "run" / "keep_even") == [0, 2, 4, 6, 8]


def test_the_toy_stage_runs_on_ray_through_its_job_entry_point(toy_registered, tmp_path, ray_address, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", ray_address)
    raw = _toy_input(tmp_path / "in")
    assert _run_module("ray_jobs.keep_even", ["--input", raw, "--output", str(tmp_path / "job"), "--quiet"]) == 0
    assert _kept(tmp_path / "job") == [0, 2, 4, 6, 8]


def test_an_optional_step_runs_only_when_enabled_and_the_next_step_reads_it_then(monkeypatch):
    from ovpipe.pipeline import default_steps, input_step

    first = StageEntry("toy_a", "a", "tests.toy_stage:KeepEvenStage")
    optional = StageEntry("optional_toy", "b", "tests.toy_stage:OptionalToy", reads="toy_a", optional=True)
    last = StageEntry("toy_c", "c", "tests.toy_stage:KeepEvenStage", reads=("optional_toy", "toy_a", "no_such"))
    monkeypatch.setattr(registry, "STAGES", [first, optional, last])
    assert last.read_candidates == ("optional_toy", "toy_a")  # unregistered names are skipped
    off, on = load_config(overrides=["run.seed=0"]), load_config(overrides=["run.seed=7"])
    assert default_steps(off) == ["toy_a", "toy_c"] and default_steps(on) == ["toy_a", "optional_toy", "toy_c"]
    assert input_step(last, default_steps(off), off) == "toy_a"
    assert input_step(last, default_steps(on), on) == "optional_toy"
    # a partial run reads what the config enables (its folder from an earlier run)
    assert input_step(last, ["toy_c"], off) == "toy_a" and input_step(last, ["toy_c"], on) == "optional_toy"
    # naming the optional step runs it whatever its config says
    assert input_step(last, ["toy_a", "optional_toy", "toy_c"], off) == "optional_toy"
