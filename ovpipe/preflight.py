"""Checks before any Ray or model start: `ovpipe <stage>`, `ovpipe run` and their `--dry-run`.

Reads only what is cheap to read (listings, Parquet footers, the first bytes of a few files, the
output's ``_manifest/_stage.json``) and raises ``UserError`` with one line naming what is wrong,
where, and the flag or command that fixes it:

* the input exists and holds what the stage reads: the output of the stage the registry names in
  ``reads`` (its ``_manifest/_stage.json`` says which pass wrote it), or files of the right kind
  (Parquet or tar bytes, the columns that stage writes); ``train`` refuses a folder that is not packs;
* the weights and the vocabulary can be found (a local file, an open_clip tag in the local cache
  or a reachable hub; the exact flag when not), and a caption server answers;
* the output can be written, and holds no output of another config (``refuse_changed_config``:
  user-facing keys only); a finished training run is refused likewise (trainer/launch.py).

``plan_stage`` / ``plan_pipeline`` return what would run (``--dry-run`` prints it).
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ovpipe import registry
from ovpipe.console import UserError
from ovpipe.core.shards import MANIFEST_DIR, STAGE_FILE, SUMMARY_FILE, Location, read_json, read_manifest_entries
from ovpipe.core.stage import INPUT, OutputConflict, PassContext, Stage, refuse_changed_config
from ovpipe.registry import StageEntry

SAMPLED_FILES = 4  # input files whose bytes are looked at (the rest: listed only)
# Columns that identify a stage's output when it arrives without an ovpipe manifest (hand-made
# or copied data): docs/data-contracts.md. A stage not named here is not column-checked.
OUTPUT_COLUMNS = {
    "ingest": ("sample_id", "image_uri"),
    "embed": ("sample_id", "embedding"),
    "assign": ("sample_id", "concept_ids"),
    "balance": ("sample_id", "inclusion_prob"),
    "caption": ("caption", "image_uri"),
}
RAW_KINDS = "Parquet shards, WebDataset .tar shards or folders of images"


def raw_kinds(entry: StageEntry) -> str:
    """What a stage reading raw input reads: a stage with its own --input (merge's sources) says
    it in its summary's input part, the others read RAW_KINDS."""
    return entry.summary.split(" -> ")[0] if "--input" in entry.flags else RAW_KINDS
# What a stage needs of its input rows: another stage's output that has these columns is accepted
# too (captioning an ingest output without balancing it first), one that lacks them is refused.
NEEDED_COLUMNS = {
    "embed": ("sample_id", "image_uri"),
    "assign": ("sample_id", "embedding"),
    "dedup": ("sample_id", "embedding"),
    "decontaminate": ("sample_id", "embedding"),
    "balance": ("sample_id", "concept_ids"),
    "caption": ("sample_id", "image_uri"),
}


@dataclass
class StepPlan:
    """What one stage would do: its input shards and what its output already holds."""

    stage: str
    input: str
    output: str
    input_shards: int | None  # None: written by an earlier step of the same run
    committed: int  # shards committed in the output already (a re-run skips them)
    finished: bool

    def line(self) -> str:
        shards = "from the step before" if self.input_shards is None else f"{self.input_shards} input shard(s)"
        if self.finished:
            state = f"finished ({self.committed} shard(s) committed): nothing to do unless its input changed"
        elif self.committed:
            state = f"resumes: {self.committed} shard(s) committed, the rest to do"
        else:
            state = "new"
        return f"{self.stage:>8}: {shards}  {self.input} -> {self.output}  [{state}]"


# ------------------------------------------------------------------------------------ stages


def _candidates(entry: StageEntry) -> tuple[str, ...]:
    return entry.read_candidates


def _producers(entry: StageEntry) -> list[str]:
    return [r for r in _candidates(entry) if r != INPUT]


def _ovpipe(names: list[str]) -> str:
    return " or ".join(f"`ovpipe {n}`" for n in names)


def stage_of_pass(pass_name: str) -> str | None:
    """The registered stage whose last pass (the one writing the stage's folder) is ``pass_name``."""
    for e in registry.STAGES:
        if e.name == pass_name:
            return e.name
    for e in registry.STAGES:
        try:
            passes = e.load().passes()
        except Exception:  # training has no passes
            continue
        if any(p.name == pass_name and not p.folder for p in passes):
            return e.name
    return None


def _stage_output_writer(loc: Location) -> str | None:
    """The stage that wrote this folder (from its ``_manifest/_stage.json``), or None."""
    header = loc.join(MANIFEST_DIR, STAGE_FILE)
    if not loc.is_dir() or not header.exists():
        return None
    return stage_of_pass(str(read_json(header).get("stage"))) or str(read_json(header).get("stage"))


def _fix_input(entry: StageEntry) -> str:
    producers = _producers(entry)
    if not producers:
        return f"pass --input a folder or file of {raw_kinds(entry)}"
    return f"pass --input the output folder of {_ovpipe(producers)}"


def check_input(entry: StageEntry, stage: Stage, input: str, output: str, cfg: Any) -> int:
    """The stage's input exists and holds what it reads; returns its number of input shards."""
    name = entry.name
    loc = Location.parse(input)
    if not loc.exists():
        raise UserError(f"{name}: input {loc.uri()!r} does not exist; {_fix_input(entry)}")
    producers = _producers(entry)
    writer = _stage_output_writer(loc)
    if writer is not None:
        if writer not in producers and not _has_needed_columns(name, loc, needed_columns(name, cfg)):
            wants = _ovpipe(producers) if producers else raw_kinds(entry)
            what = ("this is not a pack folder: " if name == "train" else "") + \
                f"{loc.uri()!r} is the output of `ovpipe {writer}`"
            raise UserError(f"{name}: {what}, but `ovpipe {name}` reads {'the output of ' if producers else ''}"
                            f"{wants}; {_fix_input(entry)}")
        committed = len(read_manifest_entries(loc))
        if not committed:
            raise UserError(f"{name}: {loc.uri()!r} holds no committed shard of `ovpipe {writer}` yet; run "
                            f"`ovpipe {writer}` into it to completion first")
        needed = needed_columns(name, cfg) or ()
        if writer == "assign" and "embedding" in needed and not _has_needed_columns(name, loc, needed):
            # a producer's output without the embeddings: assign drops them unless told to keep them
            raise UserError(f"{name}: {loc.uri()!r} (the output of `ovpipe assign`) lacks the columns "
                            f"{list(needed)} that `ovpipe {name}` reads (assign drops the embeddings unless "
                            f"assign.keep_embedding=true: re-run it so); {_fix_input(entry)}")
        return committed
    if name == "train":
        return _check_pack_files(loc)
    files = _input_files(stage, loc, output, cfg)
    if files is None:  # a stage that lists its input its own way: it says what is wrong itself
        return 0
    if not files:
        raise UserError(f"{name}: no input shards under {loc.uri()!r}; {_fix_input(entry)}")
    for f in files[:SAMPLED_FILES]:
        _check_file(entry, f, producers, needed_columns(name, cfg))
    return len(files)


def needed_columns(name: str, cfg: Any) -> tuple[str, ...] | None:
    """NEEDED_COLUMNS; decontaminate's depend on its evaluation sets: embeddings for images compared
    by cosine, image references for phash only, conversations for questions (merge's output)."""
    if name != "decontaminate":
        return NEEDED_COLUMNS.get(name)
    d = cfg.decontaminate
    images = (("embedding",) if d.method != "phash" else ("image_uri",)) if d.benchmarks else ()
    return ("sample_id", *images, *(("conversations",) if d.questions else ()))


def _has_needed_columns(name: str, loc: Location, needed: tuple[str, ...] | None = None) -> bool:
    """Whether a stage output's first committed data shard has what this stage needs."""
    needed = needed or NEEDED_COLUMNS.get(name)
    entries = read_manifest_entries(loc)
    first = next((e["output"] for _, e in sorted(entries.items()) if e.get("output")), None)
    if needed is None or first is None:
        return False
    with loc.fs.open_input_file(loc.join(first).path) as fh:
        return set(needed) <= set(pq.ParquetFile(fh).schema_arrow.names)


def _input_files(stage: Stage, loc: Location, output: str, cfg: Any) -> list[Location] | None:
    """What the stage's first pass would list (its own ``list_shards``: ingest's tars and image
    folders, pack's JSON files); None when it cannot be listed before the stage runs."""
    first = stage.passes()[0]
    ctx = PassContext(stage.name, loc, Location.parse(output), Location.parse(output), cfg, quiet=True)
    try:
        return [s.input for s in first.list_shards(ctx) if s.input is not None]
    except FileNotFoundError:
        return []
    except Exception:
        return None


def _check_file(entry: StageEntry, f: Location, producers: list[str], needed: tuple[str, ...] | None = None) -> None:
    name = entry.name
    info = f.fs.get_file_info(f.path)
    if info.type != info.type.File:
        return  # a folder of images
    head = f.read_bytes(512)
    if f.path.endswith(".parquet"):
        with f.fs.open_input_file(f.path) as fh:
            tail = fh.read_at(4, max(info.size - 4, 0)) if info.size >= 8 else b""
        if head[:4] != b"PAR1" or tail != b"PAR1":
            raise UserError(f"{name}: {f.uri()!r} is not a Parquet file (it starts with {head[:12]!r}); "
                            f"{_fix_input(entry)}")
        _check_columns(entry, f, producers, needed)
    elif f.path.endswith(".tar"):
        if head[257:262] != b"ustar":
            raise UserError(f"{name}: {f.uri()!r} is not a tar file; {_fix_input(entry)}")
    elif f.path.endswith((".json", ".jsonl")):
        return
    elif not producers:
        from PIL import Image

        try:
            Image.open(f.fs.open_input_file(f.path)).verify()
        except Exception:
            raise UserError(f"{name}: {f.uri()!r} is not one of {RAW_KINDS}; {_fix_input(entry)}") from None


def _check_columns(entry: StageEntry, f: Location, producers: list[str], needed: tuple[str, ...] | None = None) -> None:
    with f.fs.open_input_file(f.path) as fh:
        names = set(pq.ParquetFile(fh).schema_arrow.names)
    if entry.name == "decontaminate" and needed and set(needed) <= names:
        return  # what its evaluation sets read (conversations for questions) is there
    if entry.name == "pack":
        if "num_tokens" in names or "conversations" in names or {"caption", "image_uri"} <= names:
            return
        raise UserError(f"pack: {f.uri()!r} is neither the output of `ovpipe caption` nor conversation data "
                        f"(conversations [+ image/images]) nor lengths (sample_id + num_tokens); its columns are "
                        f"{sorted(names)[:8]}; pass --input the output folder of `ovpipe caption`")
    wanted = [OUTPUT_COLUMNS[p] for p in producers if p in OUTPUT_COLUMNS]
    if wanted and not any(set(cols) <= names for cols in wanted):
        raise UserError(f"{entry.name}: {f.uri()!r} lacks the columns {list(wanted[0])} that {_ovpipe(producers)} "
                        f"writes; {_fix_input(entry)}")


def _check_pack_files(loc: Location) -> int:
    from trainer.data import VERSION_KEY

    files = [loc] if not loc.is_dir() else loc.list_files((".parquet",))
    for f in files[:SAMPLED_FILES]:
        try:
            with f.fs.open_input_file(f.path) as fh:
                meta = pq.ParquetFile(fh).schema_arrow.metadata or {}
        except Exception:
            meta = {}
        if VERSION_KEY not in meta:
            files = []
            break
    if not files:
        raise UserError(f"train: this is not a pack folder: {loc.uri()!r} holds no packed shards; pass --input "
                        "the output folder of `ovpipe pack`")
    return len(files)


# ----------------------------------------------------------------------- weights, vocabulary


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_clip_weights(cfg: Any, stage: str) -> None:
    """embed.pretrained: 'random', a local file, or an open_clip tag whose weights are in the local
    cache or can be downloaded."""
    e = cfg.embed
    if e.pretrained == "random":
        return
    flag = "--pretrained " if stage == "embed" else "--set embed.pretrained="  # assign: the same model's text tower
    fix = (f"pass {flag}/path/to/checkpoint.pt (a local open_clip checkpoint), or {flag}random for a seeded "
           "random model")
    if e.pretrained.startswith(("/", "./", "~")) or e.pretrained.endswith((".pt", ".bin", ".safetensors", ".pth")):
        if not os.path.isfile(os.path.expanduser(e.pretrained)):
            raise UserError(f"{stage}: the checkpoint embed.pretrained = {e.pretrained!r} does not exist; {fix}")
        return
    if _hub_reachable():  # open_clip downloads the tag's weights (or finds them cached)
        return
    if not _cached_open_clip_weights():  # nothing cached at all: no need to import open_clip to say so
        raise UserError(f"{stage}: the weights {e.pretrained!r} of {e.model} are not on this machine and the "
                        f"model hub cannot be reached; {fix}")
    import open_clip

    from curation.embed import register_tiny_models

    register_tiny_models()
    tag = open_clip.get_pretrained_cfg(e.model, e.pretrained)
    if not tag:
        raise UserError(f"{stage}: embed.pretrained {e.pretrained!r} is neither a file nor an open_clip tag of "
                        f"{e.model!r}; {fix}")
    if tag.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo = tag["hf_hub"].rstrip("/")
        for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(repo, filename), str):
                return
    elif tag.get("url") and (Path(os.path.expanduser("~/.cache/clip")) / tag["url"].rsplit("/", 1)[-1]).exists():
        return
    raise UserError(f"{stage}: the weights {e.pretrained!r} of {e.model} are not on this machine and the "
                    f"model hub cannot be reached; {fix}")


def _cached_open_clip_weights() -> bool:
    """Whether any open_clip weights are in the local caches (Hugging Face's, OpenAI's URL cache)."""
    from huggingface_hub.constants import HF_HUB_CACHE

    hub = Path(HF_HUB_CACHE)
    if hub.is_dir() and any(hub.glob("models--*/snapshots/*/open_clip_*")):
        return True
    clip = Path(os.path.expanduser("~/.cache/clip"))
    return clip.is_dir() and any(clip.iterdir())


def check_models(name: str, cfg: Any) -> None:
    """Weights, vocabularies, tokenizers and servers the stage ``name`` needs."""
    if name in ("embed", "assign"):
        check_clip_weights(cfg, name)
    if name == "assign":
        v = cfg.assign.vocabulary
        if v != "builtin" and not Location.parse(v).exists():
            raise UserError(f"assign: the vocabulary {v!r} does not exist; pass --vocabulary /path/to/metadata.json "
                            "(MetaCLIP's concept list) or --vocabulary builtin")
    if name == "pack":
        t = cfg.pack.tokenizer
        if t != "qwen" and not Path(t).is_dir():
            raise UserError(f"pack: the tokenizer folder {t!r} does not exist; pass --tokenizer /path/to/hf-tokenizer "
                            "(a local Hugging Face tokenizer folder) or --tokenizer qwen")
    if name == "caption" and cfg.caption.backend == "openai":
        _check_server(cfg.caption.base_url)
    if name == "train":
        _check_train_paths(cfg)


def _check_server(base_url: str) -> None:
    try:
        urllib.request.urlopen(base_url.rstrip("/") + "/models", timeout=5).close()
    except urllib.error.HTTPError:
        return  # something answers (auth, 404): the caption stage reports what it says
    except (OSError, ValueError) as e:
        raise UserError(f"caption: no server answers at {base_url!r} ({getattr(e, 'reason', e)}); start one "
                        "(vllm serve MODEL --port 8000) and pass --base-url http://HOST:8000/v1, or --backend "
                        "vllm to caption in-process") from None


def _check_train_paths(cfg: Any) -> None:
    t = cfg.train
    for key, flag in (("llm_path", "--set train.llm_path=/path/to/qwen3"),
                      ("vision_checkpoint", "--set train.vision_checkpoint=/path/to/rice-vit"),
                      ("init_from", "--set train.init_from=/path/to/previous/phase/run"),
                      ("val_input", "--set train.val_input=/path/to/packs")):
        value = getattr(t, key)
        if value and "://" not in value and not os.path.exists(value):
            raise UserError(f"train: train.{key} = {value!r} does not exist; pass {flag}")
    if t.phase in ("1.5", "2") and not t.init_from:
        raise UserError(f"train: phase {t.phase} starts from the previous phase's run folder; pass "
                        "--set train.init_from=/path/to/previous/phase/run")


# ---------------------------------------------------------------------------------- output


def check_writable(name: str, output: str) -> None:
    """The output folder can be created and written (local paths; object stores answer at the first write)."""
    loc = Location.parse(output)
    if not loc.is_local:
        return
    path = Path(loc.path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{name}: the output {str(path)!r} is a file; pass --output a folder (new or empty)")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{name}: cannot create the output {str(path)!r}: {str(parent)!r} is a file; "
                        "pass --output a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{name}: cannot write under {str(parent)!r} (permission denied); pass --output a "
                        "folder you can write")


def check_config(entry: StageEntry, stage: Stage, output: str, cfg: Any) -> None:
    """An existing output of another config is refused now, naming the changed keys."""
    out = Location.parse(output)
    if entry.name == "train":
        from trainer.launch import refuse_changed_train_config

        try:
            refuse_changed_train_config(output, cfg)
        except OutputConflict as e:
            raise UserError(str(e)) from None
        return
    try:
        for p in stage.passes():
            refuse_changed_config(stage.name, p, out.join(p.folder) if p.folder else out, cfg)
    except OutputConflict as e:  # found before anything ran: one line, no log
        raise UserError(str(e)) from None


def _stage_check(stage: Stage, cfg: Any, output: str) -> None:
    """The stage's own config checks (``Stage.check``): a refusal there is a mistake in the command."""
    try:
        stage.check(cfg, output)
    except ValueError as e:
        raise UserError(str(e)) from None


def _state(entry: StageEntry, output: str) -> tuple[int, bool]:
    out = Location.parse(output)
    if entry.name == "train":
        done = out.join("summary.json").exists()
        return int(done), done
    return len(read_manifest_entries(out)) if out.is_dir() else 0, out.join(MANIFEST_DIR, SUMMARY_FILE).exists()


def plan_stage(name: str, input: str, output: str, cfg: Any, *, overwrite: bool = False) -> StepPlan:
    """Every check of one stage (`ovpipe <stage>`), before Ray or a model starts."""
    entry = registry.entry(name)
    stage = entry.load()
    shards = check_input(entry, stage, input, output, cfg)
    check_models(name, cfg)
    check_writable(name, output)
    _stage_check(stage, cfg, output)
    if not overwrite:
        check_config(entry, stage, output, cfg)
    committed, finished = (0, False) if overwrite else _state(entry, output)
    return StepPlan(name, Location.parse(input).uri(), Location.parse(output).uri(), shards, committed, finished)


# -------------------------------------------------------------------------------- pipeline


def plan_pipeline(cfg: Any, *, overwrite: bool = False) -> list[StepPlan]:
    """Every check of `ovpipe run`'s steps, before the first step starts."""
    from ovpipe import pipeline

    p = cfg.pipeline
    names = p.steps or pipeline.default_steps(cfg)
    unknown = sorted(set(names) - set(registry.names()))
    if unknown:
        raise UserError(f"run: unknown steps {unknown}; the steps are {registry.names()} (--steps)")
    root = Location.parse(p.output)
    check_writable("run", p.output)
    raw = Location.parse(p.input)
    if not raw.exists():
        raise UserError(f"run: the input {raw.uri()!r} does not exist; pass --input a folder of {RAW_KINDS} "
                        "(or set pipeline.input)")
    inputs = pipeline._input_listing(raw, cfg)
    run_id = p.run_id or pipeline.default_run_id(inputs, cfg)
    folders = {INPUT: raw}
    plans = []
    for entry in registry.STAGES:
        folder = pipeline.step_folder(root, entry, run_id, True)
        folders[entry.name] = folder
        if entry.name not in names:
            continue
        source_name = pipeline.input_step(entry, names, cfg)
        source = folders.get(source_name, raw)
        if entry.name == "decontaminate" and cfg.decontaminate.questions and source_name in names:
            raise UserError("run: decontaminate.questions matches the questions of instruction data (merge's "
                            f"output), but this run's decontaminate step reads {source_name}'s image rows; run "
                            "`ovpipe decontaminate --input MERGE_OUT --set decontaminate.questions=[...]` on "
                            "merge's output instead, and leave decontaminate.questions empty here")
        if NEEDED_COLUMNS.get(entry.name, ()).count("embedding") and source_name == "assign" \
                and not cfg.assign.keep_embedding:  # assign drops the embeddings unless told to keep them
            raise UserError(f"run: {entry.name} compares embeddings, but assign (its input) drops them; "
                            "set assign.keep_embedding=true (--set assign.keep_embedding=true)")
        stage = entry.load()
        if source_name == INPUT or source_name not in names:  # not written by this run: it must be there
            shards: int | None = check_input(entry, stage, source.uri(), folder.uri(), cfg)
        else:
            shards = None
        check_models(entry.name, cfg)
        _stage_check(stage, cfg, folder.uri())
        committed, finished = 0, False
        if not overwrite:
            runs = stage.pipeline_runs(cfg, stage.resolve_output(cfg, folder.uri(), run_id))
            for where, run_cfg in runs:
                check_config(entry, stage, where, run_cfg)
            committed, finished = _state(entry, runs[-1][0])  # training: its last phase's run folder
        plans.append(StepPlan(entry.name, source.uri(), folder.uri(), shards, committed, finished))
    return plans
