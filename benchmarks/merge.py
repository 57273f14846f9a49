"""Merge + dedup: `ovpipe merge` (Ray tasks, hash-partitioned shuffle) vs a single-process polars
group-by dedup of the same rows, at two sizes (growth), interleaved A/B/A/B.

Input: two FineVision-style sources (Parquet shards, ``images`` [{bytes, path}] + ``texts``
[{user, assistant}]) of synthetic conversation rows over a pool of small PNGs, with planted
duplicates: exact (same image, question and answer), question-level (same image and question,
other answer), within and across sources, and look-alikes that are not duplicates (same question
on another image, another question on the same image).

The alternative reads every row into one polars frame, normalises the question (lower case,
whitespace collapsed: on this ASCII data what merge's NFKC + casefold does) and keeps the first row
per (image bytes, question) in source-priority order. Both must keep the same result set:
the same (source, image, normalised question) triples. ovpipe also validates every record,
probes every image header, computes sample ids and writes the merged dataset, the ledger
and manifests; token counting (merge.count_tokens) and near duplicates are off, as the
alternative does neither.

    python benchmarks/merge.py [--rows 1000000] [--small 250000] [--workers 2] [--repeats 2]

Last line: one JSON object; headline_ratio = ovpipe seconds / polars seconds at the larger size
(lower is better; ovpipe scales out over a cluster, the alternative is bound to one process and
its memory).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

POOL = 4096  # distinct images
ROWS_PER_SHARD = 50_000


def image_pool(seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(POOL):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def make_input(root: Path, rows: int, seed: int) -> None:
    """Row i asks question q_i about image m_i; about a third of the rows repeat an earlier
    (image, question) pair, half of those with the earlier answer (exact) and half with another."""
    rng = np.random.default_rng(seed)
    pool = image_pool(seed)
    img = rng.integers(0, POOL, rows)
    q = np.arange(rows) // 3 * 2 + rng.integers(0, 2, rows)  # pairs of rows share a question id
    repeat = rng.random(rows) < 0.34
    src_of_earlier = rng.integers(0, np.maximum(np.arange(rows), 1))
    img[repeat], q[repeat] = img[src_of_earlier[repeat]], q[src_of_earlier[repeat]]
    ans = np.where(repeat & (rng.random(rows) < 0.5), q, q + 7 * np.arange(rows) + 1)
    source = rng.integers(0, 2, rows)
    for s in (0, 1):
        idx = np.flatnonzero(source == s)
        (root / f"src{s}").mkdir(parents=True)
        for k in range(0, len(idx), ROWS_PER_SHARD):
            part = idx[k:k + ROWS_PER_SHARD]
            users = [f"{'  What' if i % 5 == 0 else 'what'} is shown about item {q[i]} in the picture?" for i in part]
            texts = [[{"user": u, "assistant": f"Answer number {ans[i]}."}] for u, i in zip(users, part)]
            images = [[{"bytes": pool[img[i]], "path": None}] for i in part]
            pq.write_table(pa.table({"images": images, "texts": texts}),
                           root / f"src{s}" / f"part-{k // ROWS_PER_SHARD:05d}.parquet")


def polars_dedup(root: Path) -> tuple[set, float]:
    start = time.perf_counter()
    frames = []
    for rank, s in enumerate(("src0", "src1")):
        df = pl.read_parquet(str(root / s / "*.parquet"))
        frames.append(df.with_columns(pl.lit(rank).alias("rank"), pl.lit(s).alias("source"))
                      .with_row_index("row"))
    df = pl.concat(frames)
    df = df.with_columns(
        pl.col("images").list.first().struct.field("bytes").alias("image"),
        pl.col("texts").list.first().struct.field("user").str.to_lowercase()
        .str.replace_all(r"\s+", " ").str.strip_chars().alias("question"))
    kept = df.sort(["rank", "row"]).unique(subset=["image", "question"], keep="first", maintain_order=True)
    seconds = time.perf_counter() - start
    import xxhash

    result = {(s, xxhash.xxh3_64_hexdigest(i), qn) for s, i, qn in
              zip(kept["source"].to_list(), kept["image"].to_list(), kept["question"].to_list())}
    return result, seconds


def ovpipe_merge(root: Path, out: Path, workers: int) -> tuple[set, float, dict]:
    from curation.merge import MergeStage, normalise_text
    from ovpipe.config import load_config
    from ovpipe.core.shards import Location, list_input_shards

    cfg = load_config(overrides=[
        "merge.sources=" + json.dumps([f"src{k}={root / f'src{k}'}" for k in (0, 1)]),
        "merge.count_tokens=false", "merge.plot=false", f"merge.partitions={max(4, 4 * workers)}",
        f"run.workers={workers}", "run.progress_interval_s=30"])
    start = time.perf_counter()
    summary = MergeStage().run(None, str(out), cfg, quiet=True)
    seconds = time.perf_counter() - start
    result = set()
    for shard in list_input_shards(Location.parse(str(out))):
        t = pq.read_table(shard.path, columns=["source", "image_ids", "conversations"])
        for s, ids, conv in zip(*(t.column(c).to_pylist() for c in ("source", "image_ids", "conversations"))):
            result.add((s, ids[0], normalise_text(conv[0]["value"])))
    return result, seconds, summary.to_json()


def save_report(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "merge.json").write_text(json.dumps(result, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(6, 3.4))
    sizes = [r["rows"] for r in result["sizes"]]
    ax.plot(sizes, [r["ovpipe_seconds"] for r in result["sizes"]], "o-",
            label=f"ovpipe merge ({result['workers']} Ray workers)")
    ax.plot(sizes, [r["polars_seconds"] for r in result["sizes"]], "s-", label="polars group-by (1 process)")
    ax.set_xlabel("conversation rows")
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"merge + dedup: ovpipe / polars = {result['headline_ratio']} at {sizes[-1]:,} rows", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "merge.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=250_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--repeats", type=int, default=2, help="A/B rounds per size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, logging_level="WARNING")
    ray.get([ray.remote(lambda: None).remote() for _ in range(args.workers)])
    startup = time.perf_counter() - t0
    tmp = Path(tempfile.mkdtemp(prefix="ovpipe-bench-merge-"))
    sizes = []
    try:
        for rows in (args.small, args.rows):
            data = tmp / f"in-{rows}"
            t = time.perf_counter()
            make_input(data, rows, args.seed)
            print(f"made {rows:,} rows in {time.perf_counter() - t:.1f}s", file=sys.stderr)
            ov, po = [], []
            for k in range(args.repeats):  # A/B/A/B
                got, s, summary = ovpipe_merge(data, tmp / f"out-{rows}-{k}", args.workers)
                ov.append(s)
                want, p = polars_dedup(data)
                po.append(p)
                assert got == want, f"result sets differ: {len(got ^ want)} triples"
                shutil.rmtree(tmp / f"out-{rows}-{k}", ignore_errors=True)
                print(f"{rows:,} rows, round {k}: ovpipe {s:.1f}s, polars {p:.1f}s, kept {len(got):,}", file=sys.stderr)
            sizes.append({"rows": rows, "kept": len(got), "ovpipe_seconds": round(statistics.median(ov), 2),
                          "polars_seconds": round(statistics.median(po), 2),
                          "ratio": round(statistics.median(o / p for o, p in zip(ov, po)), 3),
                          "ovpipe_rows_per_s": round(rows / statistics.median(ov), 1),
                          "dropped_by_reason": summary["dropped_by_reason"]})
            shutil.rmtree(data, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ray.shutdown()
    small, big = sizes
    growth = big["rows"] / small["rows"]
    result = {
        "benchmark": "merge",
        "workers": args.workers,
        "alternative": "polars single process: read all rows, normalise the question, unique on (image bytes, "
                       "question) keeping the first in source-priority order",
        "same_result_set": True,
        "sizes": sizes,
        "ovpipe_growth": round(big["ovpipe_seconds"] / small["ovpipe_seconds"], 3),
        "polars_growth": round(big["polars_seconds"] / small["polars_seconds"], 3),
        "rows_growth": growth,
        "ray_startup_seconds": round(startup, 2),
        "headline_ratio": big["ratio"],
        "headline": "ovpipe seconds / polars seconds at the larger size (lower is better)",
    }
    save_report(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
