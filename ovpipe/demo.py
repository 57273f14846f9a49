"""`ovpipe demo`: make seeded demo data and run every stage that exists on it, on a local Ray.

Layout under --out: raw/ (demo input), then one folder per stage (ingest/, ...). Each stage
reads the previous stage's committed output. Re-running resumes; --overwrite starts again.
"""

from __future__ import annotations

from ovpipe.config import Config
from ovpipe.demo_data import make_demo_data
from ovpipe.shards import Location
from ovpipe.stage import StageSummary, run_stage


def run_demo(out: str, n: int, cfg: Config, overwrite: bool = False) -> list[StageSummary]:
    from curation.ingest import IngestStage

    root = Location.parse(out)
    raw = root.join("raw")
    if overwrite:
        raw.delete_tree()
    if not raw.exists():
        make_demo_data(raw.path, n=n, seed=cfg.run.seed)
    summaries = []
    summaries.append(run_stage(IngestStage(), raw.path, root.join("ingest").path, cfg, overwrite=overwrite))
    return summaries
