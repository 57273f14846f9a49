"""The one launch path of training: `ovpipe train` and the pipeline's train step both run a training
phase through ``TrainStage``.

Reads: the packed shards (the pack stage's output: a local folder or an object-store URI) and the
resolved config (the ``[train]`` section: the phase, where its model comes from, the steps).
Writes: one run folder per phase (trainer/train.py: ``checkpoints/``, ``metrics.jsonl``,
``loss.png``, ``export/``, ``train_config.json``, ``summary.json``), plus ``train_config.toml``,
the resolved config the torchrun ranks load, when more than one process trains. Run folders are
on a local or shared filesystem (checkpoints need one); for a pipeline whose output is on object
storage, ``resolve_output`` redirects the train step under ``train.run_dir``.

One process (CPU, one GPU, or ``train.nproc_per_node = 1``) trains in this process; more run
``python -m torch.distributed.run --standalone -m trainer.train`` (trainer/train.py's entry point).
Re-running into the same run folder resumes from its newest checkpoint; a finished run folder
(``summary.json`` present) is left as it is, or refused when the training config changed
(``refuse_changed_train_config``). A torchrun failure is one line: the failing rank's exception
(its whole output goes to ``<run folder>/_logs/torchrun-<time>.log``).

The pipeline's train step (``pipeline_runs``): with a real model (``train.llm_path`` or
``train.init_from``) it trains the configured ``train.phase`` into ``<step folder>/<phase>``; with the
tiny seeded model (demo, tests) it chains a few steps of phases 1, 1.5 and 2, each from the previous
phase's run folder, into ``<step folder>/1``, ``/1.5`` and ``/2``.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ovpipe.core.config import config_hash, section_dump, to_toml
from ovpipe.core.shards import Location
from ovpipe.core.stage import OutputConflict, Stage, StageSummary
from trainer.data import PackStream
from trainer.metrics import summary_text
from trainer.train import train

if TYPE_CHECKING:
    from ovpipe.config import Config

TOML_FILE = "train_config.toml"  # the resolved config handed to the torchrun ranks
# The tiny-model chain of the pipeline's train step (demo, tests): (phase, optimizer steps)
DEMO_CHAIN = (("1", 3), ("1.5", 2), ("2", 2))


class TrainStage(Stage):
    """Training as a pipeline stage: one phase per ``run``, into one run folder."""

    name = "train"

    def run(self, input: str, output: str, cfg: Config, *, filesystem=None, overwrite: bool = False,
            quiet: bool = False) -> StageSummary:
        """Train (or resume) phase ``cfg.train.phase`` on the packed shards ``input`` into the run
        folder ``output`` (a local or shared path); ``overwrite`` deletes ``output`` first. Returns
        the summary: input = kept = packs of ``input`` (training drops nothing), one shard, skipped
        when the phase had already finished. ``filesystem``: where ``input`` is (for counting its
        packs; the ranks open ``input`` by its path or URI). ``quiet``: no launcher or progress lines."""
        start = time.monotonic()
        out = Path(self._local_path(output))
        if overwrite and out.exists():
            shutil.rmtree(out)
        refuse_changed_train_config(output, cfg)
        n_packs = _count_packs(input, filesystem)
        already = (out / "summary.json").exists()
        phase = cfg.train.phase
        if not already:
            import torch

            nproc = cfg.train.nproc_per_node or (torch.cuda.device_count() or 1)
            if nproc == 1:
                _train_here(input, str(out), cfg, quiet)
            else:
                out.mkdir(parents=True, exist_ok=True)
                toml = out / TOML_FILE
                toml.write_text(to_toml(cfg))
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                       "-m", "trainer.train", "--input", input, "--output", str(out), "--config", str(toml)]
                if not quiet:
                    print(" ".join(cmd), file=sys.stderr, flush=True)
                rc, failure, log = _torchrun(cmd, out)
                if rc != 0:
                    raise RuntimeError(f"training phase {phase} failed{failure} (exit {rc}); its output is in "
                                       f"{log}; re-run the same command to resume from the newest checkpoint")
        if not quiet and (out / "summary.json").exists():
            print(summary_text(json.loads((out / "summary.json").read_text()), out), file=sys.stderr, flush=True)
        return StageSummary(stage=self.name, output=output, config_hash=config_hash(cfg.train.model_dump()),
                            shards=1, shards_skipped=int(already), input_rows=n_packs, kept_rows=n_packs,
                            dropped_rows=0, dropped_by_reason={}, seconds=round(time.monotonic() - start, 3))

    def pipeline_runs(self, cfg: Config, output: str) -> list[tuple[str, Config]]:
        """The (run folder, config) pairs the pipeline's train step runs ``run`` for, in order, each
        into a subfolder of the step folder ``output``: ``<output>/<train.phase>`` with a real model;
        the tiny model's demo chain ``<output>/1``, ``/1.5``, ``/2`` otherwise (each phase starts
        from the previous one's folder: ``train.init_from``)."""
        t = cfg.train
        if t.llm_path or t.init_from:
            return [(_join(output, t.phase), cfg)]
        runs, prev = [], ""
        for phase, steps in DEMO_CHAIN:
            folder = _join(output, phase)
            # one process, as before the launcher was shared: the demo's ~2 packs cannot feed a rank per GPU
            upd = {"phase": phase, "steps": steps, "init_from": prev, "checkpoint_interval": steps,
                   "keep_checkpoints": 1, "lr": t.lr or (1e-3 if phase == "1" else 1e-4), "nproc_per_node": 1}
            runs.append((folder, cfg.model_copy(update={"train": t.model_copy(update=upd)})))
            prev = folder
        return runs

    def check(self, cfg: Config, output: str) -> None:
        """Before the pipeline runs any step: a train step whose output is on object storage needs
        ``train.run_dir`` (checkpoints need a filesystem)."""
        if not _is_local(output) and not cfg.train.run_dir:
            raise ValueError(
                f"the train step writes checkpoints to a local or shared filesystem, but this run's "
                f"output is {output.rstrip('/')!r}; set train.run_dir (e.g. /shared/ovpipe-runs) or leave "
                "'train' out of pipeline.steps (--steps ingest,embed,assign,balance,caption,pack)"
            )

    def resolve_output(self, cfg: Config, output: str, run_id: str) -> str:
        """Where the pipeline's train step writes: ``output`` itself when it is a local path, else
        ``<train.run_dir>/<run_id>/train``."""
        self.check(cfg, output)
        if _is_local(output):
            return output
        return posixpath.join(cfg.train.run_dir, run_id, "train")

    @staticmethod
    def _local_path(output: str) -> str:
        if not _is_local(output):
            raise ValueError(f"a training run folder must be a local or shared path (checkpoints need a "
                             f"filesystem), not {output!r}; the pipeline puts it under train.run_dir")
        return Location.parse(output).path


def refuse_changed_train_config(output: str, cfg: Config) -> None:
    """A finished run folder (``summary.json``) written with another training config is refused,
    like a stage output of another config (``OutputConflict``), naming the keys that changed."""
    if not _is_local(output):
        return
    out = Path(Location.parse(output).path)
    saved = out / "train_config.json"
    if not (out / "summary.json").exists() or not saved.exists():
        return
    old_all = json.loads(saved.read_text())
    new = section_dump(cfg, ("train", "run"))  # the fields that change what training writes
    changed = [f"{section}.{k}: {old_all.get(section, {}).get(k)!r} -> {v!r}"
               for section, fields in new.items() for k, v in sorted(fields.items())
               if k in old_all.get(section, {}) and old_all[section][k] != v]
    if changed:
        raise OutputConflict(
            f"output {str(out)!r} is a finished training run of another config. Changed: {'; '.join(changed)}. "
            "Write to a new --output, or delete the old run folder to train it again.")


_EXCEPTION_LINE = re.compile(r"^(?:\[(?:rank|default)\d+\]:\s*)?([A-Za-z_][\w.]*(?:Error|Exception)\b.*)$")


def _torchrun(cmd: list[str], out: Path) -> tuple[int, str, str]:
    """Run torchrun; its stderr goes to ``<out>/_logs/torchrun-<time>.log`` and, without its
    tracebacks and its ChildFailedError report, to ours. Returns (exit code, " on rank R: <the
    failing rank's exception line>" or "", the log's path)."""
    from ovpipe.console import LOG_DIR, StderrFilter

    log_path = out / LOG_DIR / f"torchrun-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
        filt, report = StderrFilter(log, sys.stderr.fileno()), False
        for raw in iter(proc.stderr.readline, b""):
            log.write(raw)
            line = raw.decode("utf-8", "replace").rstrip("\n")
            lines.append(line)
            report = report or "ChildFailedError" in line
            if not report and filt.keep(line):
                print(line, file=sys.stderr, flush=True)
        rc = proc.wait()
    return rc, _failure(lines), str(log_path)


def _failure(lines: list[str]) -> str:
    """' on rank R: <exception line>' from torchrun's output: the root-cause rank of its report and
    the first exception line a rank printed (not torchrun's own)."""
    rank = ""
    if any("Root Cause" in s for s in lines):
        after = lines[next(i for i, s in enumerate(lines) if "Root Cause" in s):]
        found = next((re.search(r"rank\s*:\s*(\d+)", s) for s in after if re.search(r"rank\s*:\s*\d+", s)), None)
        rank = f" on rank {found.group(1)}" if found else ""
    for s in lines:
        m = _EXCEPTION_LINE.match(s.strip())
        if m and "ChildFailedError" not in s and "elastic" not in s:
            return f"{rank}: {m.group(1)}"
    return rank


def _train_here(input: str, output: str, cfg: Config, quiet: bool) -> None:
    """One process: train in this process, in a group of one, and leave no group behind."""
    import torch.distributed as dist

    had_group = dist.is_initialized()
    try:
        train(input, output, cfg, log=(lambda s: None) if quiet else (lambda s: print(s, file=sys.stderr)),
              quiet=quiet)
    finally:
        if not had_group and dist.is_initialized():
            dist.destroy_process_group()


def _count_packs(input: str, filesystem) -> int:
    return sum(PackStream(Location.parse(input, filesystem)).num_rows)


def _is_local(path: str) -> bool:
    """A local (or shared, mounted) path, told from an object-store URI without opening it."""
    return "://" not in path or path.startswith("file://")


def _join(folder: str, name: str) -> str:
    """A phase's run folder under ``folder``: absolute when local (it is another phase's init_from)."""
    if not _is_local(folder):
        return posixpath.join(folder, name)
    return os.path.abspath(os.path.join(folder.removeprefix("file://"), name))
