"""Config sections of the curation stages (each documented in `ovpipe config show --describe`):
ingest (curation/ingest.py), embed (curation/embed.py), assign (curation/assign.py),
balance (curation/balance.py, docs/sampling.md) and caption (curation/caption.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ovpipe.core.config import GLOBAL_PASS, NOT_HASHED, Section



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


class EmbedSection(Section):
    """Image embeddings with an open_clip model (curation/embed.py). The production default is
    MetaCLIP-H/14-Full-CC2.5B: open_clip `ViT-H-14-quickgelu` + tag `metaclip_fullcc` (1024-d)."""

    model: str = Field(
        "ViT-H-14-quickgelu",
        description="open_clip model name, a built-in tiny config ('ovpipe-tiny-clip') for tests, or the "
        "built-in stand-in 'ovpipe-thumbnail' (a seeded projection of a thumbnail that keeps image distances; "
        "its text side has no meaning: tests and the demo only, curation/thumbnail.py).",
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


class DedupSection(Section):
    """Near-duplicate images (curation/dedup.py, docs/dedup.md): embedding clusters + cosine, and a
    perceptual hash, compared within each k-means cluster of the embeddings."""

    enabled: bool = Field(False, description="Run dedup as a step of `ovpipe run` (between assign and "
                          "balance); the `ovpipe dedup` command runs regardless.", json_schema_extra=NOT_HASHED)
    method: Literal["both", "embedding", "phash"] = Field(
        "both", description="A pair is a duplicate when its embedding cosine >= threshold (embedding), its "
        "perceptual-hash Hamming distance <= phash_bits (phash), or either (both).")
    threshold: float = Field(0.95, gt=0, le=1, description="Cosine similarity at or above which two "
                             "embeddings are near duplicates.")
    phash_bits: int = Field(8, ge=0, le=64, description="Hamming distance (of 64 bits) at or below which "
                            "two perceptual hashes (imagehash.phash of the decoded image) are near duplicates.")
    clusters: int = Field(0, ge=0, description="k-means clusters; pairs are compared within a cluster only. "
                          "0 = ceil(rows / cluster_rows).")
    cluster_rows: int = Field(2000, gt=0, description="Target rows per cluster when clusters = 0.")
    kmeans_sample: int = Field(100_000, gt=0, description="Embeddings (a hash-chosen sample) the "
                               "centroids are learned on.")
    kmeans_iters: int = Field(20, gt=0, description="k-means iterations (FAISS).")
    probe_margin: float = Field(0.05, ge=0, le=2, description="A row is also compared in its second "
                                "nearest cluster when that centroid's cosine is within this of the nearest's "
                                "(copies on both sides of a cluster boundary still meet); 0 = nearest only.")
    partitions: int = Field(16, gt=0, description="Reduce tasks of the shuffle by cluster (cluster c "
                            "goes to partition c mod partitions).")
    report_thresholds: list[float] = Field(
        [0.85, 0.9, 0.95, 0.98], description="Report: samples removed at each of these cosine thresholds.",
        json_schema_extra=NOT_HASHED)
    report_pairs: int = Field(6, ge=0, description="Report: example pairs per similarity band in the "
                              "contact sheet.", json_schema_extra=NOT_HASHED)
    keep_intermediates: bool = Field(False, description="Keep the shuffle's intermediates (OUT/_sample, "
                                     "_partition: a copy of every embedding, _pairs, _resolve) after the stage "
                                     "finished; off: removed once every output shard is committed (a re-run "
                                     "with an unchanged input then does nothing; a changed input redoes them).",
                                     json_schema_extra=NOT_HASHED)
    phash_min_decided: int = Field(
        32, ge=0, le=64, description="A perceptual hash counts only when at least this many of its 64 bits "
        "are decided (their DCT coefficient clearly away from the median): a flat colour or two flat halves "
        "leaves most bits to rounding noise, and such hashes collide; those images are compared by "
        "embedding only. 0 = every hash counts.")


class DecontaminateSection(Section):
    """Benchmark decontamination (curation/decontaminate.py, docs/dedup.md): training samples that
    match an evaluation image (exact bytes, perceptual hash or embedding) are ledgered."""

    benchmarks: list[str] = Field(
        [], description="Evaluation image sets, each a folder of images (name = the folder's name) or a Parquet "
        "file (name = its `benchmark` column, else the file's name), optionally as NAME=PATH. Empty (and no "
        "`questions`) = the step is off in `ovpipe run`.")
    method: Literal["both", "embedding", "phash"] = Field(
        "both", description="Besides exact bytes (always): cosine >= threshold (embedding), Hamming "
        "distance <= phash_bits (phash), or either (both).")
    threshold: float = Field(0.95, gt=0, le=1, description="Cosine at or above which a training image "
                             "matches an evaluation image.")
    phash_bits: int = Field(8, ge=0, le=64, description="Perceptual-hash Hamming distance at or below "
                            "which a training image matches an evaluation image.")
    phash_min_decided: int = Field(
        32, ge=0, le=64, description="A perceptual hash (of a training or evaluation image) counts only when "
        "at least this many of its 64 bits are decided, as dedup.phash_min_decided: plain images' hashes "
        "collide.")
    max_eval_images: int = Field(1_000_000, gt=0, description="Refuse larger evaluation sets of images "
                                 "or of questions (they are held by every task).")
    cache_dir: str = Field("", description="Cache of embedded evaluation sets; empty = $OVPIPE_CACHE/eval "
                           "or ~/.cache/ovpipe/eval.", json_schema_extra=NOT_HASHED)
    report_pairs: int = Field(6, ge=0, description="Report: example matches per benchmark.",
                              json_schema_extra=NOT_HASHED)
    questions: list[str] = Field(
        [], description="Evaluation question sets for the text side: Parquet or JSON Lines files with a "
        "question / text / prompt column (name from a `benchmark` column, else the file's name; id from "
        "id / question_id / key, else the row number), optionally NAME=PATH. A training sample whose user "
        "turns (`conversations`, merge's output) share an n-gram with one is ledgered benchmark_overlap.")
    ngram: int = Field(8, ge=3, le=64, description="Text side: a user turn overlaps an evaluation question "
                       "when they share this many consecutive normalised words (case, punctuation and <image> "
                       "ignored); a question shorter than that must be matched whole.")
    input_model: Literal["recorded", "config"] = Field(
        "recorded", description="Which model embeds the evaluation images: `recorded` = the model that made "
        "the input's embeddings, as its stage recorded it (embed, assign, dedup, decontaminate outputs); "
        "`config` = this config's embed.* (an input made outside ovpipe, which records none).")
