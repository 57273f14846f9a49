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
(``summary.json`` present) is left as it is.

The pipeline's train step (``pipeline_runs``): with a real model (``train.llm_path`` or
``train.init_from``) it trains the configured ``train.phase`` into ``<step folder>/<phase>``; with the
tiny seeded model (demo, tests) it chains a few steps of phases 1, 1.5 and 2, each from the previous
phase's run folder, into ``<step folder>/1``, ``/1.5`` and ``/2``.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ovpipe.core.config import config_hash, to_toml
from ovpipe.core.shards import Location
from ovpipe.core.stage import Stage, StageSummary
from trainer.data import PackStream
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
                rc = subprocess.call(cmd)
                if rc != 0:
                    raise RuntimeError(f"training phase {phase} failed (exit {rc}); rerun to resume")
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
