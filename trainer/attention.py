"""Attention that never crosses samples (LLM) or images (ViT).

Two places need isolation:

* The LLM sees a packed row: several samples concatenated, position ids restarting per sample.
  On transformers 5.x + Qwen3, restarting position ids alone isolates samples only when no mask is
  passed AND ``use_cache=False`` (transformers then detects the packing from the position ids); with
  the config's default ``use_cache=True`` or an all-ones 2D mask, samples silently attend across
  boundaries. So we never rely on that detection: every LLM call gets ``use_cache=False`` and an
  explicit isolation argument:

  - ``"sdpa"``: a 4D block-diagonal causal boolean mask ``(B, 1, L, L)`` (True = may attend),
    which transformers passes to ``scaled_dot_product_attention`` unchanged. Works on CPU and GPU.
  - ``"flash_varlen"``: flash-attn's varlen kernel through transformers' ``flash_attention_2``,
    fed ``cu_seq_lens_q/k`` + ``max_length_q/k`` explicitly (the whole batch flattened to one row).
    Only when flash-attn is installed and the model is on CUDA.

* The ViT sees all patches of all images of a micro-batch (up to ~32K patches for 8K-token packs):
  never one dense mask over them. ``vision_attention`` attends per image: a loop of unmasked SDPA
  calls over the image segments, or one varlen flash-attn call on GPU.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

LLM_ATTENTION_PATHS = ("sdpa", "flash_varlen")


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) segment ids -> (B, 1, L, L) bool mask: token i may attend to j iff j <= i and both
    are in the same segment. Padding must carry its own segment id so no row is empty."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    L = segment_ids.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=segment_ids.device).tril()
    return (same & causal)[:, None]


def cu_seqlens_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative sequence starts (int32, with a leading 0) of the batch flattened row by row;
    a new sequence starts at every change of segment id and at every row start."""
    flat = segment_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    L = segment_ids.shape[1]
    starts[::L] = True
    idx = torch.nonzero(starts).flatten()
    end = torch.tensor([flat.numel()], device=flat.device)
    return torch.cat([idx, end]).to(torch.int32)


def llm_isolation_kwargs(segment_ids: torch.Tensor, path: str) -> dict:
    """Keyword arguments for a transformers Qwen3 forward that isolate the packed samples."""
    if path == "sdpa":
        return {"attention_mask": block_causal_mask(segment_ids), "use_cache": False}
    if path == "flash_varlen":
        cu = cu_seqlens_from_segments(segment_ids)
        max_len = int((cu[1:] - cu[:-1]).max())
        return {
            "attention_mask": None,
            "use_cache": False,
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": max_len,
            "max_length_k": max_len,
        }
    raise ValueError(f"unknown LLM attention path {path!r}; expected one of {LLM_ATTENTION_PATHS}")


def vision_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     use_flash: bool = False) -> torch.Tensor:
    """Bidirectional attention within each image. q, k, v: (N, heads, head_dim) for all patches
    of all images concatenated; cu_seqlens: (n_images + 1,) image starts. Returns (N, heads, head_dim)."""
    if use_flash:
        from flash_attn import flash_attn_varlen_func

        cu = cu_seqlens.to(torch.int32)
        max_len = int((cu[1:] - cu[:-1]).max())
        return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=False)
    out = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        # (1, heads, n, head_dim): one image, no mask needed.
        qi, ki, vi = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
        out.append(F.scaled_dot_product_attention(qi, ki, vi)[0].transpose(0, 1))
    return torch.cat(out, dim=0)
