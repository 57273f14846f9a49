"""The packing core: integer lengths (<= capacity) -> packs, from the length HISTOGRAM.

Best-fit decreasing (BFD), computed on counts instead of items. Lengths are small integers
(<= 8192), so a bucket of a million samples has at most 8192 distinct lengths, and BFD's
decisions depend only on lengths. Every open pack lives in a pool keyed by its remaining room
``r``; the packs at one ``r`` are kept as *ranges* of pack ids that have had identical
histories (so identical contents). Placing the ``c`` items of length ``L`` (largest L first):

* the best fit is the smallest ``r >= L`` (a two-level bitset over r finds it);
* sequential BFD would put ``q = min(r // L, room in item count)`` items into the first pack
  at ``r`` (after each item the same pack is still the best fit), then the next pack, ...;
  so whole ranges take ``q`` items each in one step, and at most one pack takes the rest;
* when no pack has room, new packs are opened in bulk (each holding ``capacity // L`` items).

The result is exactly sequential BFD's packing (pack count and per-pack length multisets),
at a cost of one step per (length, pool range) touched instead of one per item. An exact fill
(``r == L``) is always taken when it exists, since it is the best fit.

Then sample ids are assigned: within one length, which sample takes which slot does not change
any pack's total, so samples of length L are ordered by a seeded hash of ``sample_hash``
(deterministic, independent of input order) and fill the length-L slots in placement order.
Optional composition control (``spread``): within each length, the most image-heavy samples go
to the packs that hold the fewest image tokens so far, spreading image-heavy samples across packs.

Per item, all of it is numpy (no sort over items but one): each op records how many items its
packs already hold, so a slot's place in the output is ``offsets[pack] + before + j``, computed
by two ``np.repeat`` expansions; pack sizes and totals come from difference arrays over the ops.
The one sort, (length, key) as packed uint64 words, is polars' (single-threaded, ~3x numpy's).
Memory is a few arrays of N (see benchmarks/pack_85m.py).

Buckets without losing packs (``plan_buckets`` + ``fill_plan``, used by packing/stage.py): the
BFD above runs ONCE on the sum of the buckets' length histograms; its packs, grouped into runs of
identical packs, are handed to the buckets that can form them from their own samples, and the
few a bucket cannot complete alone go to repair shards that get exactly the samples left over.
So the pack count is the global BFD's for any number of buckets (packing each bucket on its own,
then re-packing the under-filled packs together, is not: BFD is not monotone, and on uniform
lengths the loss survives any such repair).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import polars as pl

from ovpipe.core.hashing import seeded_mix


@dataclass
class PackResult:
    """``order[offsets[p]:offsets[p+1]]`` are the sample indices (into the input arrays) of pack
    ``p``, in pack order; ``pack_tokens[p]`` their total length."""

    order: np.ndarray  # int64[N]
    offsets: np.ndarray  # int64[P+1]
    pack_tokens: np.ndarray  # int64[P]

    @property
    def num_packs(self) -> int:
        return len(self.pack_tokens)

    def members(self, p: int) -> np.ndarray:
        return self.order[self.offsets[p]: self.offsets[p + 1]]


def lower_bound(total_tokens: int, capacity: int) -> int:
    """No packing can use fewer than ceil(sum of lengths / capacity) packs."""
    return -(-int(total_tokens) // capacity)


def bfd_histogram(hist: np.ndarray, capacity: int, max_items: int | None = None) -> tuple[np.ndarray, int]:
    """Best-fit decreasing on a length histogram (``hist[L]`` = number of items of length L).

    Returns ``(ops, num_packs)`` where each row of ``ops`` (int64, columns first_pack, n_packs,
    length, per_pack, before) says: packs first_pack .. first_pack+n_packs-1, each already
    holding ``before`` items, each received ``per_pack`` items of ``length``; rows are in
    placement order (so grouped by length, longest first)."""
    if len(hist) > capacity + 1 and hist[capacity + 1:].any():
        raise ValueError("histogram has lengths above the capacity")
    if hist[0]:
        raise ValueError("zero-length items cannot be packed")
    cap_items = max_items or capacity  # a pack never holds more than `capacity` items of length >= 1
    pools: dict[int, deque] = {}  # room -> deque of [first_pack, n_packs, n_items]
    # The set of rooms with a non-empty pool, as a two-level bitmap: bit (r & 63) of words[r >> 6],
    # and bit w of `top` when words[w] != 0. Finding the smallest room >= L then takes a few
    # operations on 64- and 128-bit ints (one shift of an 8192-bit int costs ~1 us, most of a step).
    words = [0] * (capacity // 64 + 1)
    top = 0
    ops: list[int] = []  # flat: first pack, packs, length, items per pack, items before (5 per op)
    emit = ops.extend
    next_pack = 0
    # The loop runs once per (length, pool range) touched (~20K times for 1M log-normal lengths),
    # so "put a range back in the pool at its new room" is written out inline rather than called.
    for length in np.flatnonzero(hist)[::-1].tolist():
        left = int(hist[length])
        while left:
            # Best fit: the smallest room >= length (0: none).
            w = length >> 6
            m = words[w] >> (length & 63)
            if m:
                room = length + (m & -m).bit_length() - 1
            else:
                t = top >> (w + 1)
                if t:
                    w += (t & -t).bit_length()
                    m = words[w]
                    room = (w << 6) + (m & -m).bit_length() - 1
                else:
                    room = 0
            if not room:
                # No open pack has room: open new ones, each holding as many as fit.
                q = capacity // length
                if q > cap_items:
                    q = cap_items
                full, rest = divmod(left, q)
                if full:
                    emit((next_pack, full, length, q, 0))
                    r = capacity - q * length
                    if r and q < cap_items:  # else full: closed for good
                        if r in pools:
                            pools[r].append([next_pack, full, q])
                        else:
                            pools[r] = deque(([next_pack, full, q],))
                            words[r >> 6] |= 1 << (r & 63)
                            top |= 1 << (r >> 6)
                    next_pack += full
                if rest:  # rest < q: room and item count are left
                    emit((next_pack, 1, length, rest, 0))
                    r = capacity - rest * length
                    if r in pools:
                        pools[r].append([next_pack, 1, rest])
                    else:
                        pools[r] = deque(([next_pack, 1, rest],))
                        words[r >> 6] |= 1 << (r & 63)
                        top |= 1 << (r >> 6)
                    next_pack += 1
                break
            pool = pools[room]
            entry = pool[0]
            first, n, items = entry
            q = room // length
            if q > cap_items - items:
                q = cap_items - items
            full = left // q
            if full > n:
                full = n
            if full:
                emit((first, full, length, q, items))
                left -= full * q
                r = room - q * length
                if r and items + q < cap_items:
                    if r in pools:
                        pools[r].append([first, full, items + q])
                    else:
                        pools[r] = deque(([first, full, items + q],))
                        words[r >> 6] |= 1 << (r & 63)
                        top |= 1 << (r >> 6)
                first += full
                n -= full
            if n and left:  # one pack takes the rest (fewer than q)
                emit((first, 1, length, left, items))
                r = room - left * length
                if r and items + left < cap_items:
                    if r in pools:
                        pools[r].append([first, 1, items + left])
                    else:
                        pools[r] = deque(([first, 1, items + left],))
                        words[r >> 6] |= 1 << (r & 63)
                        top |= 1 << (r >> 6)
                first += 1
                n -= 1
                left = 0
            if n:
                entry[0], entry[1] = first, n
            else:
                pool.popleft()
                if not pool:
                    del pools[room]
                    w = room >> 6
                    words[w] ^= 1 << (room & 63)
                    if not words[w]:
                        top ^= 1 << w
    return np.fromiter(ops, dtype=np.int64, count=len(ops)).reshape(-1, 5), next_pack


def _per_pack(ops: np.ndarray, num_packs: int, per_item: np.ndarray) -> np.ndarray:
    """Sum over ops of ``q * per_item`` added to each pack of the op's range (a difference array,
    so the cost is per op, not per item)."""
    first, n, _length, q, _before = ops.T
    w = (q * per_item).astype(np.float64)  # exact: totals are far below 2**53
    diff = np.bincount(first, weights=w, minlength=num_packs + 1) - np.bincount(first + n, weights=w,
                                                                                minlength=num_packs + 1)
    return np.cumsum(diff[:num_packs]).astype(np.int64)


def _slot_positions(ops: np.ndarray, offsets: np.ndarray, with_pack: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Where each slot lands in the output ``order``, slots listed by length (ascending) and,
    within a length, in placement order: the order samples sorted by (length, key) fill them.

    A slot (op k, pack p, j-th of the op's q items in p) lands at offsets[p] + before_k + j, so
    a pack's members come out in placement order (longest first) with no sort over items.
    Expanded in two steps, op -> (op, pack) pairs -> slots, each a numpy repeat."""
    ops = ops[np.argsort(ops[:, 2], kind="stable")]  # ops are grouped by length, longest first
    first, n, _length, q, before = ops.T
    pair_op = np.repeat(np.arange(len(ops)), n)
    pair_start = np.cumsum(n) - n
    pair_pack = first[pair_op] + (np.arange(len(pair_op)) - pair_start[pair_op])
    pair_q = q[pair_op]
    slot_start = np.cumsum(pair_q) - pair_q
    pos = np.repeat(offsets[pair_pack] + before[pair_op] - slot_start, pair_q)
    pos += np.arange(len(pos))
    return pos, (np.repeat(pair_pack, pair_q) if with_pack else None)


def pack_lengths(lengths: np.ndarray, capacity: int, *, max_items: int | None = None,
                 sample_hash: np.ndarray | None = None, seed: int = 0,
                 image_tokens: np.ndarray | None = None) -> PackResult:
    """Pack samples of the given lengths (1..capacity) into packs of at most ``capacity`` tokens
    and at most ``max_items`` samples. ``sample_hash`` (uint64) makes the assignment of
    samples to slots independent of input order; with ``image_tokens``, image-heavy samples are
    spread across packs. Deterministic."""
    lengths = np.asarray(lengths)
    n = len(lengths)
    if n == 0:
        return PackResult(np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int64))
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < 1 or hi > capacity:
        raise ValueError(f"lengths must be in [1, {capacity}], got [{lo}, {hi}]")
    ops, num_packs = bfd_histogram(np.bincount(lengths, minlength=capacity + 1), capacity, max_items)
    res, _pool = fill_plan(lengths, ops, num_packs, capacity, sample_hash=sample_hash, seed=seed,
                           image_tokens=image_tokens)
    return res


def fill_plan(lengths: np.ndarray, ops: np.ndarray, num_packs: int, capacity: int, *,
              sample_hash: np.ndarray | None = None, seed: int = 0,
              image_tokens: np.ndarray | None = None) -> tuple[PackResult, np.ndarray]:
    """Put samples into the slots of a plan (``ops`` as ``bfd_histogram`` returns them, for packs
    0..num_packs-1). Samples of length L, ordered by (seeded hash of ``sample_hash``, index), fill
    the plan's length-L slots in placement order; those left over (more samples of a length than
    the plan has slots for) are returned as the pool, in that order. Every slot must be filled."""
    lengths = np.asarray(lengths)
    n = len(lengths)
    counts = _per_pack(ops, num_packs, np.ones(len(ops), np.int64))
    offsets = np.zeros(num_packs + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    tokens = _per_pack(ops, num_packs, ops[:, 2])
    pos, pack_by_len = _slot_positions(ops, offsets, with_pack=image_tokens is not None)
    # Samples by (length, seeded hash): a stable order whatever the input order.
    key = seeded_mix(sample_hash if sample_hash is not None else np.arange(n, dtype=np.uint64), seed)
    by_len = _order_by_length_then_key(lengths, key, capacity) if n else np.zeros(0, np.int64)
    del key
    pool = np.zeros(0, np.int64)
    if int(offsets[-1]) != n:  # the plan holds only some of the samples: the first of each length
        slots = np.bincount(ops[:, 2], weights=ops[:, 1] * ops[:, 3], minlength=capacity + 1).astype(np.int64)
        have = np.bincount(lengths, minlength=capacity + 1)
        if (slots > have).any():
            raise ValueError("the plan has more slots of some length than there are samples of it")
        sorted_len = lengths[by_len]
        first_of_len = np.cumsum(have) - have
        used = np.arange(n) - first_of_len[sorted_len] < slots[sorted_len]
        by_len, pool = by_len[used], by_len[~used]
    del ops
    if image_tokens is not None:
        by_len = _spread_images(by_len, pack_by_len, lengths, np.asarray(image_tokens), num_packs)
    order = np.empty(len(by_len), dtype=np.int64)
    order[pos] = by_len
    return PackResult(order, offsets, tokens), pool


@dataclass
class BucketPlan:
    """One global BFD plan split over hash buckets (``plan_buckets``). The plan's packs come in
    groups of identical packs; group ``g`` is ``contents[content_offsets[g]:content_offsets[g+1]]``
    (rows: length, items of that length per pack, items placed before them), and
    ``alloc[b, g]`` of its ``copies[g]`` packs are formed inside bucket b from b's own samples;
    the rest (``repair_copies``) are formed by the repair shard from every bucket's left-over
    samples, whose lengths are exactly what those packs need."""

    contents: np.ndarray  # int64[K, 3]
    content_offsets: np.ndarray  # int64[G+1]
    copies: np.ndarray  # int64[G]
    alloc: np.ndarray  # int64[B, G]
    pool: np.ndarray  # int64[B, L]: each bucket's samples of each length left to the repair
    num_packs: int  # the global BFD's pack count: the buckets' and the repair's packs add up to it

    @property
    def repair_copies(self) -> np.ndarray:
        return self.copies - self.alloc.sum(axis=0)

    def ops(self, copies: np.ndarray) -> tuple[np.ndarray, int]:
        """Ops (``bfd_histogram``'s layout) of ``copies[g]`` packs of each group, groups in plan
        order: packs numbered from 0 in that order."""
        keep = np.flatnonzero(copies)
        firsts = np.cumsum(copies[keep]) - copies[keep]
        rows = []
        for g, first in zip(keep.tolist(), firsts.tolist()):
            c = self.contents[self.content_offsets[g]:self.content_offsets[g + 1]]
            op = np.empty((len(c), 5), np.int64)
            op[:, 0], op[:, 1], op[:, 2], op[:, 3], op[:, 4] = first, copies[g], c[:, 0], c[:, 1], c[:, 2]
            rows.append(op)
        ops = np.concatenate(rows) if rows else np.zeros((0, 5), np.int64)
        # bfd_histogram's order (placement order: longest first) keeps the assignment's tie-breaks
        return ops[np.argsort(-ops[:, 2], kind="stable")], int(copies.sum())


def plan_buckets(hists: np.ndarray, capacity: int, max_items: int | None = None) -> BucketPlan:
    """One best-fit-decreasing plan over the sum of the buckets' length histograms (``hists[b, L]``:
    samples of length L in bucket b), split so that each bucket forms as many of the plan's packs
    as it can from its own samples. The pack count is the global BFD's whatever the number of
    buckets; only the few packs no bucket can complete alone go to the repair shard.

    Groups of identical packs are handed out in plan order (longest samples first); each group's
    copies go to the buckets in proportion to how many each could form (largest remainders, then
    bucket order, for the rest), so every bucket keeps a share of every length for later groups.
    Work: one small numpy step per group (about twice the plan's ops), on histograms only."""
    hists = np.array(hists, dtype=np.int64)
    B = hists.shape[0]
    ops, num_packs = bfd_histogram(hists.sum(axis=0), capacity, max_items)
    # Packs whose op histories are identical form contiguous ranges: cut at every op's bounds.
    bounds = np.unique(np.concatenate([[0, num_packs], ops[:, 0], ops[:, 0] + ops[:, 1]]))
    seg_lo = np.searchsorted(bounds, ops[:, 0])
    seg_hi = np.searchsorted(bounds, ops[:, 0] + ops[:, 1])
    span = seg_hi - seg_lo
    inc_op = np.repeat(np.arange(len(ops)), span)
    inc_seg = seg_lo[inc_op] + (np.arange(len(inc_op)) - np.repeat(np.cumsum(span) - span, span))
    inc = np.lexsort((ops[inc_op, 4], inc_seg))  # by group, then by place in the pack
    inc_op, inc_seg = inc_op[inc], inc_seg[inc]
    G = len(bounds) - 1
    contents = np.stack([ops[inc_op, 2], ops[inc_op, 3], ops[inc_op, 4]], axis=1)
    content_offsets = np.searchsorted(inc_seg, np.arange(G + 1))
    copies = np.diff(bounds)
    alloc = np.zeros((B, G), np.int64)
    left = hists.copy()
    for g in range(G):
        c = contents[content_offsets[g]:content_offsets[g + 1]]
        lens, per = c[:, 0], c[:, 1]
        can = (left[:, lens] // per).min(axis=1)
        m, total = int(copies[g]), int(can.sum())
        if total <= m:
            x = can
        else:
            share = can * m
            x = share // total
            rest = m - int(x.sum())
            if rest:
                frac = share - x * total
                x[np.lexsort((np.arange(B), -frac))[:rest]] += 1
        if x.any():
            alloc[:, g] = x
            left[:, lens] -= x[:, None] * per
    return BucketPlan(contents, content_offsets, copies, alloc, left, num_packs)


def _order_by_length_then_key(lengths: np.ndarray, key: np.ndarray, capacity: int) -> np.ndarray:
    """Sample indices sorted by (length, key), ties by index. One sort of packed uint64 words
    (length | top key bits | index) is ~4x faster than a two-key lexsort, and polars' sort of
    them (single-threaded: a bucket is one Ray task on one CPU) ~3x faster than numpy's."""
    n = len(lengths)
    len_bits, idx_bits = int(capacity).bit_length(), max(int(n - 1).bit_length(), 1)
    key_bits = 64 - len_bits - idx_bits
    if key_bits < 16:
        return np.lexsort((np.arange(n), key, lengths))
    word = (lengths.astype(np.uint64) << np.uint64(64 - len_bits)) | (
        (key >> np.uint64(64 - key_bits)) << np.uint64(idx_bits)) | np.arange(n, dtype=np.uint64)
    word = pl.Series(word).sort(multithreaded=False).to_numpy()
    return (word & np.uint64((1 << idx_bits) - 1)).astype(np.int64)


def _spread_images(by_len: np.ndarray, pack_by_len: np.ndarray, lengths: np.ndarray, image_tokens: np.ndarray,
                   num_packs: int) -> np.ndarray:
    """Within each length (longest first), give the most image-heavy samples to the slots whose
    packs are furthest below the global image-token share so far. Returns a new ``by_len`` (samples aligned with
    ``pack_by_len``, the pack of each slot in the same by-length order)."""
    load = np.zeros(num_packs, dtype=np.float64)  # image tokens minus the global share of tokens placed
    share = float(image_tokens.sum()) / max(float(lengths.sum()), 1.0)
    out = by_len.copy()
    sorted_len = lengths[by_len]
    bounds = np.flatnonzero(np.diff(sorted_len)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(by_len)]])
    for s, e in zip(starts[::-1].tolist(), ends[::-1].tolist()):
        samples = by_len[s:e]
        img = image_tokens[samples]
        if not img.any():
            continue
        heavy_first = samples[np.argsort(-img, kind="stable")]
        packs = pack_by_len[s:e]
        light_first = np.argsort(load[packs], kind="stable")
        out[s + light_first] = heavy_first
        np.add.at(load, packs, image_tokens[out[s:e]] - share * lengths[out[s:e]])
    return out
