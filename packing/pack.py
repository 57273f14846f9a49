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
class LengthCounts:
    """Samples of each length in each bucket, sparse: only the (bucket, length) pairs that hold
    samples (a bucket of 16K samples has ~2K distinct lengths of 8K), by length then bucket:
    ``bucket[ptr[L]:ptr[L+1]]`` (ascending) are the buckets holding length L, ``count[...]`` how
    many. Memory is per pair, not B x (max_len + 1) as a dense array of histograms would be."""

    buckets: int
    ptr: np.ndarray  # int64[max length + 2]
    bucket: np.ndarray  # int32[E]
    count: np.ndarray  # int64[E]

    @classmethod
    def from_entries(cls, bucket: np.ndarray, length: np.ndarray, count: np.ndarray, buckets: int,
                     capacity: int) -> LengthCounts:
        """From (bucket, length, count) triples in any order; a pair listed twice is added up."""
        bucket, length, count = (np.asarray(a, np.int64) for a in (bucket, length, count))
        keep = count != 0
        bucket, length, count = bucket[keep], length[keep], count[keep]
        order = np.lexsort((bucket, length))
        bucket, length, count = bucket[order], length[order], count[order]
        if len(bucket) > 1:
            first = np.flatnonzero(np.r_[True, (bucket[1:] != bucket[:-1]) | (length[1:] != length[:-1])])
            if len(first) < len(bucket):
                count = np.add.reduceat(count, first)
                bucket, length = bucket[first], length[first]
        top = max(int(capacity), int(length[-1]) if len(length) else 0)  # longer: bfd_histogram refuses them
        ptr = np.searchsorted(length, np.arange(top + 2)).astype(np.int64)
        return cls(int(buckets), ptr, bucket.astype(np.int32), count)

    @classmethod
    def from_dense(cls, hists: np.ndarray, capacity: int) -> LengthCounts:
        """From ``hists[b, L]`` (samples of length L in bucket b)."""
        hists = np.asarray(hists, np.int64)
        b, length = np.nonzero(hists)
        return cls.from_entries(b, length, hists[b, length], hists.shape[0], capacity)

    def total(self) -> np.ndarray:
        """int64[max length + 1]: the sum of the buckets' histograms."""
        cum = np.zeros(len(self.count) + 1, np.int64)
        np.cumsum(self.count, out=cum[1:])
        return cum[self.ptr[1:]] - cum[self.ptr[:-1]]


@dataclass
class BucketPlan:
    """One global BFD plan split over hash buckets (``plan_buckets``). The plan's packs come in
    groups of identical packs; group ``g`` is ``contents[content_offsets[g]:content_offsets[g+1]]``
    (rows: length, items of that length per pack, items placed before them). Bucket b forms
    ``alloc_copies[i]`` packs of group ``alloc_group[i]`` for i in ``alloc_offsets[b]:alloc_offsets[b+1]``
    from its own samples; the rest of each group's ``copies`` (``repair_copies``) are formed by the
    repair shards from every bucket's left-over samples (the pool), whose lengths are exactly what
    those packs need. Everything per bucket is sparse (only the groups a bucket forms, only the
    lengths it pools), so the plan's size follows the packs and the (bucket, length) pairs, not B x
    groups or B x (max_len + 1)."""

    contents: np.ndarray  # int64[K, 3]
    content_offsets: np.ndarray  # int64[G+1]
    copies: np.ndarray  # int64[G]
    num_packs: int  # the global BFD's pack count: the buckets' and the repair's packs add up to it
    buckets: int
    alloc_offsets: np.ndarray  # int64[B+1]: bucket b's rows of alloc_group / alloc_copies
    alloc_group: np.ndarray  # int32[A], ascending within a bucket
    alloc_copies: np.ndarray  # int32[A] (int64 past 2**31)
    pool_offsets: np.ndarray  # int64[B+1]: bucket b's rows of pool_length / pool_count / pool_before
    pool_length: np.ndarray  # int32[E], ascending within a bucket
    pool_count: np.ndarray  # int32[E] (int64 past 2**31): bucket b's samples of that length left to the repair
    pool_before: np.ndarray  # int32[E] (likewise): samples of that length pooled by the buckets before b

    @property
    def groups(self) -> int:
        return len(self.copies)

    @property
    def repair_copies(self) -> np.ndarray:
        formed = np.zeros(self.groups, np.int64)
        np.add.at(formed, self.alloc_group, self.alloc_copies)
        return self.copies - formed

    def alloc_row(self, b: int) -> np.ndarray:
        """int64[G]: packs of each group bucket b forms."""
        return _dense_row(self.alloc_offsets, self.alloc_group, self.alloc_copies, b, self.groups)

    def pool_hist(self, b: int, size: int) -> np.ndarray:
        """int64[size]: bucket b's pooled samples of each length."""
        return _dense_row(self.pool_offsets, self.pool_length, self.pool_count, b, size)

    def pooled_before(self, b: int, lengths: np.ndarray) -> np.ndarray:
        """For each length (one bucket b pools), the samples of it pooled by the buckets before b."""
        s, e = self.pool_offsets[b], self.pool_offsets[b + 1]
        return self.pool_before[s + np.searchsorted(self.pool_length[s:e], lengths)].astype(np.int64)

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


def plan_buckets(hists: LengthCounts | np.ndarray, capacity: int, max_items: int | None = None) -> BucketPlan:
    """One best-fit-decreasing plan over the sum of the buckets' length histograms (``hists``:
    ``LengthCounts``, or dense ``hists[b, L]`` = samples of length L in bucket b), split so that
    each bucket forms as many of the plan's packs as it can from its own samples. The pack count
    is the global BFD's whatever the number of buckets; only the few packs no bucket can complete
    alone go to the repair shards.

    Groups of identical packs are handed out in plan order (longest samples first); each group's
    copies go to the buckets in proportion to how many each could form (largest remainders, then
    bucket order, for the rest), so every bucket keeps a share of every length for later groups.
    Work: one small numpy step per group over the buckets that hold its lengths (O(B) for a
    group of several lengths); memory: the (bucket, length) pairs and the plan's nonzero
    allocations, never a B x groups or B x (max_len + 1) array."""
    counts = hists if isinstance(hists, LengthCounts) else LengthCounts.from_dense(hists, capacity)
    B = counts.buckets
    ops, num_packs = bfd_histogram(counts.total(), capacity, max_items)
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
    ptr, holder = counts.ptr, counts.bucket
    left = counts.count.copy()  # samples of each (length, bucket) pair not yet in a bucket's pack
    got_bucket, got_group, got_copies = [], [], []
    for g in range(G):
        c = contents[content_offsets[g]:content_offsets[g + 1]]
        lens, per = c[:, 0].tolist(), c[:, 1].tolist()
        if len(lens) == 1:  # the buckets holding that length, in bucket order
            s, e = ptr[lens[0]], ptr[lens[0] + 1]
            cand, can = holder[s:e], left[s:e] // per[0]
        else:  # the buckets holding all its lengths: the others can form none
            can = None
            for length, q in zip(lens, per):
                s, e = ptr[length], ptr[length + 1]
                v = np.zeros(B, np.int64)
                v[holder[s:e]] = left[s:e] // q
                can = v if can is None else np.minimum(can, v, out=can)
            cand = np.flatnonzero(can)
            can = can[cand]
        m, total = int(copies[g]), int(can.sum())
        if total <= m:
            x = can
        else:
            share = can * m
            x = share // total
            rest = m - int(x.sum())
            if rest:  # a bucket that can form none has no remainder: never among the `rest` largest
                frac = share - x * total
                x[np.lexsort((np.arange(len(x)), -frac))[:rest]] += 1
        nz = np.flatnonzero(x)
        if len(nz):
            who, n = cand[nz], x[nz]
            got_bucket.append(who.astype(np.int32))
            got_group.append(np.full(len(nz), g, np.int32))
            got_copies.append(n)
            for length, q in zip(lens, per):
                s, e = ptr[length], ptr[length + 1]
                left[s + np.searchsorted(holder[s:e], who)] -= n * q
    cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
    a_bucket, a_group, a_copies = cat(got_bucket, np.int32), cat(got_group, np.int32), cat(got_copies, np.int64)
    by_bucket = np.argsort(a_bucket, kind="stable")  # groups stay ascending within a bucket
    a_bucket, a_group, a_copies = a_bucket[by_bucket], a_group[by_bucket], a_copies[by_bucket]
    # The pool: what is left of each pair, numbered within its length across buckets (bucket order).
    pair_len = np.repeat(np.arange(len(ptr) - 1), np.diff(ptr))
    before = np.cumsum(left) - left
    before -= before[ptr[pair_len]]
    pooled = np.flatnonzero(left)
    by_bucket = pooled[np.lexsort((pair_len[pooled], holder[pooled]))]
    p_bucket = holder[by_bucket]
    return BucketPlan(
        contents, content_offsets, copies, num_packs, B,
        np.searchsorted(a_bucket, np.arange(B + 1)).astype(np.int64), a_group, _narrow(a_copies),
        np.searchsorted(p_bucket, np.arange(B + 1)).astype(np.int64), pair_len[by_bucket].astype(np.int32),
        _narrow(left[by_bucket]), _narrow(before[by_bucket]))


def _dense_row(offsets: np.ndarray, index: np.ndarray, values: np.ndarray, row: int, size: int) -> np.ndarray:
    """int64[size]: row ``row`` of a sparse matrix stored by rows (``index[offsets[row]:offsets[row+1]]``
    are its nonzero columns, ``values[...]`` their values), as a dense vector."""
    dense = np.zeros(size, np.int64)
    s, e = offsets[row], offsets[row + 1]
    dense[index[s:e]] = values[s:e]
    return dense


def _narrow(counts: np.ndarray) -> np.ndarray:
    """int32 when every count fits (samples below 2**31): half the bytes of the per-bucket rows."""
    return counts.astype(np.int32) if not len(counts) or int(counts.max()) < 2**31 else counts


@dataclass
class RepairSplit:
    """The plan's repair packs cut into R repair shards (``split_repair``), sparse: shard k forms
    ``copies[i]`` packs of group ``group[i]`` for i in ``offsets[k]:offsets[k+1]``. The pooled
    samples of one length, numbered across buckets (bucket order, then fill order), fill the
    shards' slots of that length in shard order: ``keys`` (``length << 40 | first number``,
    ascending) and ``key_shard`` say which shard takes which numbers."""

    offsets: np.ndarray  # int64[R+1]
    group: np.ndarray  # int32[X]
    copies: np.ndarray  # int64[X]
    keys: np.ndarray  # int64[Y]
    key_shard: np.ndarray  # int32[Y]

    NUMBER_BITS = 40  # a length's pooled samples are numbered below 2**40

    @property
    def shards(self) -> int:
        return len(self.offsets) - 1

    def copies_of(self, k: int, groups: int) -> np.ndarray:
        """int64[G]: packs of each group repair shard k forms."""
        return _dense_row(self.offsets, self.group, self.copies, k, groups)

    def dest(self, lengths: np.ndarray, numbers: np.ndarray) -> np.ndarray:
        """The repair shard of each pooled sample (its length, its number within that length)."""
        at = (np.asarray(lengths, np.int64) << self.NUMBER_BITS) | np.asarray(numbers, np.int64)
        return self.key_shard[np.searchsorted(self.keys, at, side="right") - 1].astype(np.int64)


def split_repair(plan: BucketPlan, shards: int) -> RepairSplit:
    """The repair packs (plan order) cut into ``shards`` runs of about equal samples."""
    copies = plan.repair_copies
    per_pack = np.add.reduceat(plan.contents[:, 1], plan.content_offsets[:-1]) if len(copies) else copies
    rows: list[tuple[int, int, int]] = []  # (shard, group, packs), shards ascending
    target = max(1, -(-int((copies * per_pack).sum()) // shards))
    k, filled = 0, 0
    for g in np.flatnonzero(copies).tolist():
        left = int(copies[g])
        while left:
            take = left if k == shards - 1 else min(left, max(1, -(-(target - filled) // int(per_pack[g]))))
            rows.append((k, g, take))
            left -= take
            filled += take * int(per_pack[g])
            if filled >= target and k < shards - 1:
                k, filled = k + 1, 0
    r = np.array(rows, np.int64).reshape(-1, 3)
    offsets = np.searchsorted(r[:, 0], np.arange(shards + 1)).astype(np.int64)
    # Slots of each (length, shard): every content row of every (shard, group) row
    size = plan.content_offsets[r[:, 1] + 1] - plan.content_offsets[r[:, 1]]
    row_of = np.repeat(np.arange(len(r)), size)
    content = plan.content_offsets[r[row_of, 1]] + (np.arange(len(row_of)) - np.repeat(np.cumsum(size) - size, size))
    length, slots, shard = plan.contents[content, 0], r[row_of, 2] * plan.contents[content, 1], r[row_of, 0]
    order = np.lexsort((shard, length))
    length, slots, shard = length[order], slots[order], shard[order]
    first = np.flatnonzero(np.r_[True, (length[1:] != length[:-1]) | (shard[1:] != shard[:-1])]) if len(length) \
        else np.zeros(0, np.int64)
    slots = np.add.reduceat(slots, first) if len(first) else slots
    length, shard = length[first], shard[first]
    start = np.cumsum(slots) - slots  # numbers before this (length, shard), over all lengths ...
    new_len = np.flatnonzero(np.r_[True, length[1:] != length[:-1]]) if len(length) else np.zeros(0, np.int64)
    start -= np.repeat(start[new_len], np.diff(np.r_[new_len, len(length)]))  # ... within its length
    return RepairSplit(offsets, r[:, 1].astype(np.int32), r[:, 2],
                       (length << RepairSplit.NUMBER_BITS) | start, shard.astype(np.int32))


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
