"""The whole pipeline from one config: `ovpipe run` and `python -m ray_jobs.pipeline`.

Reads:  ``pipeline.input`` (raw shards: Parquet, WebDataset tars, image folders; local or URI).
Writes, under ``pipeline.output`` (local or URI)::

    ingest/ embed/ assign/             per-shard stages, shared by every run (incremental)
    versions/<run_id>/balance/ caption/ pack/ [train/]
                                       global stages, recomputed over the union for each run
    runs/<run_id>.json                 the run manifest: id, config hash, inputs, counts, timings
    runs/LATEST                        the id of the newest finished run (object stores: no links)

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
import time
from typing import TYPE_CHECKING, Any

from curation.readers import list_ingest_shards
from ovpipe import registry
from ovpipe.core.config import config_hash, section_dump
from ovpipe.core.progress import summary_table
from ovpipe.core.shards import Location, read_json, write_bytes_atomic, write_json
from ovpipe.core.stage import StageSummary, input_file_infos
from ovpipe.registry import SHARED, StageEntry

if TYPE_CHECKING:
    from ovpipe.config import Config


def step_names() -> list[str]:
    return registry.names()


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
                 filesystem=None) -> dict[str, Any]:
    """Run (or resume) every step; returns the run manifest (also written to runs/<id>.json)."""
    start = time.monotonic()
    input_root = Location.parse(input, filesystem)
    out = Location.parse(output, filesystem)
    wanted = steps or step_names()
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
        summaries = [stage.run(folders[entry.reads].uri(), where, run_cfg, overwrite=overwrite)
                     for where, run_cfg in runs]
        record = _one_record(entry.name, output, summaries)
        record["wall_seconds"] = round(time.monotonic() - t0, 3)
        record["rows_per_s"] = round(record["input_rows"] / max(record["wall_seconds"], 1e-9), 1)
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
        "seconds": round(time.monotonic() - start, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(out.join("runs", f"{run_id}.json"), manifest)
    write_bytes_atomic(out.join("runs", "LATEST"), run_id.encode())
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
    return "\n".join(lines)
