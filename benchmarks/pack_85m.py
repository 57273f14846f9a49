"""Slow benchmark (not in the default suite): pack 85M precomputed lengths on this machine.

    .venv/bin/python benchmarks/pack_85m.py [--n 85000000] [--buckets 64]

Lengths are log-normal (mean ~740, clipped to [64, 8192]) with random 64-bit sample hashes,
generated per bucket from a seed (as pass 2 of `ovpipe pack` sees them: one bucket at a time).
Each bucket is packed with packing.pack.pack_lengths, the buckets one after another in this
process. Reports wall time, packs vs the lower bound, and peak RSS per sample (target <= 64 B).
Prints ONE JSON line last.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from packing.pack import lower_bound, pack_lengths  # noqa: E402

CAP = 8192


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=85_000_000)
    ap.add_argument("--buckets", type=int, default=64)
    args = ap.parse_args()
    base_rss = peak_rss_bytes()
    sigma = 0.8
    mu = np.log(740) - sigma**2 / 2
    start = time.perf_counter()
    packs = tokens = bound_sum = 0
    pack_seconds = 0.0
    for b in range(args.buckets):
        rng = np.random.default_rng(b)
        n = args.n // args.buckets + (1 if b < args.n % args.buckets else 0)
        lengths = np.clip(np.round(rng.lognormal(mu, sigma, n)), 64, CAP).astype(np.int16)
        hashes = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64)
        t = time.perf_counter()
        res = pack_lengths(lengths, CAP, sample_hash=hashes)
        pack_seconds += time.perf_counter() - t
        assert res.pack_tokens.max() <= CAP and len(res.order) == n
        packs += res.num_packs
        tokens += int(lengths.sum(dtype=np.int64))
        bound_sum += lower_bound(int(lengths.sum(dtype=np.int64)), CAP)
        del lengths, hashes, res
        print(f"bucket {b + 1}/{args.buckets}: {packs:,} packs so far, {time.perf_counter() - start:.0f}s, "
              f"peak RSS {peak_rss_bytes() / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    wall = time.perf_counter() - start
    peak = peak_rss_bytes()
    print(json.dumps({
        "benchmark": "pack_85m", "samples": args.n, "buckets": args.buckets, "packs": packs,
        "lower_bound": lower_bound(tokens, CAP), "lower_bound_per_bucket_sum": bound_sum,
        "packs_ratio_to_bound": round(packs / lower_bound(tokens, CAP), 6),
        "compression": round(args.n / packs, 3), "fill": round(tokens / (packs * CAP), 6),
        "wall_seconds": round(wall, 1), "pack_seconds": round(pack_seconds, 1),
        "samples_per_s": round(args.n / pack_seconds),
        "peak_rss_gib": round(peak / 2**30, 3), "peak_rss_bytes_per_sample": round(peak / args.n, 2),
        "rss_above_start_bytes_per_sample": round((peak - base_rss) / args.n, 2),
        "headline_ratio": round(peak / args.n, 2),
    }))


if __name__ == "__main__":
    main()
