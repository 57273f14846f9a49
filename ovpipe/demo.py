# Developers: read CONTRIBUTING.md first (shared tree: small targeted edits only in this file).
"""`ovpipe demo`: make seeded demo data and run every stage that exists on it, on a local Ray.

Layout under --out: raw/ (demo input), then one folder per stage, in DEMO_STEPS order. Each
step reads the committed output of the step it names as its input. Re-running resumes;
--overwrite starts again.

To add a stage to the demo, append one DemoStep: the folder it reads, the folder it writes, and
a function that runs it (usually ``run_stage(YourStage(), input, output, cfg, ...)``) and
returns its StageSummary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ovpipe.config import Config
from ovpipe.demo_data import make_demo_data
from ovpipe.shards import Location
from ovpipe.stage import StageSummary, run_stage


@dataclass(frozen=True)
class DemoStep:
    name: str
    reads: str  # folder under --out
    writes: str  # folder under --out
    run: Callable[[str, str, Config, bool], StageSummary]  # (input, output, cfg, overwrite)


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
    """Keeps half of the demo images unless the config sets a size; prints where the report is."""
    from curation.balance import BalanceStage

    b = cfg.balance
    if not (b.target or b.fraction or b.threshold):
        cfg = cfg.model_copy(update={"balance": b.model_copy(update={"fraction": 0.5})})
    return BalanceStage().run(input, output, cfg, overwrite=overwrite)


def _caption(input: str, output: str, cfg: Config, overwrite: bool) -> StageSummary:
    """The embedded captioner: pseudo-captions from each image's top-k concepts (English and
    Chinese), unless the config points at a server (caption.backend = "openai")."""
    from curation.caption import CaptionRunner

    return CaptionRunner().run(input, output, cfg, overwrite=overwrite)


def _pack(input: str, output: str, cfg: Config, overwrite: bool) -> StageSummary:
    from packing.stage import PackRunner

    return PackRunner().run(input, output, cfg, overwrite=overwrite)


DEMO_STEPS: list[DemoStep] = [
    DemoStep("ingest", "raw", "ingest", _ingest),
    DemoStep("embed", "ingest", "embed", _embed),
    DemoStep("assign", "embed", "assign", _assign),
    DemoStep("balance", "assign", "balance", _balance),
    DemoStep("caption", "balance", "caption", _caption),
    DemoStep("pack", "caption", "pack", _pack),
]


def demo_config(cfg: Config) -> Config:
    """The demo's own defaults (tiny models, small vocabularies) on top of the user's config."""
    e = cfg.embed
    if (e.model, e.pretrained) == ("ViT-H-14-quickgelu", "metaclip_fullcc"):  # the production default
        # a seeded random 64-d open_clip model (curation/embed.py TINY_MODELS): no download
        tiny = e.model_copy(update={"model": "ovpipe-tiny-clip", "pretrained": "random", "batch_size": 32})
        cfg = cfg.model_copy(update={"embed": tiny})
    return cfg


def run_demo(out: str, n: int, cfg: Config, overwrite: bool = False) -> list[StageSummary]:
    root = Location.parse(out)
    raw = root.join("raw")
    if overwrite:
        raw.delete_tree()
    if not raw.exists():
        make_demo_data(raw.path, n=n, seed=cfg.run.seed)
    cfg = demo_config(cfg)
    summaries = []
    for step in DEMO_STEPS:
        summaries.append(step.run(root.join(step.reads).path, root.join(step.writes).path, cfg, overwrite))
    return summaries
