"""The vision-language model: RICE-ViT-style vision tower -> MLP projector -> Qwen3 LLM.

One readable file (nanoGPT style). Shapes, for a micro-batch of B packed rows of length L:

* ``pixel_values``  (N, 3*14*14) float: every 14x14 patch of every image of the micro-batch, image
  after image, each image's patches in 2x2-merge order (the four patches that form one LLM token
  are consecutive; see trainer/collate.py ``patchify``).
* ``grid_hw``       (n_images, 2) long: each image's size in patches (h/14, w/14), both even.
* ``input_ids``     (B, L): chat-template tokens with each image expanded to
  ``<|vision_start|>`` + (h/28)(w/28) ``<|image_pad|>`` + ``<|vision_end|>``.
* ``position_ids``  (B, L): restart at 0 for every sample.
* ``segment_ids``   (B, L): which sample of the row each token belongs to (padding: its own id).
* ``targets``       (B, L): the token to predict at each position, already shifted by one and
  set to -100 wherever there is no loss (see collate.py); so no shift happens here and no target
  ever crosses a sample boundary.

Vision tower (RICE-ViT / MLCD style, as in LLaVA-OneVision-1.5): a bias-free conv patch embedding,
one learned CLS token per image (with its own rotary angle) used only inside the ViT, a pre-norm
LayerNorm, pre-norm blocks (LayerNorm -> MHA with 2D rotary embedding -> LayerNorm -> GELU MLP),
attention per image (never across images; trainer/attention.py). The CLS outputs are dropped.

Projector ("merger"): LayerNorm per patch -> concatenate each 2x2 patch group (4C) ->
Linear(4C, 4C) -> GELU -> Linear(4C, LLM hidden).

LLM: transformers' ``Qwen3ForCausalLM``; image features replace the ``<|image_pad|>`` embeddings
(a count mismatch raises). Blocks are addressable for FSDP2 ``fully_shard`` per block:
``model.vision.blocks`` (ViT) and ``model.llm.model.layers`` (decoder layers); see ``blocks()``.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer import attention
from trainer.checkpoint_convert import load_rice_vit

IMAGE_PAD_ID = 151655  # <|image_pad|> in Qwen2-VL / Qwen3 vocabularies
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # RICE-ViT uses OpenAI CLIP normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    """RICE-ViT-L/14 defaults (rice-vit-large-patch14-560)."""

    hidden_size: int = 1024
    depth: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    patch_size: int = 14
    spatial_merge_size: int = 2
    in_channels: int = 3
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# ----------------------------------------------------------------------------- vision tower


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (N, heads, head_dim); cos/sin: (N, head_dim). Rotation in float32 like the reference."""
    dtype = x.dtype
    x = x.float()
    out = x * cos[:, None] + rotate_half(x) * sin[:, None]
    return out.to(dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, cu_seqlens, cos, sin, use_flash=False):
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention.vision_attention(q, k, v, cu_seqlens, use_flash=use_flash)
        return self.proj(out.reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cu_seqlens, cos, sin, use_flash=False):
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin, use_flash)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        p = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, kernel_size=p, stride=p, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        p, c = self.cfg.patch_size, self.cfg.in_channels
        x = patches.view(-1, c, p, p).to(self.proj.weight.dtype)
        return self.proj(x).view(-1, self.cfg.hidden_size)


def patch_positions(grid_hw: torch.Tensor, merge: int) -> torch.Tensor:
    """(row, col) of every patch, in the 2x2-merge order the collator lays patches out in."""
    pos = []
    for h, w in grid_hw.tolist():
        rows = torch.arange(h)[:, None].expand(h, w)
        cols = torch.arange(w)[None, :].expand(h, w)
        rc = torch.stack([rows, cols], -1).view(h // merge, merge, w // merge, merge, 2)
        pos.append(rc.permute(0, 2, 1, 3, 4).reshape(-1, 2))
    return torch.cat(pos).to(grid_hw.device)


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.patch_embed = PatchEmbed(cfg)
        self.class_embedding = nn.Parameter(torch.randn(cfg.hidden_size) * cfg.hidden_size**-0.5)
        self.class_pos_emb = nn.Parameter(torch.randn(1, hd // 2))  # rotary angles of the CLS token
        self.pre_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        # 2D rope: head_dim/4 frequencies for rows and the same for columns.
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd // 2, 2, dtype=torch.float) / (hd // 2))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rope_angles(self, grid_hw: torch.Tensor) -> torch.Tensor:
        """Per token (CLS first, then the image's patches) rotary angles, (N + n_images, head_dim/2)."""
        pos = patch_positions(grid_hw, self.cfg.spatial_merge_size).float()
        angles = (pos[..., None] * self.inv_freq).flatten(1)  # (N, head_dim/2): [rows | cols]
        out, start = [], 0
        for h, w in grid_hw.tolist():
            out += [self.class_pos_emb.float(), angles[start:start + h * w]]
            start += h * w
        return torch.cat(out)

    def forward(self, pixel_values: torch.Tensor, grid_hw: torch.Tensor, use_flash: bool = False):
        """(N, 3*p*p) patches -> (N, C) patch features (CLS tokens dropped)."""
        x = self.patch_embed(pixel_values)
        sizes = (grid_hw[:, 0] * grid_hw[:, 1]).tolist()
        if sum(sizes) != x.shape[0]:
            raise ValueError(f"grid_hw says {sum(sizes)} patches, pixel_values has {x.shape[0]}")
        cls = self.class_embedding.to(x.dtype)[None]
        pieces = []
        for chunk in x.split(sizes):
            pieces += [cls, chunk]
        x = self.pre_layernorm(torch.cat(pieces))
        lens = torch.tensor([s + 1 for s in sizes])
        cu_seqlens = F.pad(lens.cumsum(0), (1, 0)).to(x.device)
        angles = self.rope_angles(grid_hw)
        emb = torch.cat([angles, angles], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        for block in self.blocks:
            x = block(x, cu_seqlens, cos, sin, use_flash)
        keep = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        keep[cu_seqlens[:-1]] = False  # drop each image's CLS token
        return x[keep]


class Projector(nn.Module):
    """LayerNorm -> merge 2x2 patches (4C) -> Linear(4C, 4C) -> GELU -> Linear(4C, D)."""

    def __init__(self, vision_hidden: int, llm_hidden: int, merge: int = 2, eps: float = 1e-5):
        super().__init__()
        self.merged = vision_hidden * merge * merge
        self.ln_q = nn.LayerNorm(vision_hidden, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(self.merged, self.merged), nn.GELU(),
                                 nn.Linear(self.merged, llm_hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.merged))


# ----------------------------------------------------------------------------- the whole model


class VisionLanguageModel(nn.Module):
    def __init__(self, vision_cfg: VisionConfig, llm: nn.Module, image_pad_id: int = IMAGE_PAD_ID):
        super().__init__()
        self.vision = VisionTower(vision_cfg)
        self.projector = Projector(vision_cfg.hidden_size, llm.config.hidden_size,
                                   vision_cfg.spatial_merge_size, vision_cfg.layer_norm_eps)
        self.llm = llm
        self.image_pad_id = image_pad_id

    @property
    def llm_attention(self) -> str:
        """The isolation path follows the LLM's attention implementation, so the isolation
        argument is always one that implementation honours (an SDPA model ignores cu_seqlens)."""
        impl = self.llm.config._attn_implementation
        if impl == "flash_attention_2":
            return "flash_varlen"
        if impl == attention.PER_SAMPLE_IMPL:
            return "per_sample"
        if impl == "sdpa":
            return "sdpa"
        raise ValueError(f"LLM attention implementation {impl!r} is not supported for packed training; "
                         f"build the model with attn_implementation 'auto', 'per_sample', 'sdpa' or "
                         "'flash_attention_2'")

    def blocks(self) -> list[nn.Module]:
        """The units to wrap with FSDP2 ``fully_shard``: ViT blocks, then LLM decoder layers."""
        return [*self.vision.blocks, *self.llm.model.layers]

    def image_features(self, pixel_values, grid_hw):
        use_flash = pixel_values.is_cuda and attention.flash_attn_available()
        return self.projector(self.vision(pixel_values, grid_hw, use_flash=use_flash))

    def embed(self, input_ids, pixel_values=None, grid_hw=None):
        embeds = self.llm.get_input_embeddings()(input_ids)
        is_pad = input_ids == self.image_pad_id
        n_pads = int(is_pad.sum())
        if pixel_values is None or pixel_values.numel() == 0:
            if n_pads:
                raise ValueError(f"{n_pads} <|image_pad|> tokens but no images in the batch")
            return embeds
        feats = self.image_features(pixel_values, grid_hw)
        if feats.shape[0] != n_pads:
            raise ValueError(f"image features ({feats.shape[0]} tokens from grid_hw {grid_hw.tolist()}) "
                             f"!= <|image_pad|> tokens in input_ids ({n_pads})")
        return embeds.masked_scatter(is_pad[..., None], feats.to(embeds.dtype))

    def hidden_states(self, batch: dict) -> torch.Tensor:
        embeds = self.embed(batch["input_ids"], batch.get("pixel_values"), batch.get("grid_hw"))
        iso = attention.llm_isolation_kwargs(batch["segment_ids"], self.llm_attention)
        out = self.llm.model(inputs_embeds=embeds, position_ids=batch["position_ids"], **iso)
        return out.last_hidden_state

    def forward(self, batch: dict, return_logits: bool = False) -> dict:
        """Returns ``loss_sum`` (summed token cross-entropy, float32) and ``num_loss_tokens``; the
        caller divides by the loss-token count over all ranks and micro-batches. Logits are only
        computed at loss positions unless ``return_logits``."""
        hidden = self.hidden_states(batch)
        targets = batch["targets"]
        at = targets != -100
        logits_at = self.llm.lm_head(hidden[at]).float()
        out = {"loss_sum": F.cross_entropy(logits_at, targets[at], reduction="sum"),
               "num_loss_tokens": int(at.sum())}
        if return_logits:
            out["logits"] = self.llm.lm_head(hidden).float()
        return out


# ----------------------------------------------------------------------------- building


def tiny_llm_config(vocab_size: int = 151936, seed_hidden: int = 64, layers: int = 2):
    """A tiny Qwen3 config for tests and the demo (real vocabulary size, so real token ids work)."""
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab_size, hidden_size=seed_hidden, intermediate_size=2 * seed_hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, max_position_embeddings=8192, tie_word_embeddings=True,
                       use_cache=False, attn_implementation="sdpa")


def tiny_vision_config() -> VisionConfig:
    return VisionConfig(hidden_size=32, depth=2, num_heads=2, intermediate_size=64)


def build_model(vision_cfg: VisionConfig, llm_config=None, llm_path: str | Path | None = None,
                vision_checkpoint: str | Path | None = None, seed: int = 0,
                attn_implementation: str = "auto") -> VisionLanguageModel:
    """Build the model. The LLM comes from a local Hugging Face Qwen3 folder (``llm_path``) or,
    for tests and the demo, from ``llm_config`` with seeded random weights; the vision tower from
    a local RICE-ViT checkpoint (trainer/checkpoint_convert.py) or seeded random weights. The
    projector is always new (phase 1 trains it). ``attn_implementation`` (the LLM's isolation path,
    trainer/attention.py): "auto" (flash varlen when flash-attn and CUDA are there, else per-sample),
    "per_sample" (one causal SDPA call per sample; CPU or GPU), "sdpa" (dense block mask; CPU or
    GPU) or "flash_attention_2" (varlen, needs flash-attn and CUDA)."""
    from transformers import Qwen3ForCausalLM

    if attn_implementation == "auto":
        attn_implementation = "flash_attention_2" if attention.flash_attn_available() else "per_sample"
    if attn_implementation == "per_sample":
        attn_implementation = attention.PER_SAMPLE_IMPL
    torch.manual_seed(seed)
    if llm_path is not None:
        if not sys.stderr.isatty():  # a bar redrawn into a log file is noise; our own lines report progress
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        llm = Qwen3ForCausalLM.from_pretrained(str(llm_path), attn_implementation=attn_implementation,
                                               dtype=torch.float32)
    elif llm_config is not None:
        llm_config._attn_implementation = attn_implementation
        llm = Qwen3ForCausalLM(llm_config)
    else:
        raise ValueError("give llm_path (a local Hugging Face Qwen3 folder) or llm_config")
    llm.config.use_cache = False
    model = VisionLanguageModel(vision_cfg, llm)
    _ = model.llm_attention  # fail early on an unsupported implementation
    if vision_checkpoint is not None:
        load_rice_vit(model, vision_checkpoint)
    return model


def vision_config_dict(cfg: VisionConfig) -> dict:
    return asdict(cfg)
