"""Caption's global exact + near-duplicate dedup as a hash-partitioned shuffle: no process holds
every caption (issue 15). Called by ``curation.caption.CaptionDedupPass.prepare``.

Reads:  pass 1's committed shards (``OUT/_captions``): ``sample_id``, ``caption_key``, optional
        ``sample_hash``, and ``caption_minhash`` when near-dedup is on.
Writes: scratch files under ``OUT/_tmp/caption-dedup/<run>/`` (``ovpipe.core.routed``: one Arrow
        record batch per destination, so a reducer reads only its own batch of every file), and
        per input shard the loser table (``LOSER_SCHEMA``: row, reason, detail) as
        ``.../losers/<shard index>.parquet``, which the pass copies to ``OUT/_dedup/``.

The rule is the in-memory one's, exactly: winner order = (sample_hash, shard index, row);
an exact duplicate (same ``caption_key``) loses to the smallest of its group; among the rows
left, a row that shares an LSH bucket (band, band key) with that bucket's smallest row (its
leader) loses to the smallest leader whose estimated Jaccard reaches the threshold.

Rounds (each a set of tasks through ``ovpipe.core.executor.map_tasks``; the driver holds file
names and per-shard counts only):

1. exact map (per shard): (key, hash, shard, row, sample_id) -> partition ``key % P``;
2. exact reduce (per partition): group by key -> losers, routed to their shard;
3. band map (per shard): the rows not lost in 2 -> (band, band key, hash, shard, row) ->
   partition ``band key % P``;
4. band reduce (per partition): group by (band, key) -> (member, leader) pairs, routed to the
   leader's shard;
5. leader map (per shard): attach the leader's signature and sample_id, route to the member's shard;
6. final (per shard): member signatures, Jaccard, the smallest passing leader per member, plus the
   exact losers: the shard's loser table, written sorted by row, and its digest.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from ovpipe.core.executor import map_tasks
from ovpipe.core.hashing import text_hash
from ovpipe.core.routed import read_routed, write_routed
from ovpipe.core.shards import Location, read_table, write_table

LOSER_SCHEMA = pa.schema([pa.field("row", pa.int32()), pa.field("reason", pa.string()), pa.field("detail", pa.string())])
SCRATCH = "caption-dedup"
ROWS_PER_PARTITION = 500_000  # a band reducer holds ~26 B x bands a row: ~210 MB at 16 bands
_BAND_MULT = np.uint64(0x100000001B3)


def _scratch(paths: list[str], fs) -> list[Location]:
    """Scratch files named by their paths in the scratch folder's filesystem."""
    return [Location(fs, p) for p in paths]


EXACT = pa.schema([("key", pa.uint64()), ("hash", pa.uint64()), ("shard", pa.int32()), ("row", pa.int32()),
                   ("sample_id", pa.string())])
LOST = pa.schema([("row", pa.int32()), ("winner", pa.string())])
BAND = pa.schema([("band", pa.int16()), ("key", pa.uint64()), ("hash", pa.uint64()), ("shard", pa.int32()),
                  ("row", pa.int32())])
PAIR = pa.schema([("m_shard", pa.int32()), ("m_row", pa.int32()), ("l_hash", pa.uint64()), ("l_shard", pa.int32()),
                  ("l_row", pa.int32())])
LEAD = pa.schema([("m_row", pa.int32()), ("l_hash", pa.uint64()), ("l_shard", pa.int32()), ("l_row", pa.int32()),
                  ("l_id", pa.string()), ("l_sig", pa.list_(pa.uint32()))])


def _group_heads(keys: list[np.ndarray], rank: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(members, heads): every index whose key columns all equal a smaller-ranked one's, and the
    smallest of its group (rank = the winner order's columns, most significant first)."""
    order = np.lexsort(tuple(reversed(rank)) + tuple(reversed(keys)))
    same = np.ones(max(len(order) - 1, 0), dtype=bool)
    for k in keys:
        s = k[order]
        same &= s[1:] == s[:-1]
    first = np.ones(len(order), dtype=bool)
    first[1:] = ~same
    head = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    return order[~first], order[head[~first]]


def _band_keys(signatures: np.ndarray, bands: int) -> np.ndarray:
    from curation.caption_filter import band_keys

    return band_keys(signatures, bands)


def _sample_hashes(t: pa.Table) -> np.ndarray:
    if "sample_hash" in t.column_names:
        return t.column("sample_hash").to_numpy()
    return np.array([text_hash(s) for s in t.column("sample_id").to_pylist()], dtype=np.uint64)


def _signatures(col: pa.ChunkedArray | pa.Array, n: int, perms: int) -> np.ndarray:
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return col.flatten().to_numpy(zero_copy_only=False).reshape(n, perms)


# --- the rounds (each runs as one task) --------------------------------------------------------

def exact_map(job: dict, i: int, shard: Location) -> tuple[int, str]:
    names = pq.ParquetFile(shard.path, filesystem=shard.fs).schema_arrow.names
    t = read_table(shard, ["sample_id", "caption_key"] + [c for c in ("sample_hash",) if c in names])
    n = t.num_rows
    key = t.column("caption_key").to_numpy()
    table = pa.table([key, _sample_hashes(t), np.full(n, i, np.int32), np.arange(n, dtype=np.int32),
                      t.column("sample_id")], schema=EXACT)
    return i, write_routed(job["dir"].join("exact", f"{i}.routed"), table, (key % job["P"]).astype(np.int64), job["P"])


def exact_reduce(job: dict, p: int, files: list[str]) -> tuple[int, str]:
    t = read_routed(_scratch(files, job["dir"].fs), p, EXACT)
    cols = {c: t.column(c).to_numpy(zero_copy_only=False) for c in ("key", "hash", "shard", "row")}
    losers, winners = (_group_heads([cols["key"]], [cols["hash"], cols["shard"], cols["row"]])
                       if job["exact"] and len(t) else (np.zeros(0, np.int64), np.zeros(0, np.int64)))
    ids = t.column("sample_id").take(pa.array(winners))
    out = pa.table([cols["row"][losers], ids], schema=LOST)
    return p, write_routed(job["dir"].join("lost", f"{p}.routed"), out, cols["shard"][losers].astype(np.int64), job["S"])


def band_map(job: dict, i: int, shard: Location, lost_files: list[str]) -> tuple[int, str | None, int]:
    """The shard's rows still alive after exact dedup -> one record per (row, band)."""
    if job["threshold"] <= 0:
        return i, None, 0
    names = pq.ParquetFile(shard.path, filesystem=shard.fs).schema_arrow.names
    t = read_table(shard, ["sample_id", "caption_minhash"] + [c for c in ("sample_hash",) if c in names])
    n = t.num_rows
    alive = np.ones(n, dtype=bool)
    alive[read_routed(_scratch(lost_files, job["dir"].fs), i, LOST).column("row").to_numpy()] = False
    rows = np.flatnonzero(alive).astype(np.int32)
    bands = _band_keys(_signatures(t.column("caption_minhash"), n, job["perms"])[rows], job["bands"])
    b = bands.shape[1]
    table = pa.table([np.tile(np.arange(b, dtype=np.int16), len(rows)), bands.reshape(-1),
                      np.repeat(_sample_hashes(t)[rows], b), np.full(len(rows) * b, i, np.int32),
                      np.repeat(rows, b)], schema=BAND)
    route = (bands.reshape(-1) % job["P"]).astype(np.int64)
    return i, write_routed(job["dir"].join("band", f"{i}.routed"), table, route, job["P"]), len(rows)


def band_reduce(job: dict, p: int, files: list[str]) -> tuple[int, str]:
    """Buckets -> (member, leader) pairs, routed to the leader's shard."""
    t = read_routed(_scratch(files, job["dir"].fs), p, BAND)
    c = {k: t.column(k).to_numpy() for k in BAND.names}
    if len(t):
        members, heads = _group_heads([c["band"], c["key"]], [c["hash"], c["shard"], c["row"]])
    else:
        members = heads = np.zeros(0, np.int64)
    pairs = pa.table([c["shard"][members], c["row"][members], c["hash"][heads], c["shard"][heads],
                      c["row"][heads]], schema=PAIR)
    return p, write_routed(job["dir"].join("pair", f"{p}.routed"), pairs, c["shard"][heads].astype(np.int64), job["S"])


def leader_map(job: dict, i: int, shard: Location, pair_files: list[str]) -> tuple[int, str]:
    """Pairs whose leader is in this shard: + the leader's signature and sample_id; -> member's shard."""
    pairs = read_routed(_scratch(pair_files, job["dir"].fs), i, PAIR)
    l_rows = pairs.column("l_row").to_numpy()
    t = read_table(shard, ["sample_id", "caption_minhash"])
    take = pa.array(l_rows.astype(np.int64))
    out = pa.table([pairs.column("m_row"), pairs.column("l_hash"), pairs.column("l_shard"), pairs.column("l_row"),
                    t.column("sample_id").take(take), t.column("caption_minhash").take(take)], schema=LEAD)
    return i, write_routed(job["dir"].join("lead", f"{i}.routed"), out,
                            pairs.column("m_shard").to_numpy().astype(np.int64), job["S"])


def final(job: dict, i: int, shard: Location, lost_files: list[str], lead_files: list[str]) -> tuple[int, int, str]:
    """This shard's losers: exact ones, then near ones (smallest passing leader per member);
    written sorted by row. Returns (shard index, losers, digest of the table)."""
    fs = job["dir"].fs
    lost = read_routed(_scratch(lost_files, fs), i, LOST)
    rows = [lost.column("row").to_numpy()]
    reasons = ["duplicate_caption"] * len(lost)
    details = [f"same normalised caption as sample {w}" for w in lost.column("winner").to_pylist()]
    if job["threshold"] > 0 and lead_files:
        lead = read_routed(_scratch(lead_files, fs), i, LEAD)
        if len(lead):
            m_row = lead.column("m_row").to_numpy()
            t = read_table(shard, ["caption_minhash"])
            m_sig = _signatures(t.column("caption_minhash").take(pa.array(m_row.astype(np.int64))), len(lead),
                                job["perms"])
            l_sig = _signatures(lead.column("l_sig"), len(lead), job["perms"])
            sim = np.array([float(np.mean(a == b)) for a, b in zip(m_sig, l_sig)])  # jaccard_estimate's arithmetic
            ok = np.flatnonzero(sim >= job["threshold"])
            order = ok[np.lexsort((lead.column("l_row").to_numpy()[ok], lead.column("l_shard").to_numpy()[ok],
                                   lead.column("l_hash").to_numpy()[ok], m_row[ok]))]
            first = np.ones(len(order), dtype=bool)
            first[1:] = m_row[order][1:] != m_row[order][:-1]
            best = order[first]  # per member: the smallest passing leader in the winner order
            ids = lead.column("l_id").take(pa.array(best)).to_pylist()
            rows.append(m_row[best])
            reasons += ["near_duplicate_caption"] * len(best)
            details += [f"estimated Jaccard {s:.2f} with sample {n}" for s, n in zip(sim[best].tolist(), ids)]
    table = pa.table([np.concatenate(rows).astype(np.int32), pa.array(reasons, pa.string()),
                      pa.array(details, pa.string())], schema=LOSER_SCHEMA)
    table = table.take(pa.array(np.argsort(table.column("row").to_numpy(), kind="stable"))).combine_chunks()
    write_table(job["dir"].join("losers", f"{i}.parquet"), table)
    h = xxhash.xxh3_64(table.column("row").to_numpy().tobytes())
    h.update("\n".join(table.column("reason").to_pylist()).encode())
    return i, len(table), h.hexdigest()


# --- the driver's side: names and counts only ---------------------------------------------------

def _by_index(results) -> list:
    out = sorted(results, key=lambda r: r[0])
    return [r[1:] if len(r) > 2 else r[1] for r in out]


def find_duplicates(shards: list[Location], c: Any, cfg: Any, work: Location, total_rows: int,
                    partitions: int = 0) -> tuple[list[Location], int, str]:
    """Run the rounds over pass 1's shards (in order). Returns each shard's staged loser file
    (``LOSER_SCHEMA``), the number of losers and a digest of them all (for the config hash)."""
    S = len(shards)
    P = partitions or max(1, math.ceil(total_rows / ROWS_PER_PARTITION))
    job = {"dir": work.join(SCRATCH, uuid.uuid4().hex[:12]), "P": P, "S": S, "exact": c.dedup_exact,
           "threshold": c.near_dup_threshold, "perms": c.minhash_perms, "bands": c.minhash_bands}
    work.join(SCRATCH).delete_tree()  # a killed run's leftovers
    shared = (job,)
    exact = _by_index(map_tasks(exact_map, [(i, s) for i, s in enumerate(shards)], cfg, shared=shared))
    lost = _by_index(map_tasks(exact_reduce, [(p, exact) for p in range(P)], cfg, shared=shared))
    lead: list[str] = []
    if c.near_dup_threshold > 0 and S:
        band = [f for f, _ in _by_index(map_tasks(band_map, [(i, s, lost) for i, s in enumerate(shards)], cfg,
                                                   shared=shared))]
        pairs = _by_index(map_tasks(band_reduce, [(p, band) for p in range(P)], cfg, shared=shared))
        lead = _by_index(map_tasks(leader_map, [(i, s, pairs) for i, s in enumerate(shards)], cfg, shared=shared))
    done = _by_index(map_tasks(final, [(i, s, lost, lead) for i, s in enumerate(shards)], cfg, shared=shared))
    digest = xxhash.xxh3_64()
    for s, (_, d) in zip(shards, done):
        digest.update(f"{s.name}:{d}\n".encode())
    return ([job["dir"].join("losers", f"{i}.parquet") for i in range(S)], sum(n for n, _ in done),
            digest.hexdigest())


def clear_scratch(work: Location) -> None:
    work.join(SCRATCH).delete_tree()

