"""Decontaminate stage: planted evaluation images and their altered copies are all ledgered with the
right benchmark name, nothing else is; the eval set is embedded once (cached)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.decontaminate import DecontaminateStage, input_model, load_benchmark_images
from curation.dedup import DedupStage
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
    assert not (tmp_path / "out" / "_tmp").exists()  # no scratch left behind
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
    # the run report (ovpipe report) shows the key figures: removed, threshold, overlaps per benchmark
    from ovpipe.report import write_report

    html = Path(write_report(str(tmp_path / "cli"), str(tmp_path / "r.html"))).read_text()
    for bench, n in report["overlaps_per_benchmark"].items():
        assert f"<th>overlaps: {bench}</th><td>{n}</td>" in html
    assert f"<th>removed</th><td>{expected}</td>" in html and "<th>threshold (cosine)</th><td>0.95" in html


def test_names_with_spaces_in_the_report(setup, tmp_path):
    """Eval file and folder names with spaces (a ledger detail is not split on spaces)."""
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


TINY = ["embed.model=ovpipe-tiny-clip", "embed.pretrained=random", "run.executor=local"]


def ledgered(out) -> dict[str, str]:
    return {r["sample_id"]: re.search(r"benchmark=(\S+)", r["detail"]).group(1)
            for r in read_ledger(Location.parse(str(out))).to_dicts()}


def test_eval_images_are_embedded_by_the_inputs_model_not_the_configs(setup, tmp_path):
    """The input was embedded by the thumbnail; a config naming another model (tiny CLIP, 64-d)
    still embeds the eval images with the thumbnail, read from the input's stage header (embed's
    own, and the model that dedup passes on), and caches them under that model's identity."""
    root, groups = setup
    expected = {s: ("mmbench-mini" if g < 8 else "textvqa-mini") for s, g in groups.items() if g < 12}
    cfg = load_config(overrides=TINY + benchmarks_flags(root) + ["decontaminate.method=embedding"])
    run_stage(DecontaminateStage(), str(root / "embed"), str(tmp_path / "a"), cfg, quiet=True)
    reference = ledgered(tmp_path / "a")
    assert reference and all(expected.get(s) == b for s, b in reference.items())
    # through dedup (which records the model of its input), with the tiny model still configured
    dedup_cfg = load_config(overrides=THUMB + ["dedup.clusters=2", "dedup.partitions=1", "dedup.threshold=0.9999"])
    run_stage(DedupStage(), str(root / "embed"), str(tmp_path / "dedup"), dedup_cfg, quiet=True)
    run_stage(DecontaminateStage(), str(tmp_path / "dedup"), str(tmp_path / "b"), cfg, quiet=True)
    after_dedup = ledgered(tmp_path / "b")
    assert after_dedup and set(after_dedup) <= set(reference)
    # input_model=config: the configured (tiny) model, whose width is not the input's: a clear error
    with pytest.raises(RuntimeError, match="64-d.*--set embed.model"):
        run_stage(DecontaminateStage(), str(root / "embed"), str(tmp_path / "c"),
                  load_config(overrides=cfg_flags(cfg) + ["decontaminate.input_model=config"]), quiet=True)


def test_a_model_is_rebuilt_from_its_recorded_identity():
    """assign records only the identity of its input's model: a seeded random init (and an open_clip
    tag) is rebuilt from it, whatever embed.* says."""
    from curation.dedup import model_spec_for
    from curation.embed import ModelSpec

    made_by = ModelSpec("ovpipe-tiny-clip", "random", 3)
    assert model_spec_for(made_by.identity(), None, ModelSpec("ovpipe-thumbnail", "random")) == made_by
    assert model_spec_for({**made_by.identity(), "model_config": "other"}, None, made_by) is None


def cfg_flags(cfg) -> list[str]:
    return TINY + [f"decontaminate.benchmarks={json.dumps(cfg.decontaminate.benchmarks)}",
                   f"decontaminate.cache_dir={cfg.decontaminate.cache_dir}", "decontaminate.method=embedding"]


def test_an_input_that_records_no_model_or_an_unbuildable_one_is_refused(setup, tmp_path):
    root, _ = setup
    bare = tmp_path / "bare"  # the embed output's rows, copied without their stage header
    bare.mkdir()
    for k, f in enumerate(list_input_shards(Location.parse(str(root / "embed")))):
        pq.write_table(read_table(f), bare / f"s{k}.parquet")
    flags = benchmarks_flags(root) + ["decontaminate.method=embedding"]
    with pytest.raises(ValueError, match="cannot tell which model.*input_model=config"):
        run_stage(DecontaminateStage(), str(bare), str(tmp_path / "a"), load_config(overrides=TINY + flags), quiet=True)
    # told to use embed.* of the config (the right model here): it runs
    run_stage(DecontaminateStage(), str(bare), str(tmp_path / "b"),
              load_config(overrides=THUMB + flags + ["decontaminate.input_model=config"]), quiet=True)
    assert ledgered(tmp_path / "b")
    # a recorded model that cannot be rebuilt (a checkpoint file this machine does not have)
    (bare / "_manifest").mkdir()
    (bare / "_manifest" / "_stage.json").write_text(json.dumps({"stage": "assign", "payload": {
        "stage": "assign", "global_state": {"embed_model": {"model": "ViT-B-32", "weights": "file:xxh3=0123",
                                                             "precision": "auto", "model_config": "x"}}}}))
    with pytest.raises(ValueError, match="cannot be rebuilt here.*embed.pretrained"):
        input_model(load_config(overrides=TINY + flags), Location.parse(str(bare / "s0.parquet")))


QUESTIONS = {  # eval id -> question
    "q1": "What is the name of the brand written on the red bottle near the window?",
    "q2": "How many people are standing on the left side of the wooden bridge in this photo?",
    "q3": "What color is the car?",  # shorter than the n-gram: matched only whole
}
MMMU = "Which of the following best describes the trend shown in the graph between 1990 and 2010?"


def conversation(*humans: str) -> list[dict]:
    turns = []
    for h in humans:
        turns += [{"from": "human", "value": h}, {"from": "gpt", "value": "an answer"}]
    return turns


def test_questions_sharing_an_ngram_with_an_eval_question_are_ledgered(tmp_path, capfd):
    """The text side on instruction data: case, punctuation and <image> do not hide an overlap; an
    eval question inside a longer prompt is found by its 8-grams; a short eval question only whole;
    a shared common phrase shorter than n is not an overlap."""
    from ovpipe import cli

    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "vqa-mini.jsonl").write_text(
        "\n".join(json.dumps({"question_id": k, "question": q}) for k, q in QUESTIONS.items()))
    pq.write_table(pa.table({"benchmark": ["mmmu-mini"], "id": ["m7"], "question": [MMMU]}),
                   tmp_path / "evals" / "m.parquet")
    rows = {
        "t1": (conversation("<image>\nWHAT is the name of the brand written on the red bottle, near the window"),
               ("vqa-mini", "q1")),
        "t2": (conversation("Please answer: how many people are standing on the left side of the wooden bridge?"),
               ("vqa-mini", "q2")),
        "t3": (conversation("<image>\nWhat color is the car?"), ("vqa-mini", "q3")),
        "t4": (conversation("What color is the car in the top left corner of the picture?"), None),
        "t5": (conversation("Describe the image.", f"<image> {MMMU.upper()}"), ("mmmu-mini", "m7")),
        "t6": (conversation("What is the name of the street shown in this photo?"), None),
        "t7": (conversation("How many cats are on the sofa?"), None),
        "t8": (None, None),
    }
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(pa.table({"sample_id": list(rows), "conversations": [c for c, _ in rows.values()]}),
                   inp / "part-00000.parquet")
    argv = ["decontaminate", "--input", str(inp), "--output", str(tmp_path / "out"), "--quiet",
            "--questions", str(tmp_path / "evals" / "vqa-mini.jsonl"),
            "--questions", str(tmp_path / "evals" / "m.parquet"),
            "--set", "run.executor=local"]
    assert cli.main(argv) == 0, capfd.readouterr().err
    found = {r["sample_id"]: re.search(r"benchmark=(.*) eval_id=(\S+) match=(\S+)", r["detail"]).groups()
             for r in read_ledger(Location.parse(str(tmp_path / "out"))).to_dicts()}
    assert {s: f[:2] for s, f in found.items()} == {s: w for s, (_, w) in rows.items() if w}
    assert found["t3"][2] == "question_whole" and found["t1"][2] == "question"
    report = json.loads((tmp_path / "out" / "_report" / "decontaminate_report.json").read_text())
    assert report["overlaps_per_benchmark"] == {"mmmu-mini": 1, "vqa-mini": 3} and report["ngram"] == 8
    # on image rows (no conversations) the text side is one clear error
    images = tmp_path / "images"
    images.mkdir()
    pq.write_table(pa.table({"sample_id": ["a"], "caption": ["x"]}), images / "p.parquet")
    cfg = load_config(overrides=["run.executor=local",
                                 f"decontaminate.questions={json.dumps([str(tmp_path / 'evals' / 'm.parquet')])}"])
    with pytest.raises(RuntimeError, match="no 'conversations' column"):
        run_stage(DecontaminateStage(), str(images), str(tmp_path / "o2"), cfg, quiet=True)


def test_run_with_questions_is_refused_before_the_first_step(tmp_path, capfd, demo_raw):
    """In `ovpipe run` decontaminate reads image rows: questions there would find no conversations
    hours later; the plan refuses them first."""
    from ovpipe import cli

    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": MMMU}))
    sets = ["--set", 'embed.model="ovpipe-thumbnail"', "--set", 'embed.pretrained="random"',
            "--set", f"decontaminate.questions={json.dumps([str(questions)])}"]
    rc = cli.main(["run", "--input", str(demo_raw), "--output", str(tmp_path / "out"), "--dry-run", *sets])
    err = capfd.readouterr().err
    assert rc != 0 and "decontaminate.questions" in err and "merge's output" in err, err
    assert not (tmp_path / "out").exists()
