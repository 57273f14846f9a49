"""`ovpipe retry OUT`: re-run only the rows a stage dropped for a transient reason, accounting intact.

Reads:  a stage output ``OUT``: each pass's header (``_manifest/_stage.json``, which records what
        the pass read and the whole resolved config it ran with), its committed manifest entries
        and their ledgers (which rows were dropped, with which reason).
Writes: per retried shard, the shard's next generation through the one commit path
        (``ovpipe.core.stage.commit_shard`` with ``replaces``): ``data/<shard>.retry<N>.parquet``,
        ``_ledger/<shard>.retry<N>.parquet`` (when rows are still dropped), then the new manifest
        entry, last; then the old generation's files are deleted. A stage of several passes (caption)
        has its later passes redone from the retried one (``_manifest/_retry_pending.json`` in the
        retried pass's folder marks that until they are), and the stage summary is rewritten.

Which rows: the ledger rows of the chosen reasons (default: the stage's ``transient_reasons`` in
ovpipe/registry.py) whose locator names an input row (``...#row=N``). They go through the pass's
own processing code (``Pass.process_rows``) with the recorded settings (``--set`` may change
what does not change the output: the captioner's URL, timeouts, workers; anything else is refused
as a changed config). Recovered rows are merged into the kept rows at their input position and the
rows still dropped replace their old ledger rows in place, so a shard after a retry holds exactly
the bytes a run that never failed would have written, and inputs = kept + dropped still holds.

Crash safety: until a shard's new entry is written, the old entry names the old files, which are
untouched; a killed retry leaves every shard either as it was or retried, and running ``ovpipe
retry`` again finishes the work (files of a generation that was never committed are deleted).
"""

from __future__ import annotations

import copy
import re
import sys
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import ValidationError

from ovpipe import registry
from ovpipe.config import Config, load_config
from ovpipe.core.config import ConfigError, apply_override
from ovpipe.core.ledger import RETRY_COUNTS, AccountingError, Ledger
from ovpipe.core.shards import (
    MANIFEST_DIR,
    STAGE_FILE,
    Location,
    read_json,
    read_manifest_entries,
    read_table,
    write_json,
)
from ovpipe.core.stage import (
    INPUT,
    OutputConflict,
    Pass,
    PassContext,
    ShardOutput,
    StageSummary,
    _folder,
    _subfolders,
    add_retry_counts,
    clear_folder,
    commit_shard,
    delete_uncommitted_generations,
    open_output,
    pass_payload,
    plan_tasks,
    run_stage,
)

PENDING_FILE = "_retry_pending.json"  # in a retried pass's _manifest/: its later passes are stale
_ROW = re.compile(r"#row=(\d+)$")
# manifest entry fields commit_shard writes itself; the others (a stage's stats) are carried over
_ENTRY_FIELDS = {"shard", "input", "output", "ledger", "input_rows", "kept_rows", "output_rows", "dropped_rows",
                 "dropped_by_reason", "config_hash", "input_stamp", "seconds", "node", "generation", "retried"}


@dataclass
class RetryReport:
    """What one `ovpipe retry` did."""

    stage: str
    output: str
    reasons: list[str]
    shards: int = 0  # shards recommitted
    by_reason: dict[str, dict[str, int]] = field(default_factory=dict)  # this run: retried/recovered/still_failing
    skipped: dict[str, str] = field(default_factory=dict)  # shard -> why its rows were not retried
    summary: StageSummary | None = None  # the stage summary after the retry (None: nothing changed)


def row_of(locator: str, uri: str | None = None) -> int | None:
    """The input row a ledger locator names (``<uri>#row=N``; with ``uri``: of that input only),
    or None (a tar member, a file, an img2dataset sidecar's row)."""
    m = _ROW.search(locator or "")
    if m is None or (uri is not None and locator[: m.start()] != uri):
        return None
    return int(m.group(1))


def find_stage(out: Location, name: str | None) -> registry.StageEntry:
    """The registered stage that wrote ``out``: ``name``, or the one whose last pass writing into
    ``out`` itself has the name the output's header carries."""
    header = out.join(MANIFEST_DIR, STAGE_FILE)
    if not header.exists():
        raise FileNotFoundError(f"{out.uri()!r} is not an ovpipe stage output (no {MANIFEST_DIR}/{STAGE_FILE})")
    written_by = read_json(header).get("stage")
    if name:
        entry = registry.entry(name)
        try:
            names = {q.name for q in entry.load().passes()}
        except NotImplementedError:
            names = set()
        if written_by not in names:
            raise ValueError(f"{out.uri()!r} was written by pass {written_by!r}, not by stage {name!r} "
                             f"(its passes: {sorted(names)}); leave out --stage, or pass that stage's output")
        return entry
    for entry in registry.STAGES:
        try:
            passes = entry.load().passes()
        except NotImplementedError:  # train keeps its own launcher: nothing to retry
            continue
        root = [q for q in passes if not q.folder]  # the pass that writes OUT's own header (not merge's images/)
        if root and root[-1].name == written_by:
            return entry
    raise ValueError(f"{out.uri()!r} was written by {written_by!r}, which is no registered stage's last pass; "
                     f"name the stage with --stage ({registry.names()})")


def retry_config(recorded: dict[str, Any] | None, config_path: str | None, overrides: list[str]) -> Config:
    """The recorded config, then the --config file's keys, then --set (an output written before
    configs were recorded: defaults + --config + --set, as the stage's own command)."""
    if recorded is None:
        return load_config(config_path, overrides)
    data = copy.deepcopy(recorded)
    if config_path:
        p = Path(config_path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass a TOML file to --config")
        for section, values in tomllib.loads(p.read_text(encoding="utf-8")).items():
            if isinstance(values, dict):
                data.setdefault(section, {}).update(values)
    for assignment in overrides:
        apply_override(Config, data, assignment)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"ovpipe retry: the recorded config with --set {' '.join(overrides)} is invalid: {e}") from None


def retry_stage(output: str, *, stage: str | None = None, reasons: list[str] | None = None, limit: int | None = None,
                overrides: list[str] | None = None, config_path: str | None = None, input: str | None = None,
                filesystem=None, quiet: bool = False) -> RetryReport:
    """Retry the ledgered rows of ``reasons`` in the stage output ``output`` (see the module doc)."""
    if limit is not None and limit < 0:
        raise ValueError(f"--limit {limit}: pass a number of rows, 0 or more (leave it out for no limit)")
    out = Location.parse(output, filesystem)
    entry = find_stage(out, stage)
    wanted = list(reasons or entry.transient_reasons)
    if not wanted:
        raise ValueError(f"stage {entry.name!r} marks no ledger reason as transient; name the reasons to "
                         "retry with --reasons R1,R2")
    st = entry.load()
    passes = st.passes()
    first = _folder(out, passes[0]).join(MANIFEST_DIR, STAGE_FILE)
    if not first.exists():
        raise FileNotFoundError(f"{out.uri()!r} has no output of stage {entry.name!r} (no {first.uri()!r})")
    recorded = read_json(first).get("recorded", {})
    source = input or recorded.get("input")
    if not source:
        raise ValueError(f"{out.uri()!r} does not record its input (written by an older ovpipe); pass --input")
    cfg = retry_config(recorded.get("config"), config_path, list(overrides or []))
    return retry_output(entry, Location.parse(source, filesystem), out, cfg, wanted, limit=limit,
                        filesystem=filesystem, quiet=quiet)


def retry_output(entry: registry.StageEntry, stage_input: Location, out: Location, cfg: Config, wanted: list[str],
                 *, limit: int | None = None, filesystem=None, quiet: bool = False) -> RetryReport:
    """Retry the rows of ``wanted`` reasons in the stage output ``out`` with this config (what
    `ovpipe run --retry` calls with the run's config, before it runs the step)."""
    st = entry.load()
    passes = st.passes()
    st.check(cfg, out.uri())
    report = RetryReport(entry.name, out.uri(), wanted)
    budget = [limit if limit is not None else -1]
    stale_from = None  # index of the first pass whose later passes must be redone
    for i, p in enumerate(passes):
        folder = _folder(out, p)
        if folder.join(MANIFEST_DIR, PENDING_FILE).exists() and stale_from is None:
            stale_from = i  # an earlier retry died before it redid the later passes
        # only a pass that reads the stage's input, row by row: a later pass's drops (caption's
        # duplicates) are recomputed when it is redone, and virtual shards (pack buckets) have no rows
        if not p.counts_samples or p.reads != INPUT or not folder.join(MANIFEST_DIR, STAGE_FILE).exists():
            continue
        ctx = PassContext(entry.name, stage_input, folder, out, cfg, {}, quiet)
        if i > 0:  # its drops are decided from the earlier passes' results over the whole input
            _refuse_dependent_pass(p, passes[:i], folder, set(wanted))
            continue
        if _retry_pass(p, ctx, set(wanted), budget, report, has_later=i < len(passes) - 1) and stale_from is None:
            stale_from = i
    if stale_from is None and not report.shards:
        return report
    for p in passes[stale_from + 1:] if stale_from is not None else []:
        clear_folder(_folder(out, p), _subfolders(passes, p))  # redone from the retried pass's new output
    report.summary = run_stage(st, stage_input.uri(), out.path if filesystem is not None else out.uri(), cfg,
                               filesystem=filesystem, quiet=quiet)
    for p in passes:
        _folder(out, p).join(MANIFEST_DIR, PENDING_FILE).delete_if_exists()
    return report


def _refuse_dependent_pass(p: Pass, earlier: list[Pass], folder: Location, reasons: set[str]) -> None:
    """A pass after others (dedup's, balance's selection) drops rows by what its earlier passes
    computed over the whole input; its rows cannot be redone one by one."""
    dropped = {r for e in read_manifest_entries(folder).values() for r in e.get("dropped_by_reason", {})}
    found = sorted(reasons & dropped)
    if found:
        raise ValueError(f"{p.name}: {', '.join(found)} is decided from what the passes before it "
                         f"({', '.join(q.name for q in earlier)}) computed over the whole input, not row by row; "
                         "ovpipe retry cannot redo it: run the stage again with --overwrite (or other settings)")


def _retry_pass(p: Pass, ctx: PassContext, reasons: set[str], budget: list[int], report: RetryReport,
                has_later: bool) -> bool:
    """Retry one pass's rows of ``reasons``; True when it recommitted a shard."""
    entries = read_manifest_entries(ctx.output)
    delete_uncommitted_generations(ctx.output, entries)
    todo = sorted(name for name, e in entries.items() if reasons & set(e.get("dropped_by_reason", {})))
    if not todo or budget[0] == 0:
        return False
    tasks, global_state = plan_tasks(p, ctx)
    try:  # the recorded settings, or --set changes that do not change the output
        open_output(ctx.output, pass_payload(p, ctx.cfg, global_state), tasks[0].config_hash, stage=ctx.stage)
    except OutputConflict as e:
        raise OutputConflict(f"ovpipe retry re-runs rows with the settings that wrote them; --set may change "
                             f"only settings that do not change the output (a URL, timeouts, workers). {e}") from None
    by_name = {t.shard: t for t in tasks}
    changed = False
    for name in todo:
        if budget[0] == 0:
            break
        e, task = entries[name], by_name.get(name)
        if task is None or task.input is None or (task.input_stamp and e.get("input_stamp") not in (None, task.input_stamp)):
            report.skipped[name] = "its input changed or is gone since it was committed: run the stage to redo it"
            continue
        old_ledger = read_table(ctx.output.join(e["ledger"]))
        rows_of = [row_of(loc, task.input.uri()) for loc in old_ledger.column("locator").to_pylist()]
        if None in rows_of:
            report.skipped[name] = "its ledger names inputs that are not rows (tar members, files): not retryable"
            continue
        pick = [j for j, r in enumerate(old_ledger.column("reason").to_pylist()) if r in reasons]
        if budget[0] > 0:
            pick = pick[: budget[0]]
            budget[0] -= len(pick)
        result = p.process_rows(task, [rows_of[j] for j in pick])
        merged, counts = merge_retried(e, read_table(ctx.output.join(e["output"])), old_ledger, rows_of, pick,
                                       result, ctx.stage)
        if has_later and not changed:  # before the first commit: later passes are stale from now on
            write_json(ctx.output.join(MANIFEST_DIR, PENDING_FILE), {"pass": p.name})
        commit_shard(p, task, merged, replaces=e)
        report.shards += 1
        report.by_reason = add_retry_counts([report.by_reason, counts])
        changed = True
        if not ctx.quiet:
            print(f"[{p.name}] retried shard {name}: " + ", ".join(
                f"{r} {c['recovered']}/{c['retried']} recovered" for r, c in counts.items()), file=sys.stderr)
    return changed


def merge_retried(entry: dict[str, Any], old_table: pa.Table, old_ledger: pa.Table, rows_of: list[int],
                  pick: list[int], result: ShardOutput, stage: str) -> tuple[ShardOutput, dict[str, dict[str, int]]]:
    """The shard after a retry: recovered rows inserted among the kept rows at their input
    position, still-dropped rows' new ledger rows in place of their old ones (input order, as a run
    that never failed writes them); and per old reason: retried, recovered, still failing."""
    n = entry["input_rows"]
    old_kept = np.setdiff1d(np.arange(n), np.array(rows_of, dtype=np.int64))
    retried = [rows_of[j] for j in pick]
    new_rows = [row_of(loc) for loc in result.ledger.rows["locator"]]
    if None in new_rows:
        raise AccountingError(f"{stage}: shard {entry['shard']}: a retried row came back without its input row "
                              "in its ledger locator; this is a bug in the stage's process_rows, please report it")
    still = set(new_rows)
    recovered = [r for r in retried if r not in still]
    if (len(old_kept) != old_table.num_rows or len(recovered) != result.table.num_rows
            or not still <= set(retried) or result.input_rows != len(retried)):
        raise AccountingError(f"{stage}: shard {entry['shard']}: the retried rows do not match its input rows "
                              f"({len(old_kept)} kept input rows vs {old_table.num_rows} kept; {len(recovered)} "
                              f"recovered vs {result.table.num_rows} returned); this is a bug, please report it")
    # the schema as the stage's code makes it (read back, a list's child is "element", not "item",
    # and the Arrow schema stored in the file would differ)
    table = pa.concat_tables([old_table.cast(result.table.schema), result.table])
    table = table.take(pa.array(np.argsort(np.concatenate([old_kept, recovered]), kind="stable")))
    keep = np.setdiff1d(np.arange(old_ledger.num_rows), np.array(pick, dtype=np.int64))
    ledger_rows = pa.concat_tables([old_ledger.take(pa.array(keep, pa.int64())),
                                    result.ledger.table().cast(old_ledger.schema)])
    order = [rows_of[j] for j in keep.tolist()] + new_rows
    ledger_rows = ledger_rows.take(pa.array(np.argsort(np.array(order, dtype=np.int64), kind="stable")))
    ledger = Ledger(stage, {f: ledger_rows.column(f).to_pylist() for f in ledger_rows.column_names})
    reason_of = dict(zip(retried, (old_ledger.column("reason")[j].as_py() for j in pick)))
    counts: dict[str, Counter] = {}
    for r, reason in reason_of.items():
        c = counts.setdefault(reason, Counter({k: 0 for k in RETRY_COUNTS}))
        c["retried"] += 1
        c["still_failing" if r in still else "recovered"] += 1
    counts_json = {k: dict(v) for k, v in sorted(counts.items())}
    stats = {k: v for k, v in entry.items() if k not in _ENTRY_FIELDS}
    stats["retried"] = add_retry_counts([entry.get("retried", {}), counts_json])
    return ShardOutput(table, ledger, n, stats=stats), counts_json


def retry_table(by_reason: dict[str, dict[str, int]]) -> list[list[Any]]:
    """Rows of reason, retried, recovered, still failing (for the CLI)."""
    return [[reason, *(c.get(k, 0) for k in RETRY_COUNTS)] for reason, c in sorted(by_reason.items())]


# ------------------------------------------------------------------------------ command line

HELP = "re-run only the rows a stage output dropped for a transient reason (captioner down, image host away)"
EXAMPLE = ("ovpipe retry out/versions/r1/caption --set caption.base_url=http://gpu2:8000/v1   "
           "(--reasons R1,R2 to choose; default: the stage's transient reasons)")


def add_arguments(parser) -> None:
    parser.add_argument("output", help="a stage output (folder or URI)")
    parser.add_argument("--reasons", default=None,
                        help="comma-separated ledger reasons to retry (default: the stage's transient ones: "
                             + "; ".join(f"{e.name}: {','.join(e.transient_reasons)}"
                                         for e in registry.STAGES if e.transient_reasons) + ")")
    parser.add_argument("--stage", default=None, help=f"the stage that wrote OUTPUT (default: from its header; "
                                                      f"{','.join(registry.names())})")
    parser.add_argument("--limit", type=int, default=None, help="retry at most this many rows in this run")
    parser.add_argument("--input", default=None, help="the stage's input, when OUTPUT does not record it")
    parser.add_argument("--config", default=None, help="run config (TOML) over the recorded one")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one recorded setting, e.g. --set caption.base_url=http://gpu2:8000/v1")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def main(args) -> int:
    from ovpipe.core.progress import format_table, summary_table

    report = retry_stage(args.output, stage=args.stage, reasons=args.reasons.split(",") if args.reasons else None,
                         limit=args.limit, overrides=args.overrides, config_path=args.config, input=args.input,
                         quiet=args.quiet)
    for shard, why in sorted(report.skipped.items()):
        print(f"not retried: {shard}: {why}", file=sys.stderr)
    if not report.by_reason:
        print(f"{report.stage}: nothing to retry for {','.join(report.reasons)} in {report.output}")
        return 0
    print(format_table(["reason", *RETRY_COUNTS], retry_table(report.by_reason)))
    if report.summary is not None:
        print(summary_table([report.summary.to_json()]))
    print(f"{report.stage}: {report.shards} shard(s) recommitted in {report.output}")
    return 0
