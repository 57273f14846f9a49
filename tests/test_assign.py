"""Assign stage: backends against a float64 brute-force reference; the stage on Ray."""

import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.assign import CONCEPT_IDS, CONCEPT_SCORES, AssignStage, Searcher
from ovpipe.config import load_config
from ovpipe.core.stage import run_stage

from tests.helpers import TINY_EMBED as TINY


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def reference(concepts: np.ndarray, queries: np.ndarray, k: int):
    """float64 brute force; ties by lower id."""
    s = queries.astype(np.float64) @ concepts.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(np.arange(s.shape[1]), s.shape), -s), axis=1)[:, :k]
    return order, np.take_along_axis(s, order, 1)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_backends_equal_float64_reference_on_random_data(backend):
    rng = np.random.default_rng(0)
    concepts, queries = unit(rng, 20_000, 64), unit(rng, 700, 64)
    ids, scores = Searcher(concepts, backend, query_chunk=256).search(queries, 10)
    ref_ids, ref_scores = reference(concepts, queries, 10)
    assert ids.dtype == np.int32 and scores.dtype == np.float32
    assert np.array_equal(ids, ref_ids)
    assert np.abs(scores - ref_scores).max() < 1e-5
    assert (np.diff(scores, axis=1) <= 0).all()


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_ties_go_to_the_lower_concept_id_even_across_the_cut(backend):
    rng = np.random.default_rng(1)
    base = unit(rng, 50, 32)
    # concept 7 repeated at ids 7, 50, 51, 52, 53 (exact ties); k = 3 cuts through the tie
    concepts = np.concatenate([base, np.repeat(base[7:8], 4, axis=0), unit(rng, 30, 32)])
    queries = np.concatenate([base[7:8], unit(rng, 20, 32)])
    ids, scores = Searcher(concepts, backend).search(queries, 3)
    assert ids[0].tolist() == [7, 50, 51] and scores[0, 0] == scores[0, 2]
    assert np.array_equal(ids, reference(concepts, queries, 3)[0])


def test_auto_backend_and_k_larger_than_vocabulary(monkeypatch):
    rng = np.random.default_rng(2)
    concepts, queries = unit(rng, 4, 16), unit(rng, 3, 16)
    searcher = Searcher(concepts, "auto")
    assert searcher.backend == "faiss"  # faiss-cpu is installed (the cpu extra)
    ids, _ = searcher.search(queries, 4)
    assert sorted(ids[0].tolist()) == [0, 1, 2, 3]
    monkeypatch.setitem(sys.modules, "faiss", None)  # a machine without FAISS falls back to torch
    fallback = Searcher(concepts, "auto")
    assert fallback.backend == "torch"
    assert (fallback.search(queries, 4)[0] == ids).all()


@pytest.fixture(scope="module")
def embedded(demo_embedded) -> Path:
    """The session's demo shards, ingested and embedded by the tiny model."""
    return demo_embedded


def assign(inp, out, cache, *overrides, **kw):
    cfg = load_config(overrides=TINY + [f"assign.cache_dir={cache}", "assign.k=4", *overrides])
    return run_stage(AssignStage(), str(inp), str(out), cfg, quiet=True, **kw)


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.parquet"))
            if "_manifest" not in p.parts}


def test_assign_on_ray_cache_hit_and_identical_across_executors(embedded, tmp_path, capfd):
    cache = tmp_path / "cache"
    first = assign(embedded, tmp_path / "a", cache)
    assert "cache miss" in capfd.readouterr().err
    second = assign(embedded, tmp_path / "b", cache, "run.executor=local")
    assert "cache hit" in capfd.readouterr().err
    assert first.input_rows == first.kept_rows == 90 and second.kept_rows == 90
    assert files(tmp_path / "a") == files(tmp_path / "b")

    table = pq.read_table(tmp_path / "a", schema=None)
    assert "embedding" not in table.column_names
    assert table.schema.field(CONCEPT_IDS).type == pa.list_(pa.int32(), 4)
    assert table.schema.field(CONCEPT_SCORES).type == pa.list_(pa.float32(), 4)

    # the ids are the float64 brute force over the cached concept vectors
    concepts = np.load(next(cache.iterdir()) / "embeddings.npy")
    emb = pq.read_table(embedded)
    q = np.asarray(emb["embedding"].combine_chunks().flatten().to_numpy(zero_copy_only=False)).reshape(-1, 64)
    ref_ids, ref_scores = reference(concepts, q, 4)
    by_id = dict(zip(table["sample_id"].to_pylist(), table[CONCEPT_IDS].to_pylist()))
    got = np.array([by_id[s] for s in emb["sample_id"].to_pylist()])
    assert np.array_equal(got, ref_ids)


def test_bad_embeddings_are_ledgered_and_resume_skips_done_shards(embedded, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for p in sorted((embedded / "data").glob("*.parquet"))[:2]:
        shutil.copy(p, src / p.name)
    t = pq.read_table(sorted(src.glob("*.parquet"))[0]).slice(0, 3)
    emb = np.asarray(t["embedding"].combine_chunks().flatten().to_numpy(zero_copy_only=False)).reshape(-1, 64).copy()
    emb[1, 5] = np.nan
    col = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float16()), 64)
    bad = t.set_column(t.schema.get_field_index("embedding"), t.schema.field("embedding"), col)
    pq.write_table(bad, src / "zz_bad.parquet")
    cache = tmp_path / "cache"
    summary = assign(src, tmp_path / "o", cache, "run.executor=local")
    assert summary.dropped_by_reason == {"bad_embedding": 1}
    assert summary.input_rows == summary.kept_rows + summary.dropped_rows
    again = assign(src, tmp_path / "o", cache, "run.executor=local")
    assert again.shards_skipped == again.shards == 3


def test_concepts_from_another_model_are_refused(embedded, tmp_path):
    with pytest.raises(ValueError, match="were made by"):
        assign(embedded, tmp_path / "o", tmp_path / "cache", "embed.init_seed=1", "run.executor=local")
