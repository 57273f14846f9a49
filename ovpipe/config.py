"""The root config: one TOML file per run, composed of every stage's own section.

Each stage owns its section next to its code (curation/config.py, packing/config.py,
trainer/config.py) and names it in its registry line (ovpipe/registry.py); the root config is
built from the registry, so a new stage adds its section without touching this file. The
sections that cut across stages (run, ray) and the machinery (parsing, validation, hashing) are
in ovpipe/core/config.py; the pipeline's own section is here. ``ovpipe config show`` prints the
resolved config (defaults + file + ``--set`` overrides) as TOML; ``--describe`` lists every key.
"""

from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

from pydantic import Field, create_model

from ovpipe import registry
from ovpipe.core import config as core
from ovpipe.core.config import NOT_HASHED, RaySection, RunSection, Section

if TYPE_CHECKING:  # what the composed model holds, for readers and type checkers
    from curation.config import AssignSection, BalanceSection, CaptionSection, EmbedSection, IngestSection
    from packing.config import PackSection
    from trainer.config import TrainSection


class PipelineSection(Section):
    """The whole pipeline (`ovpipe run`, `python -m ray_jobs.pipeline`): ovpipe/pipeline.py."""

    input: str = Field("", description="Raw input shards (folder or URI); --input overrides.",
                       json_schema_extra=NOT_HASHED)
    output: str = Field("", description="Root of every stage's output (folder or URI); --output overrides.",
                        json_schema_extra=NOT_HASHED)
    run_id: str = Field("", description="Name of this run's version; empty = a hash of config + input listing.",
                        json_schema_extra=NOT_HASHED)
    steps: list[str] = Field([], description=f"Steps to run; empty = every step ({', '.join(registry.names())}) except "
                             "optional ones their section does not enable.",
                             json_schema_extra=NOT_HASHED)


def _compose() -> type[Section]:
    """run, ray, then every registered stage's section (in registry order), then pipeline."""
    sections = {"run": RunSection, "ray": RaySection}
    for entry in registry.STAGES:
        if entry.config:
            sections[entry.name] = entry.config_model()
    sections["pipeline"] = PipelineSection
    return create_model("Config", __base__=Section, __doc__="The whole run configuration.",
                        **{name: (model, model()) for name, model in sections.items()})


Config = _compose()
if TYPE_CHECKING:
    class Config(Section):  # noqa: F811  (the shape _compose() builds)
        run: RunSection
        ray: RaySection
        ingest: IngestSection
        embed: EmbedSection
        assign: AssignSection
        balance: BalanceSection
        caption: CaptionSection
        pack: PackSection
        train: TrainSection
        pipeline: PipelineSection


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the TOML file, then ``--set`` overrides, validated together."""
    return core.load_config(Config, path, overrides)


def describe_defaults() -> str:
    """Every key with its default and description (`ovpipe config show --describe`)."""
    return core.describe_defaults(Config)
