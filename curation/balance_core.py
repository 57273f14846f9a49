"""The balance sampler: everything the balance stage and its report compute, without the stage.

Validating one shard's rows (``shard_rows``: codes per row, flat concept lists of the usable
ones), the exact arithmetic that decides membership (hash uniforms, -ln without libm, weights,
MetaCLIP keep probabilities), the radix-select cut-off and the MetaCLIP threshold solver, the
in-memory selection (``select``: the benchmark's and the tests' reference), the global state the
stage finds in ``prepare`` (``BalanceState``) and ``map_shards`` (a reduction's per-shard step over
``ovpipe.core.executor``). curation/balance.py (the stage) and curation/balance_report.py (its
report) import this module; it imports neither (docs/sampling.md states the designs).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from ovpipe.core.executor import map_tasks
from ovpipe.core.hashing import GOLDEN, splitmix64
from ovpipe.core.progress import Progress
from ovpipe.core.shards import Location

MODES = ("inverse_frequency", "metaclip")
WEIGHTINGS = ("mean", "sum", "max", "score_weighted")
# Row codes: 0 = usable; the others are ledger reasons, checked in this order.
REASONS = np.array(["", "bad_sample_id", "no_concepts", "bad_concept_ids", "bad_concept_scores", "not_selected"],
                   dtype=object)
OK, BAD_SAMPLE_ID, NO_CONCEPTS, BAD_CONCEPT_IDS, BAD_CONCEPT_SCORES, NOT_SELECTED = range(6)
DETAILS = {
    BAD_SAMPLE_ID: "sample_id is null or not 16 hex digits (and no sample_hash column)",
    NO_CONCEPTS: "concept_ids is null or empty: the image has no concept to weigh it by",
    BAD_CONCEPT_IDS: "a concept id is null, negative or >= the vocabulary size (balance.num_concepts)",
    BAD_CONCEPT_SCORES: "concept_scores is null, has another length than concept_ids, or is not finite",
}
MAX_CONCEPTS_UNSET = 1 << 24  # id bound when balance.num_concepts is 0: bounds the bincount's memory
DIGIT_BITS = 16  # radix of the cut-off search: 65,536-bin histograms


# ---------------------------------------------------------------- hashing and exact arithmetic

def uniforms(sample_hash: np.ndarray, seed: int, stream: int = 0) -> np.ndarray:
    """u in (0, 1) from hash(sample_hash, seed): 53 random bits + 1/2 ulp, so never 0 or 1."""
    salt = splitmix64(np.array([(seed * GOLDEN + stream + 1) % 2**64], dtype=np.uint64))
    h = splitmix64(np.asarray(sample_hash, dtype=np.uint64) ^ salt)
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


_LN2 = 0.6931471805599453
_SQRT_HALF = 0.7071067811865476


def neg_log(u: np.ndarray) -> np.ndarray:
    """-ln(u) for u in (0, 1), from frexp and a polynomial (relative error < 1e-12).

    Not np.log: numpy's SIMD log differs in the last bit between CPUs (AVX-512 vs not), and a
    one-ulp change at the cut-off would change the selection on a mixed cluster."""
    m, e = np.frexp(u)  # u = m * 2**e, m in [0.5, 1)
    low = m < _SQRT_HALF
    m = np.where(low, m * 2.0, m)
    e = e - low
    s = (m - 1.0) / (m + 1.0)  # ln(m) = 2 atanh(s), |s| <= 0.1716
    s2 = s * s
    poly = 1.0 / 13
    for k in (11, 9, 7, 5, 3):
        poly = poly * s2 + 1.0 / k
    ln_m = 2.0 * s * (poly * s2 + 1.0)
    return -(e * _LN2 + ln_m)


def one_minus_exp_neg(x: np.ndarray) -> np.ndarray:
    """1 - exp(-x) for x >= 0 without libm (as neg_log), accurate for tiny x too."""
    x = np.asarray(x, dtype=np.float64)
    small = 1.0
    for k in range(14, 1, -1):  # x (1 - x/2 (1 - x/3 (...))): the Taylor series, no cancellation
        small = 1.0 - x / k * small
    small = x * small
    n = np.floor(x / _LN2)
    r = x - n * _LN2  # in [0, ln 2)
    e_r = 1.0
    for k in range(16, 0, -1):
        e_r = 1.0 - r / k * e_r  # exp(-r) by Horner
    big = 1.0 - np.ldexp(e_r, -np.minimum(n, 1100).astype(np.int64))
    return np.where(x < 0.5, small, big)


# ---------------------------------------------------------------- concept lists

@dataclass
class ConceptLists:
    """Ragged per-row concept lists as flat arrays: row i owns values[offsets[i]:offsets[i+1]]."""

    values: np.ndarray  # int concept ids
    offsets: np.ndarray  # int64, len rows + 1, offsets[0] == 0
    scores: np.ndarray | None = None  # float, aligned with values

    @property
    def rows(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def fixed(cls, ids: np.ndarray, scores: np.ndarray | None = None) -> "ConceptLists":
        """From an (n, k) array: every row has k concepts."""
        n, k = ids.shape
        return cls(ids.reshape(-1), np.arange(0, n * k + 1, k, dtype=np.int64),
                   None if scores is None else scores.reshape(-1))

    def slice(self, start: int, stop: int) -> "ConceptLists":
        a, b = self.offsets[start], self.offsets[stop]
        return ConceptLists(self.values[a:b], self.offsets[start:stop + 1] - a,
                            None if self.scores is None else self.scores[a:b])

    def positions(self) -> Iterator[tuple[np.ndarray | None, np.ndarray]]:
        """(rows, element index) for j = 0, 1, ...: the j-th concept of every row that has one.

        Per-row reductions walk the positions in order, so each row's result is the same
        sequence of float operations whatever other rows sit in its shard."""
        lens = np.diff(self.offsets)
        if self.rows == 0:
            return
        k = int(lens.max())
        if (lens == k).all():
            for j in range(k):
                yield None, slice(j, None, k) if k else slice(0, 0)
            return
        starts = self.offsets[:-1]
        for j in range(k):
            rows = np.flatnonzero(lens > j)
            yield rows, starts[rows] + j


def _reduce_rows(lists: ConceptLists, per_elem: np.ndarray, op: Callable, init: float) -> np.ndarray:
    acc = np.full(lists.rows, init, dtype=np.float64)
    for rows, idx in lists.positions():
        if rows is None:
            acc = op(acc, per_elem[idx])
        else:
            acc[rows] = op(acc[rows], per_elem[idx])
    return acc


def concept_weights(lists: ConceptLists, counts: np.ndarray, how: str = "mean") -> np.ndarray:
    """inverse_frequency weight per row from the inverse counts of its concepts (see docs)."""
    inv = 1.0 / np.maximum(counts, 1).astype(np.float64)
    per = inv[lists.values]
    lens = np.diff(lists.offsets).astype(np.float64)
    if how == "max":
        return _reduce_rows(lists, per, np.maximum, 0.0)
    if how == "score_weighted":
        s = np.maximum(lists.scores.astype(np.float64), 0.0)  # negative cosine = no evidence
        num = _reduce_rows(lists, s * per, np.add, 0.0)
        den = _reduce_rows(lists, s, np.add, 0.0)
        mean = _reduce_rows(lists, per, np.add, 0.0) / lens
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), mean)
    total = _reduce_rows(lists, per, np.add, 0.0)
    return total if how == "sum" else total / lens


def metaclip_keep_prob(lists: ConceptLists, counts: np.ndarray, t: float) -> np.ndarray:
    """1 - prod over the row's concepts of (1 - t / max(count, t))."""
    c = counts[lists.values].astype(np.float64)
    q = 1.0 - t / np.maximum(c, t)
    return 1.0 - _reduce_rows(lists, q, np.multiply, 1.0)


# ---------------------------------------------------------------- order sampling cut-off

def es_keys(sample_hash: np.ndarray, weights: np.ndarray, seed: int) -> np.ndarray:
    """Efraimidis-Spirakis key as an order-preserving uint64: E = Exp(1) / w > 0, whose float64
    bits sort like E. Smaller keys are drawn first (E is the arrival time of a rate-w race)."""
    e = neg_log(uniforms(sample_hash, seed)) / weights
    return e.view(np.uint64)


def _prefix_mask(hi: np.ndarray, lo: np.ndarray, prefix: tuple[int, ...]) -> np.ndarray | None:
    """Rows whose 128-bit key (hi, lo) starts with the given 16-bit digits (None = all rows)."""
    level = len(prefix)
    if level == 0:
        return None
    value = 0
    for d in prefix:
        value = (value << DIGIT_BITS) | d
    if level <= 4:
        top = hi if level == 4 else hi >> np.uint64(64 - DIGIT_BITS * level)
        return top == np.uint64(value)
    hi_value, lo_value = value >> (DIGIT_BITS * (level - 4)), value & ((1 << (DIGIT_BITS * (level - 4))) - 1)
    lo_top = lo if level == 8 else lo >> np.uint64(64 - DIGIT_BITS * (level - 4))
    return (hi == np.uint64(hi_value)) & (lo_top == np.uint64(lo_value))


def _digit(hi: np.ndarray, lo: np.ndarray, level: int) -> np.ndarray:
    word, pos = (hi, level) if level < 4 else (lo, level - 4)
    return ((word >> np.uint64(64 - DIGIT_BITS * (pos + 1))) & np.uint64(0xFFFF)).astype(np.intp)


def key_histogram(hi: np.ndarray, lo: np.ndarray, prefix: tuple[int, ...]) -> np.ndarray:
    """Counts of the next 16-bit digit among rows matching the prefix."""
    mask = _prefix_mask(hi, lo, prefix)
    if mask is not None:
        hi, lo = hi[mask], lo[mask]
    return np.bincount(_digit(hi, lo, len(prefix)), minlength=1 << DIGIT_BITS).astype(np.int64)


def key_candidates(hi: np.ndarray, lo: np.ndarray, prefix: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    mask = _prefix_mask(hi, lo, prefix)
    return (hi, lo) if mask is None else (hi[mask], lo[mask])


def find_cutoff(n_select: int, histogram: Callable[[tuple], np.ndarray],
                candidates: Callable[[tuple], tuple[np.ndarray, np.ndarray]], cap: int) -> tuple[int, int]:
    """The n-th smallest 128-bit key (hi, lo) by radix select: each histogram call sums the
    next digit's counts over all rows (over all shards), until the boundary bin holds at most
    `cap` rows; those are gathered and sorted. Needs 1 <= n_select <= number of rows."""
    prefix: tuple[int, ...] = ()
    need = n_select
    for level in range(8):
        cum = np.cumsum(histogram(prefix))
        b = int(np.searchsorted(cum, need))  # first bin whose cumulative count reaches `need`
        below = int(cum[b - 1]) if b else 0
        need -= below
        prefix += (b,)
        if int(cum[b]) - below <= cap:
            break
    hi, lo = candidates(prefix)
    order = np.lexsort((lo, hi))
    k = order[need - 1]
    return int(hi[k]), int(lo[k])


def passes_cutoff(hi: np.ndarray, lo: np.ndarray, cutoff: tuple[int, int]) -> np.ndarray:
    c_hi, c_lo = np.uint64(cutoff[0]), np.uint64(cutoff[1])
    return (hi < c_hi) | ((hi == c_hi) & (lo <= c_lo))


def cutoff_value(cutoff: tuple[int, int]) -> float:
    """The E value (float64) of a cut-off key."""
    return float(np.array([cutoff[0]], dtype=np.uint64).view(np.float64)[0])


# ---------------------------------------------------------------- metaclip threshold solving

FIXED_POINT = 2.0**32  # per-row probabilities summed as integers: exact and order-free


def expected_sizes(lists: ConceptLists, counts: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Sum over rows of the keep probability at each t, in units of 2**-32 (int64)."""
    return np.array([np.round(metaclip_keep_prob(lists, counts, float(t)) * FIXED_POINT).astype(np.int64).sum()
                     for t in ts], dtype=np.int64)


def solve_threshold(target: float, max_count: int, expected: Callable[[np.ndarray], np.ndarray],
                    points: int = 32, rounds: int = 12) -> tuple[float, float]:
    """t with expected size closest to `target`: expected(ts) is increasing in t; each round
    evaluates `points` values of t (one pass over the data) across the bracket in log space."""
    lo_t, hi_t = 1.0, float(max(max_count, 1))
    lo_e, hi_e = expected(np.array([lo_t, hi_t])) / FIXED_POINT
    if target <= lo_e:
        return lo_t, lo_e
    if target >= hi_e:
        return hi_t, hi_e
    for _ in range(rounds):
        ts = np.exp(np.linspace(np.log(lo_t), np.log(hi_t), points + 2)[1:-1])
        es = expected(ts) / FIXED_POINT
        i = int(np.searchsorted(es, target))
        lo_t, lo_e = (ts[i - 1], es[i - 1]) if i else (lo_t, lo_e)
        hi_t, hi_e = (ts[i], es[i]) if i < len(ts) else (hi_t, hi_e)
        if hi_e - lo_e < 0.5 or hi_t / lo_t - 1 < 1e-12:
            break
    return (lo_t, lo_e) if target - lo_e <= hi_e - target else (hi_t, hi_e)


# ---------------------------------------------------------------- in-memory selection core

@dataclass
class Selection:
    keep: np.ndarray  # bool per row
    weight: np.ndarray  # float64 per row (the sampler's weight, see `select`)
    inclusion_prob: np.ndarray  # float64 per row (exact for metaclip, approximate for ES)
    info: dict[str, Any] = field(default_factory=dict)


def size_from(n_rows: int, target: int = 0, fraction: float = 0.0) -> int:
    n = target if target else int(np.floor(fraction * n_rows + 0.5))
    return min(max(n, 0), n_rows)


CHUNK_ROWS = 1 << 16  # in-memory selection works on row chunks: temporaries stay in cache


def _chunks(n: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, CHUNK_ROWS):
        yield start, min(start + CHUNK_ROWS, n)


def concept_counts(values: np.ndarray, minlength: int = 0) -> np.ndarray:
    """bincount over chunks: np.bincount casts its input to intp, a copy as large as the input."""
    counts = np.zeros(max(minlength, int(values.max(initial=-1)) + 1), dtype=np.int64)
    step = CHUNK_ROWS * 16
    for start in range(0, len(values), step):
        counts += np.bincount(values[start:start + step], minlength=len(counts))
    return counts


def select(sample_hash: np.ndarray, lists: ConceptLists, *, mode: str = "inverse_frequency", seed: int = 0,
           target: int = 0, fraction: float = 0.0, threshold: float = 0.0, weighting: str = "mean",
           num_concepts: int = 0, candidate_rows: int = 1 << 20) -> Selection:
    """The whole selection on in-memory arrays of usable rows (one shard's worth, or a
    benchmark's 20M rows): the functions the stage runs per shard, with the reductions done in
    place over row chunks, so the extra memory is a few per-row arrays."""
    counts = concept_counts(lists.values, num_concepts)
    n = len(sample_hash)
    if mode == "metaclip":
        if threshold:
            t, info = threshold, {"threshold": threshold, "threshold_solved": False}
        else:
            n_target = size_from(n, target, fraction)
            t, exp = solve_threshold(n_target, int(counts.max(initial=1)),
                                     lambda ts: sum(expected_sizes(lists.slice(a, b), counts, ts) for a, b in _chunks(n)))
            info = {"threshold": t, "threshold_solved": True, "expected_size": exp}
        prob = np.empty(n)
        for a, b in _chunks(n):
            prob[a:b] = metaclip_keep_prob(lists.slice(a, b), counts, t)
        keep = uniforms(sample_hash, seed) < prob
        return Selection(keep, prob, prob, {**info, "counts": counts})
    n_select = size_from(n, target, fraction)
    w = np.empty(n)
    for a, b in _chunks(n):
        w[a:b] = concept_weights(lists.slice(a, b), counts, weighting)
    keep, incl, info = _es_select(np.asarray(sample_hash, dtype=np.uint64), w, seed, n_select, candidate_rows)
    return Selection(keep, w, incl, {**info, "counts": counts})


def _es_select(lo, w, seed, n_select, cap):
    n = len(w)
    if n_select >= n or n_select == 0:
        keep = np.full(n, n_select > 0)
        return keep, keep.astype(np.float64), {"n_select": n_select, "cutoff": None}
    hi = np.empty(n, dtype=np.uint64)
    for a, b in _chunks(n):
        hi[a:b] = es_keys(lo[a:b], w[a:b], seed)

    def histogram(prefix):
        return sum(key_histogram(hi[a:b], lo[a:b], prefix) for a, b in _chunks(n))

    def candidates(prefix):
        parts = [key_candidates(hi[a:b], lo[a:b], prefix) for a, b in _chunks(n)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    cutoff = find_cutoff(n_select, histogram, candidates, cap)
    keep = np.empty(n, dtype=bool)
    for a, b in _chunks(n):
        keep[a:b] = passes_cutoff(hi[a:b], lo[a:b], cutoff)
    incl = np.zeros(n)
    tau = cutoff_value(cutoff)
    for a, b in _chunks(n):
        k = keep[a:b]
        incl[a:b][k] = one_minus_exp_neg(w[a:b][k] * tau)
    return keep, incl, {"n_select": n_select, "cutoff": cutoff}


# ---------------------------------------------------------------- reading shards

@dataclass
class ShardRows:
    """One shard's rows as the sampler sees them: codes per input row, arrays for usable rows."""

    codes: np.ndarray  # uint8 per input row: OK or a ledger reason
    sample_hash: np.ndarray  # uint64, usable rows only
    lists: ConceptLists  # usable rows only
    sources: np.ndarray | None = None  # object, usable rows only

    @property
    def usable(self) -> np.ndarray:
        return self.codes == OK


def required_columns(weighting: str) -> list[str]:
    return ["sample_id", "concept_ids"] + (["concept_scores"] if weighting == "score_weighted" else [])


def read_columns(loc: Location, weighting: str, extra: Iterable[str] = ()) -> pa.Table:
    """Only the columns the sampler needs, with a clear error when one is missing."""
    with loc.fs.open_input_file(loc.path) as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        missing = [c for c in required_columns(weighting) if c not in names]
        if missing:
            raise ValueError(
                f"balance: input shard {loc.uri()!r} has no column(s) {missing}; its columns are {names}. "
                "The balance stage reads the assign stage's output (sample_id, concept_ids list<int32>"
                + (", concept_scores list<float32>" if weighting == "score_weighted" else "")
                + "); run `ovpipe assign` first or point --input at its output."
            )
        wanted = required_columns(weighting) + [c for c in ("sample_hash", "source", *extra) if c in names]
        return pf.read(columns=list(dict.fromkeys(wanted)))


def _list_parts(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(values, per-value null flags, lengths, row-is-null) of a list / large_list /
    fixed_size_list column; values of null rows are dropped (pyarrow's flatten())."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type)):
        raise ValueError(f"expected a list column, got {arr.type}")
    row_null = arr.is_null().to_numpy(zero_copy_only=False)
    lens = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = arr.flatten()
    value_null = flat.is_null().to_numpy(zero_copy_only=False)
    values = pc.fill_null(flat, 0).to_numpy(zero_copy_only=False) if flat.null_count else flat.to_numpy(zero_copy_only=False)
    return values, value_null, lens, row_null


def _any_per_row(flags: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    cum = np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])
    return cum[offsets[1:]] > cum[offsets[:-1]]


def _hashes_from_ids(ids: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros(len(ids), dtype=np.uint64)
    ok = np.zeros(len(ids), dtype=bool)
    for i, s in enumerate(ids):
        if s is not None and len(s) == 16:
            try:
                out[i] = int(s, 16)
                ok[i] = True
            except ValueError:
                pass
    return out, ok


def shard_rows(table: pa.Table, weighting: str, top_k: int, num_concepts: int) -> ShardRows:
    """Validate one shard's rows and keep the arrays of the usable ones."""
    n = table.num_rows
    codes = np.zeros(n, dtype=np.uint8)
    sid = table.column("sample_id")
    if "sample_hash" in table.column_names and pa.types.is_uint64(table.schema.field("sample_hash").type):
        hashes = pc.fill_null(table.column("sample_hash"), 0).to_numpy().astype(np.uint64)
        id_ok = ~(sid.is_null().to_numpy(zero_copy_only=False)
                  | table.column("sample_hash").is_null().to_numpy(zero_copy_only=False))
    else:
        hashes, id_ok = _hashes_from_ids(sid.to_pylist())
    codes[~id_ok] = BAD_SAMPLE_ID

    values, value_null, lens, row_null = _list_parts(table.column("concept_ids"))
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    upper = num_concepts or MAX_CONCEPTS_UNSET
    bad_value = value_null | (values < 0) | (values >= upper)
    row_codes = np.where(row_null | (lens == 0), NO_CONCEPTS,
                         np.where(_any_per_row(bad_value, offsets), BAD_CONCEPT_IDS, OK))
    scores = None
    if weighting == "score_weighted":
        s_values, s_null, s_lens, s_row_null = _list_parts(table.column("concept_scores"))
        s_offsets = np.concatenate([[0], np.cumsum(s_lens)]).astype(np.int64)
        s_bad = _any_per_row(s_null | ~np.isfinite(s_values.astype(np.float64)), s_offsets)
        bad_scores = s_row_null | (s_lens != lens) | s_bad
        row_codes = np.where((row_codes == OK) & bad_scores, BAD_CONCEPT_SCORES, row_codes)
        scores = s_values
    codes = np.where(codes == OK, row_codes, codes).astype(np.uint8)

    usable = codes == OK
    keep_elem = np.repeat(usable, lens)
    if scores is not None:
        scores = scores[keep_elem] if len(scores) == len(keep_elem) else scores[:0]
    lists = _truncate(ConceptLists(values[keep_elem].astype(np.int64),
                                   np.concatenate([[0], np.cumsum(lens[usable])]).astype(np.int64), scores), top_k)
    sources = None
    if "source" in table.column_names:
        sources = np.asarray(table.column("source").to_pylist(), dtype=object)[usable]
    return ShardRows(codes, hashes[usable], lists, sources)


def _truncate(lists: ConceptLists, top_k: int) -> ConceptLists:
    """The first top_k concepts of each row (the assign stage writes them best first)."""
    lens = np.diff(lists.offsets)
    if not top_k or lists.rows == 0 or lens.max() <= top_k:
        return lists
    row_of = np.repeat(np.arange(lists.rows), lens)
    keep = (np.arange(len(lists.values)) - lists.offsets[row_of]) < top_k
    new_lens = np.minimum(lens, top_k)
    return ConceptLists(lists.values[keep], np.concatenate([[0], np.cumsum(new_lens)]).astype(np.int64),
                        None if lists.scores is None else lists.scores[keep])


def source_counts(rows: ShardRows) -> Counter:
    """Usable rows per source; a null source (inputs not from ovpipe's ingest) counts as ""."""
    return Counter(s or "" for s in rows.sources.tolist()) if rows.sources is not None else Counter()


# ---------------------------------------------------------------- global state

SHARD_GROUP = 32  # shards per reduction task: the driver gets one result per group, not per shard


def shard_groups(shards: list[Location]) -> list[list[Location]]:
    """The shards in groups of SHARD_GROUP, for passes whose results add up (any grouping gives the
    same sums)."""
    return [shards[i:i + SHARD_GROUP] for i in range(0, len(shards), SHARD_GROUP)]


def sparse(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, counts) of the nonzero entries: what a group task sends the driver instead of a dense
    array over every concept."""
    ids = np.flatnonzero(counts)
    return ids, counts[ids]


def add_sparse(total: np.ndarray, ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """total[ids] += counts (ids unique), grown when an id is past its end; returns the total."""
    if len(ids) and int(ids.max()) >= len(total):
        total = np.concatenate([total, np.zeros(int(ids.max()) + 1 - len(total), total.dtype)])
    total[ids] += counts
    return total


def map_shards(fn: Callable, shards: list[Location], shared: tuple, cfg: Any, label: str,
               quiet: bool = False) -> Iterator[Any]:
    """fn(*shared, shard) for every shard (ovpipe.core.executor decides: Ray tasks or this process),
    with a progress line; results in completion order (callers reduce them with order-free
    integer sums or sort them)."""
    progress = Progress(f"balance: {label}", len(shards), cfg.run.progress_interval_s, quiet=quiet)
    for result in map_tasks(fn, [(s,) for s in shards], cfg, shared=shared):
        yield result
        progress.update(1)


@dataclass
class BalanceState:
    """Global state found in the select pass's prepare() and shipped to every shard task."""

    mode: str
    counts: np.ndarray
    seed: int
    input_rows: int
    usable_rows: int
    invalid: dict[str, int]
    sources: dict[str, int]
    n_select: int | None = None  # inverse_frequency
    cutoff: tuple[int, int] | None = None  # inverse_frequency, None = keep all or none
    threshold: float | None = None  # metaclip t
    threshold_solved: bool = False
    expected_size: float | None = None

    def digest(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "input_rows": self.input_rows,
            "usable_rows": self.usable_rows,
            "concept_counts_xxh3": xxhash.xxh3_64_hexdigest(np.ascontiguousarray(self.counts).tobytes()),
            "n_select": self.n_select,
            "cutoff": None if self.cutoff is None else [str(self.cutoff[0]), str(self.cutoff[1])],
            "threshold": None if self.threshold is None else float.hex(float(self.threshold)),
        }


def check_size_options(bcfg) -> None:
    given = [k for k in ("target", "fraction", "threshold") if getattr(bcfg, k)]
    allowed = ("target", "fraction", "threshold") if bcfg.mode == "metaclip" else ("target", "fraction")
    wrong = [k for k in given if k not in allowed]
    if wrong:
        raise ValueError(f"balance.{wrong[0]} does not apply to mode {bcfg.mode!r} (it uses {' or '.join(allowed)})")
    if len(given) != 1:
        how = " | ".join(f"--{k}" for k in allowed)
        raise ValueError(
            f"balance (mode {bcfg.mode}): give exactly one of {how} (got {', '.join(given) or 'none'}); "
            "e.g. --fraction 0.5 keeps half of the usable input"
        )
