"""The packing core: integer lengths (<= capacity) -> packs, from the length HISTOGRAM.

Best-fit decreasing (BFD), computed on counts instead of items. Lengths are small integers
(<= 8192), so a bucket of a million samples has at most 8192 distinct lengths, and BFD's
decisions depend only on lengths. Every open pack lives in a pool keyed by its remaining room
``r``; the packs at one ``r`` are kept as *ranges* of pack ids that have had identical
histories (so identical contents). Placing the ``c`` items of length ``L`` (largest L first):

* the best fit is the smallest ``r >= L`` (a bitset over r finds it);
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

All of it is numpy on arrays of samples; memory is a few arrays of N (see benchmarks/pack_85m.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np


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
    length, per_pack) says: packs first_pack .. first_pack+n_packs-1 each received ``per_pack``
    items of ``length``; rows are in placement order."""
    if len(hist) > capacity + 1 and hist[capacity + 1:].any():
        raise ValueError("histogram has lengths above the capacity")
    if hist[0]:
        raise ValueError("zero-length items cannot be packed")
    cap_items = max_items or capacity  # a pack never holds more than `capacity` items of length >= 1
    pools: dict[int, deque] = {}  # room -> deque of [first_pack, n_packs, n_items]
    bits = 0  # bit r set <=> pools[r] is non-empty
    ops_first: list[int] = []  # one op = (first pack, packs, length, items per pack), 4 parallel lists
    ops_n: list[int] = []
    ops_len: list[int] = []
    ops_q: list[int] = []
    next_pack = 0

    def op(first: int, n: int, length: int, q: int) -> None:
        ops_first.append(first)
        ops_n.append(n)
        ops_len.append(length)
        ops_q.append(q)

    def put(room: int, first: int, n: int, items: int) -> None:
        nonlocal bits
        if room == 0 or items >= cap_items:
            return  # full: closed for good
        pool = pools.get(room)
        if pool is None:
            pool = pools[room] = deque()
        pool.append([first, n, items])
        bits |= 1 << room

    for length in np.flatnonzero(hist)[::-1].tolist():
        left = int(hist[length])
        while left:
            above = bits >> length
            if not above:
                # No open pack has room: open new ones, each holding as many as fit.
                q = min(capacity // length, cap_items)
                full = left // q
                if full:
                    op(next_pack, full, length, q)
                    put(capacity - q * length, next_pack, full, q)
                    next_pack += full
                if left % q:
                    op(next_pack, 1, length, left % q)
                    put(capacity - (left % q) * length, next_pack, 1, left % q)
                    next_pack += 1
                break
            room = length + ((above & -above).bit_length() - 1)
            pool = pools[room]
            entry = pool[0]
            first, n, items = entry
            q = min(room // length, cap_items - items)
            full = min(n, left // q)
            if full:
                op(first, full, length, q)
                left -= full * q
                first += full
                n -= full
                put(room - q * length, first - full, full, items + q)
            if n and left:  # one pack takes the rest (fewer than q)
                op(first, 1, length, left)
                put(room - left * length, first, 1, items + left)
                first += 1
                n -= 1
                left = 0
            if n:
                entry[0], entry[1] = first, n
            else:
                pool.popleft()
                if not pool:
                    del pools[room]
                    bits &= ~(1 << room)
    ops = np.empty((len(ops_first), 4), dtype=np.int64)
    for j, col in enumerate((ops_first, ops_n, ops_len, ops_q)):
        ops[:, j] = np.fromiter(col, dtype=np.int64, count=len(col))
    return ops, next_pack


def _slots(ops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expand ops into one slot per item: (pack id, length), in placement order."""
    first, n, length, q = ops.T
    per_op = n * q
    op_of_slot = np.repeat(np.arange(len(ops)), per_op)
    start = np.cumsum(per_op) - per_op
    within = np.arange(int(per_op.sum()), dtype=np.int64) - start[op_of_slot]
    pack = first[op_of_slot] + within // q[op_of_slot]
    return pack, length[op_of_slot]


def splitmix64(x: np.ndarray, seed: int) -> np.ndarray:
    """A well-mixed 64-bit hash of (x, seed), vectorised."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64((0x9E3779B97F4A7C15 * (seed + 1)) & 0xFFFFFFFFFFFFFFFF)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


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
    slot_pack, slot_len = _slots(ops)
    del ops
    # Samples by (length, seeded hash): a stable order whatever the input order.
    key = splitmix64(sample_hash if sample_hash is not None else np.arange(n, dtype=np.uint64), seed)
    by_len = _order_by_length_then_key(lengths, key, capacity)
    del key
    slot_by_len = np.argsort(slot_len.astype(np.int16 if capacity < 2**15 else np.int32), kind="stable")
    del slot_len
    if image_tokens is not None:
        by_len = _spread_images(by_len, slot_by_len, slot_pack, lengths, np.asarray(image_tokens), num_packs)
    sample_of_slot = np.empty(n, dtype=np.int64)
    sample_of_slot[slot_by_len] = by_len
    del by_len, slot_by_len
    # Group slots by pack (stable: within a pack, placement order = longest first).
    grouped = np.argsort(slot_pack, kind="stable")
    order = sample_of_slot[grouped]
    del sample_of_slot, grouped
    counts = np.bincount(slot_pack, minlength=num_packs)
    offsets = np.zeros(num_packs + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    tokens = np.bincount(slot_pack, weights=None, minlength=num_packs)
    tokens = np.add.reduceat(lengths[order].astype(np.int64), offsets[:-1]) if num_packs else tokens
    return PackResult(order, offsets, tokens.astype(np.int64))


def _order_by_length_then_key(lengths: np.ndarray, key: np.ndarray, capacity: int) -> np.ndarray:
    """Sample indices sorted by (length, key), ties by index. One sort of packed uint64 words
    (length | top key bits | index) is ~4x faster than a two-key lexsort."""
    n = len(lengths)
    len_bits, idx_bits = int(capacity).bit_length(), max(int(n - 1).bit_length(), 1)
    key_bits = 64 - len_bits - idx_bits
    if key_bits < 16:
        return np.lexsort((np.arange(n), key, lengths))
    word = (lengths.astype(np.uint64) << np.uint64(64 - len_bits)) | (
        (key >> np.uint64(64 - key_bits)) << np.uint64(idx_bits)) | np.arange(n, dtype=np.uint64)
    word.sort()
    return (word & np.uint64((1 << idx_bits) - 1)).astype(np.int64)


def _spread_images(by_len: np.ndarray, slot_by_len: np.ndarray, slot_pack: np.ndarray, lengths: np.ndarray,
                   image_tokens: np.ndarray, num_packs: int) -> np.ndarray:
    """Within each length (longest first), give the most image-heavy samples to the slots whose
    packs are furthest below the global image-token share so far. Returns a new ``by_len`` (samples aligned with
    ``slot_by_len``)."""
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
        packs = slot_pack[slot_by_len[s:e]]
        light_first = np.argsort(load[packs], kind="stable")
        out[s + light_first] = heavy_first
        np.add.at(load, packs, image_tokens[out[s:e]] - share * lengths[out[s:e]])
    return out
