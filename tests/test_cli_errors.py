"""The mistakes a new user makes (issue 17), each answered before Ray or a model starts: exit code,
at most 3 lines on stderr, and the message names the fix. Ctrl-C: exit 130, and the re-run
resumes. Help: descriptions, defaults, choices, an example; --version; make-demo-data --out."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ovpipe import cli, preflight, registry
from ovpipe.config import load_config
from ovpipe.core.shards import Location, write_json
from ovpipe.core.stage import _describe_change, pass_payload
from tests.conftest import committed_shards, python_exe, subprocess_env


def _run(capfd, *argv: str) -> tuple[int, list[str]]:
    rc = cli.main(list(argv))
    err = capfd.readouterr().err
    return rc, [line for line in err.splitlines() if line.strip()]


def _fake_output(folder: Path, pass_name: str, payload: dict | None = None, shards: int = 1) -> Path:
    """A stage output as its manifest describes it: the header naming the pass, committed entries."""
    loc = Location.parse(str(folder))
    write_json(loc.join("_manifest", "_stage.json"),
               {"stage": pass_name, "config_hash": "0", "payload": payload or {"stage": pass_name}})
    for i in range(shards):
        pq.write_table(pa.table({"sample_id": [f"s{i}"]}), str(folder / f"s{i}.parquet"))
        write_json(loc.join("_manifest", f"s{i}.json"), {"shard": f"s{i}", "output": f"s{i}.parquet"})
    return folder


def _assert_one_error(rc: int, lines: list[str], *needles: str, code: int = 2) -> None:
    assert rc == code, lines
    assert 1 <= len(lines) <= 3, lines
    text = " ".join(lines)
    for needle in needles:
        assert needle in text, (needle, lines)


# ------------------------------------------------------------------------------- the input


def test_ingest_of_a_text_file_says_what_it_reads(tmp_path, capfd):
    (tmp_path / "notes.txt").write_text("hello world\n")
    (tmp_path / "fake.parquet").write_text("hello world\n")  # a text file named .parquet
    rc, lines = _run(capfd, "ingest", "--input", str(tmp_path / "notes.txt"), "--output", str(tmp_path / "o1"))
    _assert_one_error(rc, lines, "notes.txt", "pass --input a folder or file of Parquet shards")
    rc, lines = _run(capfd, "ingest", "--input", str(tmp_path / "fake.parquet"), "--output", str(tmp_path / "o2"))
    _assert_one_error(rc, lines, "is not a Parquet file", "pass --input")
    rc, lines = _run(capfd, "ingest", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o3"))
    _assert_one_error(rc, lines, "does not exist", "pass --input")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()  # nothing written


def test_pack_of_an_assign_output_names_the_stage_it_reads(tmp_path, capfd):
    assign = _fake_output(tmp_path / "assign", "assign")
    rc, lines = _run(capfd, "pack", "--input", str(assign), "--output", str(tmp_path / "pack"))
    _assert_one_error(rc, lines, "is the output of `ovpipe assign`",
                      "pass --input the output folder of `ovpipe merge` or `ovpipe caption`")


def test_a_foreign_parquet_without_the_columns_a_stage_reads_is_refused(tmp_path, capfd):
    pq.write_table(pa.table({"x": [1]}), str(tmp_path / "x.parquet"))
    rc, lines = _run(capfd, "balance", "--input", str(tmp_path / "x.parquet"), "--output", str(tmp_path / "b"),
                     "--fraction", "0.5")
    _assert_one_error(rc, lines, "concept_ids", "`ovpipe assign`")


def test_train_on_a_caption_folder_says_it_is_not_a_pack_folder(tmp_path, capfd):
    caption = _fake_output(tmp_path / "caption", "caption_dedup")
    rc, lines = _run(capfd, "train", "--input", str(caption), "--output", str(tmp_path / "run"))
    _assert_one_error(rc, lines, "this is not a pack folder", "`ovpipe pack`")
    pq.write_table(pa.table({"caption": ["a"]}), str(tmp_path / "plain.parquet"))  # no ovpipe manifest either
    rc, lines = _run(capfd, "train", "--input", str(tmp_path / "plain.parquet"), "--output", str(tmp_path / "run"))
    _assert_one_error(rc, lines, "this is not a pack folder", "`ovpipe pack`")


# ------------------------------------------------------------------ weights and vocabulary


def test_embed_without_weights_names_the_pretrained_flag(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(preflight, "_hub_reachable", lambda *a, **k: False)  # no network (as here and in CI)
    monkeypatch.setattr(preflight, "_cached_open_clip_weights", lambda: False)
    ingest = _fake_output(tmp_path / "ingest", "ingest")
    start = time.monotonic()
    rc, lines = _run(capfd, "embed", "--input", str(ingest), "--output", str(tmp_path / "embed"))
    _assert_one_error(rc, lines, "metaclip_fullcc", "pass --pretrained /path/to/checkpoint.pt")
    assert time.monotonic() - start < 20  # before any model or Ray start
    rc, lines = _run(capfd, "embed", "--input", str(ingest), "--output", str(tmp_path / "embed"),
                     "--pretrained", str(tmp_path / "missing.pt"))
    _assert_one_error(rc, lines, "missing.pt", "does not exist", "--pretrained /path")


def test_assign_with_a_missing_vocabulary_names_the_flag(tmp_path, capfd):
    embed = _fake_output(tmp_path / "embed", "embed")
    rc, lines = _run(capfd, "assign", "--input", str(embed), "--output", str(tmp_path / "a"), "--set",
                     "embed.pretrained=random", "--vocabulary", str(tmp_path / "metadata.json"))
    _assert_one_error(rc, lines, "metadata.json", "pass --vocabulary /path/to/metadata.json")


# ---------------------------------------------------------------------------- the output


def test_an_output_that_is_a_file_is_refused(tmp_path, capfd, demo_raw):
    (tmp_path / "f").write_text("x")
    rc, lines = _run(capfd, "ingest", "--input", str(demo_raw), "--output", str(tmp_path / "f"))
    _assert_one_error(rc, lines, "is a file", "pass --output")


def test_a_changed_config_is_refused_before_ray_with_user_facing_keys(tmp_path, capfd):
    """An existing balance output of target 100 and a run with target 200: refused by the
    preflight (no "starting Ray" line), naming balance.target, never global_state."""
    assign = _fake_output(tmp_path / "assign", "assign")
    out = tmp_path / "balance"
    old = load_config(overrides=["balance.target=100"])
    for p in registry.entry("balance").load().passes():
        folder = out / p.folder if p.folder else out
        write_json(Location.parse(str(folder)).join("_manifest", "_stage.json"),
                   {"stage": p.name, "config_hash": "0", "payload": pass_payload(p, old, {"cutoff": [1, 2]})})
    rc, lines = _run(capfd, "balance", "--input", str(assign), "--output", str(out), "--target", "200")
    _assert_one_error(rc, lines, "balance.target: 100 -> 200", "--overwrite")
    text = " ".join(lines)
    assert "global_state" not in text and "starting Ray" not in text and "config.balance" not in text


def test_a_changed_global_state_is_named_not_listed():
    text = _describe_change({"config": {"balance": {"target": 1}}, "global_state": {"cutoff": [1, 2, 3]}},
                            {"config": {"balance": {"target": 1}}, "global_state": {"cutoff": [4, 5, 6]}})
    assert "cutoff" in text and "global_state" not in text and "[1, 2, 3]" not in text


def test_train_refuses_a_changed_config_into_a_finished_run(tmp_path, capfd):
    from trainer.launch import refuse_changed_train_config

    packs = _fake_output(tmp_path / "packs", "pack_buckets")
    run = tmp_path / "run"
    run.mkdir()
    old = load_config(overrides=["train.steps=4"])
    (run / "train_config.json").write_text(json.dumps(old.model_dump()))
    (run / "summary.json").write_text(json.dumps({"steps": 4}))
    refuse_changed_train_config(str(run), old)  # the same config: accepted (the run is left as it is)
    rc, lines = _run(capfd, "train", "--input", str(packs), "--output", str(run), "--set", "train.steps=8")
    _assert_one_error(rc, lines, "train.steps: 4 -> 8", "new --output")


def test_ledger_refuses_what_is_not_an_ovpipe_output(tmp_path, capfd):
    rc, lines = _run(capfd, "ledger", str(tmp_path / "nope"))
    _assert_one_error(rc, lines, "does not exist", "ovpipe ledger demo_out")
    (tmp_path / "plain").mkdir()
    rc, lines = _run(capfd, "ledger", str(tmp_path / "plain"))
    _assert_one_error(rc, lines, "is not an ovpipe output")


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capfd, demo_raw):
    rc = cli.main(["ingest", "--input", str(demo_raw), "--output", str(tmp_path / "o"), "--dry-run"])
    out = capfd.readouterr().out
    assert rc == 0 and "ingest:" in out and "input shard(s)" in out and "[new]" in out
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------- Ctrl-C


def _interrupt_then_resume(demo_raw: Path, out: Path, extra: list[str], env: dict) -> None:
    cmd = [python_exe(), "-m", "ovpipe.cli", "ingest", "--input", str(demo_raw), "--output", str(out),
           "--workers", "1", "--quiet", *extra]
    slow = {**env, "OVPIPE_FAULT_SHARD_DELAY_S": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=slow)
    deadline = time.monotonic() + 300
    while not committed_shards(out / "_manifest") and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [s for s in err.decode().splitlines() if s.strip()]
    assert proc.returncode == 130, lines
    assert 1 <= len(lines) <= 3 and "re-run the same command to resume" in lines[0], lines
    done = int(re.search(r"(\d+) shard\(s\) are committed", lines[0]).group(1))
    assert done == len(committed_shards(out / "_manifest")) >= 1
    assert list((out / "_logs").glob("ingest-*.log"))  # the traceback went to the log
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr
    resumed = re.search(r"(\d+)/(\d+)\s*$", again.stdout.splitlines()[2])  # the summary's "resumed" column
    assert int(resumed.group(1)) >= done


def test_ctrl_c_exits_130_and_the_rerun_resumes(demo_raw, tmp_path):
    _interrupt_then_resume(demo_raw, tmp_path / "o", ["--set", "run.executor=local"], subprocess_env())


@pytest.mark.slow
def test_ctrl_c_under_ray_exits_130_and_ray_noise_stays_in_the_log(demo_raw, tmp_path):
    _interrupt_then_resume(demo_raw, tmp_path / "o", [], subprocess_env())


@pytest.mark.slow
def test_a_torchrun_failure_is_one_line_from_the_failing_rank(tmp_path, capfd):
    from trainer.launch import _torchrun

    script = tmp_path / "fail.py"
    script.write_text("import os\nif os.environ['RANK'] == '1':\n    raise ValueError('bad pack on rank 1')\n"
                      "import time; time.sleep(3)\n")
    rc, failure, log = _torchrun([python_exe(), "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                                  str(script)], tmp_path)
    err = capfd.readouterr().err
    assert rc != 0 and failure == " on rank 1: ValueError: bad pack on rank 1"
    assert "Traceback" not in err and "ChildFailedError" not in err  # the wall stays in the log
    assert "ChildFailedError" in Path(log).read_text()


# --------------------------------------------------------------------------------- help


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_help_describes_every_command_with_defaults_choices_and_an_example(capsys):
    top = _help(capsys)
    assert " -> ".join(registry.names()) + "." in " ".join(top.split())  # not cut off
    for entry in registry.STAGES:
        text = _help(capsys, entry.name)
        assert entry.summary.split(" -> ")[0] in text and "example:" in text, entry.name
        assert "default:" in text or not entry.all_flags()
        for flag, f in entry.all_flags().items():
            if f.choices:
                assert "{" + ",".join(map(str, f.choices)) + "}" in text, (entry.name, flag)
    for argv in (("config",), ("config", "show"), ("ledger",), ("make-demo-data",), ("run",), ("demo",)):
        text = _help(capsys, *argv)
        assert "example" in text, argv


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and re.match(r"ovpipe \S+", capsys.readouterr().out)


def test_make_demo_data_takes_out_like_demo_and_its_old_positional(tmp_path, capsys):
    assert cli.main(["make-demo-data", "--out", str(tmp_path / "a"), "--n", "6"]) == 0
    assert cli.main(["make-demo-data", str(tmp_path / "b"), "--n", "6"]) == 0
    assert sorted(p.name for p in (tmp_path / "a").rglob("*.parquet")) == \
        sorted(p.name for p in (tmp_path / "b").rglob("*.parquet")) != []


# ----------------------------------------------------------------------------- progress


def test_progress_eta_comes_from_rows_after_start_up(monkeypatch):
    """Start-up (Ray, a model) takes 40 s, then each 100-row shard 1 s: the ETA after two shards
    is the remaining rows at the steady rate, not 40 s per shard; a summary pass shows no rows."""
    import io

    from ovpipe.core import progress as prog

    clock = [0.0]
    monkeypatch.setattr(prog.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    p = prog.Progress("embed", 10, interval_s=0, stream=out, total_rows=1000)
    clock[0] = 40.0
    p.update(1, 100)
    assert p.line().endswith("ETA ?")  # one shard: no steady rate yet
    clock[0] = 41.0
    p.update(1, 100)
    assert "100 rows/s" in p.line() and p.line().endswith("ETA 0:00:08")  # 800 rows left at 100/s
    aux = prog.Progress("balance_counts", 2, interval_s=0, stream=out)
    aux.update(1, 0)
    assert "rows" not in aux.line()


def test_ray_and_torch_noise_stays_off_the_terminal():
    """Lines Ray, Ray Data, torchrun and Python warnings print on every run, as they print them:
    the log file gets them, the terminal only ovpipe's own lines."""
    from ovpipe.console import StderrFilter

    lines = [
        "[embed] starting Ray…",
        "2026-12-03 01:02:09,478\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled",
        "[2026-12-03 01:02:33,029 E 1228 1228] core_worker.cc:2465: Actor with class name: 'MapWorker(...)'",
        "2026-12-03 01:02:33,029\tWARNING __init__.py:28 -- Progress bars disabled. To enable, set ...",
        "\x1b[36m(MapWorker(MapBatches(EmbedActor)) pid=1234)\x1b[0m loading",
        "/x/site-packages/torch/y.py:12: UserWarning: something",
        "  warnings.warn(msg)",
        "[embed] 1/3 shards · 16 rows · 1 rows/s · elapsed 0:00:28 · ETA ?",
        "Traceback (most recent call last):",
        '  File "a.py", line 1, in <module>',
        "ValueError: a failed shard's traceback (its one-line error is printed by ovpipe)",
        "W1203 01:03:43.427000 4215 torch/distributed/elastic/multiprocessing/api.py:1028] Sending process",
        "[embed] 3/3 shards · 40 rows · elapsed 0:00:28",
    ]
    f = StderrFilter(None, 2)
    assert [s for s in lines if f.keep(s)] == [lines[0], lines[7], lines[12]]


def test_quiet_means_quiet_balance_report_passes_included(tmp_path, capfd):
    """--quiet: nothing on stderr, not even balance's sub-pass lines (counts, report, contact
    sheet), which a run without it prints."""
    import numpy as np

    from ovpipe.core.hashing import text_hash

    src = tmp_path / "assigned"
    src.mkdir()
    for s in range(2):
        ids = [f"s{s}_{i}" for i in range(20)]
        pq.write_table(pa.table({
            "sample_id": ids, "sample_hash": pa.array([text_hash(i) for i in ids], pa.uint64()), "source": ["x"] * 20,
            "concept_ids": pa.FixedSizeListArray.from_arrays(pa.array(np.arange(60, dtype=np.int32) % 7), 3),
            "concept_scores": pa.FixedSizeListArray.from_arrays(pa.array(np.linspace(1, 0.1, 60, dtype=np.float32)), 3),
        }), str(src / f"p{s}.parquet"))
    local = ["--fraction", "0.5", "--set", "run.executor=local"]
    assert cli.main(["balance", "--input", str(src), "--output", str(tmp_path / "loud"), *local]) == 0
    assert "[balance: report counts]" in capfd.readouterr().err
    assert cli.main(["balance", "--input", str(src), "--output", str(tmp_path / "quiet"), "--quiet", *local]) == 0
    assert capfd.readouterr().err == ""


def test_run_checks_every_step_before_the_first_starts(tmp_path, capfd, monkeypatch, demo_raw):
    """`ovpipe run` with the default (MetaCLIP) weights and no network: refused before ingest runs
    (nothing is written), naming the flag; a missing raw input likewise."""
    monkeypatch.setattr(preflight, "_hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(preflight, "_cached_open_clip_weights", lambda: False)
    out = tmp_path / "out"
    rc, lines = _run(capfd, "run", "--input", str(demo_raw), "--output", str(out))
    _assert_one_error(rc, lines, "embed:", "--pretrained /path/to/checkpoint.pt")
    rc, lines = _run(capfd, "run", "--input", str(tmp_path / "missing"), "--output", str(out))
    _assert_one_error(rc, lines, "does not exist", "--input")
    assert not out.exists()


def test_run_with_dedup_on_assign_output_that_drops_embeddings_is_refused_first(tmp_path, capfd, demo_raw):
    """dedup compares embeddings; in `ovpipe run` it reads assign, which drops them by default."""
    out = tmp_path / "out"
    tiny = ["--set", 'embed.model="ovpipe-thumbnail"', "--set", 'embed.pretrained="random"']
    rc, lines = _run(capfd, "run", "--input", str(demo_raw), "--output", str(out), "--set", "dedup.enabled=true", *tiny)
    _assert_one_error(rc, lines, "dedup", "assign.keep_embedding=true")
    assert not out.exists()
