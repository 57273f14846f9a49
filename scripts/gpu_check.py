"""GPU check for the embed and assign stages; self-contained: needs torch, uses open_clip and
faiss when installed (no ray, no ovpipe import), random weights and data, nothing downloaded.

1. Image embedding throughput of a ViT-H/14-sized model (MetaCLIP-H/14's image tower: 32 layers,
   width 1280, patch 14, 224 px, 1024-d output) in bf16: open_clip's ViT-H-14-quickgelu with random
   weights when open_clip is installed, else an equivalent plain-torch ViT. A CUDA OOM halves the
   batch, as the stage does.
2. Top-k over 500K x 1024 unit concept vectors with each available backend: torch fp32 matmul +
   topk (ovpipe's `torch` backend), torch fp16 matmul, faiss-gpu flat IP with float16 storage and
   faiss-cpu when faiss is installed. Ids are compared with the torch fp32 result.

Prints a table, then one JSON line. `--dry-run` runs tiny sizes on CPU (no GPU needed) to check
the script itself; without --dry-run and without CUDA it exits with code 2 and says why.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def parse(argv=None):
    ap = argparse.ArgumentParser(description="ovpipe embed/assign GPU check")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU, to test this script")
    ap.add_argument("--batch", type=int, default=256, help="images per forward pass")
    ap.add_argument("--iters", type=int, default=20, help="timed forward passes")
    ap.add_argument("--concepts", type=int, default=500_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--queries", type=int, default=16384)
    ap.add_argument("--chunk", type=int, default=2048, help="queries per search call")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--no-open-clip", action="store_true", help="use the plain-torch ViT even if open_clip is here")
    return ap.parse_args(argv)


def plain_vit_h14(torch, width=1280, layers=32, heads=16, patch=14, size=224, out_dim=1024):
    """A ViT-H/14-shaped image tower in plain torch (pre-norm blocks, CLS token, projection)."""
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
            self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
            self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            x = x + self.proj(a.transpose(1, 2).reshape(b, n, width))
            return x + self.mlp(self.ln2(x))

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, width, patch, patch, bias=False)
            self.cls = nn.Parameter(torch.zeros(1, 1, width))
            self.pos = nn.Parameter(torch.zeros(1, (size // patch) ** 2 + 1, width))
            self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.head = nn.Linear(width, out_dim, bias=False)

        def forward(self, x):
            x = self.patch(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
            x = self.ln_pre(x)
            for blk in self.blocks:
                x = blk(x)
            return self.head(self.ln_post(x[:, 0]))

    return ViT()


def build_image_model(torch, args, device, dtype):
    if args.dry_run:
        return plain_vit_h14(torch, width=64, layers=2, heads=2, patch=16, size=64, out_dim=32), "tiny plain-torch ViT", 64
    if not args.no_open_clip:
        try:
            import open_clip

            torch.manual_seed(0)
            model = open_clip.create_model("ViT-H-14-quickgelu", pretrained=None)
            return model.visual, "open_clip ViT-H-14-quickgelu (random)", 224
        except ImportError:
            pass
    torch.manual_seed(0)
    return plain_vit_h14(torch), "plain-torch ViT-H/14 (random)", 224


def bench_embed(torch, args, device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, name, size = build_image_model(torch, args, device, dtype)
    model = model.to(device=device, dtype=dtype).eval()
    batch = args.batch if not args.dry_run else 4
    iters = args.iters if not args.dry_run else 2
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    while True:
        try:
            with torch.inference_mode():
                for _ in range(2):  # warm-up (cuDNN/cuBLAS heuristics, allocator)
                    model(x[:batch])
                sync(torch, device)
                start = time.perf_counter()
                for _ in range(iters):
                    torch.nn.functional.normalize(model(x[:batch]).float(), dim=-1)
                sync(torch, device)
                secs = time.perf_counter() - start
            break
        except oom:
            batch //= 2
            torch.cuda.empty_cache()
            if batch == 0:
                raise
            print(f"  CUDA OOM: batch halved to {batch}", file=sys.stderr)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    return {"model": name, "dtype": str(dtype).replace("torch.", ""), "batch": batch,
            "images_per_s": round(batch * iters / secs, 1), "peak_gib": round(mem, 2)}


def sync(torch, device):
    if device == "cuda":
        torch.cuda.synchronize()


def bench_topk(torch, args, device):
    n, d, nq = (args.concepts, args.dim, args.queries) if not args.dry_run else (5000, 64, 256)
    chunk, k = min(args.chunk, nq), args.k
    g = torch.Generator(device="cpu").manual_seed(0)
    concepts = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1).half()
    queries = torch.nn.functional.normalize(torch.randn(nq, d, generator=g), dim=-1).half()
    rows, ids = [], {}

    def run(name, search, setup_s):
        search(queries[:chunk])  # warm-up
        sync(torch, device)
        start = time.perf_counter()
        out = torch.cat([search(queries[i:i + chunk]) for i in range(0, nq, chunk)])
        sync(torch, device)
        secs = time.perf_counter() - start
        ids[name] = out.cpu()
        rows.append({"backend": name, "queries_per_s": round(nq / secs, 1), "setup_s": round(setup_s, 2)})

    t = time.perf_counter()
    c32 = concepts.float().to(device)
    run(f"torch fp32 ({device})", lambda q: torch.topk(q.float().to(device) @ c32.T, k, dim=1).indices,
        time.perf_counter() - t)
    if device == "cuda":
        c16 = concepts.to(device)
        run("torch fp16 (cuda)", lambda q: torch.topk(q.to(device) @ c16.T, k, dim=1).indices, 0.0)
        del c16
    try:
        import faiss
    except ImportError:
        faiss = None
        rows.append({"backend": "faiss", "queries_per_s": None, "note": "faiss not installed"})
    if faiss is not None:
        c_np = concepts.float().numpy()
        t = time.perf_counter()
        cpu_index = faiss.IndexFlatIP(d)
        cpu_index.add(c_np)
        setup = time.perf_counter() - t
        if device == "cuda" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            res = faiss.StandardGpuResources()
            opts = faiss.GpuClonerOptions()
            opts.useFloat16 = True
            t = time.perf_counter()
            gpu_index = faiss.index_cpu_to_gpu(res, 0, cpu_index, opts)
            run("faiss-gpu flat IP fp16", lambda q: torch.from_numpy(gpu_index.search(q.float().numpy(), k)[1]),
                time.perf_counter() - t)
        else:
            rows.append({"backend": "faiss-gpu", "queries_per_s": None, "note": "faiss has no GPUs here"})
        small = nq if args.dry_run else min(nq, 2048)  # faiss-cpu at 500K is slow: time a slice
        q_np = queries[:small].float().numpy()
        t0 = time.perf_counter()
        out = [torch.from_numpy(cpu_index.search(q_np[i:i + chunk], k)[1]) for i in range(0, small, chunk)]
        secs = time.perf_counter() - t0
        ids["faiss-cpu flat IP"] = torch.cat(out)
        rows.append({"backend": "faiss-cpu flat IP", "queries_per_s": round(small / secs, 1),
                     "setup_s": round(setup, 2), "note": f"{small} queries"})
    ref = ids[f"torch fp32 ({device})"]
    for r in rows:
        if r["backend"] in ids:
            got = ids[r["backend"]]
            same = (got == ref[:len(got)]).all(dim=1).float().mean().item()
            r["rows_equal_torch_fp32"] = round(same, 4)
    return {"concepts": n, "dim": d, "queries": nq, "k": k, "backends": rows}


def table(rows, headers):
    cells = [headers] + [[("" if r.get(h) is None else str(r.get(h))) for h in headers] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(headers))) for c in
                     [cells[0], ["-" * w for w in widths]] + cells[1:])


def main(argv=None) -> int:
    args = parse(argv)
    try:
        import torch
    except ImportError:
        print("gpu_check: torch is not installed", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch (torch.cuda.is_available() is False). This check "
              "measures GPU throughput; run it on a CUDA machine, or pass --dry-run for a CPU smoke test.",
              file=sys.stderr)
        return 2
    device = "cuda" if (torch.cuda.is_available() and not args.dry_run) else "cpu"
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run)"
    print(f"gpu_check on {gpu}; torch {torch.__version__}", flush=True)
    embed = bench_embed(torch, args, device)
    print("\nimage embedding (random weights, synthetic 224 px batches)")
    print(table([embed], ["model", "dtype", "batch", "images_per_s", "peak_gib"]))
    topk = bench_topk(torch, args, device)
    print(f"\ntop-{topk['k']} over {topk['concepts']:,} x {topk['dim']} concepts, {topk['queries']:,} queries")
    print(table(topk["backends"], ["backend", "queries_per_s", "setup_s", "rows_equal_torch_fp32", "note"]))
    print(json.dumps({"check": "gpu_check", "device": gpu, "dry_run": args.dry_run, "embed": embed, "topk": topk}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
