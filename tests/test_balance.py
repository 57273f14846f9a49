"""Balance stage: exact N, invariance to sharding / workers, inclusion probabilities against an
exact enumeration, MetaCLIP's formula, flatter concept distribution, report files, bad input,
resume of the counts pass after a crash."""

import io
import itertools
import re
import json
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xxhash
from PIL import Image

from curation.balance import BalanceCountsPass, BalanceSelectPass, BalanceStage
from curation.balance_core import ConceptLists, neg_log, one_minus_exp_neg, select, uniforms
from ovpipe.config import load_config
from ovpipe.core.stage import OutputConflict, run_stage
from tests.conftest import committed_shards, python_exe, subprocess_env


# ---------------------------------------------------------------- test data

def zipf_rows(n: int, concepts: int = 400, k: int = 5, seed: int = 0, a: float = 1.4) -> dict:
    """n samples, each with k distinct concepts drawn from a Zipf law (rank r ~ r^-a)."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, concepts + 1) ** a
    p /= p.sum()
    ids = np.stack([rng.choice(concepts, size=k, replace=False, p=p) for _ in range(n)]).astype(np.int32)
    hashes = [xxhash.xxh3_64_intdigest(f"img-{seed}-{i}".encode()) for i in range(n)]
    return {
        "sample_id": [f"{h:016x}" for h in hashes],
        "sample_hash": pa.array(hashes, pa.uint64()),
        "concept_ids": pa.array(ids.tolist(), pa.list_(pa.int32())),
        "concept_scores": pa.array(rng.uniform(0.1, 0.4, size=(n, k)).astype(np.float32).tolist(),
                                   pa.list_(pa.float32())),
        "source": [["coyo", "datacomp", "laion_cn"][int(i) % 3 if ids[i, 0] > 2 else 0] for i in range(n)],
    }


def write_shards(folder: Path, table: pa.Table, sizes: list[int], nested: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for j, size in enumerate(sizes):
        sub = folder / (f"part{j % 2}" if nested else "")
        sub.mkdir(exist_ok=True)
        pq.write_table(table.slice(start, size), sub / f"shard-{j:03d}.parquet")
        start += size
    assert start == table.num_rows
    return folder


def balance(inp, out, *overrides, **kw):
    stage = BalanceStage()
    kw.setdefault("quiet", True)
    summary = run_stage(stage, str(inp), str(out), load_config(overrides=list(overrides)), **kw)
    return stage, summary


def kept(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted((out / "data").glob("*.parquet"))])


def ledger(out: Path) -> pa.Table:
    files = sorted((out / "_ledger").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in files]) if files else None


@pytest.fixture(scope="module")
def zipf_table() -> pa.Table:
    return pa.table(zipf_rows(1200, seed=3))


# ---------------------------------------------------------------- the stage on Ray

def test_exact_n_accounting_and_schema(ray_address, zipf_table, tmp_path):
    inp = write_shards(tmp_path / "in", zipf_table, [300, 250, 400, 250])
    stage, summary = balance(inp, tmp_path / "out", "balance.fraction=0.3")
    out = kept(tmp_path / "out")
    assert out.num_rows == summary.kept_rows == round(0.3 * 1200) == 360
    assert summary.input_rows == 1200 == summary.kept_rows + summary.dropped_rows
    assert summary.dropped_by_reason == {"not_selected": 840}
    assert out.schema.names == zipf_table.schema.names + ["weight", "inclusion_prob"]
    assert out.schema.field("weight").type == pa.float64()
    # kept + ledgered are exactly the input samples
    dropped = ledger(tmp_path / "out")
    assert sorted(out["sample_id"].to_pylist() + dropped["sample_id"].to_pylist()) == sorted(
        zipf_table["sample_id"].to_pylist())
    # weight = mean inverse frequency of the sample's concepts, counted over the whole input
    counts = Counter(c for row in zipf_table["concept_ids"].to_pylist() for c in row)
    for ids, w in list(zip(out["concept_ids"].to_pylist(), out["weight"].to_pylist()))[:50]:
        assert w == pytest.approx(np.mean([1 / counts[c] for c in ids]), rel=1e-12)
    incl = np.array(out["inclusion_prob"])
    assert ((incl > 0) & (incl <= 1)).all()
    # target instead of fraction
    _, s2 = balance(inp, tmp_path / "out2", "balance.target=777")
    assert s2.kept_rows == 777


def test_same_selection_whatever_sharding_workers_or_candidate_cap(ray_address, zipf_table, tmp_path):
    a = write_shards(tmp_path / "a", zipf_table, [1200])
    b = write_shards(tmp_path / "b", zipf_table, [100, 7, 293, 400, 1, 399], nested=True)
    sets = []
    for inp, out, extra in ((a, "oa", ["run.workers=1"]), (b, "ob", ["run.workers=2"]),
                            (b, "oc", ["run.workers=1", "balance.candidate_rows=1"]),
                            (b, "od", ["run.executor=local"])):
        balance(inp, tmp_path / out, "balance.fraction=0.4", "run.seed=7", *extra)
        t = kept(tmp_path / out).sort_by("sample_id")
        sets.append((t["sample_id"].to_pylist(), t["weight"].to_pylist(), t["inclusion_prob"].to_pylist()))
    assert all(s == sets[0] for s in sets[1:]) and len(sets[0][0]) == 480
    # byte-identical shards for the same layout with 1 vs 2 workers
    balance(b, tmp_path / "oe", "balance.fraction=0.4", "run.seed=7", "run.workers=2")
    files = lambda d: {p.name: p.read_bytes() for p in (tmp_path / d).rglob("*.parquet")}  # noqa: E731
    assert files("ob") == files("oc") == files("oe")
    # the stage's distributed cut-off equals the in-memory core on all rows at once
    lists = ConceptLists(np.array(zipf_table["concept_ids"].combine_chunks().flatten()).astype(np.int64),
                         np.array(zipf_table["concept_ids"].combine_chunks().offsets).astype(np.int64))
    core = select(np.array(zipf_table["sample_hash"]), lists, fraction=0.4, seed=7)
    assert sorted(np.array(zipf_table["sample_id"])[core.keep].tolist()) == sets[0][0]


def test_different_seed_gives_different_selection(ray_address, zipf_table, tmp_path):
    inp = write_shards(tmp_path / "in", zipf_table, [600, 600])
    balance(inp, tmp_path / "s0", "balance.fraction=0.5", "run.seed=0")
    balance(inp, tmp_path / "s1", "balance.fraction=0.5", "run.seed=1")
    s0, s1 = (set(kept(tmp_path / d)["sample_id"].to_pylist()) for d in ("s0", "s1"))
    assert len(s0) == len(s1) == 600 and 0 < len(s0 & s1) < 600
    with pytest.raises(OutputConflict, match=r"run\.seed: 0 -> 1"):  # config change is refused
        balance(inp, tmp_path / "s0", "balance.fraction=0.5", "run.seed=1")
    _, again = balance(inp, tmp_path / "s0", "balance.fraction=0.5", "run.seed=0")  # resume: nothing to redo
    assert again.shards_skipped == again.shards > 0 and again.kept_rows == 600


def test_zipf_selection_is_flatter_and_report_files(ray_address, zipf_table, tmp_path, capsys):
    inp = write_shards(tmp_path / "in", zipf_table, [600, 600])
    balance(inp, tmp_path / "out", "balance.fraction=0.25", quiet=False)
    rep_dir = tmp_path / "out" / "_report"
    report = json.loads((rep_dir / "balance_report.json").read_text())
    before, after = report["concepts_before"], report["concepts_after"]
    assert after["entropy_bits"] > before["entropy_bits"] + 0.2
    assert after["normalized_entropy"] > before["normalized_entropy"]
    assert after["top50_share"] < before["top50_share"] - 0.05
    assert after["top50_of_before_share"] < before["top50_share"]
    assert report["selected_rows"] == 300 and report["usable_rows"] == 1200
    counts = report["concept_counts"]
    assert sum(counts["before"]) == 1200 * 5 and sum(counts["after"]) == 300 * 5
    assert sum(report["sources_after"].values()) == 300 and sum(report["sources_before"].values()) == 1200
    for name in ("concept_frequency_by_rank.png", "source_mix.png"):
        data = (rep_dir / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        Image.open(io.BytesIO(data)).verify()
        assert Image.open(io.BytesIO(data)).size[0] > 300
    # no image references in this input: no contact sheet, and the report says why
    assert not (rep_dir / "contact_sheet.png").exists()
    assert report["contact_sheet"]["written"] is False
    printed = capsys.readouterr()
    assert f"balance report: {rep_dir / 'balance_report.json'}" in printed.out + printed.err  # run_stage lists them


def test_demo_images_contact_sheet_and_ray_job(ray_address, demo_ingested, tmp_path):
    """make-demo-data + ingest + synthetic concept columns -> balance as `python -m ray_jobs.balance`."""
    assign = tmp_path / "assign"
    assign.mkdir()
    for p in sorted((demo_ingested / "data").glob("*.parquet")):
        t = pq.read_table(p)
        rng = np.random.default_rng(int(t["sample_hash"][0].as_py()) % 2**32)
        ids = [rng.choice(30, size=3, replace=False, p=np.arange(30, 0, -1) / 465).tolist() for _ in range(t.num_rows)]
        t = t.append_column("concept_ids", pa.array(ids, pa.list_(pa.int32())))
        t = t.append_column("concept_scores", pa.array([[0.3, 0.2, 0.1]] * t.num_rows, pa.list_(pa.float32())))
        pq.write_table(t, assign / p.name)
    proc = subprocess.run(
        [python_exe(), "-m", "ray_jobs.balance", "--input", str(assign), "--output", str(tmp_path / "bal"),
         "--fraction", "0.5", "--seed", "3"],
        env=subprocess_env(ray_address), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"balance report: {tmp_path / 'bal' / '_report' / 'contact_sheet.png'}" in proc.stdout + proc.stderr
    report = json.loads((tmp_path / "bal" / "_report" / "balance_report.json").read_text())
    assert report["selected_rows"] == 45 and report["contact_sheet"]["images_shown"] > 0
    assert set(report["sources_after"]) <= {"coyo", "datacomp", "laion_cn"}
    sheet = Image.open(tmp_path / "bal" / "_report" / "contact_sheet.png")
    assert sheet.format == "PNG" and sheet.size[1] > 200


# ---------------------------------------------------------------- statistics

def successive_sampling_inclusion(w: list[float], n: int) -> np.ndarray:
    """Exact inclusion probabilities of drawing n items without replacement, each draw
    proportional to the remaining weights: a sum over every ordered sequence of n items."""
    pi = np.zeros(len(w))
    total = sum(w)
    for seq in itertools.permutations(range(len(w)), n):
        p, left = 1.0, total
        for i in seq:
            p *= w[i] / left
            left -= w[i]
        for i in seq:
            pi[i] += p
    return pi


TINY_LISTS = [[0, 1], [0], [0, 2], [3], [1, 4], [5, 6], [0, 1, 2]]


def test_inclusion_probabilities_match_exact_enumeration():
    """Empirical inclusion frequencies over 6,000 seeds vs the exact successive-sampling
    probabilities (weights computed here by hand from the lists), within 4 binomial sigmas."""
    counts = Counter(c for row in TINY_LISTS for c in row)
    w = [np.mean([1 / counts[c] for c in row]) for row in TINY_LISTS]
    n_select, seeds = 3, 6000
    exact = successive_sampling_inclusion(w, n_select)
    assert exact.sum() == pytest.approx(n_select)
    lists = ConceptLists(np.concatenate(TINY_LISTS).astype(np.int64),
                         np.cumsum([0] + [len(r) for r in TINY_LISTS]).astype(np.int64))
    hashes = np.array([xxhash.xxh3_64_intdigest(f"s{i}".encode()) for i in range(len(TINY_LISTS))], np.uint64)
    hits = np.zeros(len(TINY_LISTS))
    for seed in range(seeds):
        sel = select(hashes, lists, target=n_select, seed=seed)
        assert sel.keep.sum() == n_select
        hits += sel.keep
    freq = hits / seeds
    sigma = np.sqrt(exact * (1 - exact) / seeds)
    assert (np.abs(freq - exact) <= 4 * sigma).all(), (freq, exact, sigma)
    # the test can fail: a uniform draw (pi = 3/7) is far outside the tolerance for some item
    assert (np.abs(n_select / len(w) - exact) > 4 * sigma).any()


def metaclip_by_hand(lists, t):
    counts = Counter(c for row in lists for c in row)
    return np.array([1 - np.prod([1 - t / max(counts[c], t) for c in row]) for row in lists])


def test_metaclip_matches_formula_on_hand_made_case(ray_address, tmp_path):
    # counts: 0 -> 4, 1 -> 3, 2 -> 2, 3..6 -> 1; with t = 2: p = 1/2, 2/3, 1, 1, ...
    lists = TINY_LISTS
    probs = metaclip_by_hand(lists, 2.0)
    assert probs[1] == 0.5 and probs[0] == pytest.approx(1 - 0.5 * (1 / 3)) and probs[3] == 1.0
    hashes = [xxhash.xxh3_64_intdigest(f"m{i}".encode()) for i in range(len(lists))]
    table = pa.table({"sample_id": [f"{h:016x}" for h in hashes],  # no sample_hash: parsed from sample_id
                      "concept_ids": pa.array(lists, pa.list_(pa.int32()))})
    write_shards(tmp_path / "in", table, [3, 4])
    _, summary = balance(tmp_path / "in", tmp_path / "out", "balance.mode=metaclip", "balance.threshold=2",
                         "run.seed=5")
    out = kept(tmp_path / "out")
    row_of = {s: i for i, s in enumerate(table["sample_id"].to_pylist())}
    for sid, p in zip(out["sample_id"].to_pylist(), out["inclusion_prob"].to_pylist()):
        assert p == pytest.approx(probs[row_of[sid]], rel=1e-15)
    u = uniforms(np.array(hashes, np.uint64), 5)
    assert sorted(out["sample_id"].to_pylist()) == sorted(np.array(table["sample_id"])[u < probs].tolist())
    # empirically over seeds (independent Bernoulli): within 4 binomial sigmas
    flat = ConceptLists(np.concatenate(lists).astype(np.int64), np.cumsum([0] + [len(r) for r in lists]))
    hits = sum(select(np.array(hashes, np.uint64), flat, mode="metaclip", threshold=2.0, seed=s).keep
               for s in range(4000))
    sigma = np.sqrt(probs * (1 - probs) / 4000)
    assert (np.abs(hits / 4000 - probs) <= 4 * sigma + 1e-12).all()


def test_metaclip_target_solves_threshold(ray_address, zipf_table, tmp_path):
    inp = write_shards(tmp_path / "in", zipf_table, [500, 700])
    stage, summary = balance(inp, tmp_path / "out", "balance.mode=metaclip", "balance.target=400")
    report = json.loads((tmp_path / "out" / "_report" / "balance_report.json").read_text())
    size = report["size"]
    assert size["threshold_solved"] is True and abs(size["expected_size"] - 400) < 0.5
    assert abs(summary.kept_rows - 400) < 4 * np.sqrt(400)  # the realised size is random around it
    rows = zipf_table["concept_ids"].to_pylist()
    assert metaclip_by_hand(rows, size["threshold"]).sum() == pytest.approx(400, abs=0.5)


def test_deterministic_math_helpers():
    u = uniforms(np.arange(100_000, dtype=np.uint64), 0)
    assert ((u > 0) & (u < 1)).all() and abs(u.mean() - 0.5) < 0.005
    assert np.allclose(neg_log(u), -np.log(u), rtol=1e-11, atol=0)
    x = np.concatenate([np.logspace(-14, 2.5, 2000), [0.0, 0.5, 745.0]])
    assert np.allclose(one_minus_exp_neg(x), -np.expm1(-x), rtol=1e-13, atol=0)


# ---------------------------------------------------------------- bad input

def test_malformed_rows_are_ledgered_and_missing_columns_refused(ray_address, tmp_path):
    good = zipf_rows(20, concepts=10, k=2, seed=9)
    table = pa.table({
        "sample_id": good["sample_id"][:16] + [None, "xyz", "00000000000000aa", "00000000000000ab"],
        "concept_ids": pa.array(good["concept_ids"].to_pylist()[:16] + [[1], [2], [], None], pa.list_(pa.int32())),
    })
    bad_ids = table.to_pydict()
    bad_ids["sample_id"] += ["00000000000000ac", "00000000000000ad", "00000000000000ae"]
    bad_ids["concept_ids"] += [[1, None], [-1, 2], [3, 10]]
    write_shards(tmp_path / "in", pa.table({"sample_id": bad_ids["sample_id"],
                                            "concept_ids": pa.array(bad_ids["concept_ids"], pa.list_(pa.int32()))}),
                 [10, 13])
    _, summary = balance(tmp_path / "in", tmp_path / "out", "balance.fraction=0.5", "balance.num_concepts=10")
    assert summary.input_rows == 23 == summary.kept_rows + summary.dropped_rows
    assert summary.kept_rows == 8  # half of the 16 usable rows
    assert summary.dropped_by_reason == {"bad_sample_id": 2, "no_concepts": 2, "bad_concept_ids": 3,
                                         "not_selected": 8}
    led = ledger(tmp_path / "out")
    assert "#row=" in led["locator"][0].as_py() and set(led["stage"].to_pylist()) == {"balance"}
    # a shard without concept_ids: a clear error naming the shard and what to do
    pq.write_table(pa.table({"sample_id": ["00000000000000af"]}), tmp_path / "in" / "zz-no-concepts.parquet")
    with pytest.raises(RuntimeError, match=r"zz-no-concepts\.parquet.*no column\(s\) \['concept_ids'\].*ovpipe assign"):
        balance(tmp_path / "in", tmp_path / "out2", "balance.fraction=0.5")
    # size options checked before any work (the counts pass's prepare, before its first shard)
    with pytest.raises(ValueError, match=re.escape("exactly one of --target | --fraction")):
        balance(tmp_path / "in", tmp_path / "out3")
    with pytest.raises(ValueError, match="threshold does not apply"):
        balance(tmp_path / "in", tmp_path / "out3", "balance.threshold=3")


def test_fixed_size_list_input_as_the_assign_stage_writes_it(ray_address, zipf_table, tmp_path):
    """assign writes fixed_size_list<int32, k> / <float32, k>: same selection as plain lists."""
    fixed = zipf_table.set_column(
        zipf_table.schema.get_field_index("concept_ids"), "concept_ids",
        zipf_table["concept_ids"].cast(pa.list_(pa.int32(), 5)))
    fixed = fixed.set_column(fixed.schema.get_field_index("concept_scores"), "concept_scores",
                             fixed["concept_scores"].cast(pa.list_(pa.float32(), 5)))
    write_shards(tmp_path / "fixed", fixed, [700, 500])
    write_shards(tmp_path / "plain", zipf_table, [1200])
    for w in ("mean", "score_weighted"):
        for name in ("fixed", "plain"):
            balance(tmp_path / name, tmp_path / f"o-{name}-{w}", "balance.fraction=0.3",
                    f"balance.weighting={w}", "run.executor=local")
        a, b = (kept(tmp_path / f"o-{n}-{w}").sort_by("sample_id") for n in ("fixed", "plain"))
        assert a["sample_id"].to_pylist() == b["sample_id"].to_pylist() and a.num_rows == 360
        assert a["weight"].to_pylist() == b["weight"].to_pylist()


def test_null_sources_from_foreign_inputs_do_not_break_the_counts(ray_address, tmp_path):
    rows = zipf_rows(40, concepts=10, k=2, seed=4)
    sources = [None if i % 4 == 0 else "web" for i in range(40)]
    write_shards(tmp_path / "in", pa.table({"sample_id": rows["sample_id"], "concept_ids": rows["concept_ids"],
                                            "source": sources}), [20, 20])
    _, summary = balance(tmp_path / "in", tmp_path / "out", "balance.fraction=0.5", "balance.num_concepts=10")
    assert summary.kept_rows == 20 and summary.input_rows == 40


# ---------------------------------------------------------------- resume

def test_rerun_after_a_crash_resumes_the_counts_pass(zipf_table, tmp_path, monkeypatch):
    """A shard that fails (a crash) leaves the other shards' counts committed; the re-run counts only
    what is missing, and the final output is byte for byte an uninterrupted run's."""
    inp = write_shards(tmp_path / "in", zipf_table, [400, 300, 500])
    args = ("balance.fraction=0.3", "run.executor=local")
    out, counts = tmp_path / "out", tmp_path / "out" / "_counts"
    counted = []
    real_count = BalanceCountsPass.process

    def count_but_crash_on_001(self, task):
        counted.append(task.shard)
        if task.shard == "shard-001":
            raise RuntimeError("worker died")
        return real_count(self, task)

    def select_crash(self, task):
        raise RuntimeError("worker died")

    with monkeypatch.context() as m:
        m.setattr(BalanceCountsPass, "process", count_but_crash_on_001)
        with pytest.raises(RuntimeError, match="balance_counts: 1 of 3 shards failed"):
            balance(inp, out, *args)
        assert committed_shards(counts / "_manifest") == {"shard-000", "shard-002"}
        # second run: only the missing shard is counted; then the selection crashes on every shard
        counted.clear()
        m.setattr(BalanceSelectPass, "process", select_crash)
        m.setattr(BalanceCountsPass, "process", lambda self, task: counted.append(task.shard) or real_count(self, task))
        with pytest.raises(RuntimeError, match="balance: 3 of 3 shards failed"):
            balance(inp, out, *args)
    assert counted == ["shard-001"]
    summary = json.loads((counts / "_manifest" / "_summary.json").read_text())
    assert (summary["shards"], summary["shards_skipped"]) == (3, 2)
    assert committed_shards(out / "_manifest") == set() and not list((out / "data").glob("*.parquet"))
    written = {p.name: p.stat().st_mtime_ns for p in (counts / "data").glob("*.parquet")}
    # third run: every count is committed and reused, the selection completes
    _, final = balance(inp, out, *args)
    summary = json.loads((counts / "_manifest" / "_summary.json").read_text())
    assert (summary["shards"], summary["shards_skipped"], summary["input_rows"]) == (3, 3, 1200)
    assert {p.name: p.stat().st_mtime_ns for p in (counts / "data").glob("*.parquet")} == written
    assert (final.input_rows, final.kept_rows) == (1200, 360)  # counts rows are not samples
    assert committed_shards(out / "_manifest") == committed_shards(counts / "_manifest")
    # the counts: one row per concept of the shard, summing to every concept occurrence
    table = pa.concat_tables([pq.read_table(p) for p in sorted((counts / "data").glob("*.parquet"))])
    assert table.schema.names == ["concept_id", "count"] and sum(table["count"].to_pylist()) == 1200 * 5
    entry = json.loads((counts / "_manifest" / "shard-000.json").read_text())
    assert entry["usable_rows"] == 400 and entry["unusable_by_reason"] == {} and sum(entry["sources"].values()) == 400
    # same bytes as a run that never crashed
    balance(inp, tmp_path / "clean", *args)
    files = lambda d: {str(p.relative_to(d)): p.read_bytes() for p in d.rglob("*.parquet")}  # noqa: E731
    assert files(out) == files(tmp_path / "clean") and len(files(out)) == 3 + 3 + 3  # data, ledgers, counts
