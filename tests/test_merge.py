"""The merge stage (curation/merge.py): three small sources in the three formats with planted
duplicates of each kind (and look-alikes that are not duplicates) and invalid records; every sample
kept or ledgered with the right reason; byte-identical across worker counts and after SIGKILL +
resume; the mixture's shares; images stored once (OUT/images/) and resolved by `ovpipe pack` as
packing the same rows with inline images does; the merged output packed and trained on (phase 2)."""

from __future__ import annotations

import base64
import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import xxhash

from curation.merge import IMAGE_SCHEMA, MERGED_SCHEMA, MergeStage, copies_of, mixture_rates, normalise_text
from curation.merge_readers import parse_source
from ovpipe.config import load_config
from ovpipe.core.ledger import read_ledger
from ovpipe.core.shards import Location, list_input_shards, read_manifest_entries
from tests.conftest import REPO, python_exe, sigkill_after_commits, subprocess_env
from tests.helpers import data_files, png

I = {k: png(k, 40 + 8 * k, 36 + 4 * k) for k in range(1, 8)}  # distinct small images
NEAR_Q = ("Please describe the scene shown in this picture in as much detail as you can, including the people, "
          "the objects on the table, the weather outside and the colors of the walls.")


def _conv(*turns: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]


def make_sources(root: Path) -> tuple[list[str], dict[str, str | None]]:
    """Three sources; returns (--input specs, {origin suffix: expected ledger reason or None = kept})."""
    llava, fv, oai = root / "llava", root / "fv", root / "oai"
    (llava / "imgs").mkdir(parents=True)
    for k in (1, 2, 3, 4, 5, 6):
        (llava / "imgs" / f"i{k}.png").write_bytes(I[k])
    fv.mkdir()
    (oai / "pics").mkdir(parents=True)
    (oai / "pics" / "i6.png").write_bytes(I[6])
    expect: dict[str, str | None] = {}

    a = [  # LLaVA JSONL (rank 0: wins every cross-source duplicate)
        ({"image": "imgs/i1.png", "conversations": _conv("<image>\nWhat color is the car?", "Red.")}, None),
        ({"image": "imgs/i2.png", "conversations": _conv("<image>\nHow many dogs?", "Two.")}, None),
        ({"image": "imgs/i1.png", "conversations": _conv("<image>\nWhere is the car parked?", "On a street.")}, None),
        ({"image": "imgs/i3.png", "conversations": _conv("<image>\nWhat color is the car?", "Blue.")}, None),
        ({"image": "imgs/i4.png", "conversations": _conv("<image>\n" + NEAR_Q, "A kitchen with two people.")}, None),
        ({"image": "imgs/i1.png", "conversations": _conv("<image>\n<image>\nWhat is this?", "A car.")},
         "image_count_mismatch"),
        ({"image": "imgs/nope.png", "conversations": _conv("<image>\nWhat?", "x")}, "missing_image"),
        ({"image": "imgs/i2.png", "conversations": _conv("<image>\nWhat?", "  ")}, "empty_turn"),
        ({"image": "imgs/i2.png", "conversations": [{"from": "human", "value": "<image>\nA?"},
                                                    {"from": "human", "value": "B?"}]}, "non_alternating"),
        (None, "bad_encoding"),  # a line of Latin-1 bytes
        ({"image": "imgs/i1.png", "conversations": _conv("<image>\nWhat color is the car?", "Red.")},
         "duplicate_sample"),  # same bytes as row 0, later row
        ({"images": ["imgs/i5.png", "imgs/i6.png"], "conversations": _conv(
            "<image>\n<image>\nWhich picture is brighter?", "The second.", "And which is larger?", "The first.")},
         None),  # multi-image, multi-turn
        ({"conversations": _conv("What is 2+2?", "4")}, None),
        ({"image": "imgs/i1.png", "conversations": _conv("<image>\nIs it daytime?", "Yes.")},
         None),  # a third kept question about i1: the image is stored once
    ]
    lines = []
    for row, (rec, reason) in enumerate(a):
        lines.append(b"{\"conversations\": [{\"from\": \"human\", \"value\": \"caf\xe9\"}]}" if rec is None
                     else json.dumps(rec).encode())
        expect[f"llava/part-0.jsonl#row={row}"] = reason
    (llava / "part-0.jsonl").write_bytes(b"\n".join(lines) + b"\n")

    def fv_img(k):
        return [{"bytes": I[k], "path": f"i{k}.png"}]

    b = [  # FineVision layout (rank 1)
        (fv_img(1), [{"user": "WHAT color is   the car?", "assistant": "red."}], None, "duplicate_sample"),
        (fv_img(2), [{"user": "How many dogs?", "assistant": "There are two dogs."}], None, "duplicate_question"),
        (fv_img(2), [{"user": "How many cats?", "assistant": "None."}], "counting", None),
        (fv_img(3), [{"user": "Is it raining?", "assistant": "No."},
                     {"user": "Is it night?", "assistant": "Yes."}], None, None),
        (fv_img(3), [{"user": "", "assistant": "x"}], None, "empty_turn"),
    ]
    pq.write_table(pa.table({
        "images": [r[0] for r in b], "texts": [r[1] for r in b], "category": [r[2] for r in b]}),
        fv / "train-00000.parquet")
    for row, r in enumerate(b):
        expect[f"fv/train-00000.parquet#row={row}"] = r[3]

    def data_url(k):
        return "data:image/png;base64," + base64.b64encode(I[k]).decode()

    def msg(role, *parts):
        return {"role": role, "content": list(parts) if len(parts) != 1 or not isinstance(parts[0], str) else parts[0]}

    text = lambda s: {"type": "text", "text": s}  # noqa: E731
    url = lambda u: {"type": "image_url", "image_url": {"url": u}}  # noqa: E731
    c = [  # OpenAI messages (rank 2), messages as JSON text
        ([msg("user", url(data_url(4)), text(NEAR_Q.replace("weather outside", "weather outdoors"))),
          msg("assistant", "Two people cooking.")], None, "near_duplicate_question"),
        ([msg("user", "<image>\nhow many dogs?"), msg("assistant", "2")], [I[2]], "duplicate_question"),
        ([msg("user", "What is 2-2?"), msg("assistant", "0")], None, None),  # not 2+2: punctuation counts
        ([msg("user", url("pics/i6.png"), text("What is in the corner?")), msg("assistant", "A lamp.")], None, None),
        ([msg("system", "Be brief."), msg("user", url(data_url(5)), text("Which season?")),
          msg("assistant", "Winter.")], None, None),
        ([msg("user", url("pics/gone.png"), text("What?")), msg("assistant", "x")], None, "missing_image"),
        ([msg("user", url(data_url(7)), text("What color is the car?")), msg("assistant", "Red.")], None, None),
    ]
    pq.write_table(pa.table({"messages": [json.dumps(r[0]) for r in c], "images": [r[1] or [] for r in c]},
                            schema=pa.schema([("messages", pa.string()), ("images", pa.list_(pa.binary()))])),
                   oai / "chat.parquet")
    for row, r in enumerate(c):
        expect[f"oai/chat.parquet#row={row}"] = r[2]
    return [f"llava={llava}", f"fv={fv}", str(oai)], expect


SETS = ["merge.near_dup_threshold=0.7", "merge.partitions=4", "merge.image_partitions=3",
        'merge.categories={llava = "general", fv = "ocr"}',
        "pack.min_pixels=784", "pack.max_pixels=18816"]


def _cfg(*extra: str, local: bool = True):
    return load_config(overrides=SETS + (["run.executor=local"] if local else []) + list(extra))


def _outcome(out: Path) -> dict[str, str | None]:
    """origin (relative to the sources' root) -> ledger reason, None = in the output."""
    root = str(out.parent / "src") + "/"
    got: dict[str, str | None] = {}
    for shard in list_input_shards(Location.parse(str(out))):
        for o in pq.read_table(shard.path, columns=["origin"]).column("origin").to_pylist():
            got[o.removeprefix(root)] = None
    for r in read_ledger(Location.parse(str(out))).iter_rows(named=True):
        got[r["locator"].removeprefix(root)] = r["reason"]
    return got


def _rows(out: Path) -> list[dict]:
    return [r for shard in list_input_shards(Location.parse(str(out))) for r in pq.read_table(shard.path).to_pylist()]


def _store(out: Path) -> pa.Table:
    """Every row of the image store OUT/images/, read through its manifest."""
    store = Location.parse(str(out / "images"))
    return pa.concat_tables([pq.read_table(store.join(e["output"]).path)
                             for _, e in sorted(read_manifest_entries(store).items())])


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    specs, expect = make_sources(root / "src")
    out = root / "out"
    summary = MergeStage().run(specs, str(out), _cfg(f"merge.sources={json.dumps(specs)}"), quiet=True)
    return out, specs, expect, summary


def test_every_sample_kept_or_ledgered_with_its_reason(merged):
    out, _, expect, summary = merged
    assert _outcome(out) == expect
    assert summary.input_rows == len(expect) == summary.kept_rows + summary.dropped_rows
    ledger = read_ledger(Location.parse(str(out))).filter(pl.col("stage") == "merge_dedup")
    kept = {r["sample_id"]: r for shard in list_input_shards(Location.parse(str(out)))
            for r in pq.read_table(shard.path).to_pylist()}
    for r in ledger.iter_rows(named=True):  # the kept sample is named, with its source, and is in the output
        kept_id = r["detail"].split("kept sample ")[1].split()[0]
        assert kept_id in kept and f"of source {kept[kept_id]['source']}" in r["detail"], r
    dog = next(r for r in ledger.iter_rows(named=True) if r["locator"].endswith("oai/chat.parquet#row=1"))
    assert "of source llava" in dog["detail"]  # the three-way question duplicate keeps the first source's


def test_output_is_the_conversation_schema_pack_reads(merged):
    out, *_ = merged
    rows = _rows(out)
    assert pq.read_schema(list_input_shards(Location.parse(str(out)))[0].path).remove_metadata() == MERGED_SCHEMA
    images = dict(zip(*(_store(out).column(c).to_pylist() for c in ("image_id", "bytes"))))
    multi = next(r for r in rows if "brighter" in r["conversations"][0]["value"])
    assert len(multi["image_ids"]) == 2 and len(multi["conversations"]) == 4 and images[multi["image_ids"][0]] == I[5]
    cats = {r["origin"].split("/src/")[1]: r["category"] for r in rows}
    assert cats["fv/train-00000.parquet#row=2"] == "counting"  # the row's column overrides
    assert cats["fv/train-00000.parquet#row=3"] == "ocr" and cats["llava/part-0.jsonl#row=0"] == "general"
    assert cats["oai/chat.parquet#row=2"] == "oai"  # neither: the source name
    fv = next(r for r in rows if r["origin"].endswith("fv/train-00000.parquet#row=3"))
    assert fv["conversations"][0]["value"].startswith("<image>\nIs it raining?")
    system = next(r for r in rows if r["origin"].endswith("oai/chat.parquet#row=4"))
    assert [t["from"] for t in system["conversations"]] == ["system", "human", "gpt"]
    assert all(r["length_tokens"] > 0 and r["repeats"] == 1 for r in rows)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["sources"]["fv"]["duplicate_question"] == 1 and report["sources"]["llava"]["bad_encoding"] == 1
    assert (out / "merge_report.png").stat().st_size > 0


def test_an_image_shared_by_three_samples_is_stored_once(merged):
    out, *_ = merged
    rows, store = _rows(out), _store(out)
    assert store.schema.remove_metadata() == IMAGE_SCHEMA
    ids = store.column("image_id").to_pylist()
    i1 = xxhash.xxh3_64_hexdigest(I[1])
    assert sum(i1 in r["image_ids"] for r in rows) == 3 and ids.count(i1) == 1
    assert sorted(ids) == sorted({i for r in rows for i in r["image_ids"]})  # each named image once, no other
    assert dict(zip(ids, store.column("bytes").to_pylist()))[i1] == I[1]
    entries = read_manifest_entries(Location.parse(str(out / "images")))
    assert len(entries) == 3
    for e in entries.values():  # hash-partitioned, sorted by id
        part = pq.read_table(out / "images" / e["output"]).column("image_id").to_pylist()
        assert part == sorted(part) and all(int(i, 16) % e["partitions"] == e["partition"] for i in part)
    assert all(p.name.startswith("part-") and p.suffix == ".parquet" for p in (out / "data").iterdir())
    report = json.loads((out / "merge_report.json").read_text())["images"]
    assert report["stored"] == len(ids) < report["references"] == sum(len(r["image_ids"]) for r in rows)


def test_a_merge_output_is_a_merge_source(merged, tmp_path):
    """Its rows name their images by id: the reader takes the bytes from its image store."""
    out, *_ = merged
    again = tmp_path / "again"
    cfg = load_config(overrides=[f"merge.sources={json.dumps([f'merged={out}'])}", "merge.count_tokens=false",
                                 "merge.image_partitions=3", "run.executor=local"])
    MergeStage().run(None, str(again), cfg, quiet=True)
    key = lambda rows: sorted((r["sample_id"], r["category"], tuple(r["image_ids"])) for r in rows)  # noqa: E731
    assert key(_rows(again)) == key(_rows(out))
    assert _store(again).equals(_store(out))


def _packs(out: Path) -> list[dict]:
    rows = [r for s in list_input_shards(Location.parse(str(out))) for r in pq.read_table(s.path).to_pylist()]
    return sorted(rows, key=lambda r: r["pack_id"])


def test_pack_reads_the_image_store_as_it_reads_inline_images(merged, tmp_path):
    """`ovpipe pack` on the merge output == on the same rows with their images inline; an id the
    store lacks is a ledger row."""
    from packing.stage import PackStage

    out, *_ = merged
    images = dict(zip(*(_store(out).column(c).to_pylist() for c in ("image_id", "bytes"))))
    inline = tmp_path / "inline"
    inline.mkdir()
    for shard in list_input_shards(Location.parse(str(out))):
        t = pq.read_table(shard.path)
        col = pa.array([[images[i] for i in ids] for ids in t.column("image_ids").to_pylist()], pa.list_(pa.binary()))
        pq.write_table(t.drop_columns(["image_ids"]).append_column("images", col), inline / Path(shard.path).name)
    cfg = _cfg("pack.buckets=2", "pack.plot=false")
    got = PackStage().run(str(out), str(tmp_path / "store"), cfg, quiet=True)
    want = PackStage().run(str(inline), str(tmp_path / "inline_packs"), cfg, quiet=True)
    assert got.kept_rows == want.kept_rows == len(_rows(out)) and got.dropped_rows == 0
    packs = _packs(tmp_path / "store")
    assert packs == _packs(tmp_path / "inline_packs") and sum(len(p["images"]) for p in packs) > len(images)

    lacking = tmp_path / "lacking"  # the store without I[1]: its three samples are ledgered, the rest packed
    shutil.copytree(out, lacking)
    i1 = xxhash.xxh3_64_hexdigest(I[1])
    for f in (lacking / "images" / "data").iterdir():
        t = pq.read_table(f)
        pq.write_table(t.filter(pc.not_equal(t.column("image_id"), i1)), f)
    summary = PackStage().run(str(lacking), str(tmp_path / "lacking_packs"), cfg, quiet=True)
    assert summary.dropped_by_reason == {"missing_image": 3} and summary.kept_rows == got.kept_rows - 3


def test_byte_identical_across_worker_counts(ray_address, merged, tmp_path):
    out, specs, *_ = merged
    sets = [f"merge.sources={json.dumps(specs)}"]
    MergeStage().run(None, str(tmp_path / "w1"), _cfg(*sets, "run.workers=1", local=False), quiet=True)
    MergeStage().run(None, str(tmp_path / "w3"), _cfg(*sets, "run.workers=3", local=False), quiet=True)
    want = data_files(out)
    assert data_files(tmp_path / "w1") == want and data_files(tmp_path / "w3") == want
    assert (tmp_path / "w3" / "merge_report.json").read_text() == (out / "merge_report.json").read_text()


def test_sigkill_and_resume_equals_uninterrupted(merged, tmp_path):
    out, specs, *_ = merged
    run = tmp_path / "killed"
    cmd = [python_exe(), "-m", "ovpipe.cli", "merge", *sum((["--input", s] for s in specs), []), "--output", str(run),
           *sum((["--set", s] for s in SETS + ["run.executor=local"]), [])]
    env = subprocess_env(OVPIPE_FAULT_SHARD_DELAY_S="0.5")
    committed = sigkill_after_commits(cmd, env, run / "_dedup" / "_manifest", at_least=1)
    assert 1 <= len(committed) < 4
    env.pop("OVPIPE_FAULT_SHARD_DELAY_S")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert data_files(run) == data_files(out)


def test_sources_and_mixture_rules():
    assert parse_source("fv=/data/x") == ("fv", "/data/x")
    assert parse_source("/data/llava_665k.json") == ("llava_665k", "/data/llava_665k.json")
    assert parse_source("s3://b/k=1/part") == ("part", "s3://b/k=1/part")
    assert normalise_text("<image>\n What  IS ２+2 ?") == "what is 2+2 ?"
    m = load_config(overrides=['merge.mixture={a = 0.5, b = 0.25, c = 0.25}']).merge
    rates, plan = mixture_rates({"a": 1000, "b": 100, "c": 600, "d": 50}, m)
    assert plan["total"] == 400 and rates["a"] == 0.2 and rates["b"] == 1.0 and rates["d"] == 0
    up = load_config(overrides=['merge.mixture={a = 0.5, b = 0.5}', "merge.total=1000", "merge.max_repeat=3"]).merge
    rates, plan = mixture_rates({"a": 1000, "b": 100}, up)
    assert rates == {"a": 0.5, "b": 3.0} and plan["capped"] == ["b"]


def test_hash_sampling_meets_shares_within_one_percent_on_100k():
    """The sampling rule itself, vectorised, on 120K samples of four skewed categories, with
    down- and capped up-sampling; deterministic per seed."""
    rng = np.random.default_rng(0)
    cats = rng.choice(4, size=120_000, p=[0.6, 0.25, 0.1, 0.05])
    hashes = rng.integers(0, 2**63, size=len(cats), dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    counts = {str(c): int((cats == c).sum()) for c in range(4)}
    m = load_config(overrides=['merge.mixture={"0" = 0.3, "1" = 0.3, "2" = 0.2, "3" = 0.2}', "merge.total=100000",
                               "merge.max_repeat=4"]).merge
    rates, plan = mixture_rates(counts, m)
    copies = copies_of(hashes, np.array([rates[str(c)] for c in cats]), seed=3)
    got = {str(c): copies[cats == c].sum() / copies.sum() for c in range(4)}
    assert all(abs(got[g] - plan["targets"][g]) < 0.01 for g in got), got
    assert copies.max() <= 4 and (copies > 1).any() and (copies == 0).any()
    assert np.array_equal(copies, copies_of(hashes, np.array([rates[str(c)] for c in cats]), seed=3))
    assert not np.array_equal(copies, copies_of(hashes, np.array([rates[str(c)] for c in cats]), seed=4))


@pytest.mark.slow
def test_mixture_on_100k_synthetic_samples_through_the_stage(tmp_path):
    """>= 100K synthetic text samples in two sources through the whole stage: achieved category
    shares within 1 % of the targets; repeats recorded; the report's PNG."""
    rng = np.random.default_rng(1)
    n = 110_000
    cats = rng.choice(["chart", "ocr", "math", "science"], size=n, p=[0.55, 0.3, 0.1, 0.05])
    for k, part in enumerate((slice(0, n // 2), slice(n // 2, n))):
        idx = np.arange(n)[part]
        pq.write_table(pa.table({
            "texts": [[{"user": f"Question {i}?", "assistant": f"Answer {i}."}] for i in idx],
            "images": [[] for _ in idx], "category": cats[part].tolist()}), tmp_path / f"s{k}.parquet")
    sources = [str(tmp_path / "s0.parquet"), str(tmp_path / "s1.parquet")]
    cfg = load_config(overrides=[f"merge.sources={json.dumps(sources)}",
                                 'merge.mixture={chart = 0.3, ocr = 0.3, math = 0.25, science = 0.15}',
                                 "merge.total=100000", "merge.max_repeat=4", "merge.count_tokens=false",
                                 "merge.partitions=4", "run.executor=local"])
    out = tmp_path / "out"
    s = MergeStage().run(None, str(out), cfg, quiet=True)
    assert s.input_rows == n
    report = json.loads((out / "merge_report.json").read_text())
    achieved, targets = report["mixture"]["achieved"], report["mixture"]["targets"]
    assert report["mixture"]["rows"] >= 99_000
    assert all(abs(achieved[g] - targets[g]) < 0.01 for g in targets), (achieved, targets)
    assert report["mixture"]["samples_repeated"] > 0 and (out / "merge_report.png").stat().st_size > 0
    rows = pl.read_parquet(str(out / "data"))
    assert rows["copy"].max() + 1 == math.ceil(max(report["mixture"]["rates"].values())) == 3
    per_sample = rows.group_by("sample_id").agg(pl.len().alias("n"), pl.col("repeats").first())
    assert (per_sample["n"] == per_sample["repeats"]).all()  # repeats = the rows of the sample


def test_cli_repeated_input_and_clear_errors(merged, tmp_path):
    _, specs, *_ = merged
    r = subprocess.run([python_exe(), "-m", "ovpipe.cli", "merge", "--output", str(tmp_path / "o")],
                       env=subprocess_env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2 and "merge needs sources" in r.stderr
    r = subprocess.run([python_exe(), "-m", "ovpipe.cli", "merge", "--input", specs[0], "--input", specs[0],
                        "--output", str(tmp_path / "o")], env=subprocess_env(), capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    assert r.returncode == 2 and "named twice" in r.stderr


@pytest.mark.slow
def test_pack_and_phase_2_training_on_the_merged_output(merged, tmp_path):
    """`ovpipe merge` -> `ovpipe pack` -> `ovpipe train --phase 1` (the init) -> `--phase 2`."""
    out, *_ = merged
    env = subprocess_env(OMP_NUM_THREADS="1")

    def cli(*args):
        r = subprocess.run([python_exe(), "-m", "ovpipe.cli", *args], env=env, capture_output=True, text=True,
                           timeout=900, cwd=REPO)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        return r

    def pack(folder, *extra):
        cli("pack", "--input", str(out), "--output", str(folder), "--max-len", "1024", "--set", "run.executor=local",
            "--set", "pack.min_pixels=784", "--set", "pack.max_pixels=18816", "--set", "pack.buckets=2", *extra)

    packs = tmp_path / "packs"
    pack(packs)
    stats = json.loads((packs / "pack_stats.json").read_text())
    kept = sum(pq.read_metadata(p.path).num_rows for p in list_input_shards(Location.parse(str(out))))
    assert stats["samples"] == kept
    pack(tmp_path / "packs_last", "--set", "pack.loss_on=last")  # phase 1 trains on the last answer only
    common = ["--set", "train.steps=1", "--set", "train.lr=0.001", "--nproc-per-node", "1"]
    cli("train", "--input", str(tmp_path / "packs_last"), "--output", str(tmp_path / "p1"), "--phase", "1", *common)
    cli("train", "--input", str(packs), "--output", str(tmp_path / "p2"), "--phase", "2", *common,
        "--set", f'train.init_from="{tmp_path / "p1"}"')
    assert json.loads((tmp_path / "p2" / "summary.json").read_text())["phase"] == "2"


def test_pipeline_runs_merge_then_pack(merged, tmp_path):
    """A stage-2 `ovpipe run`: merge is optional (on when merge.sources is set), pack reads it."""
    from ovpipe.pipeline import default_steps, run_pipeline

    _, specs, *_ = merged
    cfg = _cfg(f"merge.sources={json.dumps(specs)}", "pack.buckets=2", "pack.plot=false", "merge.plot=false")
    assert "merge" in default_steps(cfg) and "merge" not in default_steps(_cfg())
    manifest = run_pipeline(specs[0].split("=", 1)[1], str(tmp_path / "run"), cfg, run_id="s2",
                            steps=["merge", "pack"])
    stages = {s["stage"]: s for s in manifest["stages"]}
    assert stages["pack"]["input_rows"] == stages["merge"]["kept_rows"] > 0


def test_parquet_text_that_is_not_utf8_is_one_ledger_row(tmp_path):
    from curation.merge_readers import Limits, read_records

    good = json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]).encode()
    bad = b'[{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "x"}]'
    pq.write_table(pa.table({"messages": pa.array([good, bad, good], pa.binary()).view(pa.string())}),
                   tmp_path / "m.parquet")
    recs = list(read_records(Location.parse(str(tmp_path / "m.parquet")), Location.parse(str(tmp_path)),
                             Limits(4, 10**6, 10**6)))
    assert [r.error.reason if r.error else None for r in recs] == [None, "bad_encoding", None]
    assert recs[2].turns == [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]


# ------------------------------------------------------------------------------ bounded memory, intermediates


def test_json_sources_are_streamed_a_record_at_a_time(tmp_path, monkeypatch):
    """A .json list and a .jsonl file are read through a small buffer: the peak of Python memory
    while reading stays far under the file, and the records are exactly json.load's (a record with
    bytes that are not UTF-8 is one bad_encoding row; a line over the record bound one
    text_too_long row; a list broken part-way is a clear error)."""
    import tracemalloc

    from curation import merge_readers as mr

    monkeypatch.setattr(mr, "CHUNK", 4096)
    limits = mr.Limits(8, 1 << 20, 2048)
    recs = [json.dumps({"conversations": _conv(f"Question {i}? " + "é" * (i % 9), f"Answer {i}. " * (i % 5 + 1))},
                       ensure_ascii=bool(i % 2)).encode() for i in range(12_000)]
    recs[7] = b'{"conversations": [{"from": "human", "value": "caf\xe9?"}, {"from": "gpt", "value": "x"}]}'
    big = tmp_path / "big.json"
    big.write_bytes(b"[\n" + b",\n  ".join(recs) + b"\n]\n")
    lines = tmp_path / "big.jsonl"
    too_long = b'{"x": "' + b"y" * (mr.record_bytes(limits) + 10) + b'"}'
    lines.write_bytes(b"\n".join(recs[:100] + [too_long] + recs[100:]))
    want = json.loads(big.read_bytes().decode("utf-8", "surrogateescape"))
    for path, extra in ((big, None), (lines, 100)):
        tracemalloc.start()
        got = 0
        for row, rec in enumerate(mr.read_records(Location.parse(str(path)), Location.parse(str(tmp_path)), limits)):
            if row == extra:
                assert rec.error is not None and rec.error.reason == "text_too_long"
                continue
            k = row - (extra is not None and row > extra)
            if k == 7:
                assert rec.error is not None and rec.error.reason == "bad_encoding"
            else:
                assert rec.error is None and rec.turns == [{"from": t["from"], "value": t["value"]}
                                                           for t in want[k]["conversations"]]
            got += 1
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert got == len(recs)
        assert peak < path.stat().st_size / 8, (path.name, peak, path.stat().st_size)
    broken = tmp_path / "broken.json"
    broken.write_bytes(b"[" + b",".join(recs[:50]) + b", {oops}]")
    with pytest.raises(ValueError, match="not a valid JSON list of records"):
        list(mr.read_records(Location.parse(str(broken)), Location.parse(str(tmp_path)), limits))


def test_small_buffers_and_spilled_image_buckets_write_the_same_output(merged, tmp_path, monkeypatch):
    """Map tasks that flush every 2 samples / every image, and an image store sorted in many
    spilled buckets (merge.image_batch_bytes=1), write byte-for-byte the output of the default
    buffers; the shuffle's intermediates are removed after the commit."""
    import curation.merge as cm

    out, specs, *_ = merged
    monkeypatch.setattr(cm, "MAP_FLUSH_ROWS", 2)
    monkeypatch.setattr(cm, "MAP_FLUSH_BYTES", 1)
    monkeypatch.setattr(cm, "MAP_SEEN_IMAGES", 1)
    small = tmp_path / "small"
    MergeStage().run(None, str(small), _cfg(f"merge.sources={json.dumps(specs)}", "merge.image_batch_bytes=1"),
                     quiet=True)

    def final(o: Path) -> dict[str, bytes]:
        return {k: v for k, v in data_files(o).items() if not k.startswith(("_map", "_dedup"))}

    assert final(small) == final(out) and any(k.startswith("images/data/") for k in final(out))
    spilled = [e["spill_buckets"] for e in read_manifest_entries(Location.parse(str(small / "images"))).values()]
    assert max(spilled) > 1
    parts = list((tmp_path / "small" / "_map" / "_parts").glob("*/*.parquet"))
    assert not parts  # removed after the commit


def test_intermediates_removed_after_commit_and_redone_only_when_needed(merged, tmp_path):
    out, specs, *_ = merged
    for gone in ("_map/_parts", "_map/_images", "_dedup/_rows"):
        assert not (out / gone).exists(), gone
    kept = tmp_path / "kept"
    MergeStage().run(None, str(kept), _cfg(f"merge.sources={json.dumps(specs)}", "merge.keep_intermediates=true"),
                     quiet=True)
    assert list((kept / "_map" / "_parts").glob("*/p-*.parquet")) and list((kept / "_dedup" / "_rows").glob("*"))
    # Sources copied, merged (intermediates removed), then one file added: the rerun redoes the map
    # and equals a fresh merge of the changed sources.
    src = tmp_path / "src"
    shutil.copytree(Path(specs[0].split("=", 1)[1]).parent, src)
    mine = [f"llava={src / 'llava'}", f"fv={src / 'fv'}", str(src / "oai")]
    cfg = _cfg(f"merge.sources={json.dumps(mine)}")
    run = tmp_path / "run"
    MergeStage().run(None, str(run), cfg, quiet=True)
    again = MergeStage().run(None, str(run), cfg, quiet=True)  # unchanged: nothing redone
    assert again.shards_skipped == again.shards and not (run / "_map" / "_parts").exists()
    (src / "llava" / "part-1.jsonl").write_text(json.dumps(
        {"image": "imgs/i2.png", "conversations": _conv("<image>\nIs the dog asleep?", "No.")}) + "\n" + json.dumps(
        {"image": "imgs/i3.png", "conversations": _conv("<image>\nWhat color is the car?", "Blue.")}) + "\n")
    changed = MergeStage().run(None, str(run), cfg, quiet=True)
    fresh = tmp_path / "fresh"
    MergeStage().run(None, str(fresh), cfg, quiet=True)
    assert changed.kept_rows == merged[3].kept_rows + 1
    assert data_files(run) == data_files(fresh)


def test_sources_are_hashed_as_absolute_paths_keeping_their_names(merged, tmp_path, monkeypatch):
    """'NAME=rel/x', 'NAME=./rel/x/' and 'NAME=/abs/x' are one source: the same config, so a run
    given one spelling resumes a run given another instead of refusing it."""
    out, specs, *_ = merged
    root = Path(specs[0].split("=", 1)[1]).parent
    monkeypatch.chdir(root.parent)
    relative = [f"llava={root.name}/llava", f"fv=./{root.name}/fv/", f"./{root.name}/oai/"]
    a, b = _cfg(f"merge.sources={json.dumps(relative)}"), _cfg(f"merge.sources={json.dumps(specs)}")
    assert a.merge.sources == b.merge.sources == [f"llava={root}/llava", f"fv={root}/fv", f"oai={root}/oai"]
    run = tmp_path / "run"
    MergeStage().run(relative, str(run), _cfg(), quiet=True)  # --input given as typed
    summary = MergeStage().run(None, str(run), b, quiet=True)
    assert summary.shards_skipped == summary.shards
    assert data_files(run) == data_files(out)


def test_run_report_shows_category_shares_and_dedup_removals(merged, tmp_path):
    """ovpipe report on the merge output: each category's share before dedup -> after dedup ->
    after the mixture (from merge_report.json) and dedup's removals by reason (= the ledger's)."""
    from ovpipe.report import write_report

    out, *_ = merged
    rep = json.loads((out / "merge_report.json").read_text())
    html = (Path(write_report(str(out), str(tmp_path / "r.html")))).read_text()
    dedup = read_ledger(Location.parse(str(out))).filter(pl.col("stage") == "merge_dedup")
    by_reason = dict(dedup.group_by("reason").len().iter_rows())
    assert by_reason == {"duplicate_question": 2, "duplicate_sample": 2, "near_duplicate_question": 1}
    for reason, n in by_reason.items():
        assert f"removed by dedup: {reason}</th><td>{n}</td>" in html
    for cat in ("general", "ocr", "counting", "oai"):
        steps = [rep["shares"][k].get(cat, 0) for k in ("before_dedup", "after_dedup", "after_mixture")]
        assert f"share of {cat} (before dedup -&gt; after dedup -&gt; after mixture)</th><td>" + " -&gt; ".join(
            f"{s:.1%}" for s in steps) in html
    assert "merge_report.png" in html
