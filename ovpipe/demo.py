"""`ovpipe demo`: make seeded demo data and run every pipeline step on it, on a local Ray.

Layout under --out: raw/ (demo input), then one folder per registered stage (ovpipe/registry.py)
(ingest/, embed/, ..., pack/), flat: the demo has one version. Each step reads the committed
output of the step before it. Re-running resumes; --overwrite starts again.
"""

from __future__ import annotations

from ovpipe.config import Config
from ovpipe.demo_data import make_demo_data
from ovpipe.pipeline import run_pipeline
from ovpipe.core.shards import Location


def demo_config(cfg: Config) -> Config:
    """The demo's own defaults (tiny models, small vocabularies) on top of the user's config."""
    e = cfg.embed
    if (e.model, e.pretrained) == ("ViT-H-14-quickgelu", "metaclip_fullcc"):  # the production default
        # the built-in stand-in (curation/thumbnail.py): a seeded random projection of a thumbnail,
        # no download; unlike a tiny random CLIP it keeps distinct images apart (concepts spread)
        tiny = e.model_copy(update={"model": "ovpipe-thumbnail", "pretrained": "random", "batch_size": 32})
        cfg = cfg.model_copy(update={"embed": tiny})
    b = cfg.balance
    if not (b.target or b.fraction or b.threshold):  # keep half of the demo images
        cfg = cfg.model_copy(update={"balance": b.model_copy(update={"fraction": 0.5})})
    c = cfg.caption
    if c.backend == "concepts" and c.concepts_top_k == 3:
        # a tiny random embedding model gives many images the same top-3 concepts; naming all 5
        # keeps more pseudo-captions distinct, so fewer demo samples end as duplicate captions
        cfg = cfg.model_copy(update={"caption": c.model_copy(update={"concepts_top_k": 5})})
    return cfg  # pack.buckets = 0 (the default) picks one bucket for the demo's few captions


def run_demo(out: str, n: int, cfg: Config, overwrite: bool = False) -> dict:
    """Returns the run manifest (ovpipe.pipeline.run_pipeline)."""
    root = Location.parse(out)
    raw = root.join("raw")
    if overwrite:
        raw.delete_tree()
    if not raw.exists():
        make_demo_data(raw.path, n=n, seed=cfg.run.seed)
    return run_pipeline(raw.uri(), root.uri(), demo_config(cfg), run_id="demo", overwrite=overwrite,
                        versioned=False)
