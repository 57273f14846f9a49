"""Export a trained model for inference, and load it back.

Writes, under ``RUN_DIR/export/``::

    llm/config.json, llm/model.safetensors     the LLM as a Hugging Face Qwen3 folder:
                                              transformers.Qwen3ForCausalLM.from_pretrained(llm/)
    vision_projector.safetensors               vision tower (``vision.*``) and projector (``projector.*``)
    ovpipe_model.json                          vision config, image-pad id, phase, the run it came from

``load_exported(folder)`` rebuilds the whole ``VisionLanguageModel``; the next training phase's
``train.init_from`` points at the run folder and loads its export this way. Under FSDP2 the full
weights are gathered (a collective: every rank calls ``export_model``) and written by rank 0 only.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.model import VisionConfig, VisionLanguageModel, build_model

MODEL_FILE = "ovpipe_model.json"
VISION_FILE = "vision_projector.safetensors"
LLM_DIR = "llm"


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Unsharded CPU copy of the weights (on rank 0; other ranks get an empty dict under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if dist.is_initialized() and any(hasattr(m, "unshard") for m in model.modules()):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def export_model(model: VisionLanguageModel, folder: str | Path, extra: dict | None = None) -> Path | None:
    """Collective under FSDP. Returns the folder on rank 0, None elsewhere."""
    from safetensors.torch import save_file

    state = full_state_dict(model)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    folder = Path(folder)
    (folder / LLM_DIR).mkdir(parents=True, exist_ok=True)
    llm_cfg = model.llm.config
    llm = {k[len("llm."):]: v.float().contiguous().clone() for k, v in state.items() if k.startswith("llm.")}
    if llm_cfg.tie_word_embeddings:
        llm.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight; safetensors stores it once
    save_file(llm, str(folder / LLM_DIR / "model.safetensors"), metadata={"format": "pt"})
    cfg = llm_cfg.to_dict()
    cfg["dtype"] = "float32"
    cfg["use_cache"] = True  # inference default; training always passes use_cache=False
    cfg.pop("_attn_implementation_autoset", None)
    (folder / LLM_DIR / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    rest = {k: v.float().contiguous().clone() for k, v in state.items() if k.split(".")[0] in ("vision", "projector")}
    save_file(rest, str(folder / VISION_FILE), metadata={"format": "pt"})
    (folder / MODEL_FILE).write_text(json.dumps({
        "vision_config": asdict(model.vision.cfg), "image_pad_id": model.image_pad_id,
        "llm": LLM_DIR, "vision_projector": VISION_FILE, **(extra or {})}, indent=2))
    return folder


def load_exported(folder: str | Path, attn_implementation: str = "sdpa") -> VisionLanguageModel:
    """Rebuild the model from an export folder (strict: every tensor must match by name and shape)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / MODEL_FILE).exists():
        raise FileNotFoundError(f"{folder} is not an ovpipe export (no {MODEL_FILE}); point at RUN_DIR/export "
                                "of a finished training run")
    meta = json.loads((folder / MODEL_FILE).read_text())
    model = build_model(VisionConfig(**meta["vision_config"]), llm_path=folder / meta["llm"],
                        attn_implementation=attn_implementation)
    model.image_pad_id = meta["image_pad_id"]
    tensors = load_file(str(folder / meta["vision_projector"]))
    own = {k: v for k, v in model.state_dict().items() if k.split(".")[0] in ("vision", "projector")}
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    bad = [k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape]
    if missing or unexpected or bad:
        raise ValueError(f"{folder / meta['vision_projector']}: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, wrong shape {bad[:5]}")
    model.load_state_dict(tensors, strict=False)
    return model
