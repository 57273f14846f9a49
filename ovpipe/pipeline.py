"""The whole pipeline from one config: `ovpipe run` and `python -m ray_jobs.pipeline`.

Reads:  ``pipeline.input`` (raw shards: Parquet, WebDataset tars, image folders; local or URI).
Writes, under ``pipeline.output`` (local or URI)::

    ingest/ embed/ assign/             per-shard stages, shared by every run (incremental)
    versions/<run_id>/balance/ caption/ pack/ [train/]
                                       global stages, recomputed over the union for each run
    runs/<run_id>.json                 the run manifest: id, config hash, inputs, counts, timings
    runs/LATEST                        the id of the newest finished run (object stores: no links)
    runs/<run_id>.html                 the run report (ovpipe/report.py): funnel, plots, config, timings

A scheduled run over a folder where new shards arrived processes only the shards its per-shard
stages have not committed (their manifests say which), reuses what earlier runs embedded and
assigned, and recomputes what is global — concept counts, the balanced selection, captions of the
selection, packs — into a new version. The run id defaults to a hash of the config and the input
listing, so a resubmitted job (new submission id, same inputs) finds its own version and finishes
it instead of starting again; pass ``--run-id`` (e.g. the schedule date) to name versions.

The steps are the registered stages (ovpipe/registry.py), in their order: each entry names the
stage it reads, and whether its folder lives in the shared area or in the run's version.
"""

from __future__ import annotations

import posixpath
import sys
import time
from typing import TYPE_CHECKING, Any

from curation.readers import list_ingest_shards
from ovpipe import registry
from ovpipe.core.config import config_hash, section_dump
from ovpipe.core.progress import summary_table
from ovpipe.core.shards import Location, read_json, write_bytes_atomic, write_json
from ovpipe.core.stage import StageSummary, input_file_infos
from ovpipe.registry import SHARED, StageEntry
from ovpipe.retry import retry_output
from ovpipe.report import write_report

if TYPE_CHECKING:
    from ovpipe.config import Config


def step_names() -> list[str]:
    return registry.names()


def default_steps(cfg: Config) -> list[str]:
    """Every registered stage, except optional ones their config does not enable."""
    return [e.name for e in registry.STAGES if not e.optional or e.load().enabled(cfg)]


def input_step(entry: StageEntry, wanted: list[str], cfg: Config) -> str:
    """The step whose output this step reads: the first candidate that runs in this run, else
    the first enabled by the config (its folder from an earlier run), else the last candidate."""
    candidates = entry.read_candidates
    for name in candidates:
        if name == registry.INPUT or name in wanted:
            return name
    for name in candidates:
        found = registry.entry(name)  # read_candidates holds registered names only
        if not found.optional or found.load().enabled(cfg):
            return name
    return candidates[-1]


def default_run_id(inputs: list[Location], cfg: Config) -> str:
    """A hash of the config and of the input listing (names and sizes): the same inputs and
    config give the same id, so a resubmitted run finishes its own version."""
    infos = input_file_infos(inputs)  # one listing per folder, not a request per shard
    listing = [[shard.path, infos[shard.path].size if shard.path in infos else None] for shard in inputs]
    return "r-" + config_hash({"config": hashed_config(cfg), "inputs": listing})[:12]


def hashed_config(cfg: Config) -> dict[str, Any]:
    """Every section, without the fields that change only how a run runs (workers, ...)."""
    return section_dump(cfg, tuple(type(cfg).model_fields), everything_that_changes_output=True)


def step_folder(out: Location, step: StageEntry, run_id: str, versioned: bool) -> Location:
    if not versioned:
        return out.join(step.name)
    return out.join(step.name) if step.scope == SHARED else out.join("versions", run_id, step.name)


def run_pipeline(input: str, output: str, cfg: Config, *, run_id: str | None = None,
                 overwrite: bool = False, versioned: bool = True, steps: list[str] | None = None,
                 filesystem=None, retry: bool = False) -> dict[str, Any]:
    """Run (or resume) every step; returns the run manifest (also written to runs/<id>.json).
    ``retry`` (`ovpipe run --retry`): before a step runs, the rows its existing output dropped for
    one of its transient reasons are retried (ovpipe/retry.py); the step, and every later one,
    then redo only the shards whose input that changed."""
    start = time.monotonic()
    input_root = Location.parse(input, filesystem)
    out = Location.parse(output, filesystem)
    wanted = steps or default_steps(cfg)
    unknown = sorted(set(wanted) - set(step_names()))
    if unknown:
        raise ValueError(f"unknown pipeline steps {unknown}; the steps are {step_names()}")
    inputs = _input_listing(input_root, cfg)
    run_id = run_id or default_run_id(inputs, cfg)
    stages = {e.name: e.load() for e in registry.STAGES if e.name in wanted}
    for entry in registry.STAGES:  # loud checks before hours of curation, not after
        if entry.name in wanted:
            stages[entry.name].check(cfg, step_folder(out, entry, run_id, versioned).uri())
    folders = {registry.INPUT: input_root}
    records = []
    for entry in registry.STAGES:
        folder = step_folder(out, entry, run_id, versioned)
        folders[entry.name] = folder
        if entry.name not in wanted:
            continue
        t0 = time.monotonic()
        stage = stages[entry.name]
        output = stage.resolve_output(cfg, folder.uri(), run_id)
        runs = stage.pipeline_runs(cfg, output)
        source = folders[input_step(entry, wanted, cfg)]  # every earlier step has its folder
        retried = {}
        if retry and entry.transient_reasons and not overwrite and folder.join("_manifest", "_stage.json").exists():
            retried = retry_output(entry, source, folder, cfg, list(entry.transient_reasons),
                                   filesystem=filesystem).by_reason
        summaries = [stage.run(source.uri(), where, run_cfg, overwrite=overwrite)
                     for where, run_cfg in runs]
        record = _one_record(entry.name, output, summaries)
        if retried:
            record["retried_this_run"] = retried  # per reason: retried, recovered, still failing
        record["wall_seconds"] = round(time.monotonic() - t0, 3)
        # three significant digits: training reads ~0.02 packs/s, which one decimal rounds to 0
        record["rows_per_s"] = float(f"{record['input_rows'] / max(record['wall_seconds'], 1e-9):.3g}")
        # relative to where the step's last run wrote: for train on an object-store run, under train.run_dir
        record["report"] = posixpath.join(runs[-1][0], entry.report) if entry.report else None
        records.append(record)
    manifest = {
        "run_id": run_id,
        "config_hash": config_hash(hashed_config(cfg)),
        "input": input_root.uri(),
        "output": out.uri(),
        "inputs": [loc.uri() for loc in inputs],
        "stages": records,
        "config": cfg.model_dump(mode="json"),  # the resolved config, for the run report
        "seconds": round(time.monotonic() - start, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    manifest["report"] = out.join("runs", f"{run_id}.html").uri()
    write_json(out.join("runs", f"{run_id}.json"), manifest)
    write_bytes_atomic(out.join("runs", "LATEST"), run_id.encode())
    try:  # a by-product: a run whose outputs are all committed does not fail on its report
        write_report(out.join("runs", f"{run_id}.json"), out.join("runs", f"{run_id}.html"))
    except Exception as e:  # noqa: BLE001
        manifest["report"] = None
        print(f"run report not written ({type(e).__name__}: {e}); `ovpipe report {out.uri()}` retries",
              file=sys.stderr)
    return manifest


def _one_record(name: str, output: str, summaries: list[StageSummary]) -> dict[str, Any]:
    """A step's record in the run manifest; a step of several runs on the same input (training
    phases) counts its input once and the shards of every run."""
    if len(summaries) == 1:
        return summaries[0].to_json()
    last = summaries[-1]
    return StageSummary(
        stage=name, output=output, config_hash=config_hash([s.config_hash for s in summaries]),
        shards=sum(s.shards for s in summaries), shards_skipped=sum(s.shards_skipped for s in summaries),
        input_rows=summaries[0].input_rows, kept_rows=last.kept_rows, dropped_rows=last.dropped_rows,
        dropped_by_reason=last.dropped_by_reason, seconds=round(sum(s.seconds for s in summaries), 3),
    ).to_json()


def _input_listing(input_root: Location, cfg: Config) -> list[Location]:
    return list_ingest_shards(input_root, cfg.ingest)


def latest_run(output: str) -> dict[str, Any] | None:
    out = Location.parse(output)
    marker = out.join("runs", "LATEST")
    if not marker.exists():
        return None
    return read_json(out.join("runs", f"{marker.read_bytes().decode().strip()}.json"))


def run_summary_table(manifest: dict[str, Any]) -> str:
    """Per stage: in, kept, dropped by reason, time, throughput; then where the reports are."""
    lines = [summary_table(manifest["stages"])]
    for s in manifest["stages"]:
        lines.append(f"{s['stage']:>8}: {s['output']}" + (f"   report: {s['report']}" if s.get("report") else ""))
    if manifest.get("report"):
        lines.append(f"run report (open in a browser): {manifest['report']}")
    return "\n".join(lines)
