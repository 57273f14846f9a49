"""Balance stage: concept-balanced sampling of images by their assigned concepts.

Reads:  Parquet shards with ``sample_id`` (string, 16 hex digits of xxh3-64), ``concept_ids``
        (list<int32>: the image's top-k concepts, best first) and, for
        ``balance.weighting = "score_weighted"``, ``concept_scores`` (list<float32>, same
        lengths). Optional: ``sample_hash`` (uint64, the same 64 bits as ``sample_id``; parsed
        from ``sample_id`` when absent), ``source``, image references (``image_uri``,
        ``image_member``, ``image_row``: used for the report's contact sheet).
Writes, in two passes (ovpipe.core.stage.run_stage runs them in order, resumable shard by shard):

1. ``balance_counts`` -> ``OUT/_counts/``: per input shard, ``<shard>.parquet`` with one row per
   concept id its usable rows carry (the first top_k of each row): ``concept_id`` (int64),
   ``count`` (int64, > 0). Its manifest entry (``OUT/_counts/_manifest/<shard>.json``) adds
   ``usable_rows``, ``unusable_by_reason`` ({reason: rows}) and ``sources`` ({source: usable
   rows}, a null source as ""). A summary pass: its rows are concepts, not samples; it ledgers
   nothing (the select pass ledgers the unusable rows).
2. ``balance`` -> ``OUT/<shard>.parquet``: the selected input rows, unchanged and in input order,
   plus ``weight`` (float64) and ``inclusion_prob`` (float64) (docs/data-contracts.md). Every
   other row is ledgered (``OUT/_ledger/<shard>.parquet``): ``not_selected``, or
   ``bad_sample_id`` / ``no_concepts`` / ``bad_concept_ids`` / ``bad_concept_scores`` for rows
   that cannot be weighed.

Then the report: ``OUT/_report/``: balance_report.json + PNG plots (curation/balance_report.py).

Two modes (docs/sampling.md states the designs and their inclusion probabilities):

* ``inverse_frequency`` (LLaVA-OneVision-1.5): weight w = mean of 1/count over the image's top-k
  concepts; exactly N images are drawn without replacement proportionally to w, as
  Efraimidis-Spirakis order sampling: key E = Exp(1) / w with the Exp(1) variate from
  hash(sample_hash, seed); the N smallest (E, sample_hash) are kept.
* ``metaclip`` (MetaCLIP's curation rule): p_e = t / max(count_e, t); an image is kept when
  u < 1 - prod(1 - p_e), u from the same hash (independent Bernoulli, size follows from t;
  with a target, t is solved so that the *expected* size equals it).

Global state is found by small reductions, never all rows in one process: the concept counts are
the counts pass's committed shards, summed on the driver; the select pass's ``prepare`` then finds
the cut-off key by a radix select (tasks over groups of 32 input shards return the groups'
summed 65,536-bin histograms of the key's next 16 bits, then the few rows of the boundary bin) or solves the MetaCLIP threshold.
``process`` keeps a row when its key is at or below the cut-off. All arithmetic that decides
membership is integer, +, -, *, / or ldexp (no libm), so the selection is bit-identical whatever
the sharding, worker count or CPU. The sampler itself is curation/balance_core.py.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.balance_core import (
    DETAILS,
    NOT_SELECTED,
    OK,
    REASONS,
    BalanceState,
    ShardRows,
    add_sparse,
    check_size_options,
    concept_counts,
    concept_weights,
    cutoff_value,
    es_keys,
    expected_sizes,
    find_cutoff,
    key_candidates,
    key_histogram,
    map_shards,
    metaclip_keep_prob,
    one_minus_exp_neg,
    passes_cutoff,
    read_columns,
    required_columns,
    shard_groups,
    shard_rows,
    size_from,
    solve_threshold,
    source_counts,
    sparse,
    uniforms,
)
from curation.balance_report import write_report
from ovpipe.core.ledger import Ledger
from ovpipe.core.shards import Location, read_table
from ovpipe.core.stage import (
    Pass,
    PassContext,
    PassResult,
    Shard,
    ShardOutput,
    ShardTask,
    Stage,
    StageSummary,
)

if TYPE_CHECKING:  # annotations only: the root config composes every stage's section
    from curation.config import BalanceSection
    from ovpipe.config import Config

ADDED_COLUMNS = pa.schema([pa.field("weight", pa.float64()), pa.field("inclusion_prob", pa.float64())])
COUNTS_SCHEMA = pa.schema([pa.field("concept_id", pa.int64()), pa.field("count", pa.int64())])


# ---------------------------------------------------------------- per-shard steps of the reductions

def _load(bcfg: BalanceSection, loc: Location) -> ShardRows:
    return shard_rows(read_columns(loc, bcfg.weighting), bcfg.weighting, bcfg.top_k, bcfg.num_concepts)


def _read_counts(locs: list[Location]) -> tuple[np.ndarray, np.ndarray]:
    """(concept ids, counts) summed over a group of committed counts shards."""
    total = np.zeros(0, dtype=np.int64)
    for loc in locs:
        t = read_table(loc, list(COUNTS_SCHEMA.names))
        total = add_sparse(total, t.column("concept_id").to_numpy(), t.column("count").to_numpy())
    return sparse(total)


def _shard_keys(bcfg: BalanceSection, counts: np.ndarray, seed: int, loc: Location) -> tuple[np.ndarray, np.ndarray]:
    rows = _load(bcfg, loc)
    w = concept_weights(rows.lists, counts, bcfg.weighting)
    return es_keys(rows.sample_hash, w, seed), rows.sample_hash


def histogram_pass(bcfg: BalanceSection, counts: np.ndarray, seed: int, prefix: tuple,
                   locs: list[Location]) -> np.ndarray:
    """The summed key histogram of a group of shards (integer sums: any grouping gives the same)."""
    total = None
    for loc in locs:
        hi, lo = _shard_keys(bcfg, counts, seed, loc)
        h = key_histogram(hi, lo, prefix)
        total = h if total is None else total + h
    return total


def candidates_pass(bcfg: BalanceSection, counts: np.ndarray, seed: int, prefix: tuple, loc: Location):
    hi, lo = _shard_keys(bcfg, counts, seed, loc)
    return key_candidates(hi, lo, prefix)


def expected_pass(bcfg: BalanceSection, counts: np.ndarray, ts: np.ndarray, loc: Location) -> np.ndarray:
    return expected_sizes(_load(bcfg, loc).lists, counts, ts)


# ---------------------------------------------------------------- pass 1: concept counts

class BalanceCountsPass(Pass):
    """Per input shard: the concept counts of its usable rows (a table), its unusable rows by
    reason and its usable rows by source (manifest entry fields). Rows are concepts, not samples:
    ``kept_samples`` is the shard's input rows, so the per-shard check holds with no ledger."""

    name = "balance_counts"
    config_sections = ("balance",)  # weighting, top_k and num_concepts decide what is counted
    schema_version = 1
    folder = "_counts"
    counts_samples = False

    def process(self, task: ShardTask) -> ShardOutput:
        rows = _load(task.config.balance, task.input)
        n = len(rows.codes)
        counts = concept_counts(rows.lists.values)
        ids = np.flatnonzero(counts)
        table = pa.table([pa.array(ids, pa.int64()), pa.array(counts[ids], pa.int64())], schema=COUNTS_SCHEMA)
        codes = np.bincount(rows.codes, minlength=len(REASONS))
        stats = {
            "usable_rows": int(codes[OK]),
            "unusable_by_reason": {REASONS[c]: int(codes[c]) for c in range(1, len(REASONS)) if codes[c]},
            "sources": dict(sorted(source_counts(rows).items())),
        }
        return ShardOutput(table, Ledger(self.name), input_rows=n, kept_samples=n, stats=stats)


# ---------------------------------------------------------------- pass 2: the selection

class BalanceSelectPass(Pass):
    """Sums the counts pass's shards, finds the cut-off (or the MetaCLIP threshold) in prepare(),
    then keeps or ledgers every input row."""

    name = "balance"
    config_sections = ("balance", "run")
    schema_version = 1

    def __init__(self) -> None:
        self.state: BalanceState | None = None
        self._quiet = False  # prepare's progress lines (--quiet)

    # ---- global reductions on the driver
    def prepare(self, ctx: PassContext, shards: list[Shard]) -> dict[str, Any]:
        cfg = ctx.cfg  # the size options were checked by BalanceStage.check, before any pass ran
        self._quiet = ctx.quiet
        state = self._count(ctx, shards)
        inputs = [s.input for s in shards]
        if cfg.balance.mode == "metaclip":
            self._metaclip_threshold(state, inputs, cfg)
        else:
            self._es_cutoff(state, inputs, cfg)
        self.state = state
        return state.digest()

    def _count(self, ctx: PassContext, shards: list[Shard]) -> BalanceState:
        """The global state's counts: the sum of the counts pass's committed shards, which must be
        exactly this pass's input shards, as they were when counted."""
        cfg = ctx.cfg
        done = ctx.done[BalanceCountsPass.name]
        entries = done.entries
        stale = sorted(s.name for s in shards if s.name not in entries
                       or entries[s.name].get("input_stamp") not in (None, s.stamp))
        extra = sorted(set(entries) - {s.name for s in shards})
        if stale or extra:
            raise RuntimeError(f"balance: the input changed while the stage ran (shards not counted as they "
                               f"are now: {(stale + extra)[:5]}); re-run the same command")
        files = [done.output.join(entries[name]["output"]) for name in sorted(entries)]
        counts = np.zeros(max(cfg.balance.num_concepts, 1), dtype=np.int64)
        for ids, c in map_shards(_read_counts, shard_groups(files), (), cfg, "concept counts", self._quiet):
            counts = add_sparse(counts, ids, c)
        invalid: Counter = Counter()
        sources: Counter = Counter()
        for e in entries.values():
            invalid.update(e["unusable_by_reason"])
            sources.update(e["sources"])
        return BalanceState(
            cfg.balance.mode, counts, cfg.run.seed,
            input_rows=sum(e["input_rows"] for e in entries.values()),
            usable_rows=sum(e["usable_rows"] for e in entries.values()),
            invalid={r: invalid[r] for r in REASONS[1:].tolist() if invalid[r]},
            sources=dict(sorted(sources.items())),
        )

    def _es_cutoff(self, state: BalanceState, shards: list[Location], cfg: Config) -> None:
        bcfg = cfg.balance
        state.n_select = size_from(state.usable_rows, bcfg.target, bcfg.fraction)
        if 0 < state.n_select < state.usable_rows:
            def histogram(prefix):  # per group of shards: the driver sums O(shards / 32) histograms
                return sum(map_shards(histogram_pass, shard_groups(shards), (bcfg, state.counts, state.seed, prefix),
                                      cfg, f"key histogram (level {len(prefix)})", self._quiet))

            def candidates(prefix):
                parts = list(map_shards(candidates_pass, shards, (bcfg, state.counts, state.seed, prefix), cfg,
                                        "boundary candidates", self._quiet))
                return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

            state.cutoff = find_cutoff(state.n_select, histogram, candidates, bcfg.candidate_rows)

    def _metaclip_threshold(self, state: BalanceState, shards: list[Location], cfg: Config) -> None:
        bcfg = cfg.balance
        if bcfg.threshold:
            state.threshold = float(bcfg.threshold)
            return
        target = size_from(state.usable_rows, bcfg.target, bcfg.fraction)

        def expected(ts):
            return sum(map_shards(expected_pass, shards, (bcfg, state.counts, ts), cfg, "expected size", self._quiet))

        state.threshold, state.expected_size = solve_threshold(target, int(state.counts.max(initial=1)), expected)
        state.threshold_solved = True
        if not self._quiet:
            print(f"[balance] metaclip: solved t = {state.threshold:.6g} for an expected size of {target:,} "
                  f"(expected {state.expected_size:,.1f})", file=sys.stderr, flush=True)

    # ---- one shard
    def decide(self, rows: ShardRows, weighting: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """keep mask, weight and inclusion probability for the usable rows of one shard."""
        s = self.state
        if s.mode == "metaclip":
            prob = metaclip_keep_prob(rows.lists, s.counts, s.threshold)
            return uniforms(rows.sample_hash, s.seed) < prob, prob, prob
        w = concept_weights(rows.lists, s.counts, weighting)
        if s.cutoff is None:
            keep = np.full(len(w), bool(s.n_select))
            return keep, w, keep.astype(np.float64)
        hi = es_keys(rows.sample_hash, w, s.seed)
        keep = passes_cutoff(hi, rows.sample_hash, s.cutoff)
        incl = np.zeros(len(w))
        incl[keep] = one_minus_exp_neg(w[keep] * cutoff_value(s.cutoff))
        return keep, w, incl

    def process(self, task: ShardTask) -> ShardOutput:
        if self.state is None:
            raise RuntimeError("balance: process() before prepare(); run it through ovpipe.core.stage.run_stage")
        bcfg = task.config.balance
        table = pq.read_table(task.input.path, filesystem=task.input.fs)
        missing = [c for c in required_columns(bcfg.weighting) if c not in table.column_names]
        if missing:
            raise ValueError(f"balance: input shard {task.input.uri()!r} has no column(s) {missing}")
        rows = shard_rows(table, bcfg.weighting, bcfg.top_k, bcfg.num_concepts)
        keep_usable, weight, incl = self.decide(rows, bcfg.weighting)
        codes = rows.codes.copy()
        usable_idx = np.flatnonzero(codes == OK)
        codes[usable_idx[~keep_usable]] = NOT_SELECTED
        kept_idx = usable_idx[keep_usable]
        out = table.take(pa.array(kept_idx, type=pa.int64()))
        out = out.drop_columns([c for c in ADDED_COLUMNS.names if c in out.column_names])
        out = out.append_column(ADDED_COLUMNS.field("weight"), pa.array(weight[keep_usable], pa.float64()))
        out = out.append_column(ADDED_COLUMNS.field("inclusion_prob"), pa.array(incl[keep_usable], pa.float64()))
        return ShardOutput(out, self._ledger(table, codes, task.input.uri()), table.num_rows)

    def _ledger(self, table: pa.Table, codes: np.ndarray, uri: str) -> Ledger:
        ledger = Ledger(self.name)
        dropped = np.flatnonzero(codes != OK)
        if not len(dropped):
            return ledger
        details = dict(DETAILS)
        details[NOT_SELECTED] = (f"metaclip: u >= keep probability at t={self.state.threshold:.6g}"
                                 if self.state.mode == "metaclip" else
                                 f"inverse_frequency: key above the cut-off for N={self.state.n_select}")
        c = codes[dropped]
        ledger.rows["sample_id"].extend(table.column("sample_id").take(pa.array(dropped)).to_pylist())
        ledger.rows["locator"].extend(f"{uri}#row={i}" for i in dropped.tolist())
        ledger.rows["stage"].extend([self.name] * len(dropped))
        ledger.rows["reason"].extend(REASONS[c].tolist())
        ledger.rows["detail"].extend(details[int(x)] for x in c.tolist())
        return ledger


# ---------------------------------------------------------------- the stage

class BalanceStage(Stage):
    """Counts, then selection; then the report (``OUT/_report/``). Run it with
    ``ovpipe.core.stage.run_stage(BalanceStage(), input, output, cfg)``."""

    name = "balance"

    def __init__(self) -> None:
        self.counts = BalanceCountsPass()
        self.select = BalanceSelectPass()

    def passes(self) -> list[Pass]:
        return [self.counts, self.select]

    def check(self, cfg: Config, output: str) -> None:
        check_size_options(cfg.balance)  # a pipeline refuses a bad size option before its first step

    def report(self, out: Location, cfg: Config, summary: StageSummary, results: dict[str, PassResult]) -> list[str]:
        entries = results[self.select.name].entries
        shards = [out.join(entries[name]["output"]) for name in sorted(entries)]
        return write_report(self.select.state, out, cfg, shards, summary.kept_rows,
                            quiet=self.select._quiet)  # --quiet reaches the report's passes too
