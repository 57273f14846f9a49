"""Ingest throughput: `ovpipe ingest` on a local Ray vs a plain single-process loop.

The alternative does the same per-image work on the same files — read the image bytes from
Parquet, hash them (xxh3-64), read the size from the header — in one process, one shard after
another. ovpipe also does what the loop does not (dedup shuffle, EXIF orientation, truncation
checks, writing the output and ledger Parquet, manifest commits), on as many workers as Ray has
CPUs. Ray's start-up is timed separately; the headline compares the stage's own wall time.

    python benchmarks/ingest.py [--images 2000000] [--shards 100] [--workers 2]

Last line: one JSON object; headline_ratio = ovpipe rows/s / loop rows/s (target >= 0.7).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def base_jpegs(count: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        w, h = int(rng.integers(32, 128)), int(rng.integers(32, 128))
        small = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h))  # smooth, photo-like sizes (a few KB)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=75)
        out.append(buf.getvalue())
    return out


def unique_copy(jpeg: bytes, n: int) -> bytes:
    """The same picture with a JPEG comment segment carrying n: different bytes, same decode."""
    payload = f"ovpipe-bench-{n}".encode()
    return jpeg[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


def make_input(root: Path, images: int, shards: int, seed: int) -> int:
    bases = base_jpegs(256, seed)
    per_shard = -(-images // shards)
    n = 0
    for s in range(shards):
        rows = [unique_copy(bases[(n + i) % len(bases)], n + i) for i in range(min(per_shard, images - n))]
        pq.write_table(pa.table({"key": [f"k{n + i}" for i in range(len(rows))],
                                 "image": pa.array(rows, pa.binary()),
                                 "text": [f"image {n + i}" for i in range(len(rows))]}),
                       root / f"part-{s:05d}.parquet")
        n += len(rows)
    return n


def plain_loop(root: Path) -> tuple[int, float]:
    start = time.perf_counter()
    rows = 0
    for path in sorted(root.glob("*.parquet")):
        table = pq.read_table(path, columns=["image"])
        for data in table.column("image").to_pylist():
            xxhash.xxh3_64_intdigest(data)
            Image.open(io.BytesIO(data)).size
            rows += 1
    return rows, time.perf_counter() - start


def ovpipe_ingest(root: Path, out: Path, workers: int) -> tuple[int, float, float]:
    import ray

    from curation.ingest import IngestStage
    from ovpipe.config import load_config
    from ovpipe.core.stage import run_stage

    start = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, logging_level="WARNING")
    # a trivial task, so worker processes exist before the clock starts for the stage
    ray.get([ray.remote(lambda: None).remote() for _ in range(workers)])
    startup = time.perf_counter() - start
    cfg = load_config(overrides=[f"run.workers={workers}", "run.progress_interval_s=10"])
    start = time.perf_counter()
    summary = run_stage(IngestStage(), str(root), str(out), cfg)
    seconds = time.perf_counter() - start
    ray.shutdown()
    return summary.kept_rows, seconds, startup


def save_report(result: dict) -> None:
    """benchmarks/results/ingest.json and a bar chart of the two rates next to it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "ingest.json").write_text(json.dumps(result, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = ["plain loop (1 process)", f"ovpipe ingest ({result['workers']} Ray workers)"]
    ax.barh(names, [result["loop_rows_per_s"], result["ovpipe_rows_per_s"]], color=["#999", "#3a7"])
    ax.set_xlabel("images / s")
    ax.set_title(f"ingest, {result['images']:,} images: ratio {result['headline_ratio']}\n"
                 f"(Ray start-up {result['ray_startup_seconds']}s, not counted)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "ingest.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2_000_000)
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the temporary data")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ovpipe-bench-ingest-"))
    try:
        t = time.perf_counter()
        (tmp / "raw").mkdir()
        n = make_input(tmp / "raw", args.images, args.shards, args.seed)
        input_mb = sum(p.stat().st_size for p in (tmp / "raw").glob("*.parquet")) / 1e6
        print(f"made {n:,} images ({input_mb:.0f} MB) in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        loop_rows, loop_s = plain_loop(tmp / "raw")  # also warms the page cache for both
        kept, ovpipe_s, startup_s = ovpipe_ingest(tmp / "raw", tmp / "out", args.workers)
        assert kept == loop_rows == n, (kept, loop_rows, n)
        result = {
            "benchmark": "ingest",
            "images": n,
            "input_mb": round(input_mb, 1),
            "shards": args.shards,
            "workers": args.workers,
            "alternative": "plain single-process loop: read bytes from Parquet, xxh3-64, PIL header size",
            "loop_rows_per_s": round(loop_rows / loop_s, 1),
            "loop_seconds": round(loop_s, 2),
            "ovpipe_rows_per_s": round(kept / ovpipe_s, 1),
            "ovpipe_seconds": round(ovpipe_s, 2),
            "ray_startup_seconds": round(startup_s, 2),
            "ray_startup_share_of_run": round(startup_s / (startup_s + ovpipe_s), 3),
            "headline_ratio": round((kept / ovpipe_s) / (loop_rows / loop_s), 3),
            "target": ">= 0.7",
        }
        save_report(result)
        print(json.dumps(result))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
