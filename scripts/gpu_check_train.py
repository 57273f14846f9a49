"""Trainer GPU check: FSDP2, bf16, a ~0.5B-parameter model, packed 8K-token sequences; prints
tokens/s and MFU as one JSON line. Needs CUDA: without it, it says so and exits 2.

    python scripts/gpu_check_train.py [--steps 8] [--seq 8192] [--ac]
    torchrun --nproc-per-node 8 scripts/gpu_check_train.py      # all GPUs of a node

Model: Qwen3 with hidden 896, 24 layers, 14 heads / 2 KV heads, head_dim 64, MLP 4864, vocabulary
151,936 (~0.49B, Qwen2.5-0.5B's shape) + a 6-block 512-wide ViT. Data: seeded packs of 8192 tokens
(log-normal sample lengths, one 448x448 image = 256 LLM tokens in each pack's first sample),
attention isolated per sample (flash varlen when flash-attn is installed, else the SDPA block mask).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_pack(rng, seq: int, vocab: int, image_pad: int) -> dict:
    lens = []
    while sum(lens) < seq:
        lens.append(int(np.clip(rng.lognormal(np.log(600), 0.8), 300, 4096)))
    lens[-1] -= sum(lens) - seq
    if lens[-1] < 2:
        lens[-2] += lens.pop()
    ids = torch.from_numpy(rng.integers(0, 150000, seq))
    ids[2:2 + 256] = image_pad  # the first sample's image: 16 x 16 merged tokens
    targets = torch.roll(ids, -1).clone()
    targets[targets == image_pad] = -100
    pos, seg, t = torch.zeros(seq, dtype=torch.long), torch.zeros(seq, dtype=torch.long), 0
    for j, n in enumerate(lens):
        pos[t:t + n] = torch.arange(n)
        seg[t:t + n] = j
        targets[t + n - 1] = -100
        t += n
    return {"input_ids": ids[None], "targets": targets[None], "position_ids": pos[None], "segment_ids": seg[None],
            "pixel_values": torch.from_numpy(rng.standard_normal((1024, 3 * 14 * 14)).astype(np.float32)),
            "grid_hw": torch.tensor([[32, 32]]), "num_loss_tokens": int((targets != -100).sum()), "lens": lens}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--ac", action="store_true", help="activation checkpointing")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check_train: no CUDA device here; this check needs a GPU (bf16 FSDP2 training). "
              "Run it on a CUDA machine.", file=sys.stderr)
        return 2
    from transformers import Qwen3Config

    from trainer import fsdp
    from trainer.metrics import FlopCounter, peak_flops
    from trainer.model import IMAGE_PAD_ID, VisionConfig, build_model
    from trainer.step import make_optimizer
    from trainer.train import clip_and_step, forward_backward, keep_vision_in_graph

    rank, world, device = fsdp.init_distributed()
    llm = Qwen3Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, head_dim=64, max_position_embeddings=32768,
                      tie_word_embeddings=True, use_cache=False)
    model = build_model(VisionConfig(hidden_size=512, depth=6, num_heads=8, intermediate_size=2048), llm,
                        seed=0, attn_implementation="auto")
    n_params = sum(p.numel() for p in model.parameters())
    flops = FlopCounter(model)
    model = model.to(device)
    keep_vision_in_graph(model)
    if a.ac:
        fsdp.apply_activation_checkpointing(model)
    fsdp.apply_fsdp(model, device, "bf16")
    opt = make_optimizer(model, "2", {"vision": 1e-5, "projector": 1e-5, "llm": 1e-5})
    rng = np.random.default_rng(rank)
    times, tokens, step_flops, losses = [], 0, 0.0, []
    for step in range(a.warmup + a.steps):
        pack = make_pack(rng, a.seq, 151936, IMAGE_PAD_ID)
        lens = pack.pop("lens")
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in pack.items()}
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        total = fsdp.all_reduce_sum(batch["num_loss_tokens"], device)
        loss = forward_backward(model, [batch], total, sharded=True)
        clip_and_step(opt, 1.0)
        torch.cuda.synchronize()
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
            tokens += a.seq
            step_flops += flops.step_flops(lens, batch["num_loss_tokens"], [1024])
            losses.append(fsdp.all_reduce_sum(loss, device) / total)
    sec = sum(times)
    peak = peak_flops()
    result = {"check": "trainer", "device": torch.cuda.get_device_name(), "world_size": world,
              "params": n_params, "seq": a.seq, "precision": "bf16 params / fp32 reduce",
              "attention": model.llm_attention, "activation_checkpointing": a.ac, "steps": a.steps,
              "tokens_per_s_per_gpu": round(tokens / sec, 1), "step_seconds": round(sec / a.steps, 3),
              "mfu": round(step_flops / sec / peak, 4) if peak else None,
              "peak_tflops": peak / 1e12 if peak else None,
              "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
              "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)]}
    if rank == 0:
        print(json.dumps(result))
    ok = all(np.isfinite(losses))
    torch.distributed.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
