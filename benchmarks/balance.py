"""Balance benchmark: 20M samples x top-5 concepts from a Zipf law over 500K concepts -> 5M selected.

(a) The selection core (curation.balance_core.select: concept counts, weights, Efraimidis-Spirakis
    keys, radix-select cut-off, keep mask, inclusion probabilities) on in-memory arrays, against
    one plain numpy pass over the same arrays (bincount of the concepts + gather of per-sample
    mean inverse frequency), in the same run: time ratio (target <= 3x) and peak memory
    (tracemalloc; target: inputs + extra <= 2x the input arrays).
(b) End to end: `ovpipe balance` (a subprocess with its own local Ray) on Parquet shards of the
    first --e2e-rows of the same data: wall time, the stage's own time from OUT/_manifest/_summary.json
    and its counts pass's from OUT/_counts/_manifest/_summary.json (the rest is the select pass:
    the cut-off search in its prepare, then the per-shard selection).

    .venv/bin/python benchmarks/balance.py [--rows 20000000] [--e2e-rows 2000000]

Progress goes to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from curation.balance_core import ConceptLists, select  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench balance] {msg}", file=sys.stderr, flush=True)


def make_data(rows: int, k: int, concepts: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """sample_hash (uint64) and concept ids (rows, k) int32, ranks drawn from p(r) ~ 1/r."""
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(1.0 / np.arange(1, concepts + 1))
    cdf /= cdf[-1]
    perm = rng.permutation(concepts).astype(np.int32)  # concept ids are not ranks
    ids = np.empty((rows, k), dtype=np.int32)
    step = 1 << 20
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        ranks = np.searchsorted(cdf, rng.random((stop - start) * k))
        ids[start:stop] = perm[np.minimum(ranks, concepts - 1)].reshape(-1, k)
        if start // step % 5 == 0:
            log(f"data {stop:,}/{rows:,} rows")
    hashes = rng.integers(0, np.iinfo(np.uint64).max, size=rows, dtype=np.uint64, endpoint=True)
    return hashes, ids


def numpy_pass(ids: np.ndarray, concepts: int) -> np.ndarray:
    """The reference: one bincount of all concepts + a gather of the per-sample weights."""
    counts = np.bincount(ids.reshape(-1), minlength=concepts)
    inv = 1.0 / np.maximum(counts, 1)
    return inv[ids].mean(axis=1)


def core(hashes: np.ndarray, ids: np.ndarray, n_select: int):
    return select(hashes, ConceptLists.fixed(ids), target=n_select, seed=0)


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def peak_extra(fn, *args) -> int:
    """Peak bytes allocated during fn (numpy reports its buffers to tracemalloc), results included."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    out = fn(*args)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    del out
    return peak


def write_parquet(folder: Path, hashes: np.ndarray, ids: np.ndarray, rows_per_shard: int) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    k = ids.shape[1]
    sources = np.array(["coyo", "datacomp", "laion_cn", "obelics"], dtype=object)
    shards = 0
    for start in range(0, len(hashes), rows_per_shard):
        h = hashes[start:start + rows_per_shard]
        n = len(h)
        offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
        table = pa.table({
            "sample_id": pa.array([f"{x:016x}" for x in h.tolist()], pa.string()),
            "sample_hash": pa.array(h, pa.uint64()),
            "source": pa.array(sources[(h % np.uint64(4)).astype(np.intp)].tolist(), pa.string()),
            "concept_ids": pa.ListArray.from_arrays(offsets, pa.array(ids[start:start + n].reshape(-1))),
            "concept_scores": pa.ListArray.from_arrays(
                offsets, pa.array(np.linspace(0.3, 0.1, k, dtype=np.float32).repeat(1).tolist() * n, pa.float32())),
        })
        pq.write_table(table, folder / f"part-{shards:05d}.parquet", compression="zstd")
        shards += 1
    return shards


def end_to_end(hashes: np.ndarray, ids: np.ndarray, rows: int, rows_per_shard: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="ovpipe-bench-balance-") as tmp:
        inp, out = Path(tmp) / "assign", Path(tmp) / "balance"
        t0 = time.perf_counter()
        shards = write_parquet(inp, hashes[:rows], ids[:rows], rows_per_shard)
        log(f"e2e: wrote {rows:,} rows in {shards} shards ({time.perf_counter() - t0:.1f}s)")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("RAY_ADDRESS", None)
        cmd = [sys.executable, "-m", "ovpipe.cli", "balance", "--input", str(inp), "--output", str(out),
               "--target", str(rows // 4), "--seed", "0", "--set", "run.progress_interval_s=30"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"ovpipe balance failed:\n{proc.stderr[-4000:]}")
        summary = json.loads((out / "_manifest" / "_summary.json").read_text())
        counts = json.loads((out / "_counts" / "_manifest" / "_summary.json").read_text())
        report = json.loads((out / "_report" / "balance_report.json").read_text())
        return {
            "rows": rows, "shards": shards, "selected": summary["kept_rows"],
            "exact_n": summary["kept_rows"] == rows // 4,
            "wall_s": round(wall, 2), "stage_s": summary["seconds"], "counts_pass_s": counts["seconds"],
            "rows_per_s": round(rows / wall), "cpus": os.cpu_count(),
            "entropy_bits_before": report["concepts_before"]["entropy_bits"],
            "entropy_bits_after": report["concepts_after"]["entropy_bits"],
            "top50_share_before": report["concepts_before"]["top50_share"],
            "top50_share_after": report["concepts_after"]["top50_share"],
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=20_000_000)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--concepts", type=int, default=500_000)
    p.add_argument("--select", type=int, default=5_000_000)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each (interleaved); the median counts")
    p.add_argument("--e2e-rows", type=int, default=2_000_000, help="0 = skip (b)")
    p.add_argument("--rows-per-shard", type=int, default=250_000)
    args = p.parse_args()

    hashes, ids = make_data(args.rows, args.k, args.concepts, seed=0)
    input_bytes = hashes.nbytes + ids.nbytes
    log(f"data ready: {input_bytes / 2**20:,.0f} MiB of input arrays")
    core_t, base_t = [], []
    for r in range(args.repeats):
        t, base_w = timed(numpy_pass, ids, args.concepts)
        base_t.append(t)
        t, sel = timed(core, hashes, ids, args.select)
        core_t.append(t)
        log(f"repeat {r + 1}: numpy pass {base_t[-1]:.2f}s, selection core {core_t[-1]:.2f}s")
    assert np.array_equal(sel.weight, sel.weight) and int(sel.keep.sum()) == args.select
    weights_agree = bool(np.allclose(sel.weight, base_w, rtol=1e-12))
    del sel, base_w
    core_peak = peak_extra(core, hashes, ids, args.select)
    base_peak = peak_extra(numpy_pass, ids, args.concepts)
    log(f"peak extra memory: core {core_peak / 2**20:,.0f} MiB, numpy pass {base_peak / 2**20:,.0f} MiB")
    core_s, base_s = float(np.median(core_t)), float(np.median(base_t))

    e2e = None
    if args.e2e_rows:
        e2e = end_to_end(hashes, ids, min(args.e2e_rows, args.rows), args.rows_per_shard)
        log(f"e2e: {e2e}")

    print(json.dumps({
        "benchmark": "balance",
        "rows": args.rows, "k": args.k, "concepts": args.concepts, "selected": args.select,
        "exact_n": True, "weights_match_numpy_pass": weights_agree,
        "core_s": round(core_s, 3), "numpy_pass_s": round(base_s, 3),
        "headline_ratio": round(core_s / base_s, 3), "target_ratio_max": 3.0,
        "core_min_s": round(min(core_t), 3), "numpy_pass_min_s": round(min(base_t), 3),
        "ratio_of_min_times": round(min(core_t) / min(base_t), 3),
        "input_bytes": input_bytes,
        "core_peak_extra_bytes": core_peak, "numpy_pass_peak_extra_bytes": base_peak,
        "core_peak_total_over_input": round((input_bytes + core_peak) / input_bytes, 3),
        "target_peak_total_over_input_max": 2.0,
        "repeats": args.repeats, "cpus": os.cpu_count(),
        "e2e": e2e,
    }))


if __name__ == "__main__":
    main()
