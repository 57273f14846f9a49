"""`ovpipe merge`: instruction datasets -> one deduplicated conversation dataset with a category mix.

Reads:  the sources of ``merge.sources`` (or repeated ``--input NAME=PATH``), each a file or folder
        in one of the formats curation/merge_readers.py reads (LLaVA JSON/JSONL + images,
        FineVision Parquet, OpenAI ``messages`` Parquet, ``conversations`` Parquet).
Writes: ``OUT/data/part-XXXXX.parquet`` in MERGED_SCHEMA (below; docs/data-contracts.md): the
        conversation schema ``ovpipe pack`` reads, one row per sample copy, its images named by
        ``image_ids`` (xxh3-64 hex of the bytes), no bytes inline; ``OUT/images/``, the image
        store: each image the rows name stored once, IMAGE_SCHEMA (image_id, bytes), in
        ``merge.image_partitions`` hash partitions (partition = int(image_id, 16) mod the count;
        rows sorted by image_id), read through ``OUT/images/_manifest/`` (entry["output"],
        entry["partition"], entry["partitions"]); the ledger (stages ``merge``,
        ``merge_dedup``, ``merge_mix``) of every sample removed, and ``OUT/merge_report.json``
        (+ ``merge_report.png``): category / source distributions before and after, tokens per
        category, images stored and referenced.

Four passes of ovpipe.core.stage.run_stage (docs/stage2.md says why each rule is what it is):

1. ``merge`` (map, ``OUT/_map/``): one task per source file. Each record is validated (ledgered:
   placeholders != images, missing or bad images, empty turns, turns that do not alternate,
   text that is not UTF-8, ...), its images hashed (xxh3-64 of the bytes), its keys computed,
   and the sample written to the hash partition of its image set:
   ``_map/_parts/<shard>/p-XXXXX.parquet`` (the shuffle's map output, image ids only); its valid
   samples' images, each once, to their image partition: ``_map/_images/<shard>/i-XXXXX.parquet``.
   Its data shard is a small index (id, partition, source, category, tokens).
2. ``merge_dedup`` (reduce, ``OUT/_dedup/``): one task per partition reads that partition of every
   map shard. Samples are ranked by (source priority, sample_hash, origin); within a group of the
   same images + the same normalised user turns the first wins, every other is
   ``duplicate_sample`` (same answers too) or ``duplicate_question``; optionally, survivors on the
   same images whose user turns' MinHash Jaccard estimate reaches ``near_dup_threshold`` are
   ``near_duplicate_question``. No process holds more than one partition.
3. ``merge_mix`` (``OUT/``): per partition, hash-based sampling to the target shares of
   ``merge.mixture``: each sample's copies are floor(rate) + [u < frac(rate)] with
   u = seeded_mix(sample_hash, run.seed), rate = total * share / count of its group (capped at
   ``max_repeat``); samples with no copy are ledgered ``mixture_downsampled`` /
   ``mixture_excluded``; ``repeats`` and ``copy`` record up-sampling.
4. ``merge_images`` (``OUT/images/``, not a sample pass): one task per image partition reads the
   image ids the output's rows name (that partition's), takes their bytes from that partition of
   every map shard's image files, and writes each image once, sorted by id. No process holds
   more than one image partition.

Every name and byte is a function of the inputs and the config: any worker count, and a run
killed and resumed, write the same output.
"""

from __future__ import annotations

import json
import os
import tempfile
import unicodedata
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from curation.caption_filter import band_keys, exact_duplicates, jaccard_estimate, minhash, near_duplicate_candidates
from curation.merge_readers import (
    IMAGE,
    Bad,
    Limits,
    Source,
    list_source_files,
    normalise_source,
    parse_source,
    read_records,
    resolve_sources,
)
from ovpipe.core.config import config_hash
from ovpipe.core.hashing import seeded_mix, splitmix64
from ovpipe.core.images import MAX_SOURCE_PIXELS, BadImage, probe_image
from ovpipe.core.ledger import Ledger
from ovpipe.core.shards import (
    MANIFEST_DIR,
    PARQUET_WRITE_OPTIONS,
    Location,
    concat_or_empty,
    read_manifest_entries,
    read_table,
    shard_name_for,
    write_json,
    write_table,
)
from ovpipe.core.stage import (
    OutputConflict,
    Pass,
    PassContext,
    PassResult,
    Shard,
    ShardOutput,
    ShardTask,
    Stage,
    StageSummary,
    input_stamps,
    run_stage,
)

if TYPE_CHECKING:  # annotations only: the root config composes every stage's section
    from ovpipe.config import Config

MAP_DIR, PARTS_DIR, DEDUP_DIR, ROWS_DIR = "_map", "_parts", "_dedup", "_rows"
IMAGES_DIR, IMAGE_PARTS_DIR = "images", "_images"  # the image store; the map pass's image files
IMAGE_ROW_GROUP = 64  # images per row group of the store: a reader's id filter skips the others
# What one map task buffers before appending to its partition files (the bound on its memory).
MAP_FLUSH_ROWS, MAP_FLUSH_BYTES, MAP_SEEN_IMAGES = 8192, 64 << 20, 1 << 20
REPORT_FILE, PLOT_FILE = "merge_report.json", "merge_report.png"
REMOVED_FILE = "_intermediates_removed.json"  # in _map/_manifest/: the stage removed its intermediates
CJK = ("\u3400", "\u9fff")
_quote = json.encoder.encode_basestring  # json.dumps(s, ensure_ascii=False) of a str, in C

TURN = pa.struct([pa.field("from", pa.string()), pa.field("value", pa.string())])
MERGED_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),  # xxh3-64 of conversation + image hashes
        pa.field("source", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("conversations", pa.list_(TURN), nullable=False),
        pa.field("image_ids", pa.list_(pa.string()), nullable=False),  # xxh3-64 hex of each image's bytes
        pa.field("origin", pa.string(), nullable=False),  # source file URI + #row=N
        pa.field("length_tokens", pa.int32(), nullable=False),  # the packer's length rule; 0 = not counted
        pa.field("repeats", pa.int32(), nullable=False),  # copies of this sample in the output
        pa.field("copy", pa.int32(), nullable=False),  # 0 .. repeats - 1
    ]
)
_HELPERS = [
    pa.field("source_rank", pa.int32(), nullable=False),
    pa.field("sample_hash", pa.uint64(), nullable=False),
    pa.field("image_key", pa.uint64(), nullable=False),
    pa.field("question_key", pa.uint64(), nullable=False),
    pa.field("exact_key", pa.uint64(), nullable=False),
    pa.field("partition", pa.int32(), nullable=False),
]
SHUFFLE_SCHEMA = pa.schema([f for f in MERGED_SCHEMA if f.name not in ("repeats", "copy")] + _HELPERS)
IMAGE_IDS_AT = SHUFFLE_SCHEMA.names.index("image_ids")  # _shuffle_row returns SHUFFLE_SCHEMA's order
INDEX_COLUMNS = ["sample_id", "partition", "source", "category", "length_tokens"]
IMAGE_SCHEMA = pa.schema([  # OUT/images/ (and the map pass's image files): each image once
    pa.field("image_id", pa.string(), nullable=False),  # xxh3-64 hex of the bytes (16 characters)
    pa.field("bytes", pa.binary(), nullable=False),  # the encoded image as the source held it
])


# ------------------------------------------------------------------------------ identity and keys


def normalise_text(text: str) -> str:
    """What two turns must share to count as the same: NFKC, case-folded, placeholders removed,
    whitespace runs collapsed. Punctuation and digits stay ('2+2' and '2-2' are other questions)."""
    return " ".join(unicodedata.normalize("NFKC", text.replace(IMAGE, " ")).casefold().split())


def sample_keys(turns: list[dict[str, str]], image_ids: list[str]) -> tuple[int, int, int]:
    """(image_key, question_key, exact_key): the ordered image hashes; + the user turns; + every
    turn (system turns left out: they are boilerplate, not content)."""
    image_key = xxhash.xxh3_64_intdigest("\x1f".join(image_ids).encode())
    head = f"{image_key:016x}\x1d"
    # Separators are control characters normalise_text never leaves in a turn (it splits on
    # white space, which they are): the joined strings are unambiguous without JSON encoding.
    human = [normalise_text(t["value"]) for t in turns if t["from"] == "human"]
    body = [f"{t['from']}\x1f{normalise_text(t['value'])}" for t in turns if t["from"] == "gpt"]
    question = head + "\x1e".join(human)
    exact = question + "\x1d" + "\x1e".join(body)
    return image_key, xxhash.xxh3_64_intdigest(question.encode()), xxhash.xxh3_64_intdigest(exact.encode())


def sample_identity(turns: list[dict[str, str]], image_ids: list[str]) -> tuple[str, int]:
    """(sample_id, sample_hash) of the conversation as written plus its images (by their ids, the
    xxh3-64 hex of the bytes, so no image is hashed twice): the same id ``ovpipe pack`` computes
    for the row."""
    digest = xxhash.xxh3_64(canonical_json(turns).encode("utf-8") + bytes.fromhex("".join(image_ids)))
    return digest.hexdigest(), digest.intdigest()


def canonical_json(turns: list[dict[str, str]]) -> str:
    """json.dumps(turns, ensure_ascii=False, sort_keys=True, separators=(",", ":")), written
    directly for the usual turn (exactly the keys 'from' and 'value', text values): a third of the
    time per sample; anything else goes through json.dumps."""
    if all(len(t) == 2 and type(t.get("from")) is str and type(t.get("value")) is str for t in turns):
        return "[" + ",".join(f'{{"from":{_quote(t["from"])},"value":{_quote(t["value"])}}}' for t in turns) + "]"
    return json.dumps(turns, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def image_partitions(ids: list[str], n: int) -> np.ndarray:
    """The image-store partition of each image id (16 hex characters): int(id, 16) mod n."""
    if not ids:
        return np.zeros(0, np.int64)
    return (np.frombuffer(bytes.fromhex("".join(ids)), ">u8") % np.uint64(n)).astype(np.int64)


def with_sources(input: Any, cfg: Config) -> Config:
    """The config with merge.sources resolved: the configured list (repeated --input sets it),
    else the stage's input as one bare source."""
    sources = list(cfg.merge.sources)
    if not sources and input:
        sources = [input] if isinstance(input, str) else list(input)
    if not sources:
        raise ValueError("merge needs sources: --input NAME=PATH (repeatable) or merge.sources in the config")
    sources = [normalise_source(s) for s in sources]  # model_copy does not validate
    return cfg.model_copy(update={"merge": cfg.merge.model_copy(update={"sources": sources})})


# ------------------------------------------------------------------------------ pass 1: map


class MergeMapPass(Pass):
    """One source file -> its valid samples, split into the shuffle's hash partitions."""

    name = "merge"  # also the ledger's stage
    config_sections = ("merge", "pack", "run")  # pack: the length rule of the token counts
    schema_version = 3  # 2: images in _images/, not inline in the shuffle rows; 3: streamed, empty index
    folder = MAP_DIR

    def __init__(self) -> None:
        self.sources: dict[str, Source] = {}  # shard name -> its source
        self._partitions = self._image_partitions = 0  # set by prepare (shard_files names a retired
        # shard's partition files)

    def list_shards(self, ctx: PassContext) -> list[Shard]:
        m = ctx.cfg.merge
        found = []
        for src in resolve_sources(m.sources, m.priority, m.image_folders):
            for f in list_source_files(src):
                name = f"{src.name}__{shard_name_for(src.root, f)}"
                self.sources[name] = src
                found.append((name, f))
        stamps = input_stamps([f for _, f in found])
        return [Shard(name, f, stamps.get(f.path)) for name, f in found]

    def shard_files(self, shard: str) -> list[str]:
        return ([f"{PARTS_DIR}/{shard}/p-{p:05d}.parquet" for p in range(self._partitions)]
                + [f"{IMAGE_PARTS_DIR}/{shard}/i-{p:05d}.parquet" for p in range(self._image_partitions)])

    def prepare(self, ctx: PassContext, shards: list[Shard]) -> dict[str, Any]:
        self._partitions, self._image_partitions = ctx.cfg.merge.partitions, ctx.cfg.merge.image_partitions
        forget_if_removed(ctx.output, shards)  # here, not in list_shards: preflight lists shards too
        return {"sources": {s.name: [s.root.uri(), s.rank] for s in self.sources.values()}}

    def process(self, task: ShardTask) -> ShardOutput:
        cfg = task.config
        m, src = cfg.merge, self.sources[task.shard]
        limits = Limits(m.max_images_per_sample, m.max_image_bytes, m.max_text_bytes)
        root = Location.parse(src.image_root) if src.image_root else Location(task.input.fs, _dirname(task.input.path))
        counter = _TokenCounter(cfg) if m.count_tokens else None
        ledger = Ledger(self.name)
        out = _MapWriter(task)
        seen: dict[str, Any] = {}  # image id -> (height, width) or BadImage
        n = valid = 0
        for rec in read_records(task.input, root, limits):  # streamed: one record at a time
            n += 1
            try:
                if rec.error is not None:
                    raise rec.error
                row = _shuffle_row(rec, src, m, counter, seen)
            except Bad as e:
                ledger.drop(rec.locator, e.reason, e.detail)
                continue
            valid += 1
            out.add(row, rec.images)
        written, image_written = out.close()
        # The data shard is an empty index: the samples are in the partition files, which the
        # stage removes once it has committed (merge.keep_intermediates); the entry counts them.
        return ShardOutput(pa.table({c: pa.array([], SHUFFLE_SCHEMA.field(c).type) for c in INDEX_COLUMNS}),
                           ledger, n, kept_samples=valid, stats={
                               "partitions": written, "source": src.name, "image_partitions": image_written})

    def process_rows(self, task: ShardTask, rows: list[int]) -> ShardOutput:
        # A source file's records are not self-contained Parquet rows (JSON, images beside it), and
        # its rows are deduplicated against every other source: redo the merge instead.
        raise ValueError("merge: `ovpipe retry` cannot redo single merge records; fix the source (e.g. put the "
                         "missing images back) and run `ovpipe merge` again with --overwrite")


class _MapWriter:
    """The map task's output, written as it is read: at most MAP_FLUSH_ROWS samples and
    MAP_FLUSH_BYTES of images are buffered, then appended as row groups to one Parquet file per
    shuffle partition (``_parts/<shard>/p-XXXXX.parquet``) and per image partition
    (``_images/<shard>/i-XXXXX.parquet``, each image once per shard while the shard's set of
    written ids stays under MAP_SEEN_IMAGES; merge_images removes any later repeat)."""

    def __init__(self, task: ShardTask):
        self.task, self.m = task, task.config.merge
        self.rows: list[tuple] = []  # SHUFFLE_SCHEMA order
        self.images: dict[str, bytes] = {}
        self.image_bytes = 0
        self.written: set[str] = set()  # image ids this shard has written (bounded)
        self.parts = _PartitionFiles(task.output_root.join(PARTS_DIR, task.shard), "p", SHUFFLE_SCHEMA)
        self.image_parts = _PartitionFiles(task.output_root.join(IMAGE_PARTS_DIR, task.shard), "i", IMAGE_SCHEMA)

    def add(self, row: tuple, images: list[bytes]) -> None:
        self.rows.append(row)
        for i, b in zip(row[IMAGE_IDS_AT], images):
            if i not in self.written:
                self.written.add(i)
                self.images[i] = b
                self.image_bytes += len(b)
        if len(self.written) > MAP_SEEN_IMAGES:
            self.written.clear()
        if len(self.rows) >= MAP_FLUSH_ROWS:
            self._flush_rows()
        if self.image_bytes >= MAP_FLUSH_BYTES:
            self._flush_images()

    def _flush_rows(self) -> None:
        table = pa.Table.from_pydict(dict(zip(SHUFFLE_SCHEMA.names, zip(*self.rows) if self.rows else
                                              [[]] * len(SHUFFLE_SCHEMA))), schema=SHUFFLE_SCHEMA)
        self.parts.append(table, np.asarray(table.column("partition")))
        self.rows = []

    def _flush_images(self) -> None:
        ids = sorted(self.images)
        table = pa.Table.from_pydict({"image_id": ids, "bytes": [self.images[i] for i in ids]}, schema=IMAGE_SCHEMA)
        self.image_parts.append(table, image_partitions(ids, self.m.image_partitions))
        self.images, self.image_bytes = {}, 0

    def close(self) -> tuple[list[int], list[int]]:
        """The partitions written (shuffle, image store)."""
        self._flush_rows()
        self._flush_images()
        return self.parts.close(), self.image_parts.close()


class _PartitionFiles:
    """One Parquet file per partition, appended to in row groups, each written under a temporary
    name and renamed when closed (a task killed part-way leaves no file that looks complete)."""

    def __init__(self, folder: Location, prefix: str, schema: pa.Schema):
        self.folder, self.prefix, self.schema = folder, prefix, schema
        self.open: dict[int, tuple[Any, pq.ParquetWriter, Location]] = {}

    def append(self, table: pa.Table, partition: np.ndarray) -> None:
        for p in np.unique(partition).tolist():
            if p not in self.open:
                final = self.folder.join(f"{self.prefix}-{p:05d}.parquet")
                tmp = self.folder.join(f".{self.prefix}-{p:05d}.parquet.tmp")
                self.folder.mkdir()
                stream = self.folder.fs.open_output_stream(tmp.path)
                options = {k: v for k, v in PARQUET_WRITE_OPTIONS.items() if k != "row_group_size"}
                self.open[p] = (stream, pq.ParquetWriter(stream, self.schema, **options), final)
            self.open[p][1].write_table(table.filter(pa.array(partition == p)))

    def close(self) -> list[int]:
        for p, (stream, writer, final) in sorted(self.open.items()):
            writer.close()
            stream.close()
            self.folder.fs.move(self.folder.join(f".{self.prefix}-{p:05d}.parquet.tmp").path, final.path)
        return sorted(self.open)


def forget_if_removed(out: Location, shards: list[Shard]) -> None:
    """When the stage removed its intermediates after committing (remove_intermediates) and the
    sources changed since (a file added, removed or rewritten), every reduce partition is redone and
    needs every map shard's partition files: the map's committed entries are forgotten, so all of
    it is redone. Unchanged sources: nothing is redone."""
    marker = out.join(MANIFEST_DIR, REMOVED_FILE)
    if not marker.exists():
        return
    done = read_manifest_entries(out)
    if {s.name: s.stamp for s in shards} == {k: e.get("input_stamp") for k, e in done.items()}:
        return
    for name in done:
        out.join(MANIFEST_DIR, f"{name}.json").delete_if_exists()
    marker.delete_if_exists()


def remove_intermediates(out: Location) -> None:
    """After the stage committed: delete the shuffle's partition files and the staged dedup
    partitions (the bulk of the intermediates); the passes' manifests, ledgers and (empty)
    index shards stay, so the run stays complete and resumable. A marker tells the next run."""
    for folder in (out.join(MAP_DIR, PARTS_DIR), out.join(MAP_DIR, IMAGE_PARTS_DIR), out.join(DEDUP_DIR, ROWS_DIR)):
        folder.delete_tree()
    write_json(out.join(MAP_DIR, MANIFEST_DIR, REMOVED_FILE), {"removed": [PARTS_DIR, IMAGE_PARTS_DIR, ROWS_DIR]})


def _dirname(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


class _TokenCounter:
    """The packer's length rule (packing/tokenizer.py sample_length) with the pack section's
    tokenizer and resize settings."""

    def __init__(self, cfg: Config):
        from packing import tokenizer as ptok

        self.ptok, self.p = ptok, cfg.pack
        self.tok = ptok.load_tokenizer(cfg.pack.tokenizer)

    def __call__(self, turns: list[dict], sizes: list[tuple[int, int]]) -> int:
        hw = [self.ptok.smart_resize(h, w, self.p.min_pixels, self.p.max_pixels) for h, w in sizes]
        return self.ptok.sample_length(turns, hw, self.tok, system_prompt=self.p.system_prompt)


def _probe(data: bytes, image_id: str, m, seen: dict[str, Any]) -> tuple[int, int]:
    """(height, width), or BadImage; an image many samples share (questions about one picture) is
    probed once per shard."""
    if image_id not in seen:
        if len(seen) > 200_000:  # bounded memory on a shard of distinct images
            seen.clear()
        try:
            info = probe_image(data, m.max_image_bytes, MAX_SOURCE_PIXELS)
            seen[image_id] = (info.height, info.width)
        except BadImage as e:
            seen[image_id] = e
    found = seen[image_id]
    if isinstance(found, BadImage):
        raise found
    return found


def _shuffle_row(rec, src: Source, m, counter: _TokenCounter | None, seen: dict[str, Any]) -> tuple:
    image_ids = [xxhash.xxh3_64_hexdigest(b) for b in rec.images]
    sizes = []
    for i, (data, image_id) in enumerate(zip(rec.images, image_ids)):
        try:
            sizes.append(_probe(data, image_id, m, seen))
        except BadImage as e:
            raise Bad(e.reason, f"image {i}: {e.detail}") from None
    image_key, question_key, exact_key = sample_keys(rec.turns, image_ids)
    sample_id, sample_hash = sample_identity(rec.turns, image_ids)
    try:
        tokens = counter(rec.turns, sizes) if counter else 0
    except ValueError as e:  # an image the resize rule refuses (extreme aspect ratio)
        raise Bad("bad_image_size", str(e)[:300]) from None
    partition = (image_key if image_ids else question_key) % m.partitions
    return (sample_id, src.name, rec.category or m.categories.get(src.name, src.name), rec.turns, image_ids,
            rec.locator, tokens, src.rank, sample_hash, image_key, question_key, exact_key, partition)


# ------------------------------------------------------------------------------ pass 2: reduce


def map_digest(entries: dict[str, dict[str, Any]]) -> str:
    """What a reduce task reads, as a digest of the map pass's committed entries: a partition is
    redone when a map shard is added, removed or redone."""
    return config_hash({"map": {k: (e["kept_rows"], e["config_hash"], e.get("input_stamp"))
                                for k, e in entries.items()}})


class MergeDedupPass(Pass):
    """One hash partition of every map shard -> its samples minus duplicates."""

    name = "merge_dedup"
    config_sections = ("merge", "pack", "run")
    schema_version = 3  # 2: no image bytes; 3: survivors staged in _rows/, empty index
    reads = MergeMapPass.name
    folder = DEDUP_DIR

    def list_shards(self, ctx: PassContext) -> list[Shard]:
        stamp = map_digest(ctx.done[self.reads].entries)
        return [Shard(f"part-{p:05d}", None, stamp, p) for p in range(ctx.cfg.merge.partitions)]

    def shard_files(self, shard: str) -> list[str]:
        return [f"{ROWS_DIR}/{shard}.parquet"]

    def prepare(self, ctx: PassContext, shards: list[Shard]) -> dict[str, Any]:
        self.parts: dict[int, list[str]] = {}
        for name, e in sorted(ctx.done[self.reads].entries.items()):
            for p in e["partitions"]:
                self.parts.setdefault(p, []).append(f"{PARTS_DIR}/{name}/p-{p:05d}.parquet")
        return {}

    def process(self, task: ShardTask) -> ShardOutput:
        m = task.config.merge
        tables = [read_table(task.input_root.join(f)) for f in self.parts.get(task.index, [])]
        table = concat_or_empty(tables, SHUFFLE_SCHEMA)
        # The priority order, independent of which map shard a row came from.
        table = table.take(pc.sort_indices(table, [("source_rank", "ascending"), ("sample_hash", "ascending"),
                                                   ("origin", "ascending")]))
        ledger = Ledger(self.name)
        lost = find_duplicates(table, m)
        keep = np.ones(table.num_rows, bool)
        ids, sources, origins = (table.column(c).to_pylist() for c in ("sample_id", "source", "origin"))
        by_source: dict[str, Counter] = {}
        for i, (reason, winner, detail) in sorted(lost.items()):
            keep[i] = False
            by_source.setdefault(sources[i], Counter())[reason] += 1
            ledger.drop(origins[i], reason, f"kept sample {ids[winner]} of source {sources[winner]} "
                        f"({origins[winner]}){detail}", ids[i])
        out = table.filter(pa.array(keep))
        # The survivors are staged in _rows/ (an intermediate, removed once the stage has committed);
        # the data shard is an empty index, so the committed entries stay valid without them.
        write_table(task.output_root.join(self.shard_files(task.shard)[0]), out)
        return ShardOutput(out.slice(0, 0).select(INDEX_COLUMNS), ledger, table.num_rows,
                           kept_samples=out.num_rows, stats={
            "in": group_counts(table), "out": group_counts(out),
            "lost_by_source": {k: dict(sorted(v.items())) for k, v in sorted(by_source.items())}})


def group_counts(t: pa.Table, weights: np.ndarray | None = None) -> dict[str, dict[str, int]]:
    """Samples (or rows, with weights = copies) and tokens by category and by source."""
    w = np.ones(t.num_rows, np.int64) if weights is None else weights
    tokens = np.asarray(t.column("length_tokens"), np.int64) * w
    out: dict[str, dict[str, int]] = {}
    for col in ("category", "source"):
        keys = t.column(col).to_pylist()
        c, k = Counter(), Counter()
        for key, n, tok in zip(keys, w.tolist(), tokens.tolist()):
            c[key] += n
            k[key] += tok
        out[f"by_{col}"] = dict(sorted(c.items()))
        out[f"tokens_by_{col}"] = dict(sorted(k.items()))
    return out


def find_duplicates(t: pa.Table, m) -> dict[int, tuple[str, int, str]]:
    """{loser row: (reason, winner row, detail)} for a table sorted in priority order (row i
    outranks row j > i)."""
    n = t.num_rows
    lost: dict[int, tuple[str, int, str]] = {}
    if n == 0:
        return lost
    rank = np.arange(n)
    exact = np.asarray(t.column("exact_key"))
    if m.dedup_questions or m.dedup_exact:
        keys = np.asarray(t.column("question_key" if m.dedup_questions else "exact_key"))
        losers, winners = exact_duplicates(keys, rank)
        for i, w in zip(losers.tolist(), winners.tolist()):
            lost[i] = ("duplicate_sample" if exact[i] == exact[w] else "duplicate_question", w, "")
    if m.near_dup_threshold > 0:
        lost.update(_near_duplicates(t, m, set(lost)))
    return lost


def _near_duplicates(t: pa.Table, m, gone: set[int]) -> dict[int, tuple[str, int, str]]:
    """Survivors on the same images whose user turns are near duplicates (caption filter's MinHash
    + LSH, with the image key mixed into every band so only samples on the same images meet)."""
    image_key = np.asarray(t.column("image_key"))
    has_images = np.asarray(pc.list_value_length(t.column("image_ids")).fill_null(0)) > 0
    idx = np.array([i for i in np.flatnonzero(has_images).tolist() if i not in gone], np.int64)
    if len(idx) < 2:
        return {}
    convs = t.column("conversations").take(pa.array(idx)).to_pylist()
    texts = [" ".join(normalise_text(x["value"]) for x in c if x["from"] == "human") for c in convs]
    sig = np.stack([minhash(s, "zh" if any(CJK[0] <= ch <= CJK[1] for ch in s) else "en", m.minhash_perms)
                    for s in texts])
    bands = splitmix64(band_keys(sig, m.minhash_bands) ^ image_key[idx][:, None])
    members, leaders = near_duplicate_candidates(bands, idx)  # idx is the rank: sorted table
    out: dict[int, tuple[str, int, str]] = {}
    where = {int(i): k for k, i in enumerate(idx.tolist())}
    for a, b in zip(members.tolist(), leaders.tolist()):
        i, w = int(idx[a]), int(idx[b])
        if i in out or image_key[i] != image_key[w]:
            continue
        sim = jaccard_estimate(sig[where[i]], sig[where[w]])
        if sim >= m.near_dup_threshold:
            out[i] = ("near_duplicate_question", w, f"; estimated Jaccard {sim:.2f} of the user turns")
    return out


# ------------------------------------------------------------------------------ pass 3: mixture


def mixture_rates(counts: dict[str, int], m) -> tuple[dict[str, float], dict[str, Any]]:
    """Per group: expected copies of each sample; and the plan (targets, total, capped groups)."""
    if not m.mixture:
        return {g: 1.0 for g in counts}, {"targets": {}, "total": sum(counts.values()), "capped": []}
    weight = sum(m.mixture.values())
    share = {g: w / weight for g, w in sorted(m.mixture.items())}
    present = {g: s for g, s in share.items() if counts.get(g, 0) > 0}
    if not present:
        raise ValueError(f"merge.mixture names {sorted(share)}, but the deduplicated samples are of "
                         f"{sorted(counts)} ({m.mixture_by})")
    total = m.total or int(min(counts[g] / s for g, s in present.items()))
    rates, capped = {}, []
    for g in counts:
        want = total * present[g] / counts[g] if g in present else 0.0
        rates[g] = min(want, float(m.max_repeat))
        if want > m.max_repeat:
            capped.append(g)
    plan = {"targets": share, "total": total, "capped": sorted(capped),
            "missing": sorted(set(share) - set(present))}
    return rates, plan


def copies_of(sample_hash: np.ndarray, rates: np.ndarray, seed: int) -> np.ndarray:
    """floor(rate) + [u < frac(rate)], u uniform in [0, 1) from (sample_hash, seed) alone."""
    u = (seeded_mix(sample_hash, seed) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    whole = np.floor(rates)
    return (whole + (u < rates - whole)).astype(np.int64)


class MergeMixPass(Pass):
    """One deduplicated partition -> its samples at the mixture's rates (the stage's output)."""

    name = "merge_mix"
    config_sections = ("merge", "pack", "run")
    schema_version = 2  # 2: image_ids only; the bytes are in OUT/images/
    reads = MergeDedupPass.name

    def list_shards(self, ctx: PassContext) -> list[Shard]:
        entries = ctx.done[self.reads].entries
        return [Shard(name, ctx.input.join(ROWS_DIR, f"{name}.parquet"),
                      f"{e['kept_rows']}:{e['config_hash']}:{e.get('input_stamp')}")
                for name, e in sorted(entries.items())]

    def prepare(self, ctx: PassContext, shards: list[Shard]) -> dict[str, Any]:
        counts: Counter = Counter()
        for e in ctx.done[self.reads].entries.values():
            counts.update(e["out"][f"by_{ctx.cfg.merge.mixture_by}"])
        self.rates, self.plan = mixture_rates(dict(sorted(counts.items())), ctx.cfg.merge)
        return {"rates": {g: round(r, 12) for g, r in sorted(self.rates.items())}}

    def process(self, task: ShardTask) -> ShardOutput:
        cfg = task.config
        t = read_table(task.input)
        groups = t.column(cfg.merge.mixture_by).to_pylist()
        rates = np.array([self.rates.get(g, 0.0) for g in groups], np.float64)
        copies = copies_of(np.asarray(t.column("sample_hash")), rates, cfg.run.seed)
        ledger = Ledger(self.name)
        ids, origins = t.column("sample_id").to_pylist(), t.column("origin").to_pylist()
        for i in np.flatnonzero(copies == 0).tolist():
            excluded = rates[i] == 0
            ledger.drop(origins[i], "mixture_excluded" if excluded else "mixture_downsampled",
                        f"{cfg.merge.mixture_by} {groups[i]!r}: " + ("not in merge.mixture" if excluded
                                                                     else f"rate {rates[i]:.4f}"), ids[i])
        rows = np.repeat(np.arange(t.num_rows), copies)
        out = t.take(pa.array(rows)).select([f.name for f in MERGED_SCHEMA if f.name not in ("repeats", "copy")])
        starts = np.cumsum(copies) - copies
        out = out.append_column("repeats", pa.array(copies[rows].astype(np.int32)))
        out = out.append_column("copy", pa.array((np.arange(len(rows)) - starts[rows]).astype(np.int32)))
        return ShardOutput(out.cast(MERGED_SCHEMA), ledger, t.num_rows, kept_samples=int((copies > 0).sum()),
                           stats={"out": group_counts(t, copies), "repeated": int((copies > 1).sum())})


# ------------------------------------------------------------------------------ pass 4: image store


class MergeImagesPass(Pass):
    """One image partition -> the images the output's rows name, each once, sorted by id
    (OUT/images/data/part-XXXXX.parquet, IMAGE_SCHEMA). Its rows are images, not samples."""

    name = "merge_images"
    config_sections = ("merge", "pack", "run")
    schema_version = 2  # 2: bucket-sorted from streamed map files
    reads = MergeMixPass.name
    folder = IMAGES_DIR
    counts_samples = False

    def list_shards(self, ctx: PassContext) -> list[Shard]:
        # Redone when the rows (mix) or the image files (map) it reads change.
        stamp = map_digest({f"{p}/{k}": e for p in (MergeMapPass.name, self.reads)
                            for k, e in ctx.done[p].entries.items()})
        return [Shard(f"part-{p:05d}", None, stamp, p) for p in range(ctx.cfg.merge.image_partitions)]

    def prepare(self, ctx: PassContext, shards: list[Shard]) -> dict[str, Any]:
        self.rows = [ctx.input.join(e["output"]) for _, e in sorted(ctx.done[self.reads].entries.items())]
        mapped = ctx.done[MergeMapPass.name]
        self.parts: dict[int, list[Location]] = {}
        for name, e in sorted(mapped.entries.items()):
            for p in e["image_partitions"]:
                self.parts.setdefault(p, []).append(mapped.output.join(IMAGE_PARTS_DIR, name, f"i-{p:05d}.parquet"))
        return {}

    def process(self, task: ShardTask) -> ShardOutput:
        m, p = task.config.merge, task.index
        wanted, references = self._wanted(p, m.image_partitions)
        files = self.parts.get(p, [])
        size = sum(_parquet_bytes(f) for f in files)
        buckets = max(1, -(-size // m.image_batch_bytes))
        with tempfile.TemporaryDirectory(prefix="ovpipe-merge-images-") as tmp:
            spill = _Buckets(tmp, buckets)
            for loc in files:  # pass 1: the wanted images, spilled to id-range buckets on local disk
                with loc.fs.open_input_file(loc.path) as f:
                    for batch in pq.ParquetFile(f).iter_batches(batch_size=IMAGE_ROW_GROUP * 4):
                        ids = _id_values(batch.column(0))
                        spill.add(batch.filter(pa.array(_member(ids, wanted))), ids[_member(ids, wanted)])
            table, found = spill.merge(os.path.join(tmp, "out.arrow"))  # pass 2: per bucket, sorted, once
        if found < len(wanted):
            raise RuntimeError(f"merge_images: {len(wanted) - found} image ids of partition {p} are in no map "
                               "shard's image files; re-run with --overwrite")
        return ShardOutput(table, Ledger(self.name), table.num_rows, row_group_size=IMAGE_ROW_GROUP,
                           stats={"partition": p, "partitions": m.image_partitions, "references": references,
                                  "spill_buckets": buckets})

    def _wanted(self, p: int, n: int) -> tuple[np.ndarray, int]:
        """The sorted distinct ids (as uint64) of partition p that the output's rows name; and how
        many references to them the rows hold. Read one data shard's image_ids column at a time."""
        found, references = [], 0
        for loc in self.rows:
            ids = _id_values(pc.list_flatten(read_table(loc, ["image_ids"]).column("image_ids")))
            mine = ids[ids % np.uint64(n) == np.uint64(p)]
            references += len(mine)
            found.append(np.unique(mine))
        return np.unique(np.concatenate(found)) if found else np.zeros(0, np.uint64), references


def _id_values(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Image ids (16 hex characters) as uint64 values."""
    return np.frombuffer(bytes.fromhex("".join(ids.to_pylist())), ">u8").astype(np.uint64)


def _member(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    where = np.searchsorted(wanted, ids).clip(max=max(len(wanted) - 1, 0))
    return (wanted[where] == ids) if len(wanted) else np.zeros(len(ids), bool)


def _parquet_bytes(loc: Location) -> int:
    with loc.fs.open_input_file(loc.path) as f:
        meta = pq.ParquetFile(f).metadata
        return sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))


class _Buckets:
    """External bucket sort of one image partition: images go to the bucket of their id range
    (bucket order = id order), each bucket (~merge.image_batch_bytes) is then sorted alone. Holds
    one batch while spilling, one bucket while merging."""

    def __init__(self, folder: str, n: int):
        self.folder, self.n = folder, n
        self.writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}

    def _path(self, b: int) -> str:
        return os.path.join(self.folder, f"b-{b:05d}.arrow")

    def add(self, batch: pa.RecordBatch, ids: np.ndarray) -> None:
        bucket = ((ids >> np.uint64(32)) * np.uint64(self.n)) >> np.uint64(32)
        for b in np.unique(bucket).tolist():
            if b not in self.writers:
                self.writers[b] = pa.ipc.new_file(self._path(b), IMAGE_SCHEMA)
            self.writers[b].write_batch(batch.filter(pa.array(bucket == b)).cast(IMAGE_SCHEMA))

    def merge(self, dest: str) -> tuple[pa.Table, int]:
        """The buckets in id order, each sorted by id with every id once (the first spilled, i.e.
        from the first map shard in name order), into one Arrow file; returned memory-mapped (its
        pages are the file's, not the process's heap); and the count of distinct ids."""
        for w in self.writers.values():
            w.close()
        found = 0
        with pa.ipc.new_file(dest, IMAGE_SCHEMA) as out:
            for b in sorted(self.writers):
                with pa.memory_map(self._path(b)) as f:
                    t = pa.ipc.open_file(f).read_all()
                t = t.take(pc.sort_indices(t, [("image_id", "ascending")]))  # stable: the first spilled leads
                ids = t.column("image_id").to_numpy(zero_copy_only=False)
                first = np.ones(len(ids), bool)
                first[1:] = ids[1:] != ids[:-1]
                t = t.filter(pa.array(first))
                found += t.num_rows
                for batch in t.to_batches(IMAGE_ROW_GROUP):
                    out.write_batch(batch)
                os.remove(self._path(b))
        table = pa.ipc.open_file(pa.memory_map(dest)).read_all()
        os.remove(dest)  # the mapping keeps the pages until the table is gone
        return table, found


# ------------------------------------------------------------------------------ the stage


class MergeStage(Stage):
    name = "merge"

    def passes(self) -> list[Pass]:
        return [MergeMapPass(), MergeDedupPass(), MergeMixPass(), MergeImagesPass()]

    def enabled(self, cfg: Config) -> bool:
        """An optional pipeline step: it runs when merge sources are configured."""
        return bool(cfg.merge.sources)

    def check(self, cfg: Config, output: str) -> None:
        m = cfg.merge
        if m.sources:
            sources = resolve_sources(m.sources, m.priority, m.image_folders)
            unknown = sorted(set(m.categories) - {s.name for s in sources})
            if unknown:
                raise ValueError(f"merge.categories names {unknown}, which are not sources "
                                 f"({[s.name for s in sources]})")

    def resolve_input(self, input: Any, cfg: Config) -> str:
        """The first source's path (repeated --input is in merge.sources already)."""
        return parse_source(with_sources(input, cfg).merge.sources[0])[1]

    def run(self, input: Any, output: str, cfg: Config, *, filesystem=None, overwrite: bool = False,
            quiet: bool = False) -> StageSummary:
        cfg = with_sources(input, cfg)
        sources = [parse_source(s)[1] for s in cfg.merge.sources]
        out = Location.parse(output, filesystem)
        for path in sources:  # run_stage checks the first; every source must stay clear of the output
            a, b = Location.parse(path).path.rstrip("/"), out.path.rstrip("/")
            if a == b or a.startswith(b + "/") or b.startswith(a + "/"):
                raise OutputConflict(f"merge: the output {out.uri()!r} and the source {path!r} overlap; write "
                                     "the output to a folder outside every source")
        summary = run_stage(self, sources[0], output, cfg, filesystem=filesystem, overwrite=overwrite, quiet=quiet)
        if not cfg.merge.keep_intermediates:
            remove_intermediates(out)
        return summary

    def report(self, out: Location, cfg: Config, summary: StageSummary, results: dict[str, PassResult]) -> list[str]:
        from curation.merge_report import write_report

        return write_report(out, cfg, [results[p.name] for p in self.passes()], mixture_rates)
