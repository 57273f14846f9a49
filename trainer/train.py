"""FSDP2 training of one training phase on packed shards: `torchrun -m trainer.train --input PACKED
--output RUN_DIR` (the torchrun child that trainer/launch.py starts; ray_jobs/train.py runs the
same ``train()`` under Ray Train).

Reads: the pack stage's output folder(s) (trainer/data.py; the collator's system prompt, max_len
and tokenizer come from the pack stage's ``_manifest/_stage.json``), an optional held-out packed
folder (``train.val_input``), and for phases 1.5 / 2 the previous phase's run folder
(``train.init_from``: its ``export/``). Writes, under RUN_DIR::

    checkpoints/  step-N/ (DCP) + latest      trainer/checkpoint.py: resume after a kill
    metrics.jsonl, loss.png                   trainer/metrics.py
    export/                                   trainer/export.py: safetensors + configs
    train_config.json, summary.json           the resolved config; counts and timings of the run

The loop (one optimizer step): every rank takes ``grad_accum`` micro-batches of ``micro_batch``
packs, the loss-token count is all-reduced, each micro-batch's summed cross-entropy is divided by
that global count and back-propagated (gradients reduce-scattered with SUM, on the last
micro-batch only), then clip, AdamW, warmup + cosine schedule. Phase 2 mixtures: micro-batch i of
step s comes from dataset j drawn with the mixture weights from rng(seed, s, i), the same on every
rank, so all ranks stay in lock step.

Re-running with the same RUN_DIR resumes from ``checkpoints/latest``; a finished run (summary.json
present) is left as it is.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ovpipe.config import Config, load_config
from ovpipe.core.shards import MANIFEST_DIR, STAGE_FILE, Location, read_json
from packing.config import PackSection
from packing.tokenizer import load_tokenizer
from trainer import fsdp
from trainer.checkpoint import Checkpointer
from trainer.collate import PackCollator, to_device
from trainer.data import PackStream
from trainer.export import export_model, load_exported
from trainer.metrics import FlopCounter, Metrics, peak_flops, summary_text
from trainer.model import VisionConfig, build_model, tiny_llm_config, tiny_vision_config
from trainer.params import get_phase
from trainer.step import make_optimizer

PHASE_LR = {"1": 1e-4, "1.5": 1e-5, "2": 1e-5}  # reference quick-start recipes
KILL_ENV = "OVPIPE_TRAIN_KILL_AFTER_STEP"  # tests: SIGKILL every rank right after this step


# ----------------------------------------------------------------------------- building blocks


def build(cfg: Config):
    """The model for this phase: the previous phase's export, a local Qwen3 (+ RICE-ViT), or tiny."""
    t = cfg.train
    if t.phase != "1" and not t.init_from:
        raise ValueError(f"training phase {t.phase} starts from the previous phase: set train.init_from to "
                         "its run folder")
    if t.init_from:
        export = Path(t.init_from) / "export"
        return load_exported(export if export.exists() else t.init_from, t.attn_implementation)
    if t.llm_path:
        return build_model(tiny_vision_config() if not t.vision_checkpoint else _rice_vit_config(),
                           llm_path=t.llm_path, vision_checkpoint=t.vision_checkpoint or None,
                           seed=cfg.run.seed, attn_implementation=t.attn_implementation)
    llm = tiny_llm_config(seed_hidden=t.tiny_hidden, layers=t.tiny_layers)
    return build_model(tiny_vision_config(), llm, seed=cfg.run.seed, attn_implementation=t.attn_implementation)


def _rice_vit_config():
    return VisionConfig()  # RICE-ViT-L/14, the reference's tower


def warmup_cosine(optimizer, steps: int, warmup_ratio: float, min_lr_ratio: float):
    warmup = int(round(steps * warmup_ratio))

    def factor(step: int) -> float:  # step = optimizer steps done
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(steps - warmup, 1)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def pack_settings(root: str) -> dict[str, Any]:
    """system_prompt / max_len / tokenizer of the pack stage that wrote ``root`` (a local path or an
    object-store URI; defaults otherwise)."""
    header = Location.parse(root).join(MANIFEST_DIR, STAGE_FILE)
    pack = {}
    if header.exists():
        pack = read_json(header).get("payload", {}).get("config", {}).get("pack", {})
    d = PackSection()
    return {"system_prompt": pack.get("system_prompt", d.system_prompt), "max_len": pack.get("max_len", d.max_len),
            "tokenizer": pack.get("tokenizer", d.tokenizer)}


class Mixture:
    """One PackStream per dataset; micro-batch i of step s comes from the dataset drawn by weight."""

    def __init__(self, roots: list[str], weights: list[float], rank: int, world: int, seed: int, micro_batch: int):
        if weights and len(weights) != len(roots):
            raise ValueError(f"{len(weights)} mixture weights for {len(roots)} datasets {roots}")
        w = np.asarray(weights or [1.0] * len(roots), dtype=float)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"mixture weights must be >= 0 with a positive sum: {weights}")
        self.p = w / w.sum()
        self.roots, self.seed, self.micro_batch = roots, seed, micro_batch
        self.streams = [PackStream(r, rank, world, seed) for r in roots]
        self._iters: list = [None] * len(roots)

    def reset_iterators(self) -> None:  # after load_state_dict: iterate from the restored positions
        self._iters = [None] * len(self.streams)

    def next(self, step: int, micro: int) -> tuple[int, list[dict]]:
        j = 0 if len(self.streams) == 1 else int(np.random.default_rng([self.seed, step, micro]).choice(
            len(self.streams), p=self.p))
        if self._iters[j] is None:
            self._iters[j] = self.streams[j].batches(self.micro_batch)
        return j, next(self._iters[j])


def keep_vision_in_graph(model) -> None:
    """A micro-batch without images still runs the ViT and projector (on a 28x28 dummy, weight 0):
    under FSDP2 every rank must all-gather / reduce-scatter the same blocks, and in phase 1 the
    loss must depend on the projector. Registered before fully_shard, so it runs inside the
    root's forward (its parameters still unsharded)."""
    def hook(module, args, output):
        batch = args[0]
        if batch.get("pixel_values") is None or batch["pixel_values"].numel() == 0:
            dev = batch["input_ids"].device
            patch = module.vision.cfg.patch_size
            dummy = torch.zeros(4, 3 * patch * patch, device=dev)
            feats = module.image_features(dummy, torch.tensor([[2, 2]], device=dev))
            output["loss_sum"] = output["loss_sum"] + 0.0 * feats.float().sum()
        return output

    model.register_forward_hook(hook)


def forward_backward(model, micro_batches: list[dict], global_loss_tokens: float, sharded: bool) -> float:
    """Backward of sum(loss_sum) / global_loss_tokens; returns this rank's summed loss."""
    loss_sum = 0.0
    for i, mb in enumerate(micro_batches):
        if sharded:
            fsdp.set_gradient_sync(model, i == len(micro_batches) - 1)
        out = model(mb)
        (out["loss_sum"] / global_loss_tokens).backward()
        loss_sum += float(out["loss_sum"].detach())
    return loss_sum


def clip_and_step(optimizer, grad_clip: float) -> float:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


@torch.no_grad()
def validate(model, val: PackStream, collate, n_packs: int, micro_batch: int, device) -> float:
    model.eval()
    loss_sum, tokens = 0.0, 0
    packs = []
    for pack in val.epoch(0):
        packs.append(pack)
        if len(packs) == n_packs:
            break
    for i in range(0, len(packs), micro_batch):
        out = model(to_device(collate(packs[i:i + micro_batch]), device))
        loss_sum += float(out["loss_sum"])
        tokens += out["num_loss_tokens"]
    model.train()
    loss_sum, tokens = fsdp.all_reduce_sum(loss_sum, device), fsdp.all_reduce_sum(tokens, device)
    return loss_sum / max(tokens, 1)


# ----------------------------------------------------------------------------- the run


def train(input: str, output: str, cfg: Config, log=print, *, quiet: bool = False) -> dict[str, Any]:
    """Run (or resume) one training phase in this process's group. Returns summary.json's content.
    ``log``: resume messages; ``quiet``: no progress lines either."""
    t = cfg.train
    rank, world, device = fsdp.init_distributed()
    run_dir = Path(output)
    if (run_dir / "summary.json").exists():
        return json.loads((run_dir / "summary.json").read_text())
    start = time.monotonic()
    phase = get_phase(t.phase)
    seed = cfg.run.seed
    torch.manual_seed(seed + rank)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "train_config.json").write_text(json.dumps(cfg.model_dump(), indent=1))

    model = build(cfg).to(device)
    flops = FlopCounter(model)
    model.train()
    keep_vision_in_graph(model)
    if t.activation_checkpointing:
        fsdp.apply_activation_checkpointing(model)
    fsdp.apply_fsdp(model, device, t.precision)
    lr = t.lr or PHASE_LR[phase.name]
    optimizer = make_optimizer(model, phase.name, {"vision": t.vision_lr or lr, "projector": lr, "llm": lr},
                               t.weight_decay)
    scheduler = warmup_cosine(optimizer, t.steps, t.warmup_ratio, t.min_lr_ratio)

    roots = [input, *t.datasets]
    data = Mixture(roots, t.mixture_weights, rank, world, seed, t.micro_batch)
    settings = [pack_settings(r) for r in roots]
    collators = [PackCollator(load_tokenizer(s["tokenizer"]), phase=phase, max_len=s["max_len"],
                              system_prompt=s["system_prompt"]) for s in settings]
    val = PackStream(t.val_input, rank, world, seed) if t.val_input else None
    val_collate = PackCollator(load_tokenizer(pack_settings(t.val_input)["tokenizer"]), phase=phase,
                               **{k: v for k, v in pack_settings(t.val_input).items() if k != "tokenizer"}) if val else None

    ckpt = Checkpointer(run_dir / "checkpoints", keep=t.keep_checkpoints)
    done = 0
    latest = ckpt.latest()
    if latest is not None:
        done = ckpt.load(latest, model, optimizer, scheduler, data.streams)["step"]
        data.reset_iterators()
        if rank == 0:
            log(f"resumed from {latest} (step {done})")
    metrics = Metrics(run_dir, t.steps, start_step=done, enabled=rank == 0,
                      progress_interval_s=cfg.run.progress_interval_s, log=(lambda s: None) if quiet else None,
                      phase=phase.name)
    peak = peak_flops(t.peak_tflops)
    kill_after = int(os.environ.get(KILL_ENV, "-1"))

    for step in range(done, t.steps):
        t0 = time.perf_counter()
        picked = [data.next(step, i) for i in range(t.grad_accum)]
        batches = [to_device(collators[j](packs), device) for j, packs in picked]
        lens = [int(n) for _, packs in picked for p in packs for n in p["sample_lens"]]
        patches = [int(h) * int(w) // 196 for _, packs in picked for p in packs for h, w in p["image_hw"]]
        local = [sum(b["num_loss_tokens"] for b in batches), sum(lens),
                 sum(b["input_ids"].numel() for b in batches)]
        loss_tokens, eff_tokens, tokens = (fsdp.all_reduce_sum(v, device) for v in local)
        loss_sum = forward_backward(model, batches, max(loss_tokens, 1.0), sharded=True)
        lr_now = scheduler.get_last_lr()[0]
        grad_norm = clip_and_step(optimizer, t.grad_clip)
        scheduler.step()
        loss = fsdp.all_reduce_sum(loss_sum, device) / max(loss_tokens, 1.0)
        step_flops = fsdp.all_reduce_sum(flops.step_flops(lens, local[0], patches), device)
        seconds = time.perf_counter() - t0
        metrics.write({
            "step": step, "loss": loss, "lr": lr_now, "grad_norm": grad_norm, "loss_tokens": int(loss_tokens),
            "tokens": int(tokens), "effective_tokens": int(eff_tokens), "seconds": round(seconds, 4),
            "tokens_per_s": round(tokens / seconds, 1), "effective_tokens_per_s": round(eff_tokens / seconds, 1),
            "mfu": round(step_flops / seconds / (peak * world), 4) if peak else None,
            "datasets": [j for j, _ in picked]})
        last = step + 1 == t.steps
        if val is not None and ((t.val_interval and (step + 1) % t.val_interval == 0) or last):
            metrics.write({"step": step, "val_loss": validate(model, val, val_collate, t.val_packs,
                                                              t.micro_batch, device)})
        if (step + 1) % t.checkpoint_interval == 0 or last:
            ckpt.save(step + 1, model, optimizer, scheduler, data.streams, {"seed": seed, "phase": phase.name})
        if step == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    exported = None
    if t.export:
        exported = export_model(model, run_dir / "export", {"phase": phase.name, "run": str(run_dir)},
                                tokenizer=settings[0]["tokenizer"], system_prompt=settings[0]["system_prompt"])
    summary = {"phase": phase.name, "steps": t.steps, "resumed_from_step": done, "world_size": world,
               "inputs": roots, "packs_per_rank_per_epoch": [s.packs_per_epoch() for s in data.streams],
               "export": str(exported) if exported else None, "seconds": round(time.monotonic() - start, 3)}
    if rank == 0:
        recs = [r for r in metrics.records() if "loss" in r]
        summary["final_loss"] = recs[-1]["loss"] if recs else None
        metrics.plot()
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if dist.is_initialized():
        dist.barrier()
    return summary


# ----------------------------------------------------------------------------- entry point


def arg_parser(prog: str = "torchrun -m trainer.train") -> argparse.ArgumentParser:
    """The flags of the torchrun entry point (trainer/launch.py starts it with --config)."""
    ap = argparse.ArgumentParser(prog=prog, description="FSDP2 training on packed shards")
    ap.add_argument("--input", required=True, help="packed shards (the pack stage's output folder)")
    ap.add_argument("--output", required=True, help="run folder: checkpoints, metrics, export")
    ap.add_argument("--config", default=None, help="run config (TOML); the [train] section")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one config key, e.g. --set train.phase=1.5 (repeatable)")
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return arg_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    try:
        summary = train(args.input, args.output, cfg)
        if dist.get_rank() == 0:
            print(summary_text(summary, args.output))  # the numbers are in RUN_DIR/summary.json
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

