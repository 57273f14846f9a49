"""Attention that never crosses samples (LLM) or images (ViT).

Two places need isolation:

* The LLM sees a packed row: several samples concatenated, position ids restarting per sample.
  On transformers 5.x + Qwen3, restarting position ids alone isolates samples only when no mask is
  passed AND ``use_cache=False`` (transformers then detects the packing from the position ids); with
  the config's default ``use_cache=True`` or an all-ones 2D mask, samples silently attend across
  boundaries. So we never rely on that detection: every LLM call gets ``use_cache=False`` and an
  explicit isolation argument:

  - ``"per_sample"`` (default on CPU, and on CUDA without flash-attn): our attention function
    ``per_sample_attention`` registered with transformers as ``PER_SAMPLE_IMPL``, fed the same
    ``cu_seq_lens_q/k`` as flash varlen. It cuts each row at the sample boundaries and runs one
    unmasked causal SDPA call (``is_causal=True``: the fast kernel) per sample, so a pack costs
    sum(n_i^2) attention, not L^2 through the masked math kernel.
  - ``"sdpa"``: a 4D block-diagonal causal boolean mask ``(B, 1, L, L)`` (True = may attend),
    which transformers passes to ``scaled_dot_product_attention`` unchanged. Works on CPU and GPU;
    kept selectable (``attn_implementation="sdpa"``) as the reference path.
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

LLM_ATTENTION_PATHS = ("per_sample", "sdpa", "flash_varlen")
PER_SAMPLE_IMPL = "ovpipe_per_sample"  # the name transformers knows per_sample_attention by


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
    if path == "per_sample":
        # The mask factory returns None for an implementation it does not know, so nothing dense is
        # built; the boundaries reach per_sample_attention as cu_seq_lens_q/k.
        cu = cu_seqlens_from_segments(segment_ids)
        return {"attention_mask": None, "use_cache": False, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu}
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


def per_sample_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask, dropout: float = 0.0, scaling: float | None = None,
                         cu_seq_lens_q: torch.Tensor | None = None, cu_seq_lens_k: torch.Tensor | None = None,
                         **kwargs):
    """transformers attention function (registered as ``PER_SAMPLE_IMPL``): causal attention within
    each sample of each packed row, one unmasked ``is_causal`` SDPA call per sample.

    query (B, H, L, D), key/value (B, H_kv, L, D); ``cu_seq_lens_q``: sample starts of the batch
    flattened row by row (``cu_seqlens_from_segments``), so no sample crosses a row. Without it, a
    plain call (one sequence per row: position ids absent or 0..L-1) is one causal sequence per row;
    restarting position ids without boundaries raise rather than guess. Returns the output as
    (B, L, H, D) like transformers' own functions, and no attention weights."""
    B, H, L, _ = query.shape
    if attention_mask is not None:
        raise ValueError("per-sample attention takes no attention mask: the samples are cut by cu_seq_lens_q")
    if key.shape[2] != L:
        raise ValueError("per-sample attention is for training (no KV cache): query and key lengths differ")
    if cu_seq_lens_q is None:
        pos = kwargs.get("position_ids")
        if pos is not None and not torch.equal(pos, torch.arange(L, device=pos.device).expand_as(pos)):
            raise ValueError("per-sample attention got restarting position ids but no packing boundaries "
                             "(cu_seq_lens_q); call the model through VisionLanguageModel, which passes "
                             "llm_isolation_kwargs(..., 'per_sample')")
        cu_seq_lens_q = torch.arange(0, B * L + 1, L)  # one sequence per row
    if cu_seq_lens_k is not None and not torch.equal(cu_seq_lens_k, cu_seq_lens_q):
        raise ValueError("per-sample attention is self-attention: cu_seq_lens_k must equal cu_seq_lens_q")
    bounds = cu_seq_lens_q.tolist()
    if bounds[0] != 0 or bounds[-1] != B * L:
        raise ValueError(f"cu_seq_lens_q spans [{bounds[0]}, {bounds[-1]}), the batch has {B}x{L} tokens")
    gqa = key.shape[1] != H
    dropout_p = dropout if module is None or module.training else 0.0
    rows = [[] for _ in range(B)]
    for start, end in zip(bounds[:-1], bounds[1:]):
        b, s = divmod(start, L)
        e = end - b * L
        if e > L:
            raise ValueError(f"sample [{start}, {end}) of cu_seq_lens_q crosses the end of row {b}")
        # Unmasked + is_causal: SDPA's fast kernel; tokens of other samples are simply not there.
        rows[b].append(F.scaled_dot_product_attention(
            query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
            dropout_p=dropout_p, is_causal=True, scale=scaling, enable_gqa=gqa))
    out = torch.cat([torch.cat(r, dim=2) for r in rows], dim=0)
    return out.transpose(1, 2).contiguous(), None


def register_per_sample_attention() -> None:
    """Make ``PER_SAMPLE_IMPL`` a valid ``attn_implementation`` for transformers models."""
    from transformers import AttentionInterface

    AttentionInterface.register(PER_SAMPLE_IMPL, per_sample_attention)


register_per_sample_attention()


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
