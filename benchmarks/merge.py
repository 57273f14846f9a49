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


def polars_child(root: Path, dest: Path) -> None:
    """--polars-child: the alternative in a fresh process, so its peak RSS is its own."""
    import pickle
    import resource

    result, seconds = polars_dedup(root)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dest.write_bytes(pickle.dumps((result, seconds, rss_mb)))


def polars_run(root: Path, tmp: Path) -> tuple[set, float, float]:
    """(result set, seconds, peak RSS in MB) of polars_dedup run in its own process."""
    import pickle
    import subprocess

    dest = tmp / "polars.pickle"
    subprocess.run([sys.executable, __file__, "--polars-child", str(root), str(dest)], check=True)
    out = pickle.loads(dest.read_bytes())
    dest.unlink()
    return out


class RssSampler:
    """Peak RSS (MB), sampled every 0.2 s from /proc, of this process's descendants (the Ray
    cluster it started: raylet, GCS, workers; not other users' Ray processes on the machine): of
    the largest one, and of all of them plus this process (the driver, reported apart: it also
    holds the benchmark's own input generation and result sets)."""

    def __init__(self):
        import threading

        self.max_one = self.max_total = self.max_driver = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _tree() -> list[str]:
        parent = {}
        for pid in os.listdir("/proc"):
            try:
                if pid.isdigit():
                    parent[pid] = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
            except (OSError, IndexError):
                continue
        tree, grew = {str(os.getpid())}, True
        while grew:
            more = {p for p, pp in parent.items() if pp in tree} - tree
            tree |= more
            grew = bool(more)
        return sorted(tree)

    def _run(self):
        me = str(os.getpid())
        while not self._stop.is_set():
            sizes, driver = [], 0.0
            for pid in self._tree():
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            mb = int(line.split()[1]) / 1024
                            if pid == me:
                                driver = mb
                            else:
                                sizes.append(mb)
                except OSError:
                    continue
            self.max_driver = max(self.max_driver, driver)
            if sizes:  # the largest is what a process's memory bound is about (the driver holds manifests)
                self.max_one, self.max_total = max(self.max_one, max(sizes)), max(self.max_total, sum(sizes) + driver)
            self._stop.wait(0.2)


def partitions_for(rows: int) -> int:
    """Shuffle partitions grow with the data (as a cluster run sets them), so one reduce task's
    share, and with it a process's memory, stays the same at every size."""
    return max(4, rows // 62_500)


def ovpipe_merge(root: Path, out: Path, workers: int) -> tuple[set, float, dict, RssSampler]:
    from curation.merge import MergeStage, normalise_text
    from ovpipe.config import load_config
    from ovpipe.core.shards import Location, list_input_shards

    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in root.rglob("*.parquet"))
    cfg = load_config(overrides=[
        "merge.sources=" + json.dumps([f"src{k}={root / f'src{k}'}" for k in (0, 1)]),
        "merge.count_tokens=false", "merge.plot=false", f"merge.partitions={partitions_for(rows)}",
        f"merge.image_partitions={partitions_for(rows)}", f"run.workers={workers}", "run.progress_interval_s=30"])
    start = time.perf_counter()
    with RssSampler() as rss:
        summary = MergeStage().run(None, str(out), cfg, quiet=True)
    seconds = time.perf_counter() - start
    result = set()
    for shard in list_input_shards(Location.parse(str(out))):
        t = pq.read_table(shard.path, columns=["source", "image_ids", "conversations"])
        for s, ids, conv in zip(*(t.column(c).to_pylist() for c in ("source", "image_ids", "conversations"))):
            result.add((s, ids[0], normalise_text(conv[0]["value"])))
    return result, seconds, summary.to_json(), rss


def save_report(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "merge.json").write_text(json.dumps(result, indent=2) + "\n")
    fig, (ax, mem) = plt.subplots(1, 2, figsize=(10, 3.6))
    sizes = [r["rows"] for r in result["sizes"]]
    ax.plot(sizes, [r["ovpipe_seconds"] for r in result["sizes"]], "o-",
            label=f"ovpipe merge ({result['workers']} Ray workers)")
    ax.plot(sizes, [r["polars_seconds"] for r in result["sizes"]], "s-", label="polars group-by (1 process)")
    ax.set_xlabel("conversation rows")
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"time: ovpipe / polars = {result['headline_ratio']} at {sizes[-1]:,} rows", fontsize=9)
    ax.legend(fontsize=8)
    mem.plot(sizes, [r["ovpipe_peak_rss_mb_largest_worker"] for r in result["sizes"]], "o-",
             label="ovpipe: largest worker process (partitions grow with rows)")
    mem.plot(sizes, [r["polars_peak_rss_mb"] for r in result["sizes"]], "s-", label="polars: its one process")
    mem.set_xlabel("conversation rows")
    mem.set_ylabel("peak RSS (MB)")
    mem.set_ylim(bottom=0)
    mem.set_title("memory of one process", fontsize=9)
    mem.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "merge.png", dpi=120)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--polars-child":
        polars_child(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=250_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--repeats", type=int, default=2, help="A/B rounds per size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import ray

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=args.workers, include_dashboard=False, logging_level="WARNING")
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
            ov, po, rss_one, rss_all, rss_driver, rss_polars = [], [], [], [], [], []
            for k in range(args.repeats):  # A/B/A/B
                got, s, summary, rss = ovpipe_merge(data, tmp / f"out-{rows}-{k}", args.workers)
                ov.append(s)
                rss_one.append(rss.max_one)
                rss_all.append(rss.max_total)
                rss_driver.append(rss.max_driver)
                want, p, prss = polars_run(data, tmp)
                po.append(p)
                rss_polars.append(prss)
                assert got == want, f"result sets differ: {len(got ^ want)} triples"
                shutil.rmtree(tmp / f"out-{rows}-{k}", ignore_errors=True)
                kept = len(got)
                del got, want  # not held by the driver through the next round
                print(f"{rows:,} rows, round {k}: ovpipe {s:.1f}s (peak RSS {rss.max_one:.0f} MB largest worker, "
                      f"{rss.max_driver:.0f} MB driver, {rss.max_total:.0f} MB all), polars {p:.1f}s ({prss:.0f} MB), "
                      f"kept {kept:,}", file=sys.stderr)
            sizes.append({"rows": rows, "kept": kept, "partitions": partitions_for(rows),
                          "ovpipe_seconds": round(statistics.median(ov), 2),
                          "polars_seconds": round(statistics.median(po), 2),
                          "ratio": round(statistics.median(o / p for o, p in zip(ov, po)), 3),
                          "ovpipe_rows_per_s": round(rows / statistics.median(ov), 1),
                          "polars_rows_per_s": round(rows / statistics.median(po), 1),
                          "ovpipe_peak_rss_mb_largest_worker": round(max(rss_one)),
                          "ovpipe_peak_rss_mb_driver": round(max(rss_driver)),
                          "ovpipe_peak_rss_mb_all_processes": round(max(rss_all)),
                          "polars_peak_rss_mb": round(max(rss_polars)),
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
        "ovpipe_rss_growth": round(big["ovpipe_peak_rss_mb_largest_worker"]
                                   / small["ovpipe_peak_rss_mb_largest_worker"], 3),
        "polars_rss_growth": round(big["polars_peak_rss_mb"] / small["polars_peak_rss_mb"], 3),
        "ray_startup_seconds": round(startup, 2),
        "ovpipe_over_polars_rows_per_s": round(1 / big["ratio"], 4),
        "headline_ratio": big["ratio"],
        "headline": "ovpipe seconds / polars seconds at the larger size (lower is better)",
    }
    save_report(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
