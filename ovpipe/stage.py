"""Running a stage: one input shard -> one output shard + its ledger rows, committed by a
manifest entry, as Ray tasks.

A stage is a small object with a name, the config sections that change its output, and a
``process(task)`` function that turns one input shard into an Arrow table of kept rows plus a
``Ledger`` of dropped ones. Everything else lives here, once:

* the output header (``_manifest/_stage.json``): a changed config is refused, not mixed in;
* resume: input shards whose manifest entry exists are skipped; a killed run re-run writes
  exactly what an uninterrupted run writes (names and bytes are functions of the input);
* accounting: per shard and per stage, input rows == kept + dropped, or the run fails loudly;
* progress lines while shards finish, and a summary (``_manifest/_summary.json``) at the end.
"""

from __future__ import annotations

import inspect
import os
import posixpath
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.fs as pafs

from ovpipe.config import Config, config_hash, section_dump
from ovpipe.ledger import AccountingError, Ledger
from ovpipe.progress import Progress
from ovpipe.shards import (
    LEDGER_DIR,
    MANIFEST_DIR,
    STAGE_FILE,
    SUMMARY_FILE,
    Location,
    list_input_shards,
    parquet_num_rows,
    read_json,
    read_manifest_entries,
    shard_name_for,
    write_json,
    write_table,
)


@dataclass(frozen=True)
class ShardTask:
    """Everything one Ray task needs to process one input shard (picklable)."""

    stage: str
    shard: str  # deterministic output name
    input: Location
    input_root: Location
    output_root: Location
    config: Config
    config_hash: str
    input_stamp: str | None = None  # "size:mtime_ns" of the input when planned (None: unknown)


@dataclass
class ShardOutput:
    table: pa.Table
    ledger: Ledger
    input_rows: int


class Stage(Protocol):
    """What a stage provides. Optionally also ``prepare(input_shards, cfg) -> dict``: called once
    on the driver before any shard runs, for global state every shard needs (concept counts, a
    sampling threshold, a loaded index). It may store that state on the stage object (which is
    shipped to every task) and returns a small JSON-able digest of it, which goes into the config
    hash: when the global state changes, the old output is not silently mixed with the new."""

    name: str
    config_sections: tuple[str, ...]
    schema_version: int
    input_suffixes: tuple[str, ...]

    def process(self, task: ShardTask) -> ShardOutput: ...

    # Optional: ``execute_on_ray(pending, cfg, progress) -> {shard: error}`` replaces the default
    # one-task-per-shard executor (e.g. a Ray Data actor pool); it must commit every shard it
    # finishes with ``commit_shard`` and report each one with ``progress.update(1, input_rows)``.


class OutputConflict(RuntimeError):
    """The output folder holds something this run must not mix with."""


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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def stage_config_payload(stage: Stage, cfg: Config, global_state: dict[str, Any] | None = None) -> dict[str, Any]:
    payload = {
        "stage": stage.name,
        "schema_version": stage.schema_version,
        "config": section_dump(cfg, stage.config_sections),
    }
    if global_state:
        payload["global_state"] = global_state
    return payload


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    a, b = _flatten(old), _flatten(new)
    changes = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(changes) or "(no key differs; the stage's code version changed)"


def open_output(out: Location, payload: dict[str, Any], digest: str, overwrite: bool) -> None:
    """Check the output folder against this run's stage + config; write the header if new."""
    header = out.join(MANIFEST_DIR, STAGE_FILE)
    if header.exists():
        old = read_json(header)
        same = old.get("config_hash") == digest
        if overwrite or not same:
            if not overwrite:
                raise OutputConflict(
                    f"output {out.uri()!r} was written by stage {old.get('stage')!r} with config hash "
                    f"{old.get('config_hash')}; this run ({payload['stage']}) has {digest}. Changed: "
                    f"{_describe_change(old.get('payload', {}), payload)}. Write to a new --output, "
                    "or pass --overwrite to delete the old output and start again."
                )
            out.delete_tree()
        else:
            return
    elif out.is_dir() and out.list_files():
        raise OutputConflict(
            f"output {out.uri()!r} is not empty and is not an ovpipe stage output (no "
            f"{MANIFEST_DIR}/{STAGE_FILE}); choose an empty or new folder."
        )
    out.mkdir()
    write_json(header, {"stage": payload["stage"], "config_hash": digest, "payload": payload})


def clear_output(out: Location) -> None:
    """--overwrite: delete an earlier ovpipe output; a foreign non-empty folder is refused."""
    if out.join(MANIFEST_DIR, STAGE_FILE).exists():
        out.delete_tree()
    elif out.is_dir() and out.list_files():
        raise OutputConflict(
            f"output {out.uri()!r} is not empty and is not an ovpipe stage output (no "
            f"{MANIFEST_DIR}/{STAGE_FILE}); --overwrite only deletes ovpipe outputs. Choose an "
            "empty or new folder."
        )


def run_shard(stage: Stage, task: ShardTask) -> dict[str, Any]:
    """Process one input shard and commit it. Idempotent: a retry overwrites the same names."""
    start = time.monotonic()
    return commit_shard(task, stage.process(task), start)


def commit_shard(task: ShardTask, result: ShardOutput, start: float | None = None) -> dict[str, Any]:
    """Check one shard's accounting, then write its data, its ledger and (last) its manifest entry.
    Stages with their own executor (``execute_on_ray``) commit each finished shard through this."""
    start = time.monotonic() if start is None else start
    kept, dropped = result.table.num_rows, len(result.ledger)
    if result.input_rows != kept + dropped:
        raise AccountingError(
            f"{task.stage}: shard {task.input.uri()!r} read {result.input_rows} rows but kept {kept} "
            f"and ledgered {dropped}; this is a bug in the stage, please report it"
        )
    output_name = f"{task.shard}.parquet"
    write_table(task.output_root.join(output_name), result.table)
    ledger_name = None
    ledger_file = task.output_root.join(LEDGER_DIR, f"{task.shard}.parquet")
    if dropped:
        ledger_name = f"{LEDGER_DIR}/{task.shard}.parquet"
        write_table(ledger_file, result.ledger.table())
    else:  # one left by an attempt that died before its commit is not this shard's
        ledger_file.delete_if_exists()
    entry = {
        "shard": task.shard,
        "input": task.input.uri(),
        "output": output_name,
        "ledger": ledger_name,
        "input_rows": result.input_rows,
        "kept_rows": kept,
        "dropped_rows": dropped,
        "dropped_by_reason": dict(sorted(Counter(result.ledger.rows["reason"]).items())),
        "config_hash": task.config_hash,
        "input_stamp": task.input_stamp,
        "seconds": round(time.monotonic() - start, 3),
        "node": _node_id(),  # where it ran (debugging; manifests are not part of the output bytes)
    }
    _maybe_inject_fault(task)  # data written, not yet committed: the worst moment to die
    # The manifest entry is written last: it is the commit record of this shard.
    write_json(task.output_root.join(MANIFEST_DIR, f"{task.shard}.json"), entry)
    return entry


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


def _run_shard_safely(stage: Stage, task: ShardTask) -> dict[str, Any]:
    try:
        return run_shard(stage, task)
    except AccountingError:
        raise
    except Exception as e:  # one bad shard must not take down the others
        return {"shard": task.shard, "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(limit=8)}


def _prepare(stage: Stage, shards: list[Location], cfg: Config, input_root: Location,
             output_root: Location) -> dict[str, Any] | None:
    prepare = getattr(stage, "prepare", None)
    if prepare is None:
        return None
    if getattr(stage, "_prepared_digest", None) is None:
        # Stages whose global state depends on what is already committed (ingest's dedup keeps
        # earlier runs' rows) take the output folder too.
        wants = inspect.signature(prepare).parameters
        roots = {"input_root": input_root, "output_root": output_root}
        kwargs = {k: v for k, v in roots.items() if k in wants}
        stage._prepared_digest = prepare(shards, cfg, **kwargs) or {}
    return stage._prepared_digest


def input_file_infos(shards: list[Location]) -> dict[str, pafs.FileInfo]:
    """path -> FileInfo for every input shard that is a file, from one listing per folder (one
    LIST on an object store, not a HEAD per shard); a folder that cannot be listed is left out."""
    by_folder: dict[tuple[int, str], list[Location]] = {}
    for s in shards:
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


def input_stamps(shards: list[Location]) -> dict[str, str]:
    """path -> "size:mtime_ns" (unknown stamps only mean a changed input is not noticed)."""
    return {path: f"{i.size}:{'' if i.mtime_ns is None else i.mtime_ns}"
            for path, i in input_file_infos(shards).items()}


def plan_tasks(stage: Stage, cfg: Config, input_root: Location, output_root: Location) -> list[ShardTask]:
    lister = getattr(stage, "list_shards", None)  # stages whose shards are not plain files
    shards = lister(input_root, cfg) if lister else list_input_shards(input_root, stage.input_suffixes)
    if not shards:
        raise FileNotFoundError(
            f"{stage.name}: no input shards ({', '.join(stage.input_suffixes)}) under {input_root.uri()!r}"
        )
    digest = config_hash(stage_config_payload(stage, cfg, _prepare(stage, shards, cfg, input_root, output_root)))
    stamps = input_stamps(shards)
    tasks = [
        ShardTask(stage.name, shard_name_for(input_root, s), s, input_root, output_root, cfg, digest,
                  stamps.get(s.path))
        for s in shards
    ]
    names = Counter(t.shard for t in tasks)
    clashes = [n for n, c in names.items() if c > 1]
    if clashes:
        raise ValueError(f"{stage.name}: input shards map to the same output name: {clashes[:5]}")
    return tasks


def run_stage(
    stage: Stage,
    input: str,
    output: str,
    cfg: Config,
    *,
    filesystem=None,
    overwrite: bool = False,
    quiet: bool = False,
) -> StageSummary:
    """Run (or resume) one stage over every input shard; raise if any shard failed or the
    accounting does not add up."""
    start = time.monotonic()
    input_root = Location.parse(input, filesystem)
    output_root = Location.parse(output, filesystem)
    if overwrite:  # before planning, so that prepare() never sees outputs about to be deleted
        clear_output(output_root)
    tasks = plan_tasks(stage, cfg, input_root, output_root)
    payload = stage_config_payload(stage, cfg, getattr(stage, "_prepared_digest", None))
    open_output(output_root, payload, tasks[0].config_hash, overwrite)

    done = read_manifest_entries(output_root)
    gone = sorted(set(done) - {t.shard for t in tasks})
    if gone:
        retire_shards(stage, output_root, gone, cfg)
        done = {k: v for k, v in done.items() if k not in gone}
    # A committed shard whose input was rewritten since (an upstream stage redone) is redone too.
    changed = [t.shard for t in tasks if t.shard in done and t.input_stamp
               and done[t.shard].get("input_stamp") not in (None, t.input_stamp)]
    if changed:
        print(f"[{stage.name}] {len(changed)} shard(s) redone: their input changed since they were "
              f"committed: {changed[:5]}", file=sys.stderr)
        done = {k: v for k, v in done.items() if k not in changed}
    pending = [t for t in tasks if t.shard not in done]
    failed: dict[str, str] = {}
    if pending:
        progress = Progress(stage.name, len(pending), cfg.run.progress_interval_s,
                            stream=open(os.devnull, "w") if quiet else None)
        custom = getattr(stage, "execute_on_ray", None)  # (pending, cfg, progress) -> failed
        if cfg.run.executor == "local":
            failed = _execute_local(stage, pending, cfg, progress)
        elif custom is not None:
            failed = custom(pending, cfg, progress)
        else:
            failed = _execute_on_ray(stage, pending, cfg, progress)

    entries = read_manifest_entries(output_root)
    wanted = {t.shard for t in tasks}
    entries = {k: v for k, v in entries.items() if k in wanted}
    summary = _summarise(stage, output_root, tasks[0].config_hash, entries, len(tasks) - len(pending),
                         failed, time.monotonic() - start)
    if failed:
        lines = "\n".join(f"  {name}: {err}" for name, err in sorted(failed.items())[:20])
        raise RuntimeError(
            f"{stage.name}: {len(failed)} of {len(tasks)} shards failed (the others are committed; "
            f"re-run the same command to retry only the failed ones):\n{lines}"
        )
    check_accounting(summary, output_root, entries)
    write_json(output_root.join(MANIFEST_DIR, SUMMARY_FILE), summary.to_json())
    return summary


def retire_shards(stage: Stage, out: Location, shards: list[str], cfg: Config) -> None:
    """Output shards whose input shard is gone: refused, or (run.retire_missing_inputs) deleted,
    manifest entry first, so that a crash part-way never leaves a committed shard without data."""
    if not cfg.run.retire_missing_inputs:
        raise OutputConflict(
            f"{stage.name}: {len(shards)} shard(s) in {out.uri()!r} were committed from input shards that "
            f"are no longer in the input (removed or renamed): {shards[:5]}. Their rows would still flow to "
            "later stages. Put the inputs back, or re-run with --set run.retire_missing_inputs=true to "
            "delete those shards' output (later stages then retire theirs), or --overwrite to redo the stage."
        )
    extra = getattr(stage, "shard_files", None)  # stage-specific per-shard files (pack's payloads)
    for shard in shards:
        out.join(MANIFEST_DIR, f"{shard}.json").delete_if_exists()
        for rel in [f"{shard}.parquet", f"{LEDGER_DIR}/{shard}.parquet", *(extra(shard) if extra else [])]:
            out.join(rel).delete_if_exists()
    print(f"[{stage.name}] retired {len(shards)} shard(s) whose input is gone: {shards[:5]}", file=sys.stderr)


def _record(stage: Stage, result: dict[str, Any], failed: dict[str, str], progress: Progress) -> None:
    if "error" in result:
        failed[result["shard"]] = result["error"]
        print(f"[{stage.name}] shard {result['shard']} failed: {result['error']}\n{result['traceback']}",
              file=progress.stream, flush=True)
    progress.update(1, result.get("input_rows", 0))


def _execute_local(stage: Stage, pending: list[ShardTask], cfg: Config, progress: Progress) -> dict[str, str]:
    failed: dict[str, str] = {}
    for task in pending:
        _record(stage, _run_shard_safely(stage, task), failed, progress)
    return failed


def _execute_on_ray(stage: Stage, pending: list[ShardTask], cfg: Config, progress: Progress) -> dict[str, str]:
    """At most `run.workers` shards in flight; results are recorded as they finish."""
    import ray

    from ovpipe.raycluster import ensure_ray, spread_tasks

    ensure_ray(cfg)
    failed: dict[str, str] = {}
    stage_ref = ray.put(stage)
    for result in spread_tasks(_run_shard_safely, [(stage_ref, task) for task in pending], cfg):
        _record(stage, result, failed, progress)
    return failed


def _summarise(stage: Stage, out: Location, digest: str, entries: dict[str, dict], skipped: int,
               failed: dict[str, str], seconds: float) -> StageSummary:
    reasons: Counter = Counter()
    for e in entries.values():
        reasons.update(e["dropped_by_reason"])
    return StageSummary(
        stage=stage.name,
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
    )


def check_accounting(summary: StageSummary, output_root: Location | None = None,
                     entries: dict[str, dict] | None = None) -> None:
    """Inputs == kept + dropped, per stage; with the entries, also checks that the files on disk
    hold exactly the rows their manifest entries claim."""
    for e in (entries or {}).values():
        kept = parquet_num_rows(output_root.join(e["output"]))
        dropped = parquet_num_rows(output_root.join(e["ledger"])) if e["ledger"] else 0
        if (kept, dropped) != (e["kept_rows"], e["dropped_rows"]):
            raise AccountingError(
                f"{summary.stage}: shard {e['shard']} holds {kept} kept + {dropped} ledgered rows, "
                f"but its manifest entry says {e['kept_rows']} + {e['dropped_rows']}"
            )
    if summary.input_rows != summary.kept_rows + summary.dropped_rows:
        raise AccountingError(
            f"{summary.stage}: inputs {summary.input_rows} != kept {summary.kept_rows} + dropped "
            f"{summary.dropped_rows} in {summary.output}"
        )
    if sum(summary.dropped_by_reason.values()) != summary.dropped_rows:
        raise AccountingError(f"{summary.stage}: ledger reasons do not add up to dropped rows")
