"""Paper scale (issue 15): what the driver does per image and per shard, and how the global steps grow.

(a) A real multi-node Ray cluster on this machine (a head with no CPUs, so every task and actor
    runs on the two worker nodes; all started with `ray start` on 127.0.0.1 and stopped by their
    own process groups) runs the embed stage with the tiny model. The driver is a process of its
    own; it reports its CPU seconds, peak RSS, the bytes of Ray Data blocks it receives and the
    bytes it reads and writes (/proc/self/io). Three inputs separate per-image from per-shard
    cost: (N1 images, S1 shards), (N2, S1) and (N1, S2). Each is run with this tree's code and
    with a baseline tree (default /tmp/base: `mkdir /tmp/base && git archive 80edea7 | tar -x -C
    /tmp/base`, the commit before issue 15), interleaved baseline/new.
(b) Global steps on synthetic inputs at two sizes each (STEP_SIZES: ingest's global dedup,
    caption's global dedup, balance's selection + report, pack), on the same cluster, each a
    driver process of its own: wall time, peak RSS of the driver and of the largest Ray worker
    process, growth exponent log(t2/t1)/log(n2/n1), and the driver's bytes per sample (its peak
    RSS growth between the sizes over the added rows).

    nice -n 10 python benchmarks/scale.py [--base /tmp/base] [--work /tmp/ovpipe-scale] [--quick]
        [--steps ingest_dedup,pack] [--steps-only | --embed-only]

Prints one JSON object last (`headline_ratio` = driver bytes per image, baseline / new) and saves
benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["embed.model=ovpipe-tiny-clip", "embed.pretrained=random", "embed.batch_size=64",
        "embed.pool_size=2", "embed.num_cpus_per_actor=1", "embed.decode_rows=256"]
IMAGES_PER_CONTAINER = 100


# ------------------------------------------------------------------------------ the cluster
# ovpipe/testing/ray_cluster.py (shared with tests/test_scale.py's two-node test), imported where
# used: the driver and step processes must import ovpipe from the tree they measure (PYTHONPATH).

class RayRssSampler:
    """Peak RSS of the largest Ray worker process of this cluster (the workers descend from its
    nodes' `ray start` processes) while a step runs."""

    def __init__(self, node_pids: list[int], interval_s: float = 0.25):
        import psutil

        self.psutil, self.interval, self.peak, self.node_pids = psutil, interval_s, 0, node_pids
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in self.node_pids:
                with contextlib.suppress(Exception):
                    for p in self.psutil.Process(pid).children(recursive=True):
                        if p.name().startswith("ray::"):  # workers retitle themselves ray::<task>
                            self.peak = max(self.peak, p.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------------------ (a) inputs

def make_images(root: Path, n: int) -> list[tuple[str, int, str]]:
    """n distinct 32x32 PNGs in Parquet containers of IMAGES_PER_CONTAINER; returns the references."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import xxhash
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    refs = []
    rng = np.random.default_rng(0)
    for c in range(math.ceil(n / IMAGES_PER_CONTAINER)):
        path = root / f"images-{c:05d}.parquet"
        blobs = []
        for _ in range(min(IMAGES_PER_CONTAINER, n - c * IMAGES_PER_CONTAINER)):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
            blobs.append(buf.getvalue())
        if not path.exists():
            pq.write_table(pa.table({"image": pa.array(blobs, pa.binary())}), path)
        refs += [(str(path), r, xxhash.xxh3_64_hexdigest(b)) for r, b in enumerate(blobs)]
    return refs


def make_input(root: Path, refs: list, n: int, shards: int) -> Path:
    """Ingest-like shards (sample_id + image reference) over the first n images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = root / f"in-{n}-{shards}"
    if out.exists():
        return out
    out.mkdir(parents=True)
    per = math.ceil(n / shards)
    for s in range(shards):
        part = refs[s * per:min((s + 1) * per, n)]
        pq.write_table(pa.table({"sample_id": [r[2] for r in part], "image_uri": [r[0] for r in part],
                                 "image_member": ["image"] * len(part),
                                 "image_row": pa.array([r[1] for r in part], pa.int64())}),
                       out / f"part-{s:05d}.parquet")
    return out


def driver_main(args) -> None:
    """One embed run as the driver process alone (started by `run_driver`)."""
    import logging

    import numpy as np
    import ray

    ray.init(address=args.address, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"PYTHONPATH": args.code, "RAY_AUTH_MODE": "disabled"}})
    import curation.embed as embed
    from ovpipe.config import load_config
    from ovpipe.core.stage import run_stage

    received = [0]
    first = {}  # CPU time and I/O counters when the first block arrived: the streaming part starts
    gather = embed._gather

    def counting(*a, **k):  # the block the driver got from Ray Data (old and new signatures)
        if not first:
            first.update(cpu=time.process_time(), io=_proc_io())
        batch = next(x for x in a if isinstance(x, dict))
        received[0] += sum(v.nbytes if v.dtype != object else sum(len(str(s)) + 8 for s in v)
                           for v in batch.values() if isinstance(v, np.ndarray))
        return gather(*a, **k)

    embed._gather = counting
    cfg = load_config(overrides=TINY)
    io0, t0, w0 = _proc_io(), time.process_time(), time.monotonic()
    summary = run_stage(embed.EmbedStage(), args.input, args.output, cfg, quiet=True)
    cpu, wall, io1 = time.process_time() - t0, time.monotonic() - w0, _proc_io()
    nodes = set()
    for p in Path(args.output, "_manifest").glob("*.json"):
        if not p.name.startswith("_"):
            nodes.add(json.loads(p.read_text()).get("node"))
    end_cpu = time.process_time()
    print(json.dumps({"cpu_s": cpu, "wall_s": wall, "images": summary.input_rows, "shards": summary.shards,
                      # from the first block to the end: start-up (imports, Ray Data's plan, actor
                      # start) left out, so the per-image and per-shard differences are not lost in it
                      "stream_cpu_s": end_cpu - first.get("cpu", end_cpu),
                      "stream_file_bytes": (io1["rchar"] - first["io"]["rchar"]) + (io1["wchar"] - first["io"]["wchar"])
                      if first else 0,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "block_bytes": received[0], "io_bytes": (io1["rchar"] - io0["rchar"]) + (io1["wchar"] - io0["wchar"]),
                      "commit_nodes": len(nodes)}))


def _proc_io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}


def run_driver(code: Path, address: str, src: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(code), RAY_ADDRESS=address, RAY_AUTH_MODE="disabled")
    cmd = ["nice", "-n", "10", sys.executable, str(Path(__file__).resolve()), "driver", "--code", str(code),
           "--address", address, "--input", str(src), "--output", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(code))
    if res.returncode:
        raise RuntimeError(f"driver failed ({code}): {res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def embed_driver_costs(address: str, work: Path, base: Path | None, n1: int, n2: int, s1: int, s2: int,
                       repeats: int) -> dict:
    refs = make_images(work / "images", n2)
    inputs = {"small": make_input(work, refs, n1, s1), "images": make_input(work, refs, n2, s1),
              "shards": make_input(work, refs, n1, s2)}
    codes = {"new": REPO} if base is None else {"baseline": base, "new": REPO}
    runs: dict[str, dict[str, list[dict]]] = {c: {k: [] for k in inputs} for c in codes}
    for _ in range(repeats):
        for kind, src in inputs.items():
            for name, code in codes.items():  # interleaved: baseline, new, baseline, new, ...
                r = run_driver(code, address, src, work / "out" / "embed")  # same output path for both
                runs[name][kind].append(r)
                print(f"[scale] embed {name} {kind}: {r}", file=sys.stderr, flush=True)
    figures = {}
    for name, by_kind in runs.items():
        med = {k: _median_run(v) for k, v in by_kind.items()}
        figures[name] = {
            "driver_cpu_us_per_image": (med["images"]["stream_cpu_s"] - med["small"]["stream_cpu_s"]) / (n2 - n1) * 1e6,
            "driver_cpu_ms_per_shard": (med["shards"]["stream_cpu_s"] - med["small"]["stream_cpu_s"]) / (s2 - s1) * 1e3,
            "driver_total_cpu_us_per_image": (med["images"]["cpu_s"] - med["small"]["cpu_s"]) / (n2 - n1) * 1e6,
            "driver_total_cpu_ms_per_shard": (med["shards"]["cpu_s"] - med["small"]["cpu_s"]) / (s2 - s1) * 1e3,
            "driver_bytes_per_image": med["images"]["block_bytes"] / n2,
            "driver_file_bytes_per_image": med["images"]["stream_file_bytes"] / n2,
            "driver_peak_rss_mb": max(r["peak_rss_mb"] for v in by_kind.values() for r in v),
            "commit_nodes": med["images"]["commit_nodes"],
            "runs": {k: v for k, v in med.items()},
        }
    return figures


def _median_run(runs: list[dict]) -> dict:
    runs = sorted(runs, key=lambda r: r["stream_cpu_s"])
    return runs[len(runs) // 2]


# ------------------------------------------------------------------------------ (b) global steps

def make_caption_rows(root: Path, n: int, shards: int, perms: int = 64) -> Path:
    """Pass-1-like shards: random caption keys and MinHash signatures, ~2% exact copies and ~2%
    near copies (a few signature values changed)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = root / f"cap-{n}"
    if out.exists():
        return out
    out.mkdir(parents=True)
    rng = np.random.default_rng(1)
    per = math.ceil(n / shards)
    for s in range(shards):
        m = min(per, n - s * per)
        h = rng.integers(0, 2**63, m, dtype=np.uint64)
        key = rng.integers(0, 2**63, m, dtype=np.uint64)
        sig = rng.integers(0, 2**32, (m, perms), dtype=np.uint32)
        dup = rng.random(m) < 0.02
        key[dup] = key[0]
        near = np.flatnonzero(rng.random(m) < 0.02)
        src = rng.integers(0, m, len(near))
        sig[near] = sig[src]
        sig[near, rng.integers(0, perms, len(near))] ^= 1
        table = pa.table({"sample_id": [f"{x:016x}" for x in h.tolist()], "sample_hash": h, "caption_key": key,
                          "caption_minhash": pa.FixedSizeListArray.from_arrays(pa.array(sig.reshape(-1)), perms)
                          .cast(pa.list_(pa.uint32()))})
        pq.write_table(table, out / f"part-{s:05d}.parquet")
    return out


def make_balance_rows(root: Path, n: int, shards: int, concepts: int = 500_000, k: int = 5) -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = root / f"bal-{n}"
    if out.exists():
        return out
    out.mkdir(parents=True)
    rng = np.random.default_rng(2)
    per = math.ceil(n / shards)
    for s in range(shards):
        m = min(per, n - s * per)
        h = rng.integers(0, 2**63, m, dtype=np.uint64)
        ids = (rng.zipf(1.3, (m, k)) % concepts).astype(np.int32)  # long-tailed concept frequencies
        table = pa.table({"sample_id": [f"{x:016x}" for x in h.tolist()], "sample_hash": h,
                          "concept_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), k)
                          .cast(pa.list_(pa.int32()))})
        pq.write_table(table, out / f"part-{s:05d}.parquet")
    return out


def make_ingest_rows(root: Path, n: int, shards: int) -> Path:
    """Raw image-bytes Parquet shards for ingest's dedup (its fast path hashes the `image` column):
    16-byte random blobs, ~2% of them copies of blobs anywhere earlier in the input."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = root / f"ing-{n}"
    if out.exists():
        return out
    out.mkdir(parents=True)
    rng = np.random.default_rng(3)
    per = math.ceil(n / shards)
    pool = np.zeros((0, 16), np.uint8)
    for s in range(shards):
        m = min(per, n - s * per)
        blobs = rng.integers(0, 256, (m, 16), dtype=np.uint8)
        dup = np.flatnonzero(rng.random(m) < 0.02)
        if len(pool):
            blobs[dup] = pool[rng.integers(0, len(pool), len(dup))]
        pool = blobs[:1000] if s == 0 else pool  # copies of the first shard's images, across the input
        pq.write_table(pa.table({"image": pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(16), m, [None, pa.py_buffer(blobs.tobytes())]).cast(pa.binary())}), out / f"part-{s:05d}.parquet")
    return out


def make_pack_rows(root: Path, n: int, shards: int) -> Path:
    """Lengths-only pack input (sample_id + num_tokens): a long-tailed length mix up to 8K tokens."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = root / f"pack-{n}"
    if out.exists():
        return out
    out.mkdir(parents=True)
    rng = np.random.default_rng(4)
    per = math.ceil(n / shards)
    for s in range(shards):
        m = min(per, n - s * per)
        h = rng.integers(0, 2**63, m, dtype=np.uint64)
        tokens = np.minimum(8192, 64 + rng.lognormal(6.0, 0.8, m).astype(np.int64))
        pq.write_table(pa.table({"sample_id": [f"{x:016x}" for x in h.tolist()],
                                 "num_tokens": pa.array(tokens, pa.int32())}), out / f"part-{s:05d}.parquet")
    return out


def step_main(args) -> None:
    """One global step as a driver process (started by `run_step`)."""
    import logging

    import ray

    ray.init(address=args.address, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"PYTHONPATH": args.code, "RAY_AUTH_MODE": "disabled"}})
    from ovpipe.config import load_config
    from ovpipe.core.shards import Location, list_input_shards

    t0, w0 = time.process_time(), time.monotonic()
    if args.step == "caption_dedup":
        from curation.caption_dedup import find_duplicates

        cfg = load_config()
        shards = list_input_shards(Location.parse(args.input))
        n_rows = int(args.rows)
        _, losers, _ = find_duplicates(shards, cfg.caption, cfg, Location.parse(args.output), n_rows)
        extra = {"losers": losers}
    elif args.step == "ingest_dedup":  # the stage's prepare(): the shuffle and what the driver keeps of it
        from curation.ingest import IngestStage
        from ovpipe.core.stage import PassContext

        cfg = load_config(overrides=["ingest.dedup_partitions=8"])
        stage, out = IngestStage(), Location.parse(args.output)
        ctx = PassContext("ingest", Location.parse(args.input), out, out, cfg, {}, True)
        stage.prepare(ctx, stage.list_shards(ctx))
        extra = {"losers": stage.duplicate_count()}
    elif args.step == "pack":
        from ovpipe.core.stage import run_stage
        from packing.stage import PackStage

        cfg = load_config(overrides=["pack.plot=false"])
        s = run_stage(PackStage(), args.input, args.output, cfg, quiet=True)
        extra = {"packs": s.kept_rows}
    else:
        from curation.balance import BalanceStage
        from ovpipe.core.stage import run_stage

        cfg = load_config(overrides=["balance.num_concepts=500000", "balance.top_k=5",
                                     f"balance.target={int(args.rows) * 40 // 85}", "balance.report_concepts=0"])
        s = run_stage(BalanceStage(), args.input, args.output, cfg, quiet=True)
        extra = {"kept": s.kept_rows}
    print(json.dumps({"cpu_s": time.process_time() - t0, "wall_s": time.monotonic() - w0,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}))


def run_step(step: str, address: str, src: Path, out: Path, rows: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_ADDRESS=address, RAY_AUTH_MODE="disabled")
    cmd = ["nice", "-n", "10", sys.executable, str(Path(__file__).resolve()), "step", "--step", step,
           "--code", str(REPO), "--address", address, "--input", str(src), "--output", str(out), "--rows", str(rows)]
    from ovpipe.testing.ray_cluster import CLUSTER_NODES

    with RayRssSampler(CLUSTER_NODES[address]) as sampler:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(REPO))
    if res.returncode:
        raise RuntimeError(f"{step} failed: {res.stderr[-3000:]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    r["largest_worker_rss_mb"] = sampler.peak / 2**20
    return r


MAKERS = {"ingest_dedup": make_ingest_rows, "caption_dedup": make_caption_rows, "balance": make_balance_rows,
          "pack": make_pack_rows}


# Rows per step (two sizes each): the largest each step finishes in on this 2-core machine within
# the session's time (disk for the inputs is not the limit: 55 GB free).
STEP_SIZES = {"ingest_dedup": (10_000_000, 40_000_000), "caption_dedup": (8_000_000, 40_000_000),
              "balance": (40_000_000, 85_000_000), "pack": (32_000_000, 85_000_000)}


def _step_sizes(text: str) -> tuple[str, tuple[int, int]]:
    """'pack=32000000,85000000' -> ('pack', (32000000, 85000000)), checked."""
    step, _, rows = text.partition("=")
    counts = tuple(int(x) for x in rows.split(",") if x)
    if step not in STEP_SIZES or len(counts) != 2 or not 0 < counts[0] < counts[1]:
        raise SystemExit(f"--sizes {text!r}: expected STEP=A,B with A < B and STEP one of {', '.join(STEP_SIZES)}")
    return step, counts


def global_steps(address: str, work: Path, sizes: dict[str, tuple[int, int]], rows_per_shard: int,
                 saved: Path, repeats: int = 1) -> dict:
    """Runs the steps in `sizes`, each size `repeats` times interleaved (A, B, A, B, ...); the growth
    exponent is the median of the paired ratios B/A, the other figures the median-wall run's. The
    other steps come from `saved` (earlier runs), which is rewritten after each step so a failed
    or cut-short run keeps what it measured."""
    out = json.loads(saved.read_text()) if saved.exists() else {}
    if not sizes:
        return out
    for step in sizes:  # in the order asked
        make = MAKERS[step]
        runs, pairs = [], []
        for _ in range(repeats):
            pair = []
            for n in sizes[step]:
                src = make(work, n, max(1, n // rows_per_shard))
                r = run_step(step, address, src, work / "out" / step, n)
                r["rows"] = n
                pair.append(r)
                print(f"[scale] {step} {n:,}: {r}", file=sys.stderr, flush=True)
            pairs.append(pair)
            runs.extend(pair)
        exponents = sorted(math.log(b["wall_s"] / a["wall_s"]) / math.log(b["rows"] / a["rows"]) for a, b in pairs)
        a, b = (sorted((p[i] for p in pairs), key=lambda r: r["wall_s"])[(repeats - 1) // 2] for i in (0, 1))
        out[step] = {
            "runs": runs,
            "growth_exponent": exponents[(repeats - 1) // 2],  # the median pair's (the lower of two middles)
            "growth_exponents": exponents,
            "median_runs": [a, b],
            "driver_peak_rss_growth_mb": b["peak_rss_mb"] - a["peak_rss_mb"],
            # what the driver holds per sample: its RSS growth between the sizes over the added rows
            "driver_bytes_per_sample": max(0.0, (b["peak_rss_mb"] - a["peak_rss_mb"]) * 2**20 / (b["rows"] - a["rows"])),
            "largest_process_peak_rss_mb": max(max(r["peak_rss_mb"], r["largest_worker_rss_mb"]) for r in runs),
        }
        saved.write_text(json.dumps(out))
    return out


# ------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", nargs="?", default="bench", choices=["bench", "driver", "step"])
    ap.add_argument("--base", default="/tmp/base", help="baseline tree (a git worktree of the commit before); "
                    "'' = none")
    ap.add_argument("--work", default="/tmp/ovpipe-scale")
    ap.add_argument("--quick", action="store_true", help="smaller inputs (a smoke run, not the figures)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--steps-only", action="store_true", help="reuse the saved embed figures; run (b) only")
    ap.add_argument("--embed-only", action="store_true", help="reuse the saved step figures; run (a) only")
    ap.add_argument("--report-only", action="store_true", help="run nothing: the result from the saved figures")
    ap.add_argument("--sizes", action="append", default=[], metavar="STEP=A,B",
                    help="two row counts for a step instead of STEP_SIZES' (repeatable), e.g. pack=32000000,85000000")
    ap.add_argument("--steps", default=",".join(STEP_SIZES), help="the global steps to run (the others: "
                    "their saved figures)")
    ap.add_argument("--code"), ap.add_argument("--address"), ap.add_argument("--input"), ap.add_argument("--output")
    ap.add_argument("--step"), ap.add_argument("--rows")
    args = ap.parse_args(argv)
    if args.mode == "driver":
        driver_main(args)
        return 0
    if args.mode == "step":
        step_main(args)
        return 0
    from ovpipe.testing.ray_cluster import cluster

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the cluster's `finally` runs on SIGTERM too
    work = Path(args.work)
    base = Path(args.base) if args.base and Path(args.base, "curation", "embed.py").exists() else None
    n1, n2, s1, s2 = (1000, 3000, 4, 20) if args.quick else (4000, 20000, 4, 40)
    wanted = [x for x in args.steps.split(",") if x]
    chosen = {**STEP_SIZES, **dict(_step_sizes(x) for x in args.sizes)}
    sizes = {k: (20_000, 80_000) if args.quick else chosen[k] for k in wanted}
    partial = work / "embed_figures.json"  # (a) is kept if (b) fails: --steps-only reruns (b) alone
    saved_steps = work / ("steps_quick.json" if args.quick else "steps_figures.json")
    if args.report_only:
        embed, steps = json.loads(partial.read_text()), json.loads(saved_steps.read_text())
    else:
        with cluster() as address:
            if args.steps_only and partial.exists():
                embed = json.loads(partial.read_text())
            else:
                embed = embed_driver_costs(address, work, base, n1, n2, s1, s2, args.repeats)
                partial.write_text(json.dumps(embed))
            steps = global_steps(address, work, {} if args.embed_only else sizes, 50_000, saved_steps,
                                 args.repeats)
    new, old = embed["new"], embed.get("baseline")
    result = {
        "benchmark": "scale",
        "cluster": "head (0 CPUs, the driver) + 2 worker nodes x 2 CPUs, `ray start` on 127.0.0.1, one 2-core machine",
        "embed_inputs": {"images_small": n1, "images_large": n2, "shards_small": s1, "shards_large": s2},
        "driver_cpu_us_per_image": round(new["driver_cpu_us_per_image"], 2),
        "driver_cpu_ms_per_shard": round(new["driver_cpu_ms_per_shard"], 2),
        "driver_bytes_per_image": round(new["driver_bytes_per_image"], 2),
        "driver_peak_rss_mb": round(new["driver_peak_rss_mb"], 1),
        "commit_nodes": new["commit_nodes"],
        "baseline": None if old is None else {k: round(v, 2) for k, v in old.items() if isinstance(v, (int, float))},
        "embed_runs": {name: figures["runs"] for name, figures in embed.items()},
        "global_steps": steps,
        "global_step_sizes": {k: sorted({r["rows"] for r in v["runs"]}) for k, v in steps.items()},
        "global_step_note": "balance and pack at 85M, ingest dedup and caption dedup at 40M (their 85M runs would "
                            "not finish in a session on this 2-core machine; docs/architecture.md extrapolates). "
                            "Steps run at different times on a shared machine (balance at 40M overlapped a CI "
                            "run): read wall times and growth exponents as noisy",
        "max_growth_exponent": round(max(s["growth_exponent"] for s in steps.values()), 3) if steps else None,
        "max_driver_bytes_per_sample": round(max(
            [new["driver_bytes_per_image"]] + [s["driver_bytes_per_sample"] for s in steps.values()]), 2),
        "headline_ratio": None if old is None else round(old["driver_bytes_per_image"] / max(new["driver_bytes_per_image"], 1e-9), 2),
        "headline": "driver bytes received per image, baseline / new (higher is better)",
    }
    results = REPO / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "scale.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
