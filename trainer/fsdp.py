"""Parallelism, applied by small functions (torchtitan style): process group, FSDP2, activation
checkpointing.

Reads: a built ``VisionLanguageModel`` (trainer/model.py). Writes: nothing; it wraps the model in
place. ``fully_shard`` goes on every transformer block (``model.blocks()``: the ViT blocks, then
the LLM decoder layers), then on the root, which holds the rest (patch embedding, projector,
token embedding, final norm, lm_head: tied embeddings stay in one FSDP group).

Mixed precision: on CUDA, bf16 parameters for compute with fp32 gradient reduction (the sharded
master weights and AdamW state stay fp32); on CPU everything is fp32.

Gradient reduction sums over ranks instead of averaging (divide factor 1): the loss of every rank
is already divided by the loss-token count of ALL ranks and micro-batches (trainer/train.py), so
a sum gives exactly the gradient of the global mean loss.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.nn as nn


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group torchrun (or Ray Train) set up the environment for; a plain
    ``python -m trainer.train`` runs as a group of one. NCCL on CUDA, gloo on CPU."""
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout = datetime.timedelta(minutes=30)
        if all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
            dist.init_process_group(backend, timeout=timeout)  # torchrun / Ray Train set these
        else:
            # A plain process: a group of one on a fresh port. The environment is left alone, so
            # a port chosen here never leaks into later runs or child processes (which would then
            # find it taken).
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                    world_size=1, timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mixed_precision(device: torch.device, precision: str = "auto"):
    """``MixedPrecisionPolicy`` for ``fully_shard``: bf16 compute / fp32 reduce on CUDA, or None (fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise ValueError(f"precision {precision!r} needs CUDA; on CPU use 'fp32' or 'auto'")
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass (memory for compute)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing as _apply,
        checkpoint_wrapper,
    )

    blocks = set(map(id, model.blocks()))
    _apply(model, checkpoint_wrapper_fn=checkpoint_wrapper, check_fn=lambda m: id(m) in blocks)


def apply_fsdp(model: nn.Module, device: torch.device, precision: str = "auto",
               reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` every block, then the root; gradients summed over ranks (see module doc)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    mp = mixed_precision(device, precision)
    if mp is not None:
        kwargs["mp_policy"] = mp
    for block in model.blocks():
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip the reduce-scatter on all but the last micro-batch of a step (gradient accumulation)."""
    model.set_requires_gradient_sync(enabled)


def all_reduce_sum(value: float | int, device: torch.device) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())
