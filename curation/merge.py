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
import unicodedata
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from curation.caption_filter import band_keys, exact_duplicates, jaccard_estimate, minhash, near_duplicate_candidates
from curation.merge_readers import (
    IMAGE,
    Bad,
    Limits,
    Source,
    list_source_files,
    parse_source,
    read_records,
    resolve_sources,
)
from ovpipe.core.config import config_hash
from ovpipe.core.hashing import seeded_mix, splitmix64
from ovpipe.core.images import MAX_SOURCE_PIXELS, BadImage, probe_image
from ovpipe.core.ledger import Ledger
from ovpipe.core.shards import Location, concat_or_empty, read_table, shard_name_for, write_table
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

MAP_DIR, PARTS_DIR, DEDUP_DIR = "_map", "_parts", "_dedup"
IMAGES_DIR, IMAGE_PARTS_DIR = "images", "_images"  # the image store; the map pass's image files
IMAGE_ROW_GROUP = 64  # images per row group of the store: a reader's id filter skips the others
REPORT_FILE, PLOT_FILE = "merge_report.json", "merge_report.png"
CJK = ("\u3400", "\u9fff")

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
    body = [(t["from"], normalise_text(t["value"])) for t in turns if t["from"] != "system"]
    head = f"{image_key:016x}\x1d"
    question = head + "\x1e".join(v for r, v in body if r == "human")
    exact = head + json.dumps(body, ensure_ascii=False)
    return image_key, xxhash.xxh3_64_intdigest(question.encode()), xxhash.xxh3_64_intdigest(exact.encode())


def sample_identity(turns: list[dict[str, str]], images: list[bytes]) -> tuple[str, int]:
    """(sample_id, sample_hash) of the conversation as written plus its images: the same id
    ``ovpipe pack`` computes for the row."""
    canonical = json.dumps(turns, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    digest = xxhash.xxh3_64(canonical.encode("utf-8"))
    for b in images:
        digest.update(xxhash.xxh3_64_digest(b))
    return digest.hexdigest(), digest.intdigest()


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
    return cfg.model_copy(update={"merge": cfg.merge.model_copy(update={"sources": sources})})


# ------------------------------------------------------------------------------ pass 1: map


class MergeMapPass(Pass):
    """One source file -> its valid samples, split into the shuffle's hash partitions."""

    name = "merge"  # also the ledger's stage
    config_sections = ("merge", "pack", "run")  # pack: the length rule of the token counts
    schema_version = 2  # 2: images in _images/, not inline in the shuffle rows
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
        return {"sources": {s.name: [s.root.uri(), s.rank] for s in self.sources.values()}}

    def process(self, task: ShardTask) -> ShardOutput:
        cfg = task.config
        m, src = cfg.merge, self.sources[task.shard]
        limits = Limits(m.max_images_per_sample, m.max_image_bytes, m.max_text_bytes)
        root = Location.parse(src.image_root) if src.image_root else Location(task.input.fs, _dirname(task.input.path))
        counter = _TokenCounter(cfg) if m.count_tokens else None
        ledger = Ledger(self.name)
        rows: dict[str, list] = {f.name: [] for f in SHUFFLE_SCHEMA}
        seen: dict[str, Any] = {}  # image id -> (height, width) or BadImage
        images: dict[str, bytes] = {}  # image id -> bytes, of the valid samples: each image once
        n = 0
        for rec in read_records(task.input, root, limits):
            n += 1
            try:
                if rec.error is not None:
                    raise rec.error
                row = _shuffle_row(rec, src, m, counter, seen)
            except Bad as e:
                ledger.drop(rec.locator, e.reason, e.detail)
                continue
            images.update(zip(row["image_ids"], rec.images))
            for k in rows:
                rows[k].append(row[k])
        table = pa.Table.from_pydict(rows, schema=SHUFFLE_SCHEMA)
        part = np.asarray(table.column("partition"))
        written = sorted(set(part.tolist()))
        for p in written:  # the shuffle's map output: one file per non-empty partition
            write_table(task.output_root.join(PARTS_DIR, task.shard, f"p-{p:05d}.parquet"),
                        table.filter(pa.array(part == p)))
        return ShardOutput(table.select(INDEX_COLUMNS), ledger, n, stats={
            "partitions": written, "source": src.name, "image_partitions": self._write_images(task, images)})

    def process_rows(self, task: ShardTask, rows: list[int]) -> ShardOutput:
        # A source file's records are not self-contained Parquet rows (JSON, images beside it), and
        # its rows are deduplicated against every other source: redo the merge instead.
        raise ValueError("merge: `ovpipe retry` cannot redo single merge records; fix the source (e.g. put the "
                         "missing images back) and run `ovpipe merge` again with --overwrite")

    @staticmethod
    def _write_images(task: ShardTask, images: dict[str, bytes]) -> list[int]:
        """This shard's images, each once, into their image-store partitions (sorted by id);
        returns the partitions written."""
        ids = sorted(images)
        table = pa.Table.from_pydict({"image_id": ids, "bytes": [images[i] for i in ids]}, schema=IMAGE_SCHEMA)
        part = image_partitions(ids, task.config.merge.image_partitions)
        written = sorted(set(part.tolist()))
        for p in written:
            write_table(task.output_root.join(IMAGE_PARTS_DIR, task.shard, f"i-{p:05d}.parquet"),
                        table.filter(pa.array(part == p)), IMAGE_ROW_GROUP)
        return written


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


def _shuffle_row(rec, src: Source, m, counter: _TokenCounter | None, seen: dict[str, Any]) -> dict[str, Any]:
    image_ids = [xxhash.xxh3_64_hexdigest(b) for b in rec.images]
    sizes = []
    for i, (data, image_id) in enumerate(zip(rec.images, image_ids)):
        try:
            sizes.append(_probe(data, image_id, m, seen))
        except BadImage as e:
            raise Bad(e.reason, f"image {i}: {e.detail}") from None
    image_key, question_key, exact_key = sample_keys(rec.turns, image_ids)
    sample_id, sample_hash = sample_identity(rec.turns, rec.images)
    try:
        tokens = counter(rec.turns, sizes) if counter else 0
    except ValueError as e:  # an image the resize rule refuses (extreme aspect ratio)
        raise Bad("bad_image_size", str(e)[:300]) from None
    partition = (image_key if image_ids else question_key) % m.partitions
    return {"sample_id": sample_id, "source": src.name,
            "category": rec.category or m.categories.get(src.name, src.name),
            "conversations": rec.turns, "image_ids": image_ids, "origin": rec.locator,
            "length_tokens": tokens, "source_rank": src.rank, "sample_hash": sample_hash,
            "image_key": image_key, "question_key": question_key, "exact_key": exact_key,
            "partition": partition}


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
    schema_version = 2  # 2: no image bytes
    reads = MergeMapPass.name
    folder = DEDUP_DIR

    def list_shards(self, ctx: PassContext) -> list[Shard]:
        stamp = map_digest(ctx.done[self.reads].entries)
        return [Shard(f"part-{p:05d}", None, stamp, p) for p in range(ctx.cfg.merge.partitions)]

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
        return ShardOutput(out, ledger, table.num_rows, stats={
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
        return [Shard(name, ctx.input.join(e["output"]), f"{e['kept_rows']}:{e['config_hash']}:{e.get('input_stamp')}")
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
    schema_version = 1
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
        n, p = task.config.merge.image_partitions, task.index
        wanted: set[str] = set()
        references = 0
        for loc in self.rows:  # the ids this partition must hold (one column: small)
            ids = pc.list_flatten(read_table(loc, ["image_ids"]).column("image_ids")).to_pylist()
            mine = image_partitions(ids, n) == p
            references += int(mine.sum())
            wanted.update(i for i, m in zip(ids, mine.tolist()) if m)
        found, left = [], wanted
        for loc in self.parts.get(p, []):  # each id taken from the first map shard that has it
            if not left:
                break
            t = read_table(loc)
            t = t.filter(pc.is_in(t.column("image_id"), pa.array(sorted(left), pa.string())))
            found.append(t)
            left = left - set(t.column("image_id").to_pylist())
        if left:
            raise RuntimeError(f"merge_images: {len(left)} image ids of partition {p} are in no map shard's "
                               f"image files (e.g. {sorted(left)[0]}); re-run with --overwrite")
        table = concat_or_empty(found, IMAGE_SCHEMA)
        table = table.take(pc.sort_indices(table, [("image_id", "ascending")]))
        return ShardOutput(table, Ledger(self.name), table.num_rows, row_group_size=IMAGE_ROW_GROUP,
                           stats={"partition": p, "partitions": n, "references": references})


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
        return run_stage(self, sources[0], output, cfg, filesystem=filesystem, overwrite=overwrite, quiet=quiet)

    def report(self, out: Location, cfg: Config, summary: StageSummary, results: dict[str, PassResult]) -> list[str]:
        from curation.merge_report import write_report

        return write_report(out, cfg, [results[p.name] for p in self.passes()], mixture_rates)
