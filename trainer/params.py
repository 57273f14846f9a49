"""Stage-aware training setup: which modules train in which stage, what the loss is on, and the
optimizer's parameter groups (separate learning rates for vision / projector / LLM).

| stage | trains                     | loss on                                     |
| ----- | -------------------------- | ------------------------------------------- |
| 1     | projector only             | the caption (the final assistant turn)       |
| 1.5   | vision + projector + LLM   | the caption (the final assistant turn)       |
| 2     | vision + projector + LLM   | every assistant turn                         |

Frozen modules get ``requires_grad=False`` and are left out of the optimizer, so their weights
stay bit-identical (checked by tests/test_trainer_step.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

PARTS = ("vision", "projector", "llm")


@dataclass(frozen=True)
class Stage:
    name: str
    trainable: tuple[str, ...]
    loss_on: str  # packing.tokenizer.render_sample's loss_on


STAGES: dict[str, Stage] = {
    "1": Stage("1", ("projector",), "last"),
    "1.5": Stage("1.5", PARTS, "last"),
    "2": Stage("2", PARTS, "assistant"),
}


def get_stage(name: str | float) -> Stage:
    key = str(name)
    if key not in STAGES:
        raise ValueError(f"unknown training stage {name!r}; expected one of {sorted(STAGES)}")
    return STAGES[key]


def apply_stage(model: nn.Module, stage: Stage | str) -> None:
    """Freeze everything the stage does not train."""
    stage = stage if isinstance(stage, Stage) else get_stage(stage)
    for part in PARTS:
        for p in getattr(model, part).parameters():
            p.requires_grad_(part in stage.trainable)


def _no_decay(name: str, p: nn.Parameter) -> bool:
    # biases, norms and the vision CLS / rotary parameters: no weight decay
    return p.ndim < 2 or "class_" in name


def param_groups(model: nn.Module, stage: Stage | str, lr: dict[str, float],
                 weight_decay: float = 0.0) -> list[dict]:
    """AdamW-style groups: one (decay, no-decay) pair per trainable part, each with its own lr.
    ``lr`` maps part name -> learning rate (``{"vision": 2e-6, "projector": 1e-3, "llm": 1e-5}``)."""
    stage = stage if isinstance(stage, Stage) else get_stage(stage)
    apply_stage(model, stage)
    groups = []
    for part in stage.trainable:
        if part not in lr:
            raise ValueError(f"stage {stage.name} trains {part!r} but lr has no entry for it: {lr}")
        named = [(n, p) for n, p in getattr(model, part).named_parameters() if p.requires_grad]
        # tied embeddings appear once in named_parameters(), so no parameter is in two groups
        decay = [p for n, p in named if not _no_decay(n, p)]
        no_decay = [p for n, p in named if _no_decay(n, p)]
        for params, wd, suffix in ((decay, weight_decay, ""), (no_decay, 0.0, ".no_decay")):
            if params:
                groups.append({"name": part + suffix, "params": params, "lr": lr[part], "weight_decay": wd})
    return groups
