"""Embed stage on a Ray Data actor pool vs a plain loop of the same model's forward.

Model: open_clip ViT-B-32 with random weights (no download), CPU, fp32. Input: N synthetic JPEGs
(ingested first, not timed). The plain loop gets the images already decoded and preprocessed by
the model's own transform and runs forward passes of the same batch size with the same number of
torch threads; the stage fetches by reference, decodes in Ray Data CPU tasks, embeds in ONE actor
with that many threads, and commits Parquet shards. Start-up (Ray Data plan, actor start, model
load, first batch) is reported separately: steady images/s counts the rows of every actor batch
after the first, over the time from the first batch finishing to the last (pipeline gaps count). Prints one JSON line last; headline_ratio = stage steady images/s / loop
images/s (target >= 0.85).

    python benchmarks/embed.py [--images 96] [--batch 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_raw(folder: str, n: int, per_shard: int) -> None:
    import pyarrow as pa
    from PIL import Image

    from ovpipe.core.shards import Location, write_table

    rng = np.random.default_rng(0)
    for s in range(0, n, per_shard):
        images = []
        for i in range(s, min(s + per_shard, n)):
            w, h = int(rng.integers(200, 400)), int(rng.integers(200, 400))
            arr = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
            img = Image.fromarray(arr).resize((w, h), Image.BILINEAR)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=85)
            images.append(buf.getvalue())
        write_table(Location.parse(os.path.join(folder, f"part-{s // per_shard:05d}.parquet")),
                    pa.table({"image": images, "text": [f"image {i}" for i in range(s, s + len(images))]}))


def plain_loop(raw: str, batch: int, threads: int) -> dict:
    """The alternative: decoded tensors in memory, `model.encode_image` over fixed batches."""
    import open_clip
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    preprocess = open_clip.image_transform(model.visual.image_size, is_train=False)
    images = [b for p in sorted(os.listdir(raw)) for b in pq.read_table(os.path.join(raw, p))["image"].to_pylist()]
    x = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
    with torch.inference_mode():
        model.encode_image(x[:batch])  # warm-up, as the actor's first batch is in start-up
        start = time.perf_counter()
        for i in range(0, len(x), batch):
            torch.nn.functional.normalize(model.encode_image(x[i:i + batch]), dim=-1)
        secs = time.perf_counter() - start
    return {"images": len(x), "seconds": round(secs, 3), "images_per_s": round(len(x) / secs, 3)}


def plain_loop_process(raw: str, batch: int, threads: int) -> dict:
    """The loop in a fresh process started with OMP_NUM_THREADS = threads, as Ray starts actors:
    torch.set_num_threads() after start-up leaves OpenMP's pool as it was and ran 2x slower here."""
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--loop-only", raw, "--batch", str(batch),
                          "--threads", str(threads)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ray_stage(raw: str, work: str, batch: int, threads: int) -> dict:
    import ray

    from curation.embed import EmbedStage
    from curation.ingest import IngestStage
    from ovpipe.config import load_config
    from ovpipe.core.stage import run_stage

    ray.init(num_cpus=threads + 1, include_dashboard=False, logging_level=logging.WARNING)
    cfg = load_config(overrides=[
        "embed.model=ViT-B-32", "embed.pretrained=random", f"embed.batch_size={batch}",
        "embed.pool_size=1", f"embed.num_cpus_per_actor={threads}", "embed.decode_rows=16",
        "embed.device=cpu"])
    run_stage(IngestStage(), raw, os.path.join(work, "ingest"), cfg, quiet=True)
    stage = EmbedStage()
    start = time.perf_counter()
    summary = run_stage(stage, os.path.join(work, "ingest"), os.path.join(work, "embed"), cfg, quiet=True)
    total = time.perf_counter() - start
    ray.shutdown()
    timings = stage.timings
    return {"images": summary.kept_rows, "total_s": round(total, 3),
            "startup_s": round(timings["actor_startup_s"], 3),
            "steady_s": round(timings["actor_steady_s"], 3), "steady_images": timings["actor_steady_rows"],
            "steady_images_per_s": round(timings["actor_steady_rows_per_s"], 3),
            "end_to_end_images_per_s": round(summary.kept_rows / total, 3)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the loop and of the actor")
    ap.add_argument("--per-shard", type=int, default=32)
    ap.add_argument("--json", default="")
    ap.add_argument("--loop-only", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.loop_only:
        print(json.dumps(plain_loop(args.loop_only, args.batch, args.threads)))
        return {}
    with tempfile.TemporaryDirectory(prefix="ovpipe-embed-bench-") as work:
        raw = os.path.join(work, "raw")
        make_raw(raw, args.images, args.per_shard)
        print(f"[embed bench] ViT-B-32 random, {args.images} images, batch {args.batch}, "
              f"{args.threads} thread(s); plain loop ...", file=sys.stderr, flush=True)
        loop = plain_loop_process(raw, args.batch, args.threads)
        print(f"[embed bench] loop: {loop}; Ray Data stage ...", file=sys.stderr, flush=True)
        stage = ray_stage(raw, work, args.batch, args.threads)
        print(f"[embed bench] stage: {stage}; plain loop again ...", file=sys.stderr, flush=True)
        loop_after = plain_loop_process(raw, args.batch, args.threads)  # the machine is shared: bracket the stage
    loop_rate = (loop["images_per_s"] + loop_after["images_per_s"]) / 2
    out = {"benchmark": "embed", "model": "ViT-B-32 (random)", "device": "cpu", "threads": args.threads,
           "batch": args.batch, "loop_before": loop, "loop_after": loop_after,
           "loop_images_per_s": round(loop_rate, 3), "stage": stage,
           "headline": "Ray Data embed stage steady images/s / plain forward loop images/s (target >= 0.85)",
           "headline_ratio": round(stage["steady_images_per_s"] / loop_rate, 3),
           "end_to_end_ratio": round(stage["end_to_end_images_per_s"] / loop_rate, 3)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
