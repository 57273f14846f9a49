"""Near-duplicate search: ovpipe's clustered method (curation/dedup.py) vs brute-force all-pairs
FAISS range search, on synthetic 1024-d unit embeddings with planted near-duplicate groups.

Data: 64 themes > ``topics`` topics > points, each a noisy copy of its parent at cosine ~0.7 (distinct
points of one topic are at cosine ~0.5, like images of one subject); planted groups of 2-5 near
copies (cosine 0.97-0.995 to their original) hold ``--group-share`` of the rows.

* clustered (ovpipe): FAISS k-means on a hash sample (``--kmeans-sample``), every row assigned to
  its nearest centroid, pairs at cosine >= T found within each cluster (``candidate_edges``: the
  code the dedup stage's reduce tasks run), one process.
* brute force: ``faiss.IndexFlatIP.range_search`` of every row against all rows. Its cost is
  exactly linear in the number of queries, so at each size it is timed on ``--queries`` query rows
  (all members of planted groups first, then others) and scaled by N / queries: running the full
  200K x 200K on a shared 2-core machine takes an hour; the scaled time is what it would cost.

Identical duplicate sets: for the query rows, the pairs at cosine >= T from brute force equal the
pairs the clustered method found (a pair split across two clusters would be missed: counted).
Sizes run interleaved A/B/A/B (``--repeats``); the medians go in the JSON line printed last:
``headline_ratio`` = brute-force seconds (scaled) / clustered seconds at the largest size, and
the growth of both between the two sizes.

    python benchmarks/dedup.py [--sizes 50000 200000] [--queries 4096] [--json benchmarks/results/dedup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from curation.dedup import assign_clusters, candidate_edges, learn_centroids  # noqa: E402


def make_data(n: int, dim: int, topics: int, groups: int, seed: int, themes: int = 64):
    """(float32 [n, dim] unit rows, group id per row or -1): planted groups first, then the rest.
    Themes > topics > points, each a noisy copy of its parent (cosine ~0.7 to it), like images of
    one subject inside one domain; near copies are at cosine 0.97-0.995 to their original."""
    rng = np.random.default_rng(seed)

    def noisy(parents: np.ndarray, scale: float) -> np.ndarray:
        v = parents + scale * rng.standard_normal(parents.shape, dtype=np.float32) / np.sqrt(dim)
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    theme = noisy(np.zeros((themes, dim), np.float32), 1.0)
    centres = noisy(theme[rng.integers(themes, size=topics)], 1.0)
    x = np.empty((n, dim), np.float32)
    gid = np.full(n, -1, np.int64)
    row = 0
    for g in range(groups):
        size = int(rng.integers(2, 6))
        if row + size > n:
            break
        base = noisy(centres[rng.integers(topics)], 1.0)
        x[row], gid[row] = base, g
        for k in range(1, size):
            x[row + k], gid[row + k] = noisy(base, rng.uniform(0.1, 0.25)), g
        row += size
    for start in range(row, n, 65536):
        stop = min(start + 65536, n)
        x[start:stop] = noisy(centres[rng.integers(topics, size=stop - start)], 1.0)
    return x, gid


def clustered(x: np.ndarray, threshold: float, cluster_rows: int, sample: int, iters: int, seed: int,
              margin: float):
    """ovpipe's method: returns (seconds, {(i, j): i > j} pairs at cosine >= threshold)."""
    t0 = time.perf_counter()
    n = len(x)
    k = max(1, -(-n // cluster_rows))
    pick = np.random.default_rng(seed).choice(n, min(sample, n), replace=False)  # the stage: a hash sample
    centroids = learn_centroids(x[np.sort(pick)], k, iters, seed)
    parts = [assign_clusters(x[s:s + 65536], centroids, margin) for s in range(0, n, 65536)]
    home, guest = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    rows_all = np.concatenate([np.arange(n), np.flatnonzero(guest >= 0)])  # guests: a second appearance
    cl = np.concatenate([home, guest[guest >= 0]])
    order = rows_all[np.lexsort((rows_all, cl))]
    cl = np.sort(cl)
    bounds = np.flatnonzero(np.r_[True, cl[1:] != cl[:-1], True])
    pairs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        rows = order[s:e]  # ascending row ids within the cluster (stable sort)
        ei, ej, _c, _h = candidate_edges(x[rows], None, None, threshold, 0)
        pairs.append(np.stack([rows[ei], rows[ej]], axis=1))
    secs = time.perf_counter() - t0
    p = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
    return secs, {(int(a), int(b)) for a, b in p}, k


def brute_force(x: np.ndarray, queries: np.ndarray, threshold: float):
    """FAISS range search of the query rows against every row: (seconds, pairs, scaled seconds)."""
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    t0 = time.perf_counter()
    lims, _d, ids = index.range_search(x[queries], threshold)
    secs = time.perf_counter() - t0
    pairs = set()
    for qi, q in enumerate(queries.tolist()):
        for j in ids[lims[qi]:lims[qi + 1]].tolist():
            if j != q:
                pairs.add((max(q, j), min(q, j)))
    return secs, pairs, secs * len(x) / len(queries)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs=2, default=[50_000, 200_000])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--topics", type=int, default=2000)
    ap.add_argument("--group-share", type=float, default=0.1, help="share of rows in planted groups")
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--cluster-rows", type=int, default=2000)
    ap.add_argument("--kmeans-sample", type=int, default=50_000)
    ap.add_argument("--kmeans-iters", type=int, default=10)
    ap.add_argument("--queries", type=int, default=4096)
    ap.add_argument("--probe-margin", type=float, default=0.05, help="dedup.probe_margin")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    import faiss

    sizes = {}
    for n in args.sizes:
        x, gid = make_data(n, args.dim, args.topics, int(n * args.group_share / 3.5), args.seed)
        planted = np.flatnonzero(gid >= 0)
        rest = np.flatnonzero(gid < 0)
        q = np.sort(np.concatenate([planted[: args.queries * 3 // 4],
                                    rest[: args.queries - min(len(planted), args.queries * 3 // 4)]]))
        runs = {"clustered": [], "brute_force_scaled": [], "brute_force_measured": []}
        identical, missed, extra, found = True, 0, 0, 0
        for rep in range(args.repeats):  # interleaved A/B/A/B
            secs_c, pairs_c, k = clustered(x, args.threshold, args.cluster_rows, args.kmeans_sample,
                                           args.kmeans_iters, args.seed, args.probe_margin)
            secs_b, pairs_b, scaled = brute_force(x, q, args.threshold)
            runs["clustered"].append(secs_c)
            runs["brute_force_scaled"].append(scaled)
            runs["brute_force_measured"].append(secs_b)
            qs = set(q.tolist())
            mine = {p for p in pairs_c if p[0] in qs or p[1] in qs}
            identical &= mine == pairs_b
            missed, extra, found = len(pairs_b - mine), len(mine - pairs_b), len(pairs_b)
            print(f"[dedup bench] n={n} rep={rep}: clustered {secs_c:.1f}s ({k} clusters, {len(pairs_c)} pairs); "
                  f"brute force {secs_b:.1f}s on {len(q)} queries -> {scaled:.0f}s for all; "
                  f"pairs on the queries: {found} brute force, missed {missed}, extra {extra}",
                  file=sys.stderr, flush=True)
        sizes[n] = {"clustered_s": float(np.median(runs["clustered"])),
                    "brute_force_s": float(np.median(runs["brute_force_scaled"])),
                    "brute_force_measured_s": float(np.median(runs["brute_force_measured"])),
                    "query_rows": int(len(q)), "clusters": k, "pairs_on_queries": found,
                    "pairs_missed": missed, "pairs_extra": extra, "identical_duplicate_sets": bool(identical)}
        sizes[n]["ratio"] = sizes[n]["brute_force_s"] / sizes[n]["clustered_s"]
        del x
    small, large = sorted(sizes)
    out = {
        "benchmark": "dedup", "dim": args.dim, "threshold": args.threshold, "threads": faiss.omp_get_max_threads(),
        "sizes": {str(n): {k: (round(v, 3) if isinstance(v, float) else v) for k, v in s.items()}
                  for n, s in sizes.items()},
        "growth_clustered": round(sizes[large]["clustered_s"] / sizes[small]["clustered_s"], 2),
        "growth_brute_force": round(sizes[large]["brute_force_s"] / sizes[small]["brute_force_s"], 2),
        "size_ratio": large / small,
        "identical_duplicate_sets": all(s["identical_duplicate_sets"] for s in sizes.values()),
        "headline": f"clustered vs brute-force FAISS range search at {large} x {args.dim}-d (speed-up)",
        "headline_ratio": round(sizes[large]["ratio"], 2),
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
