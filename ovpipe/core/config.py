"""Config machinery every stage uses: typed sections that refuse unknown keys, TOML + ``--set``
parsing, the config hash, and the sections that cut across stages (run, ray).

Every section is a pydantic model that forbids unknown keys, so a typo such as
``ingest.max_pixel = 5`` fails with a message naming the key and listing what is allowed, instead
of being silently ignored. Each stage owns its section next to its code (curation/config.py,
packing/config.py, trainer/config.py); the root config (ovpipe/config.py) composes them.

A pass hashes only the sections that change its output (``Pass.config_sections``), so changing
the packer's settings does not invalidate finished ingest shards.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import xxhash
from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Marks a field that changes how a stage runs but never what it writes: it is left out of the
# config hash, so changing it does not invalidate finished shards.
NOT_HASHED = {"hashed": False}
# Marks a field a stage's per-shard hash leaves out because a global pass hashes it itself (so
# changing it redoes only that pass); it still changes the output, so run ids include it.
GLOBAL_PASS = {"hashed": False, "changes_output": True}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(Section):
    """Settings that apply to every stage."""

    seed: int = Field(0, ge=0, description="Seed for every hash-based random choice.")
    workers: int = Field(
        0,
        ge=0,
        description="Input shards processed at once; 0 = one per CPU of the Ray cluster.",
        json_schema_extra=NOT_HASHED,
    )
    progress_interval_s: float = Field(
        5.0, gt=0, description="Seconds between progress lines on stderr.", json_schema_extra=NOT_HASHED
    )
    executor: Literal["ray", "local"] = Field(
        "ray",
        description="'ray': shards as Ray tasks; 'local': one after another in this process (debugging).",
        json_schema_extra=NOT_HASHED,
    )
    retire_missing_inputs: bool = Field(
        False,
        description="An output shard whose input shard is gone (removed or renamed) is refused by "
        "default, since its rows would still flow to later stages; true = retire it (manifest entry, "
        "data and ledger deleted) and go on.",
        json_schema_extra=NOT_HASHED,
    )


class RaySection(Section):
    """How to reach Ray. RAY_ADDRESS in the environment wins over `address`."""

    address: str = Field("", description="Ray address ('auto' = the cluster `ray start` runs on this node); "
                                         "empty = start a local Ray of this run's own.")
    num_cpus: int = Field(0, ge=0, description="CPUs for a local Ray; 0 = all of this machine's.")


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names the key."""


def _describe_allowed(model: type[BaseModel]) -> str:
    return ", ".join(sorted(model.model_fields))


def _section_model(root: type[BaseModel], path: tuple[Any, ...]) -> type[BaseModel]:
    model: type[BaseModel] = root
    for part in path:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            break
        model = field.annotation
    return model


def _format_errors(root: type[BaseModel], err: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            parent = _section_model(root, loc[:-1])
            lines.append(f"  unknown key '{key}'; allowed keys here: {_describe_allowed(parent)}")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _parse_value(text: str) -> Any:
    """Parse an override value as a TOML literal; anything that is not one is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(root: type[BaseModel], data: dict[str, Any], assignment: str) -> None:
    """Apply one ``section.key=value`` override to a raw config dict."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects section.key=value, got {assignment!r}")
    dotted, value = assignment.split("=", 1)
    parts = [p for p in dotted.strip().split(".") if p]
    if len(parts) < 2:
        raise ConfigError(
            f"--set key {dotted!r} must name a section and a key (e.g. run.seed=3); "
            f"sections: {_describe_allowed(root)}"
        )
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted!r}: {part!r} is a value, not a section")
    node[parts[-1]] = _parse_value(value.strip())


def load_config(root: type[BaseModel], path: str | Path | None = None, overrides: list[str] | None = None):
    """Defaults, then the TOML file, then ``--set`` overrides, validated together."""
    data: dict[str, Any] = {}
    origin = "defaults"
    if path and str(path).startswith("env:"):  # a resolved config shipped to a Ray job as JSON
        name = str(path)[4:]
        try:
            data = json.loads(os.environ[name])
        except (KeyError, ValueError) as e:
            raise ConfigError(f"--config {path}: environment variable {name} is missing or not JSON ({e})") from None
        origin = str(path)
    elif path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass a TOML file to --config")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from None
        origin = str(p)
    for assignment in overrides or []:
        apply_override(root, data, assignment)
    if overrides:
        origin += " + --set " + " ".join(overrides)
    try:
        return root.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(root, e, origin)) from None


def to_toml(cfg: BaseModel | dict[str, Any]) -> str:
    """Render the resolved config (or its dump, e.g. a run manifest's) as TOML (flat sections of
    scalars and lists)."""
    out: list[str] = []
    for name, section in (cfg if isinstance(cfg, dict) else cfg.model_dump()).items():
        out.append(f"[{name}]")
        for key, value in section.items():
            out.append(f"{key} = {json.dumps(value, ensure_ascii=False)}")
        out.append("")
    return "\n".join(out)


def section_dump(cfg: BaseModel, sections: tuple[str, ...], *, everything_that_changes_output: bool = False
                 ) -> dict[str, Any]:
    """The named sections as plain dicts, without the fields marked NOT_HASHED (with
    everything_that_changes_output, GLOBAL_PASS fields are kept: run ids)."""
    def kept(extra: dict) -> bool:
        return extra.get("hashed", True) or (everything_that_changes_output and extra.get("changes_output", False))

    out = {}
    for name in sections:
        section = getattr(cfg, name)
        out[name] = {key: value for key, value in section.model_dump().items()
                     if kept(type(section).model_fields[key].json_schema_extra or {})}
    return out


def config_hash(payload: dict[str, Any]) -> str:
    """Stable 16-hex-digit hash of a JSON-able dict (key order does not matter)."""
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return xxhash.xxh3_64_hexdigest(text.encode("utf-8"))


def describe_defaults(root: type[BaseModel]) -> str:
    """Every key with its default and description, for docs and `ovpipe config show --describe`."""
    lines = []
    for name, field in root.model_fields.items():
        model = field.annotation
        lines.append(f"[{name}] {model.__doc__.strip() if model.__doc__ else ''}")
        for key, f in model.model_fields.items():
            lines.append(f"  {key} = {json.dumps(f.default, ensure_ascii=False)}  # {f.description}")
    return "\n".join(lines)
