"""`ovpipe retry`: rows dropped for a transient reason are re-run through the stage's own code, and
the output ends byte-identical to a run that never failed (captioner outage, image paths that were
away, a retry killed part-way), with nothing else re-requested and the accounting intact."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from PIL import Image

from curation import readers
from curation.caption import CaptionStage
from curation.ingest import IngestStage
from ovpipe import cli
from ovpipe.config import load_config
from ovpipe.core.ledger import Ledger, read_ledger
from ovpipe.core.shards import Location, read_manifest_entries, read_table
from ovpipe.core.stage import ShardOutput, SinglePassStage, run_stage
from ovpipe.pipeline import run_pipeline
from ovpipe.retry import retry_stage
from ovpipe.testing.chat_server import ChatServer, default_reply
from tests.conftest import python_exe, subprocess_env

LOCAL = ["run.executor='local'"]
original_read_bounded = readers.read_bounded
SHARDS, ROWS = 3, 6


# ------------------------------------------------------------------------------ helpers


def png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (24 + seed % 5, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_raw(root: Path) -> Path:
    """Parquet shards of image paths (img2dataset-style path lists): SHARDS x ROWS distinct images,
    and one corrupt file (a non-transient drop)."""
    (root / "imgs").mkdir(parents=True)
    for s in range(SHARDS):
        paths = []
        for r in range(ROWS):
            name = f"imgs/{s}-{r}.png"
            (root / name).write_bytes(png(10 * s + r) if (s, r) != (0, 4) else b"\x89PNG\r\n\x1a\nnot really")
            paths.append(name)
        pq.write_table(pa.table({"image_path": paths, "caption": [f"t{s}{r}" for r in range(ROWS)]}),
                       root / f"part-{s}.parquet")
    return root


def ingest(raw: Path, out: Path, *extra: str):
    return run_stage(IngestStage(), str(raw), str(out), load_config(overrides=LOCAL + list(extra)), quiet=True)


def committed(out: Path) -> dict:
    """Every pass folder's committed shards: data bytes, ledger bytes, counts (not file names:
    a retried shard is a later generation of the same shard)."""
    found = {}
    for header in sorted(out.rglob("_manifest/_stage.json")):
        folder = header.parent.parent
        for name, e in read_manifest_entries(Location.parse(str(folder))).items():
            found[(str(folder.relative_to(out)), name)] = (
                (folder / e["output"]).read_bytes(), (folder / e["ledger"]).read_bytes() if e["ledger"] else None,
                e["input_rows"], e["kept_rows"], e["dropped_rows"], e["dropped_by_reason"])
    return found


def ledger_rows(out: Path) -> list[tuple]:
    df = read_ledger(Location.parse(str(out)))
    return sorted(df.select("locator", "stage", "reason", "detail").iter_rows())


class FlakyServer(ChatServer):
    """A chat server that answers HTTP 500 to every request of the samples in ``failing``."""

    def __init__(self, failing: set[str], **kw):
        super().__init__(**kw)
        self.failing = set(failing)

    async def _chat(self, request):
        key = request.headers.get("X-Request-Id", "").split("/", 1)[0]
        if key in self.failing:
            with self._lock:
                self.stats.requests += 1
                self.stats.per_sample[key] += 1
            return web.json_response({"error": {"message": "injected outage"}}, status=500)
        return await super()._chat(request)


def replies(short: set[str]):
    """The default captioner, but the samples in ``short`` get a caption the filter rejects."""
    def reply(body, key):
        return ("Cat.", "stop") if key in short else default_reply(body, key)
    return reply


def caption_overrides(url: str) -> list[str]:
    return LOCAL + ['caption.backend="openai"', 'caption.model="test-captioner"', f'caption.base_url="{url}"',
                    "caption.max_retries=1", "caption.backoff_base_s=0.01", "caption.backoff_max_s=0.02"]


def caption(inp: Path, out: Path, url: str):
    return run_stage(CaptionStage(), str(inp), str(out), load_config(overrides=caption_overrides(url)), quiet=True)


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict[str, Path]:
    """Raw path shards and their ingest output (every image there)."""
    root = tmp_path_factory.mktemp("retry")
    raw = make_raw(root / "raw")
    ingest(raw, root / "ingest")
    return {"raw": raw, "ingest": root / "ingest", "root": root}


def ids_by_shard(ingested: Path) -> list[list[str]]:
    entries = read_manifest_entries(Location.parse(str(ingested)))
    return [read_table(Location.parse(str(ingested / entries[n]["output"])))["sample_id"].to_pylist()
            for n in sorted(entries)]


# ------------------------------------------------------------------------------ caption


@pytest.fixture(scope="module")
def captioned(chain) -> dict:
    """A reference run against a captioner that never fails, and the same run against one that
    failed a known set of samples (in two shards): their rows are ledgered caption_request_failed."""
    shards = ids_by_shard(chain["ingest"])
    failing = {shards[0][1], shards[0][3], shards[2][0], shards[2][4]}
    short = {shards[1][2]}  # rejected by the caption filter: a non-transient drop
    root = chain["root"]
    with FlakyServer(set(), reply=replies(short)) as good:
        caption(chain["ingest"], root / "cap_good", good.base_url)
    with FlakyServer(failing, reply=replies(short)) as flaky:
        summary = caption(chain["ingest"], root / "cap_fail", flaky.base_url)
    assert summary.dropped_by_reason["caption_request_failed"] == len(failing)
    return {"good": root / "cap_good", "fail": root / "cap_fail", "failing": failing, "short": short}


def copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_caption_retry_equals_a_run_that_never_failed_and_requests_only_the_failed(captioned, tmp_path):
    out = copy_tree(captioned["fail"], tmp_path / "cap")
    assert committed(out) != committed(captioned["good"])
    with FlakyServer(set(), reply=replies(captioned["short"])) as server:  # the captioner at a new URL
        report = retry_stage(str(out), overrides=[f'caption.base_url="{server.base_url}"'], quiet=True)
        stats = server.stats
    # only the failed samples were asked again, once each; the rejected one (non-transient) was not
    assert set(stats.per_sample) == captioned["failing"] and stats.requests == len(captioned["failing"])
    assert report.by_reason == {"caption_request_failed": {"recovered": 4, "retried": 4, "still_failing": 0}}
    assert report.shards == 2
    # byte-identical to the run that never failed: both passes' data and ledgers, and data/ as a dataset
    assert committed(out) == committed(captioned["good"])
    assert pq.read_table(out / "data").equals(pq.read_table(captioned["good"] / "data"))
    assert ledger_rows(out) == ledger_rows(captioned["good"])
    summary = json.loads((out / "_manifest" / "_summary.json").read_text())
    assert summary["input_rows"] == summary["kept_rows"] + summary["dropped_rows"]
    assert summary["dropped_by_reason"] == {"caption_too_short": 1}
    assert summary["retried_by_reason"] == {"caption_request_failed": {"recovered": 4, "retried": 4,
                                                                       "still_failing": 0}}
    printed = io.StringIO()
    with redirect_stdout(printed):
        assert cli.main(["ledger", str(out)]) == 0
    assert "caption_request_failed" in printed.getvalue() and "still_failing" in printed.getvalue()
    # a second retry finds nothing left and changes nothing
    before = committed(out)
    assert retry_stage(str(out), quiet=True).shards == 0 and committed(out) == before


def test_non_transient_reasons_are_retried_only_when_named(captioned, tmp_path):
    out = copy_tree(captioned["fail"], tmp_path / "cap")
    with FlakyServer(captioned["failing"], reply=replies(captioned["short"])) as server:  # still down
        report = retry_stage(str(out), overrides=[f'caption.base_url="{server.base_url}"'], limit=3, quiet=True)
        assert captioned["short"].isdisjoint(server.stats.per_sample)  # caption_too_short: not transient
        assert len(server.stats.per_sample) == 3  # --limit 3
        assert report.by_reason == {"caption_request_failed": {"recovered": 0, "retried": 3, "still_failing": 3}}
        server.reset_stats()
        named = retry_stage(str(out), reasons=["caption_too_short"],
                            overrides=[f'caption.base_url="{server.base_url}"'], quiet=True)
        assert set(server.stats.per_sample) == captioned["short"]  # named: asked again (and rejected again)
    assert named.by_reason == {"caption_too_short": {"recovered": 0, "retried": 1, "still_failing": 1}}
    entries = read_manifest_entries(Location.parse(str(out / "_captions")))
    assert sum(e["dropped_rows"] for e in entries.values()) == 5  # still 4 failed + 1 rejected
    assert all(e["input_rows"] == e["kept_rows"] + e["dropped_rows"] for e in entries.values())


def test_a_changed_output_setting_is_refused(captioned, tmp_path):
    out = copy_tree(captioned["fail"], tmp_path / "cap")
    with pytest.raises(RuntimeError, match="settings that wrote them"):
        retry_stage(str(out), overrides=['caption.model="another-captioner"'], quiet=True)
    assert committed(out) == committed(captioned["fail"])


def test_sigkill_during_retry_then_retry_again_is_identical(captioned, tmp_path):
    out = copy_tree(captioned["fail"], tmp_path / "cap")
    before = committed(out)
    pid_file = tmp_path / "pids"
    with FlakyServer(set(), reply=replies(captioned["short"])) as server:
        cmd = [python_exe(), "-m", "ovpipe.cli", "retry", str(out), "--quiet",
               "--set", f'caption.base_url="{server.base_url}"']
        env = subprocess_env(OVPIPE_FAULT_PID_FILE=str(pid_file), OVPIPE_FAULT_SHARD_DELAY_S="1.5")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        # the second line: shard 1 is committed, shard 2's new generation written but not committed
        while time.monotonic() < deadline and (not pid_file.exists() or len(pid_file.read_text().splitlines()) < 2):
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        mid = committed(out)
        # every shard is as it was or retried, never a mix: one retried, the other untouched
        changed = {k for k in mid if mid[k] != before[k]}
        assert len(changed) == 1 and list(changed)[0][0] == "_captions"
        assert all(v[2] == v[3] + v[4] for v in mid.values())
        assert (out / "_captions" / "_manifest" / "_retry_pending.json").exists()
        retry_stage(str(out), overrides=[f'caption.base_url="{server.base_url}"'], quiet=True)
    assert committed(out) == committed(captioned["good"])
    assert pq.read_table(out / "_captions" / "data").num_rows == pq.read_table(captioned["good"] / "_captions" / "data").num_rows
    assert not (out / "_captions" / "_manifest" / "_retry_pending.json").exists()


# ------------------------------------------------------------------------------ ingest + downstream


class CopyRows(SinglePassStage):
    """A downstream stage: keeps every row (sample_id, input_row) of its input shard."""

    name = "copy_rows"
    config_sections = ("run",)

    def process(self, task):
        table = read_table(task.input, columns=["sample_id", "input_row"])
        return ShardOutput(table, Ledger(self.name), table.num_rows)


def test_unreachable_image_paths_that_reappear(chain, tmp_path, monkeypatch):
    raw = copy_tree(chain["raw"], tmp_path / "raw")
    away = [raw / "imgs" / "0-1.png", raw / "imgs" / "2-0.png", raw / "imgs" / "2-5.png"]
    for p in away:
        p.rename(p.with_suffix(".away"))
    out = tmp_path / "ingest"
    summary = ingest(raw, out)
    assert summary.dropped_by_reason == {"truncated_image": 1, "unreadable_path": 3}
    down = tmp_path / "down"
    run_stage(CopyRows(), str(out), str(down), load_config(overrides=LOCAL), quiet=True)
    untouched = (out / "_manifest" / "part-1.json").read_text()
    for p in away:
        p.with_suffix(".away").rename(p)
    read = []  # every image file the retry opens
    monkeypatch.setattr(readers, "read_bounded", lambda target, limit: read.append(target.path) or
                        original_read_bounded(target, limit))
    report = retry_stage(str(out), quiet=True)
    monkeypatch.undo()
    assert sorted(read) == sorted(str(p) for p in away)  # nothing else was read again
    assert report.by_reason == {"unreadable_path": {"recovered": 3, "retried": 3, "still_failing": 0}}
    # identical to the ingest of a run where every image was there; the corrupt image stays ledgered
    ref = tmp_path / "ref"
    ingest(raw, ref)
    assert committed(out) == committed(ref)
    assert ledger_rows(out) == ledger_rows(ref)
    assert [r[2] for r in ledger_rows(out)] == ["truncated_image"]
    assert (out / "_manifest" / "part-1.json").read_text() == untouched  # no retryable row: not recommitted
    # downstream sees the changed input and redoes only the two affected shards
    after = run_stage(CopyRows(), str(out), str(down), load_config(overrides=LOCAL), quiet=True)
    assert after.shards_skipped == 1 and after.kept_rows == summary.kept_rows + 3
    reference = tmp_path / "down_ref"
    run_stage(CopyRows(), str(ref), str(reference), load_config(overrides=LOCAL), quiet=True)
    assert committed(down) == committed(reference)


def test_pipeline_retry_then_continue(chain, tmp_path):
    raw = copy_tree(chain["raw"], tmp_path / "raw")
    away = raw / "imgs" / "1-3.png"
    away.rename(away.with_suffix(".away"))
    cfg = load_config(overrides=LOCAL)
    run_pipeline(str(raw), str(tmp_path / "o"), cfg, steps=["ingest"], run_id="r1")
    away.with_suffix(".away").rename(away)
    manifest = run_pipeline(str(raw), str(tmp_path / "o"), cfg, steps=["ingest"], run_id="r1", retry=True)
    assert manifest["stages"][0]["retried_this_run"] == {"unreadable_path": {"recovered": 1, "retried": 1,
                                                                             "still_failing": 0}}
    ingest(raw, tmp_path / "ref")
    assert committed(tmp_path / "o" / "ingest") == committed(tmp_path / "ref")


def test_a_recovered_image_already_kept_elsewhere_is_a_duplicate(tmp_path):
    raw = make_raw(tmp_path / "raw")
    (raw / "imgs" / "1-0.png").write_bytes((raw / "imgs" / "2-2.png").read_bytes())  # same bytes
    away = raw / "imgs" / "1-0.png"
    away.rename(away.with_suffix(".away"))
    ingest(raw, tmp_path / "out")
    away.with_suffix(".away").rename(away)
    report = retry_stage(str(tmp_path / "out"), quiet=True)
    assert report.by_reason == {"unreadable_path": {"recovered": 0, "retried": 1, "still_failing": 1}}
    dup = [r for r in ledger_rows(tmp_path / "out") if r[2] == "duplicate"]
    assert len(dup) == 1 and dup[0][0].endswith("part-1.parquet#row=0") and "part-2.parquet row 2" in dup[0][3]


# ------------------------------------------------------------------------------ img2dataset sidecar


def test_img2dataset_webdataset_failures_from_the_sidecar_are_ledgered_with_their_url(tmp_path):
    import tarfile

    raw = tmp_path / "raw"
    raw.mkdir()
    with tarfile.open(raw / "00000.tar", "w") as tar:
        for key, seed in (("000000000", 1), ("000000002", 2)):
            data = png(seed)
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({
        "key": ["000000000", "000000001", "000000002", "000000003"],
        "url": ["http://h/0.jpg", "http://h/1.jpg", "http://h/2.jpg", "http://h/3.jpg"],
        "status": ["success", "failed_to_download", "success", "failed_to_resize"],
        "error_message": [None, "HTTP Error 404: Not Found", None, "image too small"],
    }), raw / "00000.parquet")
    summary = ingest(raw, tmp_path / "out")
    assert summary.input_rows == 4 and summary.kept_rows == 2
    assert summary.dropped_by_reason == {"missing_image": 2}
    ledger = read_ledger(Location.parse(str(tmp_path / "out")))
    details = ledger["detail"].to_list()
    assert "failed_to_download" in details[0] and "404" in details[0] and details[0].endswith("url=http://h/1.jpg")
    assert "failed_to_resize" in details[1] and details[1].endswith("url=http://h/3.jpg")
    # the failed URLs, handed back to the downloader
    urls = ledger["detail"].str.extract(r"url=(\S+)$").to_list()
    assert urls == ["http://h/1.jpg", "http://h/3.jpg"]
    assert [loc.rsplit("#", 1)[1] for loc in ledger["locator"].to_list()] == ["row=1", "row=3"]


def test_sidecar_rows_of_a_tar_are_not_retryable(tmp_path):
    """--reasons missing_image on a tar shard: its ledger names sidecar rows and members, not the
    shard's rows, so the shard is reported and left as it is."""
    import tarfile

    raw = tmp_path / "raw"
    raw.mkdir()
    with tarfile.open(raw / "00000.tar", "w") as tar:
        data = png(3)
        info = tarfile.TarInfo("000000000.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"key": ["000000000", "000000001"], "url": ["http://h/0", "http://h/1"],
                             "status": ["success", "failed_to_download"], "error_message": [None, "timeout"]}),
                   raw / "00000.parquet")
    ingest(raw, tmp_path / "out")
    before = committed(tmp_path / "out")
    report = retry_stage(str(tmp_path / "out"), reasons=["missing_image"], quiet=True)
    assert report.shards == 0 and "not retryable" in report.skipped["00000"]
    assert committed(tmp_path / "out") == before


def test_embed_retry_of_images_that_were_away(chain, tmp_path):
    from curation.embed import EmbedStage
    from tests.helpers import TINY_EMBED

    raw = copy_tree(chain["raw"], tmp_path / "raw")
    ingest(raw, tmp_path / "ingest")
    overrides = LOCAL + TINY_EMBED
    run_stage(EmbedStage(), str(tmp_path / "ingest"), str(tmp_path / "ref"), load_config(overrides=overrides), quiet=True)
    away = [raw / "imgs" / "1-2.png", raw / "imgs" / "2-3.png"]
    for p in away:
        p.rename(p.with_suffix(".away"))
    summary = run_stage(EmbedStage(), str(tmp_path / "ingest"), str(tmp_path / "emb"), load_config(overrides=overrides),
                        quiet=True)
    assert summary.dropped_by_reason == {"image_not_found": 2}
    for p in away:
        p.with_suffix(".away").rename(p)
    report = retry_stage(str(tmp_path / "emb"), quiet=True)
    assert report.by_reason == {"image_not_found": {"recovered": 2, "retried": 2, "still_failing": 0}}
    assert committed(tmp_path / "emb") == committed(tmp_path / "ref")


def test_wrong_stage_or_limit_is_a_clear_error_before_anything_runs(chain):
    """--stage that did not write OUTPUT, and a negative --limit, are refused with what to pass."""
    out = str(chain["ingest"])
    before = read_manifest_entries(Location.parse(out))
    with pytest.raises(ValueError, match="written by pass 'ingest', not by stage 'embed'"):
        retry_stage(out, stage="embed", reasons=["unreadable_path"])
    with pytest.raises(ValueError, match="--limit -1"):
        retry_stage(out, limit=-1)
    assert read_manifest_entries(Location.parse(out)) == before
