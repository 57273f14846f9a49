"""GPU check of the whole embed stage: ``ovpipe`` ingest, then embed, on a local Ray with every CPU
and the GPU, with the real MetaCLIP-H/14 architecture (open_clip ``ViT-H-14-quickgelu``, random
weights: ``embed.pretrained=random``) over 20,000 synthetic JPEGs of 256-512 px; nothing is
downloaded. Needs the project's dependencies (ray[data], open_clip, torch with CUDA).

1. Writes the images as Parquet shards (random content, so ingest's exact dedup keeps every one).
2. The model's own forward rate: the same model, built by the stage's ``load_model`` in the
   precision the actor resolves (bf16 on CUDA), passes of ``embed.batch_size`` random inputs
   already on the GPU, after warm-up; also the actor's per-batch path (``Embedder.embed``: uint8
   pixels on the host -> normalise -> copy -> forward -> float16 back) as a diagnostic, since the
   actor does that work serially with the GPU. And one CPU's decode rate (the stage's
   ``decode_image``) times the decode CPUs: a steady rate above that estimate was fed by images
   decoded while the actor loaded its model, not by decode keeping pace.
3. Ingest, then the embed stage through ``run_stage`` with ``--set``-style overrides, timed by the
   stage's own figures (``run_embed_pipeline``'s timings): steady images/s counts actor batches after
   the first (Ray Data start, actor start and model load excluded); end-to-end is kept rows over
   the stage's whole wall time.

Prints a table, then one JSON line: headline_ratio = stage steady images/s / forward images/s
(goal >= 0.85) and the stage's images/s (goal >= 1,150). ``--dry-run``: the tiny model on CPU over
a few hundred images, to check this script. Without --dry-run and without CUDA it exits with code 2.

    python scripts/gpu_check_embed_stage.py [--images 20000] [--batch 256] [--set embed.decode_rows=128]
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import logging
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GOAL_RATIO, GOAL_IMAGES_PER_S = 0.85, 1150.0  # issue 15: per H200, MetaCLIP-H/14


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny model, a few hundred images, CPU")
    ap.add_argument("--images", type=int, help="synthetic images (default 20000; dry run 240)")
    ap.add_argument("--per-shard", type=int, help="images per input shard (default 250; dry run 40)")
    ap.add_argument("--batch", type=int, help="embed.batch_size (default 256; dry run 16)")
    ap.add_argument("--actor-cpus", type=float,
                    help="embed.num_cpus_per_actor, also the actor's torch threads for its host-side "
                         "normalisation (default 4; dry run 1); the other CPUs decode")
    ap.add_argument("--iters", type=int, help="timed forward passes (default 20; dry run 3)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="more config overrides for ingest and embed (e.g. embed.decode_rows=128)")
    args = ap.parse_args(argv)
    full = {"images": 20_000, "per_shard": 250, "batch": 256, "actor_cpus": 4.0, "iters": 20}
    dry = {"images": 240, "per_shard": 40, "batch": 16, "actor_cpus": 1.0, "iters": 3}
    for k, v in (dry if args.dry_run else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


# ------------------------------------------------------------------------------------- images


def write_shard(job: tuple[str, int, int, int]) -> int:
    """One Parquet shard of JPEGs (quality 90, 256-512 px a side). A coarse random grid upscaled
    bilinearly: smooth like a photo (a photo's JPEG size and decode cost, not white noise's), and
    random, so no two images share bytes."""
    import pyarrow as pa
    from PIL import Image

    from ovpipe.core.shards import Location, write_table

    path, shard, start, n = job
    rng = np.random.default_rng(shard)
    images = []
    for _ in range(n):
        w, h = (int(v) for v in rng.integers(256, 513, 2))
        grid = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        img = Image.fromarray(grid).resize((w, h), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
    write_table(Location.parse(path), pa.table({"image": pa.array(images, pa.binary()),
                                                "text": [f"synthetic image {start + i}" for i in range(n)]}))
    return sum(map(len, images))


def make_images(folder: str, n: int, per_shard: int, procs: int) -> int:
    """n images in shards of per_shard, written by `procs` processes; returns their encoded bytes."""
    jobs = [(os.path.join(folder, f"part-{s:05d}.parquet"), s, start, min(per_shard, n - start))
            for s, start in enumerate(range(0, n, per_shard))]
    if procs <= 1:
        return sum(map(write_shard, jobs))
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(procs) as pool:  # spawn: no forked torch/CUDA state
        return sum(pool.imap_unordered(write_shard, jobs))


# ------------------------------------------------------------------------------------ forward


def sync(torch, device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_forward(spec, batch: int, device: str, iters: int, threads: float) -> dict:
    """The model's own rate (random inputs already on the device, in the model's dtype) and the
    actor's per-batch path (Embedder.embed on uint8 host pixels), with the actor's model, precision,
    batch size and thread count. Embedder is what EmbedActor wraps."""
    import torch

    from curation.embed import Embedder, preprocess_config

    embedder = Embedder(spec, batch, device, threads)
    model, dtype = embedder.model, embedder.dtype
    h, w = preprocess_config(spec)["size"]
    x = torch.randn(batch, 3, h, w, device=device, dtype=dtype)

    def forward():  # Embedder._forward without the (here no-op) copy to the device
        with torch.inference_mode():
            return torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)

    for _ in range(3):  # warm-up: cuBLAS/cuDNN heuristics, the caching allocator
        forward()
    sync(torch, device)
    t = time.perf_counter()
    for _ in range(iters):
        forward()
    sync(torch, device)
    fwd = batch * iters / (time.perf_counter() - t)

    pixels = np.random.default_rng(0).integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
    embedder.embed(pixels)  # warm-up
    t = time.perf_counter()
    for _ in range(max(iters // 2, 1)):
        embedder.embed(pixels)  # returns float16 on the host: synchronised
    path = batch * max(iters // 2, 1) / (time.perf_counter() - t)
    out = {"forward_images_per_s": fwd, "actor_path_images_per_s": path, "dtype": str(dtype).replace("torch.", ""),
           "batch": embedder.batch, "dim": embedder.dim,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0}
    return out  # the model is freed here; the caller empties the CUDA cache


def bench_decode(raw: str, spec, max_pixels: int) -> float:
    """Images/s ONE CPU decodes as the stage's decode tasks do (probe, decode, the model's PIL
    transform), over the first input shard. Times the decode CPUs it estimates the stage's decode
    capacity: the actor starts after decode (model load), so the images decoded meanwhile queue up,
    and a steady rate above that capacity was fed from that queue, not by decode keeping pace."""
    import pyarrow.parquet as pq

    from curation.embed import decode_image, preprocess_config, split_transform

    pil, _, _ = split_transform(preprocess_config(spec))
    images = pq.read_table(os.path.join(raw, sorted(os.listdir(raw))[0]), columns=["image"])["image"].to_pylist()
    t = time.perf_counter()
    for data in images:
        decode_image(data, pil, max_pixels)
    return len(images) / (time.perf_counter() - t)


# -------------------------------------------------------------------------------------- stage


def run_stages(raw: str, work: str, overrides: list[str], device: str) -> dict:
    """ingest, then embed, through run_stage (what `ovpipe ingest` / `ovpipe embed --set ...` run)."""
    import pyarrow.parquet as pq
    import ray

    from curation.embed import EMBEDDING, EmbedStage
    from curation.ingest import IngestStage
    from ovpipe.config import load_config
    from ovpipe.core.shards import DATA_DIR
    from ovpipe.core.stage import run_stage

    cfg = load_config(overrides=overrides)
    # ensure_ray's own start, plus num_gpus: if Ray's GPU detection missed the device, the pool
    # would fall back to CPU actors and run ViT-H on the CPU for hours instead of failing.
    gpus = 1 if device == "cuda" else 0
    ray.init(address="local", num_cpus=cfg.ray.num_cpus or None, num_gpus=gpus, include_dashboard=False,
             logging_level=logging.WARNING)
    try:
        t = time.perf_counter()
        ingest = run_stage(IngestStage(), raw, os.path.join(work, "ingest"), cfg, quiet=True)
        ingest_s = time.perf_counter() - t
        print(f"  ingest: {ingest.kept_rows:,} rows in {ingest.shards} shards, {ingest_s:.1f} s; embed ...",
              file=sys.stderr, flush=True)
        stage = EmbedStage()  # as `ovpipe embed` runs it; its timings are kept on it
        out = os.path.join(work, "embed")
        t = time.perf_counter()
        embed = run_stage(stage, os.path.join(work, "ingest"), out, cfg, quiet=True)
        total = time.perf_counter() - t
        cluster = ray.cluster_resources()
    finally:
        ray.shutdown()
    timings = stage.timings
    data = os.path.join(out, DATA_DIR)
    dim = pq.read_schema(os.path.join(data, sorted(os.listdir(data))[0])).field(EMBEDDING).type.list_size
    return {"ingested": ingest.kept_rows, "ingest_dropped": ingest.dropped_rows, "ingest_s": ingest_s,
            "embedded": embed.kept_rows, "embed_dropped": embed.dropped_rows, "shards": embed.shards,
            "dim": dim, "total_s": total, "startup_s": timings.get("actor_startup_s", float("nan")),
            "steady_s": timings.get("actor_steady_s", float("nan")),
            "steady_images": timings.get("actor_steady_rows", 0),
            "steady_images_per_s": timings.get("actor_steady_rows_per_s", float("nan")),
            "end_to_end_images_per_s": embed.kept_rows / total,
            "ray_cpus": cluster.get("CPU", 0), "ray_gpus": cluster.get("GPU", 0)}


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def main(argv=None) -> int:
    args = parse(argv)
    missing = [m for m in ("torch", "ray", "open_clip", "torchvision") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"gpu_check_embed_stage: {', '.join(missing)} not installed; this check runs the project's embed "
              "stage and needs the project's dependencies", file=sys.stderr)
        return 2
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check_embed_stage: no CUDA device visible to torch; run it on a CUDA machine, or pass "
              "--dry-run for a CPU smoke test.", file=sys.stderr)
        return 2
    from curation.embed import ModelSpec
    from ovpipe.config import load_config

    device = "cpu" if args.dry_run else "cuda"
    model = "ovpipe-tiny-clip" if args.dry_run else "ViT-H-14-quickgelu"
    overrides = [f"embed.model={model}", "embed.pretrained=random", f"embed.device={device}",
                 f"embed.batch_size={args.batch}", f"embed.num_cpus_per_actor={args.actor_cpus}"]
    overrides += ["ray.num_cpus=2"] if args.dry_run else []  # a shared CI machine: stay small
    overrides += args.overrides
    cfg = load_config(overrides=overrides)  # validated before any work; the stage loads the same
    spec = ModelSpec.from_config(cfg.embed)
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run)"
    print(f"gpu_check_embed_stage on {gpu}: {model} ({spec.pretrained}), {args.images:,} images, "
          f"batch {cfg.embed.batch_size}, {cfg.embed.num_cpus_per_actor:g} CPU(s) per actor, "
          f"decode_rows {cfg.embed.decode_rows}", flush=True)

    with tempfile.TemporaryDirectory(prefix="ovpipe-gpu-embed-") as work:
        raw = os.path.join(work, "raw")
        t = time.perf_counter()
        procs = 1 if args.dry_run else (os.cpu_count() or 1)
        nbytes = make_images(raw, args.images, args.per_shard, procs)
        print(f"  images: {args.images:,} JPEGs, {nbytes / args.images / 1024:.0f} KiB each on average, "
              f"{time.perf_counter() - t:.1f} s; forward ...", file=sys.stderr, flush=True)
        fwd = bench_forward(spec, cfg.embed.batch_size, device, args.iters, cfg.embed.num_cpus_per_actor)
        if device == "cuda":
            torch.cuda.empty_cache()  # the stage's actor gets the whole GPU
        decode_per_cpu = bench_decode(raw, spec, cfg.embed.max_pixels)
        stage = run_stages(raw, work, overrides, device)

    if stage["embedded"] != args.images or stage["dim"] != fwd["dim"]:
        print(f"gpu_check_embed_stage: the stage embedded {stage['embedded']} of {args.images} images "
              f"(dim {stage['dim']}, model {fwd['dim']})", file=sys.stderr)
        return 1
    rate = stage["steady_images_per_s"]
    ratio = rate / fwd["forward_images_per_s"]
    decode_cpus = stage["ray_cpus"] - cfg.embed.num_cpus_per_actor  # pool of one actor (one GPU)
    decode_capacity = decode_per_cpu * decode_cpus
    print(table([
        ("model forward (random input on device)", f"{fwd['forward_images_per_s']:,.1f} images/s  "
                                                   f"({fwd['dtype']}, batch {fwd['batch']})"),
        ("actor path (uint8 host -> Embedder.embed)", f"{fwd['actor_path_images_per_s']:,.1f} images/s"),
        ("embed stage, steady", f"{rate:,.1f} images/s  ({stage['steady_images']:,} images in "
                                f"{stage['steady_s']:.1f} s)"),
        ("embed stage, end to end", f"{stage['end_to_end_images_per_s']:,.1f} images/s  "
                                    f"({stage['embedded']:,} in {stage['total_s']:.1f} s, start-up "
                                    f"{stage['startup_s']:.1f} s)"),
        ("decode, estimated", f"{decode_capacity:,.1f} images/s  ({decode_per_cpu:,.1f} per CPU x "
                              f"{decode_cpus:g} CPUs)"),
        ("stage steady / forward", f"{ratio:.3f}  (goal >= {GOAL_RATIO})"),
    ]))
    if decode_capacity < rate:
        print("  note: the stage's steady rate is above the estimated decode capacity: images decoded "
              "during the actor's start-up fed it; more --images would show decode's own pace", flush=True)
    print(json.dumps({
        "check": "gpu_check_embed_stage", "device": gpu, "dry_run": args.dry_run,
        "model": f"{model} ({spec.pretrained})", "dtype": fwd["dtype"], "batch": fwd["batch"],
        "images": args.images, "image_sizes_px": [256, 512], "shards": stage["shards"],
        "ray_cpus": stage["ray_cpus"], "ray_gpus": stage["ray_gpus"],
        "num_cpus_per_actor": cfg.embed.num_cpus_per_actor, "decode_rows": cfg.embed.decode_rows,
        "overrides": overrides,
        "stage_images_per_s": round(rate, 1),
        "stage_end_to_end_images_per_s": round(stage["end_to_end_images_per_s"], 1),
        "stage_startup_s": round(stage["startup_s"], 2), "stage_total_s": round(stage["total_s"], 2),
        "ingest_s": round(stage["ingest_s"], 2),
        "forward_images_per_s": round(fwd["forward_images_per_s"], 1),
        "actor_path_images_per_s": round(fwd["actor_path_images_per_s"], 1),
        "forward_peak_gib": round(fwd["peak_gib"], 2),
        "decode_images_per_s_per_cpu": round(decode_per_cpu, 1), "decode_cpus": decode_cpus,
        "decode_capacity_images_per_s": round(decode_capacity, 1),
        "headline": "embed stage steady images/s / the model's forward images/s on the same device",
        "headline_ratio": round(ratio, 3), "goal_ratio": GOAL_RATIO, "goal_images_per_s": GOAL_IMAGES_PER_S,
        "meets_goal_ratio": ratio >= GOAL_RATIO, "meets_goal_images_per_s": rate >= GOAL_IMAGES_PER_S,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
