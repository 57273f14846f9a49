"""Dedup stage: recall and precision on a corpus of altered copies, per method; 1 vs 5 shards
byte-identical; the greedy rule; resume; the report."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest

from curation.dedup import DedupStage, assign_clusters, dedup_rows, resolve
from curation.embed import EmbedStage
from curation.ingest import IngestStage
from ovpipe.config import load_config
from ovpipe.core.ledger import read_ledger
from ovpipe.core.shards import Location, list_input_shards, read_table
from ovpipe.core.stage import run_stage
from ovpipe.testing.near_dups import make_corpus, write_parquet
from tests.helpers import data_files

THUMB = ["embed.model=ovpipe-thumbnail", "embed.pretrained=random", "embed.batch_size=32"]
LOCAL = ["run.executor=local"]


def build_chain(root: Path, shards: int, items) -> Path:
    """corpus -> ingest -> embed (thumbnail stand-in); returns the embed output."""
    write_parquet(items, str(root / "raw"), shards=shards)
    cfg = load_config(overrides=LOCAL + THUMB)
    run_stage(IngestStage(), str(root / "raw"), str(root / "ingest"), cfg, quiet=True)
    run_stage(EmbedStage(), str(root / "ingest"), str(root / "embed"), cfg, quiet=True)
    return root / "embed"


@pytest.fixture(scope="module")
def corpus():
    return make_corpus(n_base=40, copies=4, n_unrelated=40, seed=3)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, corpus):
    """The same corpus as 1 and as 5 input shards, through ingest and embed."""
    root = tmp_path_factory.mktemp("dedup")
    five = build_chain(root / "s5", 5, corpus)
    # the same rows as one shard (an embedding does not depend on its shard or batch-mates)
    one = root / "s1" / "embed"
    one.mkdir(parents=True)
    tables = [read_table(f) for f in list_input_shards(Location.parse(str(five)))]
    pq.write_table(pa.concat_tables(tables), one / "all.parquet")
    return {1: one, 5: five}


def groups_by_sample(embed_out: Path, corpus) -> dict[str, int]:
    group = {i.key: i.group for i in corpus}
    out = {}
    for f in list_input_shards(Location.parse(str(embed_out))):
        t = read_table(f, columns=["sample_id", "input_key"]).to_pylist()
        out.update({r["sample_id"]: group[r["input_key"]] for r in t})
    return out


def scores(ledger, group: dict[str, int]) -> dict[str, float]:
    """recall: copies removed / copies there are; precision: removals whose kept sample is of the
    same base image / removals; distinct_kept: base images with at least one sample kept."""
    removed = ledger.filter(ledger["reason"] == "near_duplicate_image")
    kept_of = {r["sample_id"]: re.search(r"kept=(\w+)", r["detail"]).group(1) for r in removed.to_dicts()}
    sizes = Counter(group.values())
    copies = sum(n - 1 for n in sizes.values())
    true = sum(group[s] == group[k] for s, k in kept_of.items())
    kept_groups = {g for s, g in group.items() if s not in kept_of}
    return {"recall": true / copies, "precision": true / max(len(kept_of), 1),
            "distinct_kept": len(kept_groups) / len(sizes), "removed": len(kept_of)}


def run_dedup(inp: Path, out: Path, *overrides: str, executor=LOCAL):
    cfg = load_config(overrides=executor + THUMB + ["dedup.clusters=4", "dedup.partitions=3", *overrides])
    return DedupStage().run(str(inp), str(out), cfg, quiet=True)  # as the CLI and the pipeline run it


def test_recall_precision_per_method_and_one_vs_five_shards(chain, corpus, tmp_path, ray_address):
    group = groups_by_sample(chain[1], corpus)
    results = {}
    for method in ("phash", "embedding", "both"):
        run_dedup(chain[1], tmp_path / method, f"dedup.method={method}")
        results[method] = scores(read_ledger(Location.parse(str(tmp_path / method))), group)
    print("dedup scores", json.dumps(results))
    both = results["both"]
    assert both["recall"] >= 0.95 and both["precision"] >= 0.99 and both["distinct_kept"] == 1.0, results
    assert results["embedding"]["precision"] >= 0.99 and results["phash"]["precision"] >= 0.99, results
    assert both["recall"] >= max(results["embedding"]["recall"], results["phash"]["recall"])
    # the 5-shard copy, on Ray with 2 workers, writes the same bytes (shard names differ: compare rows)
    summary = run_dedup(chain[5], tmp_path / "five", "dedup.method=both", executor=["run.workers=2"])
    assert summary.input_rows == summary.kept_rows + summary.dropped_rows == len(corpus)
    one = read_ledger(Location.parse(str(tmp_path / "both"))).sort("sample_id")
    five = read_ledger(Location.parse(str(tmp_path / "five"))).sort("sample_id")
    assert one.select("sample_id", "reason", "detail").equals(five.select("sample_id", "reason", "detail"))
    kept = lambda p: pa.concat_tables(read_table(f) for f in list_input_shards(Location.parse(str(p)))  # noqa: E731
                                      ).sort_by("sample_id")
    assert kept(tmp_path / "both").equals(kept(tmp_path / "five"))  # every column of every kept row
    report = json.loads((tmp_path / "both" / "_report" / "dedup_report.json").read_text())
    at = report["removed_at_threshold"]
    assert at["0.85"] >= at["0.9"] >= at["0.95"] >= at["0.98"] and report["examples"]
    assert (tmp_path / "both" / "_report" / "pairs.png").stat().st_size > 1000
    from ovpipe.report import write_report  # the run report shows the key figures and the contact sheet

    html = Path(write_report(str(tmp_path / "both"), str(tmp_path / "r.html"))).read_text()
    assert f"<th>removed</th><td>{report['removed']}</td>" in html and "<th>threshold (cosine)</th><td>0.95" in html
    assert f"<th>would remove at cosine 0.85</th><td>{at['0.85']}</td>" in html and "data:image/png" in html


def test_five_shards_byte_identical_across_worker_counts_and_partitions(chain, tmp_path, ray_address):
    """Same input shards: same bytes in-process with 1 partition as on Ray (2 workers), 3 partitions."""
    run_dedup(chain[5], tmp_path / "a", "dedup.partitions=1", executor=["run.workers=2"])
    run_dedup(chain[5], tmp_path / "b", "dedup.partitions=3")
    a, b = data_files(tmp_path / "a"), data_files(tmp_path / "b")
    a = {k: v for k, v in a.items() if not k.startswith("_")}
    b = {k: v for k, v in b.items() if not k.startswith("_")}
    assert a and a == b


def test_greedy_keeps_the_smallest_id_and_breaks_chains():
    # rows 0 ~ 1 ~ 2 (a chain), 0 and 2 not similar: 0 kept, 1 removed (dup of 0), 2 kept
    by = resolve(4, np.array([1, 2]), np.array([0, 1]), np.array([0.99, 0.99]))
    assert by.tolist() == [-1, 0, -1, -1]
    # a row removed goes with its most similar kept partner
    by = resolve(3, np.array([2, 2]), np.array([0, 1]), np.array([0.96, 0.99]))
    assert by.tolist() == [-1, -1, 1]


def test_methods_on_planted_vectors():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((5, 32)).astype(np.float32)
    emb = np.concatenate([base, base[:2] + 0.05 * rng.standard_normal((2, 32)).astype(np.float32)])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    hashes = rng.integers(0, 2 ** 63, 7, dtype=np.int64).astype(np.uint64)
    hashes[6] = hashes[4] ^ np.uint64(0b111)  # 3 bits from row 4 (but row 1 is its embedding twin)
    hashes[3] = hashes[2] ^ np.uint64(1)  # a phash-only duplicate of row 2
    has = np.ones(7, bool)
    ids = [f"id{k}" for k in range(7)]

    def removed(method):
        return {r: k for r, (k, _c, _h) in dedup_rows(emb, hashes, has, ids, method, 0.95, 4).items()}

    assert removed("embedding") == {"id5": "id0", "id6": "id1"}
    assert removed("phash") == {"id3": "id2", "id6": "id4"}
    assert removed("both") == {"id3": "id2", "id5": "id0", "id6": "id1"}  # the most similar kept partner


def test_a_big_cluster_is_compared_in_bounded_memory(monkeypatch):
    """One cluster of 3,000 rows (a skewed k-means): the same pairs, in the same order, as all pairs
    at once, while the working memory stays at a few block x block tiles (all rows against a block
    of rows took ~7 MB here, growing with the cluster)."""
    import tracemalloc

    from curation import dedup

    rng = np.random.default_rng(0)
    n = 3000
    emb = rng.standard_normal((n, 16)).astype(np.float32)
    emb[1::50] = emb[::50] + 0.01 * rng.standard_normal((n // 50, 16)).astype(np.float32)  # planted pairs
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    hashes = rng.integers(0, 2 ** 63, n).astype(np.uint64)
    hashes[3::50] = hashes[2::50] ^ np.uint64(0b101)
    has = np.ones(n, bool)
    monkeypatch.setattr(dedup, "BLOCK", 128)
    tracemalloc.start()
    i, j, c, h = dedup.candidate_edges(emb, hashes, has, 0.95, 4)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2e6, peak
    sims = emb @ emb.T
    ham = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    ri, rj = np.nonzero(np.tril((sims >= 0.95) | (ham <= 4), -1))  # row-major: sorted by (i, j)
    assert len(ri) >= 2 * (n // 50)
    assert np.array_equal(i, ri) and np.array_equal(j, rj)
    assert np.allclose(c, sims[ri, rj], atol=1e-6) and np.array_equal(h, ham[ri, rj])


def test_copies_across_a_cluster_boundary_meet_through_the_probe():
    centroids = np.array([[1, 0], [0, 1]], np.float32)
    x = np.array([[0.72, 0.69], [0.69, 0.72]], np.float32)  # near twins on both sides of the boundary
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    home, guest = assign_clusters(x, centroids, 0.05)
    assert home.tolist() == [0, 1] and guest.tolist() == [1, 0]
    assert assign_clusters(x, centroids, 0.0)[1].tolist() == [-1, -1]


def test_plain_images_hashes_do_not_make_duplicates(tmp_path):
    """Solid colours, two flat halves, text on white, screenshots: distinct ones share perceptual
    hashes (a flat image's DCT is rounding noise). Only hashes with enough decided bits count, so
    phash keeps its precision; the copies of the detailed ones (text, screenshots) are still found."""
    from curation.dedup import decided_bits, phash64
    from ovpipe.testing.near_dups import make_plain_corpus

    corpus = make_plain_corpus(40, 2, seed=1)
    emb = build_chain(tmp_path, 2, corpus)
    group = groups_by_sample(emb, corpus)
    found = {}
    for guard in (0, 32):
        run_dedup(emb, tmp_path / f"g{guard}", "dedup.method=phash", f"dedup.phash_min_decided={guard}")
        found[guard] = scores(read_ledger(Location.parse(str(tmp_path / f"g{guard}"))), group)
    print("plain-image phash scores (unguarded, guarded)", json.dumps(found))
    assert found[0]["precision"] < 0.6  # the collisions are real
    assert found[32]["precision"] == 1.0 and found[32]["distinct_kept"] == 1.0 and found[32]["recall"] > 0.3
    from PIL import Image

    flat = Image.new("L", (32, 32), 90)
    assert decided_bits(flat) <= 1 and phash64(corpus[0].data, 32) is None  # corpus[0]: a solid colour
    photo = make_corpus(n_base=1, copies=0, n_unrelated=0, seed=5)[0].data
    assert phash64(photo, 32) == phash64(photo)  # a detailed image's hash is kept, unchanged


def test_input_without_embeddings_is_a_clear_error(tmp_path, chain):
    with pytest.raises(RuntimeError, match="keep_embedding"):
        run_dedup(chain[5].parent / "ingest", tmp_path / "x")


def test_dry_run_on_an_assign_output_without_embeddings_is_refused_before_ray(chain, tmp_path, capfd, monkeypatch):
    """assign drops embeddings by default: `ovpipe dedup` (--dry-run, and a real run's preflight)
    says so before Ray starts or anything is written; embed's output passes."""
    from curation.assign import AssignStage
    from ovpipe import cli
    from ovpipe.core import executor

    assigned = tmp_path / "assign"
    run_stage(AssignStage(), str(chain[5]), str(assigned),
              load_config(overrides=LOCAL + THUMB + [f"assign.cache_dir={tmp_path / 'concepts'}"]), quiet=True)
    monkeypatch.setattr(executor, "ensure_ray", lambda *a, **k: pytest.fail("Ray started"))
    sets = [x for kv in THUMB for x in ("--set", kv)]
    for dry in (["--dry-run"], []):
        rc = cli.main(["dedup", "--input", str(assigned), "--output", str(tmp_path / "out"), *dry, *sets])
        err = capfd.readouterr().err
        assert rc != 0 and "lacks the columns" in err and "assign.keep_embedding=true" in err, err
        assert not (tmp_path / "out").exists()
    assert cli.main(["dedup", "--input", str(chain[5]), "--output", str(tmp_path / "ok"), "--dry-run", *sets]) == 0


def test_rerun_resumes_and_changed_threshold_is_refused(chain, tmp_path):
    out = tmp_path / "r"
    first = run_dedup(chain[5], out)
    before = data_files(out)
    again = run_dedup(chain[5], out)
    assert again.shards_skipped == again.shards and data_files(out) == before
    assert again.dropped_rows == first.dropped_rows
    with pytest.raises(Exception, match="threshold"):
        run_dedup(chain[5], out, "dedup.threshold=0.9")


def test_intermediates_are_removed_unless_kept_and_a_changed_input_redoes_every_shard(chain, tmp_path):
    """After the stage committed, its shuffle (a copy of every embedding) is gone; a re-run of the
    finished output does nothing; a changed input recomputes it and redoes every output shard (which
    rows a shard keeps depends on all of them), giving what a fresh run gives."""
    import shutil

    from curation.dedup import INTERMEDIATES, SHUFFLE

    inp = tmp_path / "in"
    shutil.copytree(chain[5], inp)
    out = tmp_path / "out"
    run_dedup(inp, out)
    assert not any((out / f).exists() for f in INTERMEDIATES) and (out / "_report" / "dedup_report.json").exists()
    before = data_files(out)
    again = run_dedup(inp, out)
    assert again.shards_skipped == again.shards and data_files(out) == before
    assert not any((out / f).exists() for f in INTERMEDIATES)  # nothing was recomputed
    run_dedup(inp, tmp_path / "kept", "dedup.keep_intermediates=true")
    assert all((tmp_path / "kept" / f / "_manifest").is_dir() for f in SHUFFLE)
    # shard 0 loses the samples that other shards' rows were ledgered against
    ledger = read_ledger(Location.parse(str(out))).to_dicts()
    kept_ids = {re.search(r"kept=(\w+)", r["detail"]).group(1) for r in ledger}
    first = list_input_shards(Location.parse(str(inp)))[0]
    table = read_table(first)
    drop = pa.array([s in kept_ids for s in table.column("sample_id").to_pylist()])
    assert pa.compute.sum(drop).as_py() > 0
    pq.write_table(table.filter(pa.compute.invert(drop)), first.path)
    redone = run_dedup(inp, out)
    assert redone.shards_skipped < redone.shards
    run_dedup(inp, tmp_path / "fresh")
    assert data_files(out) == data_files(tmp_path / "fresh") != before


@pytest.mark.slow  # a subprocess driver and a Ray job: tens of seconds
def test_sigkill_mid_stage_then_rerun_is_byte_identical(chain, tmp_path, ray_address):
    import time

    from tests.conftest import python_exe, sigkill_after_commits, subprocess_env

    reference = tmp_path / "ref"
    run_dedup(chain[5], reference, executor=["run.workers=1"])
    out = tmp_path / "killed"
    sets = [x for kv in THUMB + ["dedup.clusters=4", "dedup.partitions=3"] for x in ("--set", kv)]
    cmd = [python_exe(), "-m", "ray_jobs.dedup", "--input", str(chain[5]), "--output", str(out),
           "--workers", "1", *sets]
    env = subprocess_env(ray_address, OVPIPE_FAULT_SHARD_DELAY_S="0.5")
    committed = sigkill_after_commits(cmd, env, out / "_pairs" / "_manifest", at_least=1)
    assert 1 <= len(committed) < 3, "the kill must land mid-pass"
    time.sleep(1.0)  # let Ray reap the dead driver's workers
    resumed = run_dedup(chain[5], out, executor=["run.workers=1"])
    assert resumed.shards_skipped >= 5 + 5 + 1  # the sample and partition passes, a pairs shard
    assert data_files(out) == data_files(reference)
