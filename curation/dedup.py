"""Dedup stage: near-duplicate images (resized, re-encoded, cropped copies) removed, one kept per group.

Reads:  assign output (or embed output): the sample row with ``sample_id``, ``embedding``
        fixed_size_list<float16, D> (assign keeps it with ``assign.keep_embedding = true``) and, for
        the perceptual hash, the image reference (``image_uri`` / ``image_member`` / ``image_row``).
Writes: ``OUT/data/<shard>``: the input rows that are kept, unchanged (same schema: balance reads
        it as it reads assign's output); ledger rows (stage ``dedup``) ``near_duplicate_image`` with
        detail ``kept=<sample_id> cosine=<c> phash_distance=<d>`` (the kept sample it duplicates and
        their similarity; ``phash_distance=-1`` when a hash is missing). ``OUT/_report/``:
        ``dedup_report.json`` (removed at several thresholds, example pairs) and ``pairs.png`` (a
        contact sheet of example pairs in similarity bands around the threshold).

The rule (docs/dedup.md): two samples are duplicates when they fall in the same k-means cluster of
the embeddings and their cosine is >= ``dedup.threshold`` (method embedding), their 64-bit
perceptual hashes differ in <= ``dedup.phash_bits`` bits (phash; a hash counts only with at least
``dedup.phash_min_decided`` decided bits: plain images' hashes collide), or either (both). Within a
cluster, samples are visited in ``sample_id`` order; a sample is removed when it duplicates a sample
already kept (its most similar one is ledgered as the kept one), else kept. So the smallest
``sample_id`` of a group is kept, chains do not remove distinct images (a ~ b ~ c with a, c far
apart keeps a and c), and the result depends on the rows only, never on shards or workers.

Passes (one runner, ``ovpipe.core.stage``), a SemDeDup-style shuffle by cluster in which no process
holds all embeddings:

1. ``dedup_sample`` (``_sample/``): per input shard, the embeddings of a hash-chosen sample
   (``seeded_mix(xxh3(sample_id), run.seed)``, about ``kmeans_sample`` rows in all).
2. ``dedup_partition`` (``_partition/``): ``prepare`` learns the centroids (FAISS k-means on the
   sample sorted by sample_id: the same centroids whatever the sharding); per input shard a map
   task gives every row its nearest centroid (and a second, guest appearance in the next nearest
   when that is within ``probe_margin``), computes its perceptual hash (image fetched by reference)
   and writes ``sample_id, shard, embedding, phash`` + refs + ``cluster, part`` sorted by (part,
   cluster, sample_id) in row groups of ``PART_ROW_GROUP`` rows.
3. ``dedup_pairs`` (``_pairs/``): one reduce task per partition reads only its partition's row
   groups of every map output and writes each cluster's candidate pairs (ids, cosine, distance),
   compared one BLOCK x BLOCK tile at a time (memory bounded whatever a cluster's size).
4. ``dedup_resolve`` (``_resolve/``): one task resolves every pair (no embeddings: a few bytes per
   duplicate pair) by the rule above; writes the removed samples (``sample_id, shard, kept_id,
   cosine, phash_distance``) and how many each report threshold would remove.
5. ``dedup`` (the output): per input shard, the rows kept and the removed ones ledgered; its
   stage header records the model that made the embeddings (decontaminate reads it).

Once the stage has committed, the passes' folders (1-4) and ``_tmp/`` are deleted unless
``dedup.keep_intermediates``; a re-run on an unchanged input then does nothing (``DedupStage.run``).
"""

from __future__ import annotations

import io
import json
import math
import sys
import time
from collections import defaultdict
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from curation.assign import embedding_matrix, input_stage_header
from ovpipe.core.hashing import seeded_mix
from ovpipe.core.images import fetch_image_bytes, open_image, to_rgb
from ovpipe.core.ledger import Ledger
from ovpipe.core.shards import (MANIFEST_DIR, STAGE_FILE, SUMMARY_FILE, TMP_DIR, Location, parquet_num_rows, read_json,
                                read_manifest_entries, read_table, write_json)
from ovpipe.core.stage import (Pass, PassContext, PassResult, Shard, ShardOutput, ShardTask, Stage, StageSummary,
                               refuse_changed_config, run_stage)

if TYPE_CHECKING:
    from ovpipe.config import Config

EMBEDDING = "embedding"
REF_COLUMNS = ["image_uri", "image_member", "image_row"]
REASON = "near_duplicate_image"
PART_ROW_GROUP = 1024  # a reduce task reads only the row groups of its partition
BLOCK = 1024  # rows x columns compared at once (memory: BLOCK x BLOCK, whatever the cluster size)
REPORT_DIR = "_report"
REMOVED_MARK = "+removed:"  # an output shard's input stamp: its input file's, then the removed set's
# A phash bit is decided when its coefficient (scipy's unnormalised DCT of the 0-255 32x32 thumbnail)
# is this far from the median: ~0.05 grey level of amplitude. Measured (docs/dedup.md): photographs,
# text on white and screenshots decide >= 52 bits, a flat colour 1, two flat halves <= 8.
DECIDED_MARGIN = 200.0
NO_HASH = np.uint64(0)  # stored as null; 0 in arrays with a mask
EDGES_SCHEMA = pa.schema([("a", pa.string()), ("b", pa.string()), ("a_shard", pa.string()),
                          ("cosine", pa.float32()), ("phash_distance", pa.int16())])  # a > b
PAIRS_SCHEMA = pa.schema([("sample_id", pa.string()), ("shard", pa.string()), ("kept_id", pa.string()),
                          ("cosine", pa.float32()), ("phash_distance", pa.int16())])


# ------------------------------------------------------------------------------ pure core


def phash64(data: bytes | None, min_decided: int = 0) -> int | None:
    """imagehash.phash (the signs of the 8x8 lowest DCT coefficients of a 32x32 grey thumbnail
    against their median: 64 bits) of untrusted bytes; None if unusable, or when fewer than
    ``min_decided`` bits are decided: a plain image (a flat colour, two flat halves) has a nearly
    empty DCT whose bits are rounding noise, and such hashes collide across distinct images.
    JPEGs are drafted down before decoding: the hash only needs a small image."""
    import imagehash
    from PIL import Image

    if data is None:
        return None
    try:
        with open_image(data) as img:
            img.draft("RGB", (128, 128))
            grey = to_rgb(img).convert("L").resize((32, 32), Image.Resampling.LANCZOS)  # as phash does
        if min_decided and decided_bits(grey) < min_decided:
            return None
        return int(str(imagehash.phash(grey)), 16)
    except Exception:  # a bad image has no hash; the embedding still compares it
        return None


def decided_bits(grey) -> int:
    """How many of phash's 64 coefficients differ from their median by more than DECIDED_MARGIN."""
    import scipy.fftpack

    pixels = np.asarray(grey, dtype=np.float64)
    low = scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0), axis=1)[:8, :8]
    return int((np.abs(low - np.median(low)) > DECIDED_MARGIN).sum())


def unit_rows(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """float32 [n, D] unit rows from a fixed-size-list embedding column, and the mask of usable rows
    (null, non-finite or zero rows are unusable and left at zero)."""
    if not pa.types.is_fixed_size_list(column.type):
        raise ValueError(f"{EMBEDDING!r} must be a fixed-size list (embed's output), not {column.type}")
    chunked = column if isinstance(column, pa.ChunkedArray) else pa.chunked_array([column])
    out, ok = embedding_matrix(chunked, column.type.list_size)
    norm = np.linalg.norm(out, axis=1)
    ok &= norm > 0
    out[ok] /= norm[ok, None]
    out[~ok] = 0
    return out, ok


def hash_sample(sample_ids: list[str], seed: int, rate: float) -> np.ndarray:
    """Rows whose (sample_id, seed) hash falls below rate: a sample independent of shards and order."""
    h = np.array([xxhash.xxh3_64_intdigest(s.encode()) for s in sample_ids], np.uint64)
    return seeded_mix(h, seed) < np.uint64(min(int(rate * 2.0 ** 64), 2 ** 64 - 1))


def learn_centroids(sample: np.ndarray, k: int, iters: int, seed: int) -> np.ndarray:
    """Spherical FAISS k-means (seeded) on the driver. The centroids are a function of the sample
    and the driver's FAISS/BLAS build; their digest is in the pass's config hash, so a resume on
    a driver that computes other centroids is refused rather than mixed."""
    import faiss

    k = max(1, min(k, len(sample)))
    if k == 1:
        c = sample.mean(axis=0, keepdims=True) if len(sample) else np.zeros((1, sample.shape[1]), np.float32)
        return (c / max(np.linalg.norm(c), 1e-12)).astype(np.float32)
    km = faiss.Kmeans(sample.shape[1], k, niter=iters, seed=seed, spherical=True, verbose=False,
                      max_points_per_centroid=max(1, -(-len(sample) // k)))
    km.train(np.ascontiguousarray(sample, np.float32))
    return np.ascontiguousarray(km.centroids, np.float32)


def nearest(emb: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of each row's most similar centroid (ties: the lower index)."""
    if len(emb) == 0:
        return np.zeros(0, np.int32)
    return np.argmax(emb @ centroids.T, axis=1).astype(np.int32)


def assign_clusters(emb: np.ndarray, centroids: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """(home, guest) cluster per row: home = the most similar centroid; guest = the second most similar
    when its cosine is within ``margin`` of the home's (else -1). A copy of a row that sits near a
    cluster boundary may land on the other side; the row's guest appearance there meets it."""
    n, k = len(emb), len(centroids)
    if n == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    sims = emb @ centroids.T
    home = np.argmax(sims, axis=1)
    if k == 1 or margin <= 0:
        return home.astype(np.int32), np.full(n, -1, np.int32)
    best = sims[np.arange(n), home]
    sims[np.arange(n), home] = -np.inf
    second = np.argmax(sims, axis=1)
    near = sims[np.arange(n), second] >= best - margin
    return home.astype(np.int32), np.where(near, second, -1).astype(np.int32)


def candidate_edges(emb: np.ndarray | None, hashes: np.ndarray | None, has_hash: np.ndarray | None,
                    min_cosine: float, bits: int, block: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i > j) of one cluster with cosine >= min_cosine or Hamming <= bits: (i, j, cosine,
    hamming), sorted by (i, j); hamming = -1 where a hash is missing, cosine = nan without
    embeddings. Compared a block x block tile at a time, so the working memory is bounded by the
    block size whatever the cluster's size (a cluster of many near-identical images, a skewed
    k-means); only the pairs found (the output) grow with it."""
    n = len(emb) if emb is not None else len(hashes)
    block = block or BLOCK
    out: list[tuple[np.ndarray, ...]] = []
    for r0 in range(0, n, block):
        r1 = min(r0 + block, n)
        row_parts = [_tile_edges(emb, hashes, has_hash, min_cosine, bits, r0, r1, c0, min(c0 + block, r1))
                     for c0 in range(0, r1, block)]
        i, j, c, h = (np.concatenate(x) for x in zip(*row_parts))
        order = np.lexsort((j, i))  # the tiles of a row block, merged into (i, j) order
        out.append((i[order], j[order], c[order], h[order]))
    if not out:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int16)
    i, j, c, h = (np.concatenate(x) for x in zip(*out))
    return i.astype(np.int64), j.astype(np.int64), c.astype(np.float32), h.astype(np.int16)


def _tile_edges(emb, hashes, has_hash, min_cosine: float, bits: int, r0: int, r1: int, c0: int, c1: int):
    """The edges between rows r0:r1 and columns c0:c1 (j < i only)."""
    cos = ham = hit = None
    if emb is not None:
        cos = emb[r0:r1] @ emb[c0:c1].T
        hit = cos >= min_cosine
    if hashes is not None:
        ham = np.bitwise_count(hashes[r0:r1, None] ^ hashes[None, c0:c1]).astype(np.int16)
        ham[~(has_hash[r0:r1, None] & has_hash[None, c0:c1])] = -1
        by_hash = (ham >= 0) & (ham <= bits)
        hit = by_hash if hit is None else hit | by_hash
    if c1 > r0:  # a tile on the diagonal: j < i only (below it every j < i)
        hit &= np.arange(c0, c1)[None, :] < np.arange(r0, r1)[:, None]
    bi, bj = np.nonzero(hit)
    c = cos[bi, bj].astype(np.float32) if cos is not None else np.full(len(bi), np.nan, np.float32)
    h = ham[bi, bj] if ham is not None else np.full(len(bi), -1, np.int16)
    return bi + r0, bj + c0, c, h


def edge_mask(cos: np.ndarray, ham: np.ndarray, method: str, threshold: float, bits: int) -> np.ndarray:
    by_emb = np.nan_to_num(cos, nan=-2.0) >= threshold
    by_hash = (ham >= 0) & (ham <= bits)
    return {"embedding": by_emb, "phash": by_hash, "both": by_emb | by_hash}[method]


def resolve(n: int, ei: np.ndarray, ej: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Greedy in sample_id order (rows are sorted by it): row i is removed when an edge joins it to
    an earlier row that was kept. Returns, per row, the row it duplicates (its best-scoring kept
    partner; ties: the lower row) or -1 when kept."""
    by = np.full(n, -1, np.int64)
    if len(ei) == 0:
        return by
    order = np.lexsort((ej, -score, ei))  # by i, then best score, then lower j
    ei, ej = ei[order], ej[order]
    starts = np.flatnonzero(np.r_[True, ei[1:] != ei[:-1]])
    ends = np.r_[starts[1:], len(ei)]
    for s, e in zip(starts.tolist(), ends.tolist()):
        for j in ej[s:e].tolist():
            if by[j] == -1:  # j is kept (rows before i are final)
                by[ei[s]] = j
                break
    return by


def resolve_edges(a: list[str], b: list[str], cos: np.ndarray, ham: np.ndarray, method: str,
                  threshold: float, bits: int) -> dict[str, tuple[str, float, int]]:
    """The global greedy over duplicate pairs (a > b by sample_id): {removed id: (kept id, cosine,
    phash distance)}. Samples are visited in sample_id order; one is removed when it duplicates a
    sample already kept (the best-scoring such partner is its kept one), else kept."""
    if not len(a):
        return {}
    ids, inverse = np.unique(np.asarray(a + b, dtype=object).astype(str), return_inverse=True)
    ei, ej = inverse[:len(a)], inverse[len(a):]
    m = edge_mask(cos, ham, method, threshold, bits)
    score = np.nan_to_num(cos, nan=0.0) - ham.clip(0) / 64.0  # cosine first, then fewer differing bits
    by = resolve(len(ids), ei[m], ej[m], score[m])
    edge_of = {(int(i), int(j)): k for k, (i, j) in enumerate(zip(ei.tolist(), ej.tolist())) if m[k]}
    out = {}
    for i in np.flatnonzero(by >= 0).tolist():
        k = edge_of[(i, int(by[i]))]
        out[str(ids[i])] = (str(ids[by[i]]), float(cos[k]), int(ham[k]))
    return out


def dedup_rows(emb: np.ndarray | None, hashes: np.ndarray | None, has_hash: np.ndarray | None,
               sample_ids: list[str], method: str, threshold: float, bits: int) -> dict[str, tuple[str, float, int]]:
    """Everything in one cluster (tests, small inputs): {removed id: (kept id, cosine, distance)}."""
    order = np.argsort(np.asarray(sample_ids, dtype=object).astype(str), kind="stable")
    e = emb[order] if emb is not None else None
    h = hashes[order] if hashes is not None else None
    hh = has_hash[order] if has_hash is not None else None
    use_e = e if method in ("embedding", "both") else None
    use_h = h if method in ("phash", "both") else None
    ei, ej, ec, eh = candidate_edges(use_e, use_h, hh, threshold if use_e is not None else 2.0, bits)
    if use_e is None and e is not None and len(ei):
        ec = np.einsum("nd,nd->n", e[ei], e[ej]).astype(np.float32)
    ids = [sample_ids[k] for k in order.tolist()]
    return resolve_edges([ids[i] for i in ei.tolist()], [ids[j] for j in ej.tolist()], ec, eh, method,
                         threshold, bits)


# --------------------------------------------------------------- which model made the input


def recorded_embed_model(first_shard: Location) -> tuple[str, dict | None, dict | None]:
    """(the input's folder, the identity of the model that made its embeddings, the embed settings
    when recorded), from the input's ``_manifest/_stage.json``: embed records its model; assign,
    dedup and decontaminate the model of their input; the identity and settings are None when
    nothing says."""
    header, stage = input_stage_header(first_shard)
    payload = (stage or {}).get("payload", {})
    state = payload.get("global_state", {})
    if payload.get("stage") == "embed":
        return header.uri(), state.get("model"), payload.get("config", {}).get("embed")
    return header.uri(), state.get("embed_model"), state.get("embed_spec")


def model_spec_for(identity: dict, recorded: dict | None, configured):
    """The ModelSpec whose identity is ``identity``: the recorded embed settings, the identity's
    own fields (a seeded random init, an open_clip tag), or this config's embed.* (a local
    checkpoint: its path is not in the identity); None when none of them matches."""
    from curation.embed import RANDOM, ModelSpec

    candidates = []
    if recorded:
        candidates.append(ModelSpec(recorded["model"], recorded["pretrained"], recorded.get("init_seed", 0),
                                    recorded.get("precision", "auto")))
    weights = str(identity.get("weights", ""))
    if weights.startswith("random:seed="):
        candidates.append(ModelSpec(identity["model"], RANDOM, int(weights.split("=", 1)[1]), identity["precision"]))
    elif weights.startswith("tag:"):
        candidates.append(ModelSpec(identity["model"], weights.split(":")[1], 0, identity["precision"]))
    candidates.append(configured)
    for spec in candidates:
        try:
            if spec.identity() == identity:
                return spec
        except Exception:  # a checkpoint file that is gone, an unknown model: not this one
            continue
    return None


def spec_fields(spec) -> dict:
    return {"model": spec.name, "pretrained": spec.pretrained, "init_seed": spec.init_seed,
            "precision": spec.precision}


def provenance_state(first_shard: Location | None) -> dict:
    """What a stage that passes embeddings through records, so a later stage knows their model."""
    if first_shard is None:
        return {}
    _where, identity, recorded = recorded_embed_model(first_shard)
    return {k: v for k, v in (("embed_model", identity), ("embed_spec", recorded)) if v is not None}


# ------------------------------------------------------------------------------------ passes


def _read_columns(task: ShardTask, wanted: list[str]) -> pa.Table:
    names = pq.read_schema(task.input.path, filesystem=task.input.fs).names
    if EMBEDDING not in names:
        raise ValueError(f"input shard {task.input.uri()!r} has no {EMBEDDING!r} column: dedup compares "
                         "embeddings. Run it on embed's output, or run assign with "
                         "--set assign.keep_embedding=true")
    return read_table(task.input, columns=[c for c in wanted if c in names])


def _pass_files(done: PassResult) -> list[Location]:
    return [done.output.join(done.entries[name]["output"]) for name in sorted(done.entries)]


def _done_stamp(done: PassResult) -> str:
    """The input stamp of a virtual shard that reads every shard of an earlier pass: it changes
    when any of them was redone (another input, or another global state such as centroids)."""
    return xxhash.xxh3_64_hexdigest(json.dumps(
        {n: [e.get("input_stamp"), e["config_hash"]] for n, e in sorted(done.entries.items())}).encode())


class DedupSamplePass(Pass):
    """Per input shard: the embeddings of the hash-chosen k-means sample (sample_id, embedding)."""

    name = "dedup_sample"
    config_sections = ("dedup", "run")
    schema_version = 1
    folder = "_sample"
    counts_samples = False

    def prepare(self, ctx: PassContext, shards: list[Shard]) -> dict[str, Any]:
        total = sum(parquet_num_rows(s.input) for s in shards)
        self.rate = min(1.0, ctx.cfg.dedup.kmeans_sample / max(total, 1))
        self.total = total
        return {"rate": self.rate, "rows": total}

    def process(self, task: ShardTask) -> ShardOutput:
        table = _read_columns(task, ["sample_id", EMBEDDING])
        ids = table.column("sample_id").to_pylist()
        _emb, ok = unit_rows(table.column(EMBEDDING))
        pick = hash_sample(ids, task.config.run.seed, self.rate) & ok
        out = table.filter(pa.array(pick))
        return ShardOutput(out, Ledger(self.name), input_rows=table.num_rows, kept_samples=table.num_rows)


class DedupPartitionPass(Pass):
    """Learns the centroids (prepare); per input shard, every row's cluster, partition and phash."""

    name = "dedup_partition"
    config_sections = ("dedup", "run")
    schema_version = 1
    folder = "_partition"
    counts_samples = False

    def prepare(self, ctx: PassContext, shards: list[Shard]) -> dict[str, Any]:
        d = ctx.cfg.dedup
        sample = pa.concat_tables([read_table(f) for f in _pass_files(ctx.done[DedupSamplePass.name])])
        sample = sample.take(pc.sort_indices(sample, [("sample_id", "ascending")]))
        emb, _ok = unit_rows(sample.column(EMBEDDING)) if sample.num_rows else (np.zeros((0, 1), np.float32), None)
        rows = sum(parquet_num_rows(s.input) for s in shards)
        k = d.clusters or max(1, math.ceil(rows / d.cluster_rows))
        self.centroids = learn_centroids(emb, k, d.kmeans_iters, ctx.cfg.run.seed) if len(emb) else \
            np.zeros((1, 1), np.float32)
        return {"clusters": int(len(self.centroids)),
                "centroids": xxhash.xxh3_64_hexdigest(self.centroids.tobytes())}

    def process(self, task: ShardTask) -> ShardOutput:
        d = task.config.dedup
        table = _read_columns(task, ["sample_id", EMBEDDING, *REF_COLUMNS])
        emb, ok = unit_rows(table.column(EMBEDDING))
        home, guest = assign_clusters(emb, self.centroids, d.probe_margin)
        home, guest = np.where(ok, home, -1), np.where(ok, guest, -1)
        hashes: list[int | None] = [None] * table.num_rows
        if d.method in ("phash", "both") and all(c in table.column_names for c in REF_COLUMNS):
            refs = table.select(["sample_id", *REF_COLUMNS])
            hashes = [phash64(b, d.phash_min_decided) for b in fetch_image_bytes(refs)]
        cols = {
            "sample_id": table.column("sample_id"),
            "shard": pa.array([task.shard] * table.num_rows, pa.string()),
            EMBEDDING: table.column(EMBEDDING),
            "phash": pa.array(hashes, pa.uint64()),
        }
        cols.update({c: table.column(c) for c in REF_COLUMNS if c in table.column_names})
        rows = pa.table(cols)
        guests = np.flatnonzero(guest >= 0)  # a row near a boundary appears in two clusters
        out = pa.concat_tables([rows, rows.take(pa.array(guests, pa.int64()))])
        cluster = np.concatenate([home, guest[guests]]).astype(np.int32)
        out = out.append_column("cluster", pa.array(cluster))
        out = out.append_column("part", pa.array(np.where(cluster >= 0, cluster % d.partitions, -1).astype(np.int32)))
        out = out.take(pc.sort_indices(out, [("part", "ascending"), ("cluster", "ascending"),
                                             ("sample_id", "ascending")]))
        return ShardOutput(out, Ledger(self.name), input_rows=out.num_rows, kept_samples=out.num_rows,
                           row_group_size=PART_ROW_GROUP)


class DedupPairsPass(Pass):
    """One reduce task per partition: the candidate duplicate pairs of its clusters (edges)."""

    name = "dedup_pairs"
    config_sections = ("dedup", "run")
    schema_version = 1
    folder = "_pairs"
    reads = DedupPartitionPass.name
    counts_samples = False

    def list_shards(self, ctx: PassContext) -> list[Shard]:
        done = ctx.done[DedupPartitionPass.name]
        self.files = _pass_files(done)
        stamp = _done_stamp(done)
        return [Shard(f"part-{p:05d}", None, stamp, p) for p in range(ctx.cfg.dedup.partitions)]

    def process(self, task: ShardTask) -> ShardOutput:
        d = task.config.dedup
        parts = [pq.read_table(f.path, filesystem=f.fs, filters=[("part", "=", task.index)]) for f in self.files]
        table = pa.concat_tables(parts) if parts else pa.table({})
        edges: list[pa.Table] = []
        examples: list[dict] = []
        if table.num_rows:
            table = table.take(pc.sort_indices(table, [("cluster", "ascending"), ("sample_id", "ascending")]))
            clusters = table.column("cluster").to_numpy()
            bounds = np.flatnonzero(np.r_[True, clusters[1:] != clusters[:-1], True])
            for s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
                self._cluster(table.slice(s, e - s), d, edges, examples)
        out = pa.concat_tables(edges).combine_chunks() if edges else EDGES_SCHEMA.empty_table()
        stats = {"examples": _pick_examples(examples, d.threshold, d.report_pairs)}
        return ShardOutput(out, Ledger(self.name), input_rows=table.num_rows, kept_samples=table.num_rows,
                           stats=stats)

    def _cluster(self, rows: pa.Table, d, edges: list[pa.Table], examples: list[dict]) -> None:
        emb, _ok = unit_rows(rows.column(EMBEDDING))
        ph = rows.column("phash").combine_chunks()
        has = np.asarray(ph.is_valid())
        hashes = ph.fill_null(0).to_numpy().astype(np.uint64)
        use_e = emb if d.method in ("embedding", "both") else None
        use_h = hashes if d.method in ("phash", "both") else None
        lowest = min([d.threshold, *d.report_thresholds])
        floor = min(d.threshold - 0.1, lowest) if use_e is not None else 2.0
        ei, ej, ec, eh = candidate_edges(use_e, use_h, has, floor, d.phash_bits)
        if use_e is None and len(ei):  # phash only: the cosines are still reported
            ec = np.einsum("nd,nd->n", emb[ei], emb[ej]).astype(np.float32)
        ids = rows.column("sample_id").combine_chunks()
        keep = np.flatnonzero(edge_mask(ec, eh, d.method, lowest, d.phash_bits))
        ki, kj = pa.array(ei[keep]), pa.array(ej[keep])
        edges.append(pa.table([ids.take(ki), ids.take(kj), rows.column("shard").combine_chunks().take(ki),
                               pa.array(ec[keep], pa.float32()), pa.array(eh[keep], pa.int16())],
                              schema=EDGES_SCHEMA))
        # the report's examples: only the few chosen per band are built (a big cluster has many pairs)
        dup = edge_mask(ec, eh, d.method, d.threshold, d.phash_bits)
        id_list = ids.to_pylist()
        refs = {c: rows.column(c).to_pylist() for c in REF_COLUMNS if c in rows.column_names}
        for k in _example_rows(id_list, ei, ej, ec, d.threshold, d.report_pairs):
            i, j = int(ei[k]), int(ej[k])
            examples.append({"a": id_list[j], "b": id_list[i], "cosine": round(float(ec[k]), 4),
                             "phash_distance": int(eh[k]), "duplicate": bool(dup[k]),
                             "a_ref": [refs[c][j] for c in refs], "b_ref": [refs[c][i] for c in refs]})


def _example_rows(ids: list[str], ei: np.ndarray, ej: np.ndarray, cos: np.ndarray, threshold: float,
                  per_band: int) -> list[int]:
    """The candidate pairs _pick_examples could choose from this cluster (up to per_band per band,
    by the same hash of the pair), as indices into the edge arrays."""
    out: list[int] = []
    rounded = np.array([round(c, 4) for c in cos.tolist()], np.float64)  # as the report rounds them
    for lo, hi in bands(threshold):
        inside = np.flatnonzero(~np.isnan(rounded) & (rounded >= lo) & (rounded < hi))
        keys = [xxhash.xxh3_64_intdigest(f"{ids[ej[k]]}/{ids[ei[k]]}".encode()) for k in inside.tolist()]
        out += [int(inside[k]) for k in np.argsort(np.array(keys, np.uint64), kind="stable")[:per_band].tolist()]
    return out


class DedupResolvePass(Pass):
    """One task: every candidate pair (a few bytes per duplicate pair, no embeddings) resolved by
    the global greedy in sample_id order; the removed samples written, and how many each report
    threshold would remove."""

    name = "dedup_resolve"
    config_sections = ("dedup", "run")
    schema_version = 1
    folder = "_resolve"
    reads = DedupPairsPass.name
    counts_samples = False

    def list_shards(self, ctx: PassContext) -> list[Shard]:
        done = ctx.done[DedupPairsPass.name]
        self.files = _pass_files(done)
        stamp = _done_stamp(done)
        return [Shard("removed", None, stamp, 0)]

    def process(self, task: ShardTask) -> ShardOutput:
        d = task.config.dedup
        t = pa.concat_tables([read_table(f) for f in self.files]) if self.files else EDGES_SCHEMA.empty_table()
        if t.num_rows:  # a pair seen in two clusters (a guest row) counts once
            t = t.take(pc.sort_indices(t, [("a", "ascending"), ("b", "ascending"), ("cosine", "descending")]))
            a, b = t.column("a").to_pylist(), t.column("b").to_pylist()
            first = np.r_[True, [(a[k], b[k]) != (a[k - 1], b[k - 1]) for k in range(1, len(a))]]
            t = t.filter(pa.array(first))
        a, b = t.column("a").to_pylist(), t.column("b").to_pylist()
        cos = t.column("cosine").to_numpy(zero_copy_only=False).astype(np.float32)
        ham = t.column("phash_distance").to_numpy(zero_copy_only=False).astype(np.int16)
        shard_of = dict(zip(a, t.column("a_shard").to_pylist()))
        removed = resolve_edges(a, b, cos, ham, d.method, d.threshold, d.phash_bits)
        at = {str(x): len(resolve_edges(a, b, cos, ham, d.method, x, d.phash_bits)) for x in d.report_thresholds}
        rows = sorted(removed.items())
        out = pa.Table.from_pydict({"sample_id": [r for r, _ in rows], "shard": [shard_of[r] for r, _ in rows],
                                    "kept_id": [v[0] for _, v in rows], "cosine": [v[1] for _, v in rows],
                                    "phash_distance": [v[2] for _, v in rows]}, schema=PAIRS_SCHEMA)
        return ShardOutput(out, Ledger(self.name), input_rows=t.num_rows, kept_samples=t.num_rows,
                           stats={"removed_at": at, "pairs": t.num_rows})


def bands(threshold: float) -> list[tuple[float, float]]:
    """Similarity bands of the contact sheet: below, just below, just above, well above T."""
    return [(threshold - 0.1, threshold - 0.05), (threshold - 0.05, threshold),
            (threshold, threshold + (1 - threshold) / 2), (threshold + (1 - threshold) / 2, 1.01)]


def _pick_examples(pairs: list[dict], threshold: float, per_band: int) -> list[dict]:
    """Up to per_band pairs per band, chosen by a hash of the pair (deterministic, unbiased)."""
    out = []
    for lo, hi in bands(threshold):
        inside = [p for p in pairs if p["cosine"] is not None and lo <= p["cosine"] < hi]
        inside.sort(key=lambda p: xxhash.xxh3_64_intdigest(f"{p['a']}/{p['b']}".encode()))
        out += [dict(p, band=[round(lo, 4), round(min(hi, 1.0), 4)]) for p in inside[:per_band]]
    return out


class DedupFilterPass(Pass):
    """Per input shard: rows kept, or ledgered near_duplicate_image with the kept sample's id."""

    name = "dedup"
    config_sections = ("dedup", "run")
    schema_version = 1

    def list_shards(self, ctx: PassContext) -> list[Shard]:
        """The input shards, stamped with the removed set too: which rows a shard keeps depends on
        every shard, so a changed input (another removed set) redoes every output shard."""
        removed = _done_stamp(ctx.done[DedupResolvePass.name])
        return [replace(s, stamp=f"{s.stamp}{REMOVED_MARK}{removed}") for s in super().list_shards(ctx)]

    def prepare(self, ctx: PassContext, shards: list[Shard]) -> dict[str, Any]:
        self.files = _pass_files(ctx.done[DedupResolvePass.name])
        return provenance_state(shards[0].input if shards else None)  # decontaminate reads it

    def process(self, task: ShardTask) -> ShardOutput:
        table = read_table(task.input)
        removed = {}
        for f in self.files:
            part = pq.read_table(f.path, filesystem=f.fs, filters=[("shard", "=", task.shard)])
            for r in part.to_pylist():
                removed[r["sample_id"]] = r
        ids = table.column("sample_id").to_pylist()
        keep = np.array([sid not in removed for sid in ids], bool)
        ledger = Ledger(self.name)
        for r in np.flatnonzero(~keep).tolist():
            x = removed[ids[r]]
            ledger.drop(f"{task.input.uri()}#row={r}", REASON,
                        f"kept={x['kept_id']} cosine={x['cosine']:.4f} phash_distance={x['phash_distance']}",
                        ids[r])
        return ShardOutput(table.filter(pa.array(keep)), ledger, table.num_rows)


SHUFFLE = (DedupSamplePass.folder, DedupPartitionPass.folder, DedupPairsPass.folder, DedupResolvePass.folder)
INTERMEDIATES = (*SHUFFLE, TMP_DIR)  # and the commit path's scratch folder


class DedupStage(Stage):
    name = "dedup"

    def passes(self) -> list[Pass]:
        return [DedupSamplePass(), DedupPartitionPass(), DedupPairsPass(), DedupResolvePass(), DedupFilterPass()]

    def enabled(self, cfg: Config) -> bool:
        return cfg.dedup.enabled

    def run(self, input: str, output: str, cfg: Config, *, filesystem=None, overwrite: bool = False,
            quiet: bool = False) -> StageSummary:
        """run_stage; but a finished output whose intermediates were removed (dedup.keep_intermediates
        off) and whose input is unchanged is not recomputed: the passes before the last would redo
        the whole shuffle only to find every output shard committed."""
        start = time.monotonic()
        if not overwrite:
            done = finished_summary(self, Location.parse(input, filesystem), Location.parse(output, filesystem), cfg)
            if done is not None:
                if not quiet:
                    print(f"[dedup] {output}: finished, input unchanged: nothing to do", file=sys.stderr, flush=True)
                return replace(done, shards_skipped=done.shards, seconds=round(time.monotonic() - start, 3))
        return run_stage(self, input, output, cfg, filesystem=filesystem, overwrite=overwrite, quiet=quiet)

    def report(self, out: Location, cfg: Config, summary: StageSummary, results: dict[str, PassResult]) -> list[str]:
        written = write_report(out, cfg, summary, results[DedupPairsPass.name].entries,
                               results[DedupResolvePass.name].entries)
        if not cfg.dedup.keep_intermediates:  # every output shard is committed: the shuffle's copies go
            for folder in INTERMEDIATES:
                out.join(folder).delete_tree()
        return written


def finished_summary(stage: DedupStage, input: Location, out: Location, cfg: Config) -> StageSummary | None:
    """The stage summary of a finished output whose intermediates are gone, when every output shard
    was made from the input shards as they are now with this config; None otherwise (run_stage
    then runs, redoing what changed)."""
    summary = out.join(MANIFEST_DIR, SUMMARY_FILE)
    if not summary.exists() or out.join(DedupPartitionPass.folder, MANIFEST_DIR, STAGE_FILE).exists():
        return None
    last = stage.passes()[-1]
    refuse_changed_config(stage.name, last, out, cfg)  # another threshold: the usual clear refusal
    shards = Pass.list_shards(last, PassContext(stage.name, input, out, out, cfg))
    entries = read_manifest_entries(out)
    made_from = {k: str(e.get("input_stamp", "")).split(REMOVED_MARK)[0] for k, e in entries.items()}
    if made_from != {s.name: s.stamp for s in shards}:
        return None
    return StageSummary(**read_json(summary))


# ------------------------------------------------------------------------------------ report


def write_report(out: Location, cfg: Config, summary: StageSummary, pairs: dict[str, dict],
                 resolved: dict[str, dict]) -> list[str]:
    d = cfg.dedup
    removed_at: dict[str, int] = defaultdict(int)
    for e in resolved.values():
        for t, c in e.get("removed_at", {}).items():
            removed_at[t] += c
    examples = [x for e in pairs.values() for x in e.get("examples", [])]
    examples = _pick_examples(examples, d.threshold, d.report_pairs)
    report = {"method": d.method, "threshold": d.threshold, "phash_bits": d.phash_bits,
              "input_rows": summary.input_rows, "removed": summary.dropped_rows,
              "removed_at_threshold": dict(sorted(removed_at.items())), "examples": examples}
    folder = out.join(REPORT_DIR)
    write_json(folder.join("dedup_report.json"), report)
    written = [folder.join("dedup_report.json").uri()]
    if examples:
        png = contact_sheet(examples)
        if png is not None:
            from ovpipe.core.shards import write_bytes_atomic

            write_bytes_atomic(folder.join("pairs.png"), png)
            written.append(folder.join("pairs.png").uri())
    return written


def contact_sheet(examples: list[dict], side: int = 96) -> bytes | None:
    """Rows of example pairs (left, right, their cosine / Hamming distance and the band), PNG bytes."""
    from PIL import Image, ImageDraw

    refs = [p[k] for p in examples for k in ("a_ref", "b_ref")]
    if not refs or not all(len(r) == 3 for r in refs):
        return None
    table = pa.table({c: [r[i] for r in refs] for i, c in enumerate(REF_COLUMNS)})
    images = fetch_image_bytes(table)
    sheet = Image.new("RGB", (2 * side + 300, side * len(examples)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, p in enumerate(examples):
        for col in range(2):
            data = images[2 * row + col]
            if data is None:
                continue
            try:
                with open_image(data) as img:
                    thumb = to_rgb(img)
                    thumb.thumbnail((side, side))
                    sheet.paste(thumb, (col * side, row * side))
            except Exception:
                continue
        verdict = "duplicate" if p["duplicate"] else "kept both"
        draw.text((2 * side + 8, row * side + 8),
                  f"cosine {p['cosine']}  phash {p['phash_distance']}\nband {p['band']}\n{verdict}", fill="black")
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()
