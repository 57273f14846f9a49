"""Config section of the merge stage (curation/merge.py; docs/stage2.md): the sources, their
categories and priority, the dedup rules and the category mixture."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ovpipe.core.config import NOT_HASHED, Section


class MergeSection(Section):
    """Merging instruction datasets (curation/merge.py): sources, dedup, category mixture."""

    sources: list[str] = Field([], description="Sources to merge, each 'NAME=PATH' or a bare PATH (the "
                               "name is then the folder or file stem): a LLaVA .json/.jsonl file or folder "
                               "(+ its images), or Parquet (FineVision images/texts, OpenAI messages, or "
                               "conversations). Repeated --input on the command line replaces this list. "
                               "Recorded (and hashed) as NAME=<absolute path or URL>.")
    categories: dict[str, str] = Field({}, description="Source name -> category; a per-row 'category' "
                                       "column overrides it; without either the category is the source name.")
    priority: list[str] = Field([], description="Source names, most trusted first: the dedup keeps the "
                                "sample of the earliest source; empty = the order of 'sources'.")
    image_folders: dict[str, str] = Field({}, description="Source name -> root of its relative image paths; "
                                          "default: the folder of the file that names them.")
    dedup_exact: bool = Field(True, description="Remove samples with the same images and the same "
                              "normalised conversation (duplicate_sample).")
    dedup_questions: bool = Field(True, description="Remove samples with the same images and the same "
                                  "normalised user turns but other answers (duplicate_question).")
    near_dup_threshold: float = Field(0.0, ge=0, le=1, description="Estimated Jaccard similarity of the "
                                      "user turns (MinHash) at or above which a sample on the same images is "
                                      "a near_duplicate_question; 0 = off.")
    minhash_perms: int = Field(64, ge=8, description="MinHash signature length (near duplicates).")
    minhash_bands: int = Field(16, ge=1, description="LSH bands; must divide minhash_perms.")
    partitions: int = Field(16, ge=1, description="Hash partitions of the dedup shuffle (reduce tasks); "
                            "each partition's samples must fit in one task's memory.")
    image_partitions: int = Field(16, ge=1, description="Hash partitions of the image store "
                                  "(OUT/images/): each image is stored once, in partition int(image_id, 16) "
                                  "mod image_partitions; one partition's images must fit in one task's memory.")
    image_batch_bytes: int = Field(256 * 1024 * 1024, gt=0, description="Memory budget of one image-store "
                                   "task: a partition larger than this is sorted in id-range buckets of about "
                                   "this size, spilled to local disk (it does not change the output).",
                                   json_schema_extra=NOT_HASHED)
    keep_intermediates: bool = Field(False, description="Keep the shuffle's partition files (OUT/_map/_parts, "
                                     "_map/_images) and the deduplicated partitions (OUT/_dedup/_rows) after the "
                                     "stage has committed; off: they are deleted (a later run that needs them "
                                     "redoes the map).", json_schema_extra=NOT_HASHED)
    mixture: dict[str, float] = Field({}, description="Target share per category (or source, see "
                                      "mixture_by), as weights (normalised to sum 1); groups not named get "
                                      "none (mixture_excluded); empty = keep every deduplicated sample.")
    mixture_by: Literal["category", "source"] = Field("category", description="What the mixture's keys name.")
    total: int = Field(0, ge=0, description="Samples after the mixture; 0 = the most that down-sampling "
                       "alone reaches with the target shares.")
    max_repeat: int = Field(1, ge=1, description="Up-sampling cap: a sample appears at most this many times "
                            "(1 = no up-sampling); a group that would need more misses its share (reported).")
    count_tokens: bool = Field(True, description="Count each sample's tokens with the packer's length rule "
                               "(pack.tokenizer, pack.min_pixels/max_pixels) for the report.")
    max_images_per_sample: int = Field(64, gt=0, description="Samples with more images are ledgered "
                                       "(too_many_images).")
    max_image_bytes: int = Field(32 * 1024 * 1024, gt=0, description="Larger images are ledgered "
                                 "(image_too_large).")
    max_text_bytes: int = Field(256 * 1024, gt=0, description="Samples with more UTF-8 text than this are "
                                "ledgered (text_too_long).")
    plot: bool = Field(True, description="Write merge_report.png next to merge_report.json.",
                       json_schema_extra=NOT_HASHED)

    @field_validator("sources")
    @classmethod
    def _canonical_sources(cls, v: list[str]) -> list[str]:
        # Hashed as NAME=<absolute path or URL>: 'a=x', 'a=./x' and 'a=x/' are one run, not a conflict.
        from curation.merge_readers import normalise_source

        return [normalise_source(s) for s in v]

    @field_validator("image_folders")
    @classmethod
    def _canonical_folders(cls, v: dict[str, str]) -> dict[str, str]:
        from curation.merge_readers import canonical_path

        return {k: canonical_path(p) for k, p in v.items()}

    @field_validator("mixture")
    @classmethod
    def _positive_weights(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: w for k, w in v.items() if not w > 0}
        if bad:
            raise ValueError(f"mixture weights must be > 0 (leave a group out to exclude it): {bad}")
        return v

    @model_validator(mode="after")
    def _bands_divide(self) -> "MergeSection":
        if self.minhash_perms % self.minhash_bands:
            raise ValueError(f"merge.minhash_bands ({self.minhash_bands}) must divide merge.minhash_perms "
                             f"({self.minhash_perms})")
        return self
