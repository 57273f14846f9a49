"""The stage model: a stage is a list of passes; a pass turns shards into committed output shards.

This module is the whole interface a stage implements, and the one runner that runs every stage:

* ``Pass``: one unit of work over shards. It lists its shards (``list_shards``: files, or virtual
  shards such as pack buckets), computes global state once (``prepare``), turns one shard into
  kept rows + ledgered rows (``process`` -> ``ShardOutput``), and may run its shards its own way
  (``execute``: an actor pool); every hook is defined below with its default.
* ``Stage``: a name, its passes in order, and an optional report written after the accounting
  check. One-pass stages (ingest, embed, assign) are a ``Pass`` and a ``Stage`` in one class
  (``SinglePassStage``).
* ``run_stage``: runs the passes in order, each into its own folder under the stage's output
  (the last pass writes the stage's output itself), and owns everything they share:

  - the output header (``<folder>/_manifest/_stage.json``): a changed config is refused with the
    keys that changed, not mixed in;
  - resume: shards whose manifest entry exists are skipped; a killed run re-run writes exactly
    what an uninterrupted run writes (names and bytes are functions of the input);
  - the one commit path (``commit_shard``): data, then ledger, then the manifest entry, last;
  - accounting: per shard, per pass and per stage, input samples == kept + dropped, or the run
    fails loudly; the stage summary (``_manifest/_summary.json``) and progress lines.

Nothing here imports a stage: stages import this (ovpipe.core is the ground layer).
"""

from __future__ import annotations

import os
import posixpath
import re
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from ovpipe.core.config import config_hash, section_dump
from ovpipe.core.executor import map_tasks
from ovpipe.core.ledger import AccountingError, Ledger
from ovpipe.core.progress import Progress, parquet_rows, start_note
from ovpipe.core.shards import (
    DATA_DIR,
    LEDGER_DIR,
    MANIFEST_DIR,
    TMP_DIR,
    STAGE_FILE,
    SUMMARY_FILE,
    Location,
    list_input_shards,
    parquet_num_rows,
    read_json,
    read_manifest_entries,
    read_table,
    shard_name_for,
    write_json,
    write_table,
)

INPUT = "input"  # Pass.reads: the stage's own input (else the name of an earlier pass)


@dataclass(frozen=True)
class Shard:
    """One unit of work of a pass: a file it reads, or a virtual shard (``index``: pack bucket)."""

    name: str  # deterministic output name
    input: Location | None = None
    stamp: str | None = None  # changes when what the shard reads changes: a committed shard is redone
    index: int | None = None


@dataclass(frozen=True)
class ShardTask:
    """Everything one task needs to process one shard (picklable: it travels into Ray tasks)."""

    stage: str  # the pass's name
    shard: str
    input: Location | None
    input_root: Location
    output_root: Location
    config: Any  # the root config (ovpipe.config.Config)
    config_hash: str
    input_stamp: str | None = None
    index: int | None = None


@dataclass
class ShardOutput:
    """What ``Pass.process`` returns for one shard."""

    table: pa.Table  # the rows written to <shard>.parquet
    ledger: Ledger  # the samples dropped, each with a reason
    input_rows: int  # samples read
    kept_samples: int | None = None  # samples the table holds when its rows are not samples (packs)
    stats: dict[str, Any] = field(default_factory=dict)  # extra fields of the manifest entry
    row_group_size: int | None = None  # Parquet row groups of the data shard; None = the default

    @property
    def kept(self) -> int:
        return self.table.num_rows if self.kept_samples is None else self.kept_samples


@dataclass
class StageSummary:
    stage: str
    output: str
    config_hash: str
    shards: int
    shards_skipped: int
    input_rows: int
    kept_rows: int
    dropped_rows: int
    dropped_by_reason: dict[str, int]
    seconds: float
    failed: dict[str, str] = field(default_factory=dict)
    # ovpipe retry, per reason retried: {"retried": n, "recovered": n, "still_failing": n}, summed
    # over every retry of the committed shards ({} when none was retried)
    retried_by_reason: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PassContext:
    """Where one pass reads and writes, and what the passes before it committed."""

    stage: str
    input: Location  # what this pass reads: the stage's input or an earlier pass's folder
    output: Location  # this pass's folder
    stage_output: Location
    cfg: Any
    done: dict[str, "PassResult"] = field(default_factory=dict)  # earlier passes, by name
    quiet: bool = False  # no progress lines: prepare's own reductions pass it to their Progress


@dataclass
class PassResult:
    summary: StageSummary
    entries: dict[str, dict[str, Any]]  # committed manifest entries, by shard name
    output: Location  # the pass's folder


class OutputConflict(RuntimeError):
    """The output folder holds something this run must not mix with."""


class Pass:
    """One pass over shards. Subclasses set the class attributes and implement ``process``; every
    other hook has a working default."""

    name: str = ""  # progress label, manifest header; by convention also the ledger's stage
    config_sections: tuple[str, ...] = ()  # config sections that change what this pass writes
    schema_version: int = 1  # bump when the output schema changes: old outputs are refused
    input_suffixes: tuple[str, ...] = (".parquet",)  # input files, when the input is not a stage output
    reads: str = INPUT  # INPUT, or the name of an earlier pass of the same stage
    folder: str = ""  # output folder relative to the stage's output; "" = the stage's output
    counts_samples: bool = True  # False: a summary pass (its rows are not samples; no sample chain)
    keep_on_overwrite: bool = False  # --overwrite keeps this pass's output when its config is unchanged

    def list_shards(self, ctx: PassContext) -> list[Shard]:
        """The shards to process: by default every input file (a stage output: every committed
        shard), named after its path under the input, stamped with size and mtime."""
        return file_shards(ctx.input, list_input_shards(ctx.input, self.input_suffixes))

    def prepare(self, ctx: PassContext, shards: list[Shard]) -> dict[str, Any]:
        """Global state every shard needs (concept counts, a cut-off, a loaded index), computed once
        on the driver before any shard runs; store it on ``self`` (shipped to every task). Returns
        a small JSON-able digest of it, which goes into the config hash: when the global state
        changes, the old output is refused rather than silently mixed with the new."""
        return {}

    def process(self, task: ShardTask) -> ShardOutput:
        raise NotImplementedError(f"{type(self).__name__}.process")

    def execute(self, pending: list[ShardTask], ctx: PassContext, progress: Progress) -> dict[str, str]:
        """Run the pending shards; returns {shard: error} for the ones that failed. The default is one
        task per shard (ovpipe.core.executor). An override (an actor pool) must commit each shard it
        finishes with ``commit_shard`` and report it with ``progress.update(1, input_rows)``."""
        failed: dict[str, str] = {}
        for result in map_tasks(run_shard_safely, [(task,) for task in pending], ctx.cfg, shared=(self,)):
            record_result(self.name, result, failed, progress)
        return failed

    def shard_files(self, shard: str) -> list[str]:
        """Files besides data and ledger that belong to one shard (deleted when it is retired)."""
        return []

    def process_rows(self, task: ShardTask, rows: list[int]) -> ShardOutput:
        """``process`` for only these rows of the shard's input (``ovpipe retry``: rows a transient
        failure dropped): their kept rows and ledger rows, exactly as ``process`` writes them for
        those rows, locators included. The default runs ``process`` on the input filtered to those
        rows (a Parquet file under OUT/_tmp) and maps its locators back; a stage whose rows are not
        Parquet rows of a self-contained file (ingest: paths relative to the shard) overrides it."""
        tmp = task.output_root.join(TMP_DIR, "retry", f"{task.shard}.parquet")
        write_table(tmp, read_table(task.input).take(pa.array(rows, pa.int64())))
        try:
            result = self.process(replace(task, input=tmp))
        finally:
            tmp.delete_if_exists()
        back = {f"{tmp.uri()}#row={i}": f"{task.input.uri()}#row={r}" for i, r in enumerate(rows)}
        result.ledger.rows["locator"] = [back.get(v, v) for v in result.ledger.rows["locator"]]
        for i, f in enumerate(result.table.schema):  # locator columns of kept rows (caption_locator)
            if pa.types.is_string(f.type):
                values = result.table.column(i).to_pylist()
                if any(v in back for v in values):
                    result.table = result.table.set_column(i, f, pa.array([back.get(v, v) for v in values], f.type))
        return result


class Stage:
    """A named list of passes plus an optional report. The hooks below ``report`` are what the
    pipeline and the CLI call; their defaults fit every stage but training, which keeps its own
    launcher (trainer/launch.py) and overrides them."""

    name: str = ""

    def passes(self) -> list[Pass]:
        raise NotImplementedError(f"{type(self).__name__}.passes")

    def report(self, out: Location, cfg: Any, summary: StageSummary, results: dict[str, PassResult]) -> list[str]:
        """Written after the accounting check; returns the URIs of what it wrote."""
        return []

    def run(self, input: str, output: str, cfg: Any, *, filesystem=None, overwrite: bool = False,
            quiet: bool = False) -> StageSummary:
        """`ovpipe <stage>`, `python -m ray_jobs.<stage>` and the pipeline's step: ``run_stage``."""
        return run_stage(self, input, output, cfg, filesystem=filesystem, overwrite=overwrite, quiet=quiet)

    def check(self, cfg: Any, output: str) -> None:
        """Loud checks of the config (and the output), before anything is read or written: run_stage
        calls it first, and the pipeline calls it for every step before the first step runs."""

    def enabled(self, cfg: Any) -> bool:
        """Whether `ovpipe run` runs this stage when pipeline.steps does not list the steps (an
        optional stage in the registry says from its config, e.g. whether benchmarks are set)."""
        return True

    def resolve_input(self, input: Any, cfg: Any) -> str:
        """The one input path of `ovpipe <stage>` (checked, then passed to ``run``): --input itself;
        a stage of several inputs (merge: repeated --input, set in its config) names its first."""
        return input

    def resolve_output(self, cfg: Any, output: str, run_id: str) -> str:
        """Where the pipeline's step really writes (training: checkpoints need a filesystem)."""
        return output

    def pipeline_runs(self, cfg: Any, output: str) -> list[tuple[str, Any]]:
        """The (output, config) runs of the pipeline's step, one after another on the same input."""
        return [(output, cfg)]


class SinglePassStage(Pass, Stage):
    """A stage of one pass: the stage and the pass share the name and write the stage's output."""

    def passes(self) -> list[Pass]:
        return [self]


# ---------------------------------------------------------------------------------- the runner


def run_stage(stage: Stage, input: str, output: str, cfg: Any, *, filesystem=None, overwrite: bool = False,
              quiet: bool = False) -> StageSummary:
    """Run (or resume) every pass of a stage; raise if any shard failed or the accounting does not
    add up; write the report and the stage summary."""
    start = time.monotonic()
    stage_input = Location.parse(input, filesystem)
    out = Location.parse(output, filesystem)
    stage.check(cfg, output)  # before anything is read, cleared or written
    passes = stage.passes()
    _refuse_overlap(stage.name, stage_input, out)
    _refuse_foreign_output(out, passes)
    if overwrite:  # every pass that is redone is cleared before any runs (last first): a crash
        for p in reversed(passes):  # part-way never leaves an old output beside a new one
            if not p.keep_on_overwrite:
                clear_folder(_folder(out, p), _subfolders(passes, p))
    else:  # a changed config is refused before any pass writes anything
        for p in passes:
            refuse_changed_config(stage.name, p, _folder(out, p), cfg)
    if not quiet:  # Ray and models take a while to start: say so at once
        print(f"[{stage.name}] {start_note(cfg)}", file=sys.stderr, flush=True)
    results: dict[str, PassResult] = {}
    for p in passes:
        reads = stage_input if p.reads == INPUT else _folder(out, _pass_named(passes, p.reads))
        ctx = PassContext(stage.name, reads, _folder(out, p), out, cfg, dict(results), quiet)
        results[p.name] = run_pass(p, ctx, overwrite=overwrite, quiet=quiet,
                                   keep=_subfolders(passes, p))
    summary = combine_summaries(stage.name, out, passes, results, time.monotonic() - start)
    check_stage_accounting(summary, passes, results)
    for uri in stage.report(out, cfg, summary, results):
        if not quiet:
            print(f"{stage.name} report: {uri}", file=sys.stderr, flush=True)
    write_json(out.join(MANIFEST_DIR, SUMMARY_FILE), summary.to_json())
    return summary


def run_pass(p: Pass, ctx: PassContext, *, overwrite: bool = False, quiet: bool = False,
             keep: tuple[str, ...] = ()) -> PassResult:
    """One pass: plan, check the output header, resume, execute, check the accounting. (With
    ``overwrite``, run_stage has cleared the pass's folder already unless it is keep_on_overwrite:
    then an output of another config is replaced, one of the same config kept.)"""
    start = time.monotonic()
    tasks, global_state = plan_tasks(p, ctx)
    digest = tasks[0].config_hash
    open_output(ctx.output, pass_payload(p, ctx.cfg, global_state), digest, replace=overwrite, keep=keep,
                stage=ctx.stage, recorded={"input": ctx.input.uri(), "config": _recorded_config(ctx.cfg)})
    done = read_manifest_entries(ctx.output)
    delete_uncommitted_generations(ctx.output, done)
    before = dict(done)
    gone = sorted(set(done) - {t.shard for t in tasks})
    if gone:
        retire_shards(p, ctx.output, gone, ctx.cfg)
        done = {k: v for k, v in done.items() if k not in gone}
    # A committed shard whose input was rewritten since (an upstream stage redone) is redone too.
    changed = [t.shard for t in tasks if t.shard in done and t.input_stamp
               and done[t.shard].get("input_stamp") not in (None, t.input_stamp)]
    if changed:
        print(f"[{p.name}] {len(changed)} shard(s) redone: their input changed since they were "
              f"committed: {changed[:5]}", file=sys.stderr)
        done = {k: v for k, v in done.items() if k not in changed}
    pending = [t for t in tasks if t.shard not in done]
    failed: dict[str, str] = {}
    if pending:
        progress = Progress(p.name, len(pending), ctx.cfg.run.progress_interval_s, quiet=quiet,
                            total_rows=parquet_rows([t.input for t in pending]) if p.counts_samples else None)
        failed = p.execute(pending, ctx, progress)
    wanted = {t.shard for t in tasks}
    entries = {k: v for k, v in read_manifest_entries(ctx.output).items() if k in wanted}
    for k in changed:  # a redone shard that `ovpipe retry` had moved to a later generation's files
        if k in entries:
            delete_replaced_files(ctx.output, before[k], entries[k])
    summary = _summarise(p.name, ctx.output, digest, entries, len(tasks) - len(pending), failed,
                         time.monotonic() - start)
    if failed:
        lines = "\n".join(f"  {name}: {err}" for name, err in sorted(failed.items())[:20])
        raise RuntimeError(
            f"{p.name}: {len(failed)} of {len(tasks)} shards failed (the others are committed; "
            f"re-running the same command redoes only these, so fix the cause first unless it "
            f"was transient):\n{lines}"
        )
    check_accounting(summary, ctx.output, entries)
    if ctx.output != ctx.stage_output:  # the stage's own folder gets the stage summary, once it adds up
        write_json(ctx.output.join(MANIFEST_DIR, SUMMARY_FILE), summary.to_json())
    return PassResult(summary, entries, ctx.output)


def plan_tasks(p: Pass, ctx: PassContext) -> tuple[list[ShardTask], dict[str, Any]]:
    """The pass's tasks (one per shard, config hash included) and the digest of its global state."""
    shards = p.list_shards(ctx)
    if not shards:
        raise FileNotFoundError(
            f"{p.name}: no input shards ({', '.join(p.input_suffixes)}) under {ctx.input.uri()!r}"
        )
    global_state = p.prepare(ctx, shards) or {}
    digest = config_hash(pass_payload(p, ctx.cfg, global_state))
    tasks = [ShardTask(p.name, s.name, s.input, ctx.input, ctx.output, ctx.cfg, digest, s.stamp, s.index)
             for s in shards]
    clashes = [n for n, c in Counter(t.shard for t in tasks).items() if c > 1]
    if clashes:
        raise ValueError(f"{p.name}: input shards map to the same output name: {clashes[:5]}")
    return tasks, global_state


def pass_payload(p: Pass, cfg: Any, global_state: dict[str, Any] | None = None) -> dict[str, Any]:
    payload = {"stage": p.name, "schema_version": p.schema_version,
               "config": section_dump(cfg, p.config_sections)}
    if global_state:
        payload["global_state"] = global_state
    return payload


def _folder(out: Location, p: Pass) -> Location:
    return out.join(p.folder) if p.folder else out


def _pass_named(passes: list[Pass], name: str) -> Pass:
    for p in passes:
        if p.name == name:
            return p
    raise ValueError(f"no pass named {name!r} (passes: {[p.name for p in passes]})")


def _subfolders(passes: list[Pass], p: Pass) -> tuple[str, ...]:
    """Folders of other passes inside this pass's folder: never cleared with it. (Pass folders are
    one level below the stage's output, and only the last pass writes the output itself.)"""
    return tuple(q.folder for q in passes if q is not p and q.folder and not p.folder)


# ---------------------------------------------------------------------------- output folders


def _describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The changed keys as a person sets them (``balance.target: 100 -> 200``, as in --set); what
    a pass computed from its input (``global_state``: counts, a cut-off) is named, not listed."""
    a, b = _flatten(old), _flatten(new)
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    changes = [f"{k.removeprefix('config.')}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed
               if not k.startswith(("global_state.", "schema_version", "stage"))]
    if any(k.startswith(("schema_version", "stage")) for k in changed):
        changes.append("the output's format (written by another ovpipe version or stage)")
    computed = sorted({k.split(".")[1] for k in changed if k.startswith("global_state.")})
    if computed:
        changes.append(f"what it computed from its input or model ({', '.join(computed)}): the input or "
                       "the model changed since")
    return "; ".join(changes) or "(no key differs; the stage's code version changed)"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _refuse_overlap(stage: str, stage_input: Location, out: Location) -> None:
    """An output inside its input would be read back as input on the next run (and --overwrite of
    an input inside its output would delete it)."""
    a, b = stage_input.path.rstrip("/"), out.path.rstrip("/")
    if type(stage_input.fs) is type(out.fs) and (a == b or b.startswith(a + "/") or a.startswith(b + "/")):
        raise OutputConflict(
            f"{stage}: the output {out.uri()!r} and the input {stage_input.uri()!r} overlap (one is inside "
            "the other); write the output to a folder outside the input."
        )


def _foreign(out: Location, passes_headers: list[Location]) -> bool:
    return out.is_dir() and bool(out.list_files()) and not any(h.exists() for h in passes_headers)


def _foreign_output_error(out: Location) -> OutputConflict:
    return OutputConflict(
        f"output {out.uri()!r} is not empty and is not an ovpipe stage output (no {MANIFEST_DIR}/"
        f"{STAGE_FILE}); choose an empty or new folder (--overwrite only deletes ovpipe outputs)."
    )


def _refuse_foreign_output(out: Location, passes: list[Pass]) -> None:
    if _foreign(out, [_folder(out, p).join(MANIFEST_DIR, STAGE_FILE) for p in passes]):
        raise _foreign_output_error(out)


def _who(stage: str, pass_name: str) -> str:
    return repr(stage) if stage == pass_name else f"{stage!r} (pass {pass_name!r})"


def refuse_changed_config(stage: str, p: Pass, out: Location, cfg: Any) -> None:
    """Before any pass runs: a pass folder written by another pass or with other config sections is
    refused now, not after the passes before it have run (its global state, known only after its
    ``prepare``, is checked again when the pass opens its folder)."""
    header = out.join(MANIFEST_DIR, STAGE_FILE)
    if not header.exists():
        return
    old = read_json(header).get("payload", {})
    new = pass_payload(p, cfg)
    if any(old.get(k) != new.get(k) for k in ("stage", "schema_version", "config")):
        old_state = {k: v for k, v in old.items() if k != "global_state"}
        raise OutputConflict(
            f"output {out.uri()!r} was written by {_who(stage, str(old.get('stage')))} with another config "
            f"than this run of {_who(stage, p.name)}. Changed: {_describe_change(old_state, new)}. Write to a "
            "new --output, or pass --overwrite to delete the old output and start again."
        )


def open_output(out: Location, payload: dict[str, Any], digest: str, *, replace: bool = False,
                keep: tuple[str, ...] = (), stage: str = "", recorded: dict[str, Any] | None = None) -> None:
    """Check a pass's folder against this run's config; write the header if new. With ``replace``
    an output of another config is deleted (--overwrite of a ``keep_on_overwrite`` pass).
    ``recorded``: what the pass read and the whole resolved config, kept in the header so that
    ``ovpipe retry`` re-runs rows with the settings that wrote them (the captioner's URL too)."""
    header = out.join(MANIFEST_DIR, STAGE_FILE)
    if header.exists():
        old = read_json(header)
        if old.get("config_hash") == digest:
            return
        if not replace:
            raise OutputConflict(
                f"output {out.uri()!r} was written by {_who(stage or payload['stage'], str(old.get('stage')))} "
                f"with config hash {old.get('config_hash')}; this run of "
                f"{_who(stage or payload['stage'], payload['stage'])} has {digest}. Changed: "
                f"{_describe_change(old.get('payload', {}), payload)}. Write to a new --output, "
                "or pass --overwrite to delete the old output and start again."
            )
        clear_folder(out, keep)
    out.mkdir()
    write_json(header, {"stage": payload["stage"], "config_hash": digest, "payload": payload,
                        **({"recorded": recorded} if recorded else {})})


def _recorded_config(cfg: Any) -> dict[str, Any] | None:
    """The resolved config as JSON (None for a config that is not a pydantic model: tests' toys)."""
    dump = getattr(cfg, "model_dump", None)
    return dump(mode="json") if dump is not None else None


def clear_folder(out: Location, keep: tuple[str, ...] = ()) -> None:
    """--overwrite: delete an earlier ovpipe output (but the sub-folders in ``keep``: other passes');
    a foreign non-empty folder is refused."""
    if _foreign(out, [out.join(MANIFEST_DIR, STAGE_FILE), *(out.join(k, MANIFEST_DIR, STAGE_FILE) for k in keep)]):
        raise _foreign_output_error(out)
    if not keep:
        out.delete_tree()
        return
    for info in out.fs.get_file_info(pafs.FileSelector(out.path, recursive=False, allow_not_found=True)):
        if posixpath.basename(info.path) in keep:
            continue
        if info.type == pafs.FileType.Directory:
            out.fs.delete_dir(info.path)
        else:
            out.fs.delete_file(info.path)


def retire_shards(p: Pass, out: Location, shards: list[str], cfg: Any) -> None:
    """Output shards whose input shard is gone: refused, or (run.retire_missing_inputs) deleted,
    manifest entry first, so that a crash part-way never leaves a committed shard without data."""
    if not cfg.run.retire_missing_inputs:
        raise OutputConflict(
            f"{p.name}: {len(shards)} shard(s) in {out.uri()!r} were committed from input shards that "
            f"are no longer in the input (removed or renamed): {shards[:5]}. Their rows would still flow to "
            "later stages. Put the inputs back, or re-run with --set run.retire_missing_inputs=true to "
            "delete those shards' output (later stages then retire theirs), or --overwrite to redo the stage."
        )
    entries = read_manifest_entries(out)
    for shard in shards:
        out.join(MANIFEST_DIR, f"{shard}.json").delete_if_exists()
        delete_replaced_files(out, entries.get(shard, {}), {})  # a later generation's files (ovpipe retry)
        for rel in [f"{DATA_DIR}/{shard}.parquet", f"{shard}.parquet",  # (before data/: at the top)
                    f"{LEDGER_DIR}/{shard}.parquet", *p.shard_files(shard)]:
            out.join(rel).delete_if_exists()
    print(f"[{p.name}] retired {len(shards)} shard(s) whose input is gone: {shards[:5]}", file=sys.stderr)


# ------------------------------------------------------------------------------- one shard


def run_shard(p: Pass, task: ShardTask) -> dict[str, Any]:
    """Process one shard and commit it. Idempotent: a retry overwrites the same names."""
    start = time.monotonic()
    return commit_shard(p, task, p.process(task), start)


def run_shard_safely(p: Pass, task: ShardTask) -> dict[str, Any]:
    try:
        return run_shard(p, task)
    except AccountingError:
        raise
    except Exception as e:  # one bad shard must not take down the others
        return {"shard": task.shard, "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(limit=8)}


def commit_shard(p: Pass, task: ShardTask, result: ShardOutput, start: float | None = None,
                 replaces: dict[str, Any] | None = None) -> dict[str, Any]:
    """The one commit path: check one shard's accounting, then write its data, its ledger and
    (last) its manifest entry. ``replaces``: the committed entry this commit supersedes (``ovpipe
    retry``): the new data and ledger get the next generation's names, so until the new entry is
    written the old one still points at intact files (a crash leaves the old state or the new,
    never a mix); the old generation's files are deleted after."""
    start = time.monotonic() if start is None else start
    kept, dropped = result.kept, len(result.ledger)
    if result.input_rows != kept + dropped:
        where = task.input.uri() if task.input is not None else task.shard
        raise AccountingError(
            f"{task.stage}: shard {where!r} read {result.input_rows} rows but kept {kept} "
            f"and ledgered {dropped}; this is a bug in the stage, please report it"
        )
    generation = replaces.get("generation", 0) + 1 if replaces is not None else 0
    stem = f"{task.shard}.retry{generation}" if generation else task.shard
    output_name = f"{DATA_DIR}/{stem}.parquet"
    write_table(task.output_root.join(output_name), result.table, result.row_group_size,
                tmp_dir=task.output_root.join(TMP_DIR))
    ledger_name = None
    ledger_file = task.output_root.join(LEDGER_DIR, f"{stem}.parquet")
    if dropped:
        ledger_name = f"{LEDGER_DIR}/{stem}.parquet"
        write_table(ledger_file, result.ledger.table())
    elif replaces is None:  # one left by an attempt that died before its commit is not this shard's
        ledger_file.delete_if_exists()
    entry = {
        "shard": task.shard,
        "input": task.input.uri() if task.input is not None else None,
        "output": output_name,
        "ledger": ledger_name,
        "input_rows": result.input_rows,
        "kept_rows": kept,
        "output_rows": result.table.num_rows,
        "dropped_rows": dropped,
        "dropped_by_reason": dict(sorted(Counter(result.ledger.rows["reason"]).items())),
        "config_hash": task.config_hash,
        "input_stamp": task.input_stamp,
        "seconds": round(time.monotonic() - start, 3),
        "node": _node_id(),  # where it ran (debugging; manifests are not part of the output bytes)
        **({"generation": generation} if generation else {}),
        **result.stats,
    }
    _maybe_inject_fault(task)  # data written, not yet committed: the worst moment to die
    # The manifest entry is written last: it is the commit record of this shard.
    write_json(task.output_root.join(MANIFEST_DIR, f"{task.shard}.json"), entry)
    if replaces is not None:
        delete_replaced_files(task.output_root, replaces, entry)
    return entry


def delete_replaced_files(out: Location, old: dict[str, Any], new: dict[str, Any]) -> None:
    """After a shard's new entry is committed: the data and ledger files only the old one named."""
    for key in ("output", "ledger"):
        if old.get(key) and old[key] not in (new.get("output"), new.get("ledger")):
            out.join(old[key]).delete_if_exists()


_GENERATION = re.compile(r"\.retry\d+\.parquet$")


def delete_uncommitted_generations(folder: Location, entries: dict[str, dict[str, Any]]) -> None:
    """Files of a retry generation that no entry names: an `ovpipe retry` killed before its commit
    left them (a dataset reader of data/ would otherwise see those rows twice)."""
    named = {folder.join(e[k]).path for e in entries.values() for k in ("output", "ledger") if e.get(k)}
    for sub in (DATA_DIR, LEDGER_DIR):
        for f in folder.join(sub).list_files((".parquet",), recursive=False):
            if _GENERATION.search(f.path) and f.path not in named:
                f.delete_if_exists()


def record_result(name: str, result: dict[str, Any], failed: dict[str, str], progress: Progress) -> None:
    """Count one finished shard in the progress line; remember it if it failed."""
    if "error" in result:
        failed[result["shard"]] = result["error"]
        print(f"[{name}] shard {result['shard']} failed: {result['error']}\n{result.get('traceback', '')}",
              file=progress.stream, flush=True)
    progress.update(1, result.get("input_rows", 0))


def _node_id() -> str | None:
    ray = sys.modules.get("ray")  # never import Ray just to ask (local executor, tests)
    try:
        return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
    except Exception:
        return None


def _maybe_inject_fault(task: ShardTask) -> None:
    """Test hooks, between computing a shard and committing it: record this process's pid (so a
    test can SIGKILL the worker mid-shard), then sleep (so a test can kill a run mid-stage)."""
    pid_file = os.environ.get("OVPIPE_FAULT_PID_FILE")
    if pid_file:
        with open(pid_file, "a") as f:
            f.write(f"{os.getpid()} {task.shard}\n")
    delay = os.environ.get("OVPIPE_FAULT_SHARD_DELAY_S")
    if delay:
        time.sleep(float(delay))


# ----------------------------------------------------------------------------- input stamps


def input_file_infos(files: list[Location]) -> dict[str, pafs.FileInfo]:
    """path -> FileInfo for every input shard that is a file, from one listing per folder (one
    LIST on an object store, not a HEAD per shard); a folder that cannot be listed is left out."""
    by_folder: dict[tuple[int, str], list[Location]] = {}
    for s in files:
        by_folder.setdefault((id(s.fs), posixpath.dirname(s.path)), []).append(s)
    found: dict[str, pafs.FileInfo] = {}
    for (_, folder), group in by_folder.items():
        wanted = {s.path for s in group}
        try:
            infos = group[0].fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        except (OSError, pa.ArrowException):
            continue
        found.update({i.path: i for i in infos if i.path in wanted and i.type == pafs.FileType.File})
    return found


def file_shards(input_root: Location, files: list[Location]) -> list[Shard]:
    """One shard per input file: named after its path under the input, stamped with size and mtime."""
    stamps = input_stamps(files)
    data = input_root.join(DATA_DIR) if input_root.join(MANIFEST_DIR).is_dir() else None

    def root_of(f: Location) -> Location:  # a stage output's shards keep their names
        return data if data is not None and f.path.startswith(data.path + "/") else input_root

    committed = committed_shard_names(input_root) if data is not None else {}  # generations of ovpipe retry
    return [Shard(committed.get(f.path) or shard_name_for(root_of(f), f), f, stamps.get(f.path)) for f in files]


def committed_shard_names(root: Location) -> dict[str, str]:
    """data file path -> shard name, from a stage output's manifest entries (``ovpipe retry``
    commits a shard's rows under a new generation's file name; downstream the shard keeps its name)."""
    return {root.join(e["output"]).path: name for name, e in read_manifest_entries(root).items() if e.get("output")}


def input_stamps(files: list[Location]) -> dict[str, str]:
    """path -> "size:mtime_ns" (unknown stamps only mean a changed input is not noticed)."""
    return {path: f"{i.size}:{'' if i.mtime_ns is None else i.mtime_ns}"
            for path, i in input_file_infos(files).items()}


# ------------------------------------------------------------------------------- accounting


def _summarise(name: str, out: Location, digest: str, entries: dict[str, dict], skipped: int,
               failed: dict[str, str], seconds: float) -> StageSummary:
    reasons: Counter = Counter()
    for e in entries.values():
        reasons.update(e["dropped_by_reason"])
    return StageSummary(
        stage=name,
        output=out.uri(),
        config_hash=digest,
        shards=len(entries),
        shards_skipped=skipped,
        input_rows=sum(e["input_rows"] for e in entries.values()),
        kept_rows=sum(e["kept_rows"] for e in entries.values()),
        dropped_rows=sum(e["dropped_rows"] for e in entries.values()),
        dropped_by_reason=dict(sorted(reasons.items())),
        seconds=round(seconds, 3),
        failed=failed,
        retried_by_reason=add_retry_counts(e.get("retried", {}) for e in entries.values()),
    )


def add_retry_counts(parts) -> dict[str, dict[str, int]]:
    """Sum {reason: {"retried", "recovered", "still_failing"}} dicts (manifest entries, summaries)."""
    total: dict[str, Counter] = {}
    for part in parts:
        for reason, counts in part.items():
            total.setdefault(reason, Counter()).update(counts)
    return {r: dict(sorted(c.items())) for r, c in sorted(total.items())}


def combine_summaries(name: str, out: Location, passes: list[Pass], results: dict[str, PassResult],
                      seconds: float) -> StageSummary:
    """The stage's summary: samples in = the first sample pass's input; dropped = every sample pass's
    ledger; kept = the last sample pass's; shards (and resumed shards) = those of every pass."""
    if len(passes) == 1:
        summary = results[passes[0].name].summary
        return StageSummary(**{**asdict(summary), "stage": name, "seconds": round(seconds, 3)})
    sample_passes = [results[p.name].summary for p in passes if p.counts_samples]
    every = [results[p.name].summary for p in passes]
    reasons: Counter = Counter()
    for s in sample_passes:
        reasons.update(s.dropped_by_reason)
    return StageSummary(
        stage=name,
        output=out.uri(),
        config_hash=config_hash({p.name: results[p.name].summary.config_hash for p in passes}),
        shards=sum(s.shards for s in every),
        shards_skipped=sum(s.shards_skipped for s in every),
        input_rows=sample_passes[0].input_rows,
        kept_rows=sample_passes[-1].kept_rows,
        dropped_rows=sum(s.dropped_rows for s in sample_passes),
        dropped_by_reason=dict(sorted(reasons.items())),
        seconds=round(seconds, 3),
        retried_by_reason=add_retry_counts(s.retried_by_reason for s in sample_passes),
    )


def check_stage_accounting(summary: StageSummary, passes: list[Pass], results: dict[str, PassResult]) -> None:
    """Every sample a pass keeps is read by the sample pass that reads it; the stage adds up."""
    names = {p.name: p for p in passes}
    for p in passes:
        source = names.get(p.reads)
        if p.counts_samples and source is not None and source.counts_samples:
            kept, read = results[source.name].summary.kept_rows, results[p.name].summary.input_rows
            if kept != read:
                raise AccountingError(f"{summary.stage}: pass {source.name} kept {kept} samples but pass "
                                      f"{p.name} read {read}")
    check_accounting(summary)


def check_accounting(summary: StageSummary, output_root: Location | None = None,
                     entries: dict[str, dict] | None = None) -> None:
    """Inputs == kept + dropped; with the entries, also checks that the files on disk hold exactly
    the rows their manifest entries claim."""
    for e in (entries or {}).values():
        rows = parquet_num_rows(output_root.join(e["output"]))
        dropped = parquet_num_rows(output_root.join(e["ledger"])) if e["ledger"] else 0
        claimed = e.get("output_rows", e["kept_rows"])
        if (rows, dropped) != (claimed, e["dropped_rows"]):
            raise AccountingError(
                f"{summary.stage}: shard {e['shard']} holds {rows} rows + {dropped} ledgered, "
                f"but its manifest entry says {claimed} + {e['dropped_rows']}"
            )
    if summary.input_rows != summary.kept_rows + summary.dropped_rows:
        raise AccountingError(
            f"{summary.stage}: inputs {summary.input_rows} != kept {summary.kept_rows} + dropped "
            f"{summary.dropped_rows} in {summary.output}"
        )
    if sum(summary.dropped_by_reason.values()) != summary.dropped_rows:
        raise AccountingError(f"{summary.stage}: ledger reasons do not add up to dropped rows")
