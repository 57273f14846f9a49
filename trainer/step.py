"""One optimizer step, and a single-process CPU training loop over packed shards.

Reads: packed Parquet shards (trainer/data.py). Writes: nothing but metrics (one JSON line per
step on stdout when run as ``python -m trainer.step``); checkpoints and FSDP2 are issue 9's.

Loss normalisation: the summed token cross-entropy of all micro-batches is divided by the number
of loss tokens over all micro-batches (and, under data parallelism, all ranks: pass
``loss_tokens`` already all-reduced), so a pack's weight does not depend on how packs were grouped.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from trainer.collate import PackCollator, to_device
from trainer.data import PackStream
from trainer.model import build_model, tiny_llm_config, tiny_vision_config
from trainer.params import get_phase, param_groups


def train_step(model, optimizer, micro_batches: list[dict], loss_tokens: int | None = None,
               grad_clip: float = 1.0) -> dict:
    """Forward/backward every micro-batch, clip, step. ``loss_tokens``: the global loss-token
    count of this step (default: the local one)."""
    total = loss_tokens if loss_tokens is not None else sum(mb["num_loss_tokens"] for mb in micro_batches)
    total = max(int(total), 1)
    loss_sum = 0.0
    for mb in micro_batches:
        out = model(mb)
        (out["loss_sum"] / total).backward()
        loss_sum += float(out["loss_sum"].detach())
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_sum / total, "loss_tokens": total, "grad_norm": float(grad_norm)}


def make_optimizer(model, phase: str, lr: dict[str, float], weight_decay: float = 0.0):
    """AdamW over the parameter groups of training phase ``phase`` (trainer/params.py)."""
    return torch.optim.AdamW(param_groups(model, phase, lr, weight_decay), betas=(0.9, 0.95), eps=1e-8)


DEFAULT_LR = {"vision": 2e-6, "projector": 1e-3, "llm": 1e-5}


def train_cpu(packs: str, steps: int, phase: str = "1", micro_batch: int = 1, grad_accum: int = 1,
              seed: int = 0, lr: dict[str, float] | None = None, model=None, max_len: int = 8192,
              log=print) -> list[dict]:
    """Single-process training of one training phase on CPU (tiny seeded model unless one is
    given). ``max_len``: the pack stage's pack.max_len."""
    torch.manual_seed(seed)
    model = model or build_model(tiny_vision_config(), tiny_llm_config(), seed=seed)
    model.train()
    optimizer = make_optimizer(model, phase, lr or DEFAULT_LR)
    collate = PackCollator(phase=get_phase(phase), max_len=max_len)
    stream = PackStream(packs, seed=seed)
    batches = stream.batches(micro_batch)
    history = []
    for step in range(steps):
        t0 = time.perf_counter()
        mbs = [to_device(collate(next(batches)), "cpu") for _ in range(grad_accum)]
        m = train_step(model, optimizer, mbs)
        m.update(step=step, seconds=round(time.perf_counter() - t0, 3), data=stream.state_dict())
        history.append(m)
        log(json.dumps(m))
    return history


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="single-process CPU training on packed shards (tiny model)")
    ap.add_argument("--packs", required=True, help="pack stage output folder (or Parquet shards)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--phase", "--stage", dest="phase", default="1", choices=["1", "1.5", "2"],
                    help="training phase (--stage: its old name)")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-len", type=int, default=8192, help="the pack stage's pack.max_len")
    a = ap.parse_args(argv)
    train_cpu(a.packs, a.steps, a.phase, a.micro_batch, seed=a.seed, max_len=a.max_len)


if __name__ == "__main__":
    main()
