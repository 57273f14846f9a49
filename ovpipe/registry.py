"""The one registry of stages. Everything that names stages is generated from ``STAGES``:

* the command line: ``ovpipe <stage> --input IN --output OUT [flags]`` (ovpipe/cli.py);
* the Ray job entry points: ``python -m ray_jobs.<stage> ...`` (ray_jobs/__init__.py);
* the pipeline: ``ovpipe run`` runs the registered stages in this order, each reading the output of
  the stage named in ``reads`` (ovpipe/pipeline.py).

A line declares a stage: its name, one-line summary, the class that implements it (imported only
when the stage runs, so ``--help`` loads no model code), its config section, what it reads, its
scope (a shared incremental folder, or one folder per run version), its report, and the flags that
are shortcuts for config keys. Adding a stage = one module + one line here + docs (CONTRIBUTING.md).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from ovpipe.core.stage import INPUT, Stage  # INPUT: reads the pipeline's raw input

SHARED, VERSION = "shared", "version"  # scope: one folder for every run (incremental), or one per run


@dataclass(frozen=True)
class Flag:
    """A command-line flag that sets one config key (``--workers 4`` = ``--set run.workers=4``)."""

    key: str
    type: type = str
    help: str = ""
    choices: tuple[Any, ...] = ()
    aliases: tuple[str, ...] = ()  # older spellings still accepted
    action: str = ""  # "append": repeatable, the key gets the list (merge's --input NAME=PATH ...)


# Flags every per-shard stage takes (not train: its run folder resumes itself).
RUN_FLAGS = {
    "--workers": Flag("run.workers", int, "shards processed at once; 0 = one per CPU of the Ray cluster"),
    "--seed": Flag("run.seed", int, "seed of every hash-based random choice"),
}


@dataclass(frozen=True)
class StageEntry:
    name: str
    summary: str  # one line: what it reads -> what it writes
    impl: str  # "module:Class" of the Stage
    config: str = ""  # "module:Class" of its config section ([<name>] in the TOML); "" = none
    # INPUT, an earlier stage's name, or several in order of preference (an optional stage in
    # between): in `ovpipe run` a step reads the first candidate that runs in this run, else the
    # first one enabled by the config, else the last (see pipeline.input_step).
    reads: str | tuple[str, ...] = INPUT
    scope: str = SHARED
    # Off in `ovpipe run` unless the stage's enabled(cfg) says so or pipeline.steps names it.
    optional: bool = False
    report: str = ""  # its report, relative to the folder its (last) run wrote
    flags: dict[str, Flag] = field(default_factory=dict)
    run_flags: bool = True  # --overwrite, --quiet and RUN_FLAGS
    # ledger reasons that may succeed when tried again (a server, a host, a path that was away):
    # what `ovpipe retry` re-runs unless --reasons names others (ovpipe/retry.py)
    transient_reasons: tuple[str, ...] = ()
    example: str = ""

    def load(self) -> Stage:
        return _import(self.impl)()

    def config_model(self) -> type:
        return _import(self.config)

    @property
    def read_candidates(self) -> tuple[str, ...]:
        """What this stage may read, in order of preference; names not registered are skipped."""
        wanted = (self.reads,) if isinstance(self.reads, str) else self.reads
        return tuple(r for r in wanted if r == INPUT or find(r) is not None) or (INPUT,)

    def all_flags(self) -> dict[str, Flag]:
        return {**(RUN_FLAGS if self.run_flags else {}), **self.flags}


STAGES: list[StageEntry] = [
    StageEntry(
        "ingest", "raw image(-text) shards -> one row per unique sample (sample_id, sizes, provenance)",
        "curation.ingest:IngestStage", "curation.config:IngestSection",
        flags={"--source": Flag("ingest.source", str, "source name of every row (default: parent folder)"),
               "--max-pixels": Flag("ingest.max_pixels", int, "larger images are ledgered too_many_pixels")},
        transient_reasons=("unreadable_path",),
        example="ovpipe ingest --input raw/ --output out/ingest"),
    StageEntry(
        "embed", "ingested samples -> + L2-normalised float16 open_clip image embedding (Ray Data actor pool)",
        "curation.embed:EmbedStage", "curation.config:EmbedSection", reads="ingest",
        flags={"--model": Flag("embed.model", str, "open_clip model name"),
               "--pretrained": Flag("embed.pretrained", str, "open_clip tag or a local checkpoint file"),
               "--batch-size": Flag("embed.batch_size", int, "images per forward pass"),
               "--pool-size": Flag("embed.pool_size", int, "embedding actors; 0 = one per GPU"),
               "--num-gpus-per-actor": Flag("embed.num_gpus_per_actor", float, "GPUs per actor"),
               "--num-cpus-per-actor": Flag("embed.num_cpus_per_actor", float, "CPUs per actor")},
        transient_reasons=("image_not_found",),
        example="ovpipe embed --input out/ingest --output out/embed --pretrained /models/h14_fullcc2.5b.pt"),
    StageEntry(
        "assign", "embedded samples -> + top-k concept_ids / concept_scores (FAISS or torch; cached concept index)",
        "curation.assign:AssignStage", "curation.config:AssignSection", reads="embed",
        flags={"--vocabulary": Flag("assign.vocabulary", str, "'builtin', MetaCLIP's metadata.json or a text file"),
               "--k": Flag("assign.k", int, "concepts per image"),
               "--backend": Flag("assign.backend", str, "top-k search", ("auto", "faiss", "torch")),
               "--template": Flag("assign.template", str, "prompt template with '{}'"),
               "--cache-dir": Flag("assign.cache_dir", str, "concept cache folder")},
        example="ovpipe assign --input out/embed --output out/assign --vocabulary metadata.json --k 5"),
    StageEntry(
        "dedup", "embedded/assigned samples -> near-duplicate images removed (k-means clusters: cosine and/or "
        "perceptual hash), one kept per group + threshold report",
        "curation.dedup:DedupStage", "curation.config:DedupSection", reads=("assign", "embed"), optional=True,
        report="_report",
        flags={"--threshold": Flag("dedup.threshold", float, "cosine at or above which images are duplicates"),
               "--method": Flag("dedup.method", str, "what makes a duplicate", ("both", "embedding", "phash")),
               "--phash-bits": Flag("dedup.phash_bits", int, "perceptual-hash Hamming distance at or below "
                                    "which images are duplicates"),
               "--clusters": Flag("dedup.clusters", int, "k-means clusters; 0 = rows / dedup.cluster_rows")},
        example="ovpipe dedup --input out/assign --output out/dedup --threshold 0.95 --method both"),
    StageEntry(
        "decontaminate", "embedded samples -> samples matching an evaluation image (exact, perceptual hash, "
        "cosine) ledgered benchmark_overlap + report",
        "curation.decontaminate:DecontaminateStage", "curation.config:DecontaminateSection",
        reads=("dedup", "assign", "embed"), optional=True, report="_report",
        flags={"--benchmarks": Flag("decontaminate.benchmarks", str, "an evaluation set: a folder of images, "
                                    "a Parquet file, or NAME=PATH (repeatable)", action="append"),
               "--threshold": Flag("decontaminate.threshold", float, "cosine at or above which images match"),
               "--method": Flag("decontaminate.method", str, "besides exact bytes", ("both", "embedding", "phash")),
               "--phash-bits": Flag("decontaminate.phash_bits", int, "perceptual-hash Hamming distance at or "
                                    "below which images match"),
               "--questions": Flag("decontaminate.questions", str, "evaluation questions (text side, on "
                                   "merge's output): a .parquet/.jsonl file or NAME=PATH (repeatable)",
                                   action="append")},
        example="ovpipe decontaminate --input out/dedup --output out/decontaminate --benchmarks evals/mmbench "
                "--benchmarks evals/textvqa.parquet"),
    StageEntry(
        "balance", "concept assignments -> concept-balanced selection (inverse_frequency or metaclip) + report",
        "curation.balance:BalanceStage", "curation.config:BalanceSection",
        reads=("decontaminate", "dedup", "assign"), scope=VERSION, report="_report",
        flags={"--mode": Flag("balance.mode", str, "sampling rule", ("inverse_frequency", "metaclip")),
               "--target": Flag("balance.target", int, "images to select"),
               "--fraction": Flag("balance.fraction", float, "share of the usable input to select"),
               "--threshold": Flag("balance.threshold", float, "metaclip: the threshold t")},
        example="ovpipe balance --input out/assign --output out/balance --fraction 0.5"),
    StageEntry(
        "caption", "selected samples -> + English/Chinese caption (openai server, in-process vLLM or concepts), filtered",
        "curation.caption:CaptionStage", "curation.config:CaptionSection", reads="balance", scope=VERSION,
        flags={"--backend": Flag("caption.backend", str, "captioner", ("openai", "vllm", "concepts")),
               "--base-url": Flag("caption.base_url", str, "OpenAI-compatible server root (vllm serve)"),
               "--model": Flag("caption.model", str, "captioner model"),
               "--zh-share": Flag("caption.zh_share", float, "share of Chinese captions")},
        transient_reasons=("caption_request_failed",),
        example="ovpipe caption --input out/balance --output out/caption --backend openai "
                "--base-url http://gpu:8000/v1 --model Qwen/Qwen2.5-VL-7B-Instruct"),
    StageEntry(
        "merge", "instruction datasets (LLaVA JSON/JSONL, FineVision / OpenAI-messages Parquet) -> one deduplicated "
        "conversation dataset at a category mixture + report", "curation.merge:MergeStage",
        "curation.merge_config:MergeSection", optional=True, scope=VERSION, report="merge_report.png",
        flags={"--input": Flag("merge.sources", str, "a source, NAME=PATH or PATH (repeatable)", action="append"),
               "--partitions": Flag("merge.partitions", int, "hash partitions of the dedup shuffle")},
        example="ovpipe merge --input llava=data/llava.json --input fv=data/finevision/ --output out/merge"),
    StageEntry(
        "pack", "captioned samples / LLaVA conversations / (sample_id, num_tokens) -> packed Parquet shards "
        "of <= max-len tokens", "packing.stage:PackStage", "packing.config:PackSection",
        reads=("merge", "caption"), scope=VERSION,
        report="pack_stats.png",
        flags={"--max-len": Flag("pack.max_len", int, "tokens per pack"),
               "--max-samples-per-pack": Flag("pack.max_samples_per_pack", int, "0 = no limit"),
               "--buckets": Flag("pack.buckets", int, "hash buckets (0 = from the input size)"),
               "--tokenizer": Flag("pack.tokenizer", str, "'qwen' or a local Hugging Face tokenizer folder"),
               "--overlong": Flag("pack.overlong", str, "samples over max-len", ("drop", "truncate"))},
        example="ovpipe pack --input out/caption --output out/pack --max-len 8192"),
    StageEntry(
        "train", "packed shards -> FSDP2 training of ViT -> projector -> Qwen3 (one phase: 1, 1.5 or 2)",
        "trainer.launch:TrainStage", "trainer.config:TrainSection", reads="pack", scope=VERSION, report="loss.png", run_flags=False,
        flags={"--phase": Flag("train.phase", str, "training phase (the paper's stage)", ("1", "1.5", "2"),
                                 aliases=("--stage",)),
               "--nproc-per-node": Flag("train.nproc_per_node", int, "processes; 0 = one per GPU, 1 on CPU")},
        example="ovpipe train --input out/pack --output runs/phase1 --phase 1 --set train.llm_path=/models/qwen3"),
]


def _import(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def find(name: str) -> StageEntry | None:
    return next((e for e in STAGES if e.name == name), None)


def entry(name: str) -> StageEntry:
    found = find(name)
    if found is None:
        raise ValueError(f"unknown stage {name!r}; the stages are {names()}")
    return found


def names() -> list[str]:
    return [e.name for e in STAGES]
