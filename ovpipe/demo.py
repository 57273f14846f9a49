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
        # a seeded random 64-d open_clip model (curation/embed.py TINY_MODELS): no download
        tiny = e.model_copy(update={"model": "ovpipe-tiny-clip", "pretrained": "random", "batch_size": 32})
        cfg = cfg.model_copy(update={"embed": tiny})
    b = cfg.balance
    if not (b.target or b.fraction or b.threshold):  # keep half of the demo images
        cfg = cfg.model_copy(update={"balance": b.model_copy(update={"fraction": 0.5})})
    c = cfg.caption
    if c.backend == "concepts" and c.concepts_top_k == 3:
        # a tiny random embedding model gives many images the same top-3 concepts; naming all 5
        # keeps more pseudo-captions distinct, so fewer demo samples end as duplicate captions
        cfg = cfg.model_copy(update={"caption": c.model_copy(update={"concepts_top_k": 5})})
    p = cfg.pack
    if p.buckets == 16:  # the production default: with the demo's ~90 captions, 16 buckets would
        # leave every pack nearly empty; 2 buckets fill about two 8K packs
        cfg = cfg.model_copy(update={"pack": p.model_copy(update={"buckets": 2})})
    return cfg


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
