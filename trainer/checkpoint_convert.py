"""Load a RICE-ViT vision tower (and, if present, its merger) from a local checkpoint.

Accepted inputs (a file or a folder holding ``model.safetensors`` / ``*.safetensors`` shards, or
``pytorch_model.bin`` read with ``weights_only=True``; never unpickled otherwise):

1. Hugging Face MLCD / RICE-ViT format (``DeepGlint-AI/rice-vit-large-patch14-560``:
   ``config.json`` with ``model_type: mlcd_vision_model`` + ``model.safetensors``). Names, with
   an optional ``vision_model.`` prefix, map as:

   | checkpoint                                              | ovpipe (``model.vision.``)      |
   | ------------------------------------------------------- | ------------------------------- |
   | ``embeddings.patch_embedding.weight``                    | ``patch_embed.proj.weight``     |
   | ``embeddings.class_embedding``                           | ``class_embedding``             |
   | ``class_pos_emb``                                        | ``class_pos_emb``               |
   | ``pre_layrnorm.{weight,bias}``                           | ``pre_layernorm.*``             |
   | ``encoder.layers.N.layer_norm1.*`` / ``layer_norm2.*``   | ``blocks.N.norm1.*`` / ``norm2.*`` |
   | ``encoder.layers.N.self_attn.{q,k,v}_proj.*``            | ``blocks.N.attn.qkv.*`` (concatenated q, k, v) |
   | ``encoder.layers.N.self_attn.out_proj.*``                | ``blocks.N.attn.proj.*``        |
   | ``encoder.layers.N.mlp.fc1.*`` / ``fc2.*``               | ``blocks.N.mlp.fc1.*`` / ``fc2.*`` |
   | ``post_layernorm.*``                                     | (unused: LLaVA-OV-1.5 feeds the last hidden states to the merger) |

2. LLaVA-OneVision-1.5 format (``visual.`` or ``model.visual.`` prefix): ``visual.patch_embed.proj``,
   ``visual.class_embedding``, ``visual.class_pos_emb``, ``visual.pre_layernorm``,
   ``visual.blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`` map one to one onto
   ``model.vision.*``, and ``visual.merger.{ln_q,mlp.0,mlp.2}`` onto ``model.projector.*``.

Loading is strict: a missing or unexpected vision tensor, or a shape mismatch, raises with the names.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

_MLCD_RULES = [
    (r"embeddings\.patch_embedding\.weight", "vision.patch_embed.proj.weight"),
    (r"embeddings\.class_embedding", "vision.class_embedding"),
    (r"class_pos_emb", "vision.class_pos_emb"),
    (r"pre_layrnorm\.(weight|bias)", r"vision.pre_layernorm.\1"),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", r"vision.blocks.\1.norm1.\2"),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", r"vision.blocks.\1.norm2.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"vision.blocks.\1.attn.proj.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"vision.blocks.\1.mlp.\2.\3"),
]
_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
_IGNORED = re.compile(r"post_layernorm\.|embeddings\.position_ids|.*inv_freq")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors or *.bin checkpoint files")
    state = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(str(f)))
        else:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


def convert_mlcd(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF MLCD / RICE-ViT names -> ovpipe names (q, k, v projections fused into qkv)."""
    out, qkv, unknown = {}, {}, []
    for name, t in state.items():
        name = name.removeprefix("vision_model.")
        if m := _QKV.fullmatch(name):
            qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = t
            continue
        for pattern, target in _MLCD_RULES:
            if re.fullmatch(pattern, name):
                out[re.sub(pattern, target, name)] = t
                break
        else:
            if not _IGNORED.match(name):
                unknown.append(name)
    if unknown:
        raise ValueError(f"unrecognised RICE-ViT (MLCD) tensors: {unknown[:10]}")
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"layer {layer} {kind}: only {sorted(parts)} of q/k/v projections present")
        out[f"vision.blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def convert_llava_ov(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LLaVA-OneVision-1.5 ``visual.*`` names -> ovpipe names (merger -> projector)."""
    out = {}
    for name, t in state.items():
        name = name.removeprefix("model.")
        if not name.startswith("visual."):
            continue
        name = name.removeprefix("visual.")
        out[("projector." + name.removeprefix("merger.")) if name.startswith("merger.") else "vision." + name] = t
    return out


def convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if any(k.removeprefix("model.").startswith("visual.") for k in state):
        return convert_llava_ov(state)
    return convert_mlcd(state)


def load_rice_vit(model, path: str | Path) -> list[str]:
    """Load converted tensors into ``model`` (a VisionLanguageModel). Every vision tensor must be
    present; the projector is loaded only when the checkpoint has one. Returns the loaded names."""
    state = convert(read_state_dict(path))
    own = model.state_dict()
    vision = {k for k in own if k.startswith("vision.")}
    missing = sorted(vision - state.keys())
    unexpected = sorted(k for k in state if k not in own)
    if missing or unexpected:
        raise ValueError(f"{path}: RICE-ViT checkpoint does not fit the model: missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]} (check VisionConfig depth / sizes)")
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if bad:
        raise ValueError(f"{path}: shape mismatches: {bad[:10]}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))
    return sorted(state)
