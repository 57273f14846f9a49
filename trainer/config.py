"""Config section of the trainer (trainer/launch.py, trainer/train.py, docs/trainer.md).

``train.phase`` is the training phase (1, 1.5, 2: what trains and what the loss is on;
trainer/params.py), not a pipeline stage. Its old name ``train.stage`` is still accepted as input
(TOML files, ``--set``); the resolved config always says ``phase``."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator

from ovpipe.core.config import NOT_HASHED, Section


class TrainSection(Section):
    """`ovpipe train` / `torchrun -m trainer.train`: FSDP2 training on packed shards (docs/trainer.md)."""

    phase: Literal["1", "1.5", "2"] = Field(
        "1", validation_alias=AliasChoices("phase", "stage"),
        description="Training phase. 1: projector only, loss on the caption; 1.5: everything, caption loss; "
        "2: everything, every assistant turn. `stage` is its old name (still accepted).")
    init_from: str = Field("", description="The previous phase's run folder (its export/ is loaded); "
                           "required for phases 1.5 and 2.")
    llm_path: str = Field("", description="Phase 1: local Hugging Face Qwen3 folder; empty = a tiny seeded "
                          "random model (tests, demo).")
    vision_checkpoint: str = Field("", description="Phase 1: local RICE-ViT checkpoint; empty = seeded random.")
    tiny_layers: int = Field(2, gt=0, description="Tiny seeded model (no llm_path): LLM decoder layers.")
    tiny_hidden: int = Field(64, gt=0, description="Tiny seeded model (no llm_path): LLM hidden size.")
    datasets: list[str] = Field([], description="Extra packed datasets mixed with --input (phase 2 "
                                "mixtures); each micro-batch comes from one dataset drawn by weight.")
    mixture_weights: list[float] = Field([], description="Weights of [--input, *datasets]; empty = equal.")
    steps: int = Field(100, gt=0, description="Optimizer steps.")
    micro_batch: int = Field(1, gt=0, description="Packs per micro-batch per rank.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    lr: float = Field(0.0, ge=0, description="Peak learning rate; 0 = the phase's reference default "
                      "(phase 1: 1e-4; phases 1.5, 2: 1e-5).")
    vision_lr: float = Field(0.0, ge=0, description="Learning rate of the vision tower; 0 = lr.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (reference quick-start: 0).")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="Linear warmup share of the steps, then cosine.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine floor as a share of the peak lr.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clipping.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 params / fp32 "
                                                      "reduce on CUDA, fp32 on CPU.")
    activation_checkpointing: bool = Field(False, description="Recompute block activations in backward.",
                                           json_schema_extra=NOT_HASHED)
    attn_implementation: Literal["auto", "per_sample", "sdpa", "flash_attention_2"] = Field(
        "auto", description="LLM attention (sample isolation): auto = flash varlen with flash-attn on CUDA, "
        "else per_sample (one causal SDPA call per sample); sdpa = dense block-diagonal mask.")
    run_dir: str = Field("", description="Pipeline train step: local or shared folder for checkpoints and "
                         "metrics when the pipeline's output is on object storage (a subfolder per run id); "
                         "empty = the run's version folder (local outputs only).", json_schema_extra=NOT_HASHED)
    val_input: str = Field("", description="Held-out packed shards for validation loss; empty = none.")
    val_interval: int = Field(0, ge=0, description="Steps between validations; 0 = only at the end.")
    val_packs: int = Field(16, gt=0, description="Held-out packs per rank per validation.")
    checkpoint_interval: int = Field(50, gt=0, description="Steps between checkpoints (and one at the end).",
                                     json_schema_extra=NOT_HASHED)
    keep_checkpoints: int = Field(2, gt=0, description="Newest checkpoints kept.", json_schema_extra=NOT_HASHED)
    export: bool = Field(True, description="Write export/ (safetensors + configs) at the end.")
    peak_tflops: float = Field(0.0, ge=0, description="Per-device peak for MFU; 0 = known GPU table, none on CPU.",
                               json_schema_extra=NOT_HASHED)
    nproc_per_node: int = Field(0, ge=0, description="`ovpipe train` processes; 0 = one per GPU, or 1 on CPU.",
                                json_schema_extra=NOT_HASHED)

    @model_validator(mode="before")
    @classmethod
    def _one_phase_key(cls, data):  # both the new and the old name: refuse a silent choice
        if isinstance(data, dict) and "phase" in data and "stage" in data:
            if str(data["phase"]) != str(data["stage"]):
                raise ValueError(f"train.phase = {data['phase']!r} and train.stage = {data['stage']!r} "
                                 "(its old name) disagree; set only train.phase")
            data = {k: v for k, v in data.items() if k != "stage"}
        return data

    @field_validator("phase", mode="before")
    @classmethod
    def _phase_text(cls, v):  # --set train.phase=1.5 parses as a number
        return str(v) if isinstance(v, (int, float)) else v
