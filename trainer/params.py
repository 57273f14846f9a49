"""Training phases: which modules train in which phase, what the loss is on, and the optimizer's
parameter groups (separate learning rates for vision / projector / LLM). A phase (1, 1.5, 2) is a
step of the training recipe, not a pipeline stage (ingest, embed, ..., train).

| phase | trains                     | loss on                                     |
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
class Phase:
    name: str
    trainable: tuple[str, ...]
    loss_on: str  # packing.tokenizer.render_sample's loss_on


PHASES: dict[str, Phase] = {
    "1": Phase("1", ("projector",), "last"),
    "1.5": Phase("1.5", PARTS, "last"),
    "2": Phase("2", PARTS, "assistant"),
}


def get_phase(name: str | float) -> Phase:
    key = str(name)
    if key not in PHASES:
        raise ValueError(f"unknown training phase {name!r}; expected one of {sorted(PHASES)}")
    return PHASES[key]


def apply_phase(model: nn.Module, phase: Phase | str) -> None:
    """Freeze everything the phase does not train."""
    phase = phase if isinstance(phase, Phase) else get_phase(phase)
    for part in PARTS:
        for p in getattr(model, part).parameters():
            p.requires_grad_(part in phase.trainable)


def _no_decay(name: str, p: nn.Parameter) -> bool:
    # biases, norms and the vision CLS / rotary parameters: no weight decay
    return p.ndim < 2 or "class_" in name


def param_groups(model: nn.Module, phase: Phase | str, lr: dict[str, float],
                 weight_decay: float = 0.0) -> list[dict]:
    """AdamW-style groups: one (decay, no-decay) pair per trainable part, each with its own lr.
    ``lr`` maps part name -> learning rate (``{"vision": 2e-6, "projector": 1e-3, "llm": 1e-5}``)."""
    phase = phase if isinstance(phase, Phase) else get_phase(phase)
    apply_phase(model, phase)
    groups = []
    for part in phase.trainable:
        if part not in lr:
            raise ValueError(f"training phase {phase.name} trains {part!r} but lr has no entry for it: {lr}")
        named = [(n, p) for n, p in getattr(model, part).named_parameters() if p.requires_grad]
        # tied embeddings appear once in named_parameters(), so no parameter is in two groups
        decay = [p for n, p in named if not _no_decay(n, p)]
        no_decay = [p for n, p in named if _no_decay(n, p)]
        for params, wd, suffix in ((decay, weight_decay, ""), (no_decay, 0.0, ".no_decay")):
            if params:
                groups.append({"name": part + suffix, "params": params, "lr": lr[part], "weight_decay": wd})
    return groups
