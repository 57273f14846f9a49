"""The packed-shard schema: the contract between the packer (packing/) and the trainer (trainer/).

One row per pack. Both sides import PACK_SCHEMA from here; docs/data-contracts.md describes it
field by field. Change it only together with both sides and the docs (and bump
PACK_SCHEMA_VERSION, which the trainer checks in the shard metadata).

* ``pack_id``      deterministic id: xxh3-64 hex of the shard name (bucket-XXXXX or
                   repair-XXXXX), seed and member sample ids.
* ``num_tokens``   sum of ``sample_lens`` (<= max length; never padded in the shard).
* ``sample_ids``   the samples in the pack, in order.
* ``sample_lens``  each sample's exact token count (image tokens and vision markers included);
                   the trainer's collator recomputes it and fails loudly on a mismatch.
* ``input_ids``    all samples' token ids concatenated, image pads expanded (len == num_tokens).
* ``loss_mask``    1 where the token is trained on (caption / assistant tokens), same length.
* ``images``       encoded image bytes, in order of appearance across the pack.
* ``image_hw``     [height, width] of each image after the Qwen-style resize (multiples of 28).
* ``image_sample`` index into ``sample_ids`` of the sample each image belongs to.
* ``sources``      per-sample source name (provenance).
* ``conversations`` per-sample conversation as JSON text ([{"from", "value"}, ...] with <image>),
                   for debugging and re-tokenisation.
"""

from __future__ import annotations

import pyarrow as pa

PACK_SCHEMA_VERSION = 1

PACK_SCHEMA = pa.schema(
    [
        pa.field("pack_id", pa.string(), nullable=False),
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("sample_ids", pa.list_(pa.string()), nullable=False),
        pa.field("sample_lens", pa.list_(pa.int32()), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("loss_mask", pa.list_(pa.uint8()), nullable=False),
        pa.field("images", pa.list_(pa.binary()), nullable=False),
        pa.field("image_hw", pa.list_(pa.list_(pa.int32())), nullable=False),
        pa.field("image_sample", pa.list_(pa.int32()), nullable=False),
        pa.field("sources", pa.list_(pa.string()), nullable=False),
        pa.field("conversations", pa.list_(pa.string()), nullable=False),
    ],
    metadata={b"ovpipe.pack_schema_version": str(PACK_SCHEMA_VERSION).encode()},
)
