"""Top-k concept search: FAISS (ovpipe's CPU default) vs torch vs plain numpy, same data.

Random unit float16 concept vectors (default 100K x 1024, MetaCLIP-H/14's width) and queries;
each backend finds every query's top-k by inner product. Reports queries/s per backend, whether
the ids are identical across backends and equal a float64 brute force on a subset, and prints one
JSON line last (headline_ratio = queries/s of ovpipe's CPU default, `auto` = torch, over numpy). A bar chart goes next to
--json when given.

    python benchmarks/assign.py [--concepts 100000] [--dim 1024] [--queries 2000] [--k 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from curation.assign import Searcher, _tie_sorted, resolve_backend  # noqa: E402


def unit(rng, n, d):
    x = rng.standard_normal((n, d), dtype=np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def numpy_topk(concepts32: np.ndarray, q: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """The plain alternative: float32 matmul, argpartition, then the same (score, id) order."""
    out = []
    for s in range(0, len(q), chunk):
        scores = q[s:s + chunk] @ concepts32.T
        part = np.argpartition(-scores, k, axis=1)[:, :k + 1]
        ids, _ = _tie_sorted(part, np.take_along_axis(scores, part, 1), k)
        out.append(ids)
    return np.concatenate(out)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concepts", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=1024, help="queries per search call")
    ap.add_argument("--check", type=int, default=200, help="queries checked against float64")
    ap.add_argument("--threads", type=int, default=0, help="0 = torch's default")
    ap.add_argument("--json", default="", help="also write the result here (and a .png next to it)")
    args = ap.parse_args(argv)
    import torch

    threads = args.threads or torch.get_num_threads()
    rng = np.random.default_rng(0)
    concepts, queries = unit(rng, args.concepts, args.dim), unit(rng, args.queries, args.dim).astype(np.float32)
    print(f"[assign bench] {args.concepts:,} concepts x {args.dim}, {args.queries:,} queries, k={args.k}, "
          f"{threads} threads", file=sys.stderr, flush=True)
    results, ids = {}, {}
    for backend in ("faiss", "torch"):
        searcher, build = timed(lambda: Searcher(concepts, backend, "cpu", args.chunk, threads))
        searcher.search(queries[:args.chunk], args.k)  # warm-up
        (ids[backend], _), secs = timed(lambda: searcher.search(queries, args.k))
        results[backend] = {"queries_per_s": round(args.queries / secs, 1), "seconds": round(secs, 3),
                            "build_s": round(build, 3)}
        print(f"[assign bench] {backend}: {results[backend]}", file=sys.stderr, flush=True)
    c32 = concepts.astype(np.float32)
    numpy_topk(c32, queries[:args.chunk], args.k, args.chunk)
    ids["numpy"], secs = timed(lambda: numpy_topk(c32, queries, args.k, args.chunk))
    results["numpy"] = {"queries_per_s": round(args.queries / secs, 1), "seconds": round(secs, 3)}
    print(f"[assign bench] numpy: {results['numpy']}", file=sys.stderr, flush=True)

    n = min(args.check, args.queries)
    s64 = queries[:n].astype(np.float64) @ concepts.astype(np.float64).T
    ref = np.lexsort((np.broadcast_to(np.arange(args.concepts), s64.shape), -s64), axis=1)[:, :args.k]
    agree = {f"{a}_vs_{b}": int((ids[a] == ids[b]).all(axis=1).sum())
             for a, b in (("faiss", "torch"), ("faiss", "numpy"), ("torch", "numpy"))}
    exact = {b: int((ids[b][:n] == ref).all(axis=1).sum()) for b in ids}
    out = {
        "benchmark": "assign", "concepts": args.concepts, "dim": args.dim, "queries": args.queries,
        "k": args.k, "threads": threads, "backends": results,
        "rows_with_identical_ids": agree, "rows_checked_vs_float64": n, "rows_equal_float64": exact,
        "identical_ids": all(v == args.queries for v in agree.values()) and all(v == n for v in exact.values()),
        "auto_backend_on_cpu": resolve_backend("auto", "cpu"),
        "headline": "ovpipe CPU default (assign.backend=auto) queries/s / numpy queries/s",
        "headline_ratio": round(results[resolve_backend("auto", "cpu")]["queries_per_s"]
                                / results["numpy"]["queries_per_s"], 3),
        "faiss_over_numpy": round(results["faiss"]["queries_per_s"] / results["numpy"]["queries_per_s"], 3),
        "torch_over_faiss": round(results["torch"]["queries_per_s"] / results["faiss"]["queries_per_s"], 3),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        _plot(out, os.path.splitext(args.json)[0] + ".png")
    print(json.dumps(out))
    return out


def _plot(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(out["backends"])
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(names, [out["backends"][n]["queries_per_s"] for n in names], color=["C0", "C1", "C2"])
    ax.set_ylabel("queries / s")
    ax.set_title(f"top-{out['k']} over {out['concepts']:,} x {out['dim']} ({out['threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
