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

Each step is one line of STEPS: the folder it reads, the folder it writes, whether it lives in the
shared area or the run's version, and the function that runs it.
"""

from __future__ import annotations

import posixpath
import time
from dataclasses import dataclass
from typing import Any, Callable

from ovpipe.config import Config, config_hash, section_dump
from ovpipe.shards import Location, read_json, write_bytes_atomic, write_json
from ovpipe.stage import StageSummary, input_file_infos, run_stage

SHARED, VERSION = "shared", "version"


@dataclass(frozen=True)
class Step:
    name: str
    reads: str  # "input" (the pipeline's input) or another step's name
    scope: str  # SHARED (incremental, one folder for all runs) or VERSION (one per run)
    run: Callable[[str, str, Config, bool], StageSummary]  # (input, output, cfg, overwrite)
    report: str | Callable[[Config], str] = ""  # the step's report, relative to where it wrote


def _ingest(input: str, output: str, cfg: Config, overwrite: bool) -> StageSummary:
    from curation.ingest import IngestStage

    return run_stage(IngestStage(), input, output, cfg, overwrite=overwrite)


def _embed(input: str, output: str, cfg: Config, overwrite: bool) -> StageSummary:
    from curation.embed import EmbedStage

    return run_stage(EmbedStage(), input, output, cfg, overwrite=overwrite)


def _assign(input: str, output: str, cfg: Config, overwrite: bool) -> StageSummary:
    from curation.assign import AssignStage

    return run_stage(AssignStage(), input, output, cfg, overwrite=overwrite)


def _balance(input: str, output: str, cfg: Config, overwrite: bool) -> StageSummary:
    from curation.balance import BalanceStage

    return BalanceStage().run(input, output, cfg, overwrite=overwrite)


def _caption(input: str, output: str, cfg: Config, overwrite: bool) -> StageSummary:
    from curation.caption import CaptionRunner

    return CaptionRunner().run(input, output, cfg, overwrite=overwrite)


def _pack(input: str, output: str, cfg: Config, overwrite: bool) -> StageSummary:
    from packing.stage import PackRunner

    return PackRunner().run(input, output, cfg, overwrite=overwrite)


def _train(input: str, output: str, cfg: Config, overwrite: bool) -> StageSummary:
    """Trains on the packs (which may be on object storage); checkpoints need a filesystem."""
    from trainer.train import run_training_step

    out = Location.parse(output)
    if not out.is_local:
        _check_train_run_dir(out, cfg)
        run_id = posixpath.basename(posixpath.dirname(out.path.rstrip("/")))
        output = posixpath.join(cfg.train.run_dir, run_id, "train")
    return run_training_step(input, output, cfg, overwrite=overwrite)


def _train_report(cfg: Config) -> str:
    """The last stage's loss plot: stage 2 of the demo chain, else the configured stage."""
    real_model = cfg.train.llm_path or cfg.train.init_from
    return f"{cfg.train.stage if real_model else '2'}/loss.png"


def _check_train_run_dir(out: Location, cfg: Config) -> None:
    if not cfg.train.run_dir:
        raise ValueError(
            f"the train step writes checkpoints to a local or shared filesystem, but this run's "
            f"output is {out.uri()!r}; set train.run_dir (e.g. /shared/ovpipe-runs) or leave 'train' "
            "out of pipeline.steps (--steps ingest,embed,assign,balance,caption,pack)"
        )


STEPS: list[Step] = [
    Step("ingest", "input", SHARED, _ingest),
    Step("embed", "ingest", SHARED, _embed),
    Step("assign", "embed", SHARED, _assign),
    Step("balance", "assign", VERSION, _balance, report="_report"),
    Step("caption", "balance", VERSION, _caption),
    Step("pack", "caption", VERSION, _pack, report="pack_stats.png"),
    Step("train", "pack", VERSION, _train, report=_train_report),
]


def step_names() -> list[str]:
    return [s.name for s in STEPS]


def default_run_id(inputs: list[Location], cfg: Config) -> str:
    """A hash of the config and of the input listing (names and sizes): the same inputs and
    config give the same id, so a resubmitted run finishes its own version."""
    infos = input_file_infos(inputs)  # one listing per folder, not a request per shard
    listing = [[shard.path, infos[shard.path].size if shard.path in infos else None] for shard in inputs]
    return "r-" + config_hash({"config": hashed_config(cfg), "inputs": listing})[:12]


def hashed_config(cfg: Config) -> dict[str, Any]:
    """Every section, without the fields that change only how a run runs (workers, ...)."""
    return section_dump(cfg, tuple(type(cfg).model_fields), everything_that_changes_output=True)


def step_folder(out: Location, step: Step, run_id: str, versioned: bool) -> Location:
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
    if "train" in wanted and not out.is_local:
        _check_train_run_dir(out, cfg)  # before hours of curation, not after
    inputs = _input_listing(input_root, cfg)
    run_id = run_id or default_run_id(inputs, cfg)
    folders = {"input": input_root}
    records = []
    for step in STEPS:
        folder = step_folder(out, step, run_id, versioned)
        folders[step.name] = folder
        if step.name not in wanted:
            continue
        t0 = time.monotonic()
        summary = step.run(folders[step.reads].uri(), folder.uri(), cfg, overwrite)
        record = summary.to_json()
        record["wall_seconds"] = round(time.monotonic() - t0, 3)
        record["rows_per_s"] = round(record["input_rows"] / max(record["wall_seconds"], 1e-9), 1)
        report = step.report(cfg) if callable(step.report) else step.report
        # relative to where the step wrote: for train on an object-store run, under train.run_dir
        record["report"] = posixpath.join(record["output"], report) if report else None
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


def _input_listing(input_root: Location, cfg: Config) -> list[Location]:
    from curation.readers import list_ingest_shards

    return list_ingest_shards(input_root, cfg.ingest)


def latest_run(output: str) -> dict[str, Any] | None:
    out = Location.parse(output)
    marker = out.join("runs", "LATEST")
    if not marker.exists():
        return None
    return read_json(out.join("runs", f"{marker.read_bytes().decode().strip()}.json"))


def run_summary_table(manifest: dict[str, Any]) -> str:
    """Per stage: in, kept, dropped by reason, time, throughput; then where the reports are."""
    from ovpipe.progress import format_table

    rows = []
    for s in manifest["stages"]:
        reasons = ", ".join(f"{r}={c}" for r, c in s["dropped_by_reason"].items()) or "-"
        rows.append([s["stage"], s["input_rows"], s["kept_rows"], s["dropped_rows"], reasons,
                     f"{s['seconds']:.1f}s", f"{s['rows_per_s']:,.0f}/s", f"{s['shards_skipped']}/{s['shards']}"])
    lines = [format_table(["stage", "in", "kept", "dropped", "dropped by reason", "time", "rows/s", "resumed"], rows)]
    for s in manifest["stages"]:
        lines.append(f"{s['stage']:>8}: {s['output']}" + (f"   report: {s['report']}" if s.get("report") else ""))
    return "\n".join(lines)
