"""`ovpipe pack`: samples -> packed training shards of at most ``pack.max_len`` tokens.

Reads (one format per input file, detected from its name and columns):
* caption shards (the caption stage's output, or any Parquet with ``caption`` + an image
  reference ``image_uri``/``image_member``/``image_row`` + ``width``/``height``): one-turn
  conversations, ``<image>`` + a per-language prompt as the user turn, the caption as the answer;
* LLaVA conversation data: ``.json`` (a list of records) or ``.jsonl`` files with
  ``{"id", "image": path | [paths] (optional), "conversations": [{"from", "value"}, ...]}``,
  images read from ``pack.image_folder`` (default: the file's folder); or Parquet with a
  ``conversations`` column (list of {from, value} structs, or JSON text) and images as bytes
  (``image``/``images``: binary, Hugging Face {bytes, path} structs, or lists of them) or paths,
  or (an ``ovpipe merge`` output) ``image_ids`` resolved through the input's image store
  ``INPUT/images/`` (``ImageStore``: only the partitions and row groups that hold the shard's ids
  are read; an id the store lacks is a ``missing_image`` ledger row);
* any Parquet with ``num_tokens`` (and ``sample_id``): lengths used as they are, nothing rendered.

Writes (docs/data-contracts.md), as ``PackStage``, three passes of ovpipe.core.stage.run_stage:
* ``OUT/_staged/`` (pass ``pack``, ``PackPrepPass``; also the ledger's stage name): per input shard
  ``data/<shard>.parquet`` (the index: INDEX_COLUMNS), ``_payload/<shard>.routed`` (the rendered
  samples, STAGED_SCHEMA, a routed file (ovpipe.core.routed): one Arrow record batch per bucket =
  sample_hash mod B; B = pack.buckets, or from the input size), ``_counts/<shard>.routed`` (per
  bucket, its (length, samples) counts: COUNTS_SCHEMA), ``_ledger/<shard>.parquet`` (the samples
  dropped: overlong, bad images, ...);
* ``OUT/_lengths/`` (pass ``pack_lengths``): per bucket, its exact length histogram;
* ``OUT/data/bucket-XXXXX.parquet`` and ``OUT/data/repair-XXXXX.parquet`` (pass ``pack_buckets``,
  ``PackBucketPass``): one row per pack, PACK_SCHEMA (packing/schema.py), self-contained; the
  folder holds nothing else, so any Parquet reader opens it as a dataset. ``OUT/_manifest/``
  their commit records (with counts and histograms) and the stage's ``_summary.json``;
* ``OUT/pack_stats.json`` (+ ``OUT/pack_stats.png`` with ``pack.plot``), the stage's report:
  counts, lower bound (both terms), the global BFD's pack count, fill, per-source tokens, warnings.
The intermediate payload (``_staged/_payload/``, ``_staged/_counts/``, ``_pool/``) is removed
once the stage has committed, unless ``pack.keep_staged``.

How it runs: pass 1 is one task per input shard (render, measure, fetch images, ledger overlong
and bad samples, write rows grouped by bucket). Pass 2 is one task per bucket: the sum of that
bucket's batch of every staged shard's counts -> a length histogram. Pass 3 plans
once on the driver from those histograms (packing.pack.plan_buckets: ONE best-fit-decreasing
plan over all samples, its packs handed to the buckets that can form them from their own
samples), then runs one task per bucket (its packs; the samples its packs do not take go to
``OUT/_pool/bucket-XXXXX.routed``, a routed file, one batch per repair shard) and, after every
bucket, one task per repair shard (the plan's other packs, from its batch of every pool file).
These reads are a shuffle: S x B small reads in passes 2 and 3 (S staged shards, B buckets) and
B x B for the repair shards, each a few small reads at known offsets whose cost does not grow
with B (ovpipe.core.routed; a Parquet footer with a row group per bucket did). So
the pack count is exactly one global BFD's, whatever B and the worker count. Virtual shards are
stamped with a digest of the staged shards, so they are redone when those change. run_stage
commits, resumes and checks the accounting (inputs = packed + ledgered; every staged sample is
packed by exactly one bucket or repair shard).
"""

from __future__ import annotations

import io
import json
import posixpath
import sys
from collections import Counter
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from ovpipe.core.config import config_hash
from ovpipe.core.hashing import text_hash
from ovpipe.core.images import MAX_SOURCE_PIXELS, BadImage, fetch_image_bytes, probe_image
from ovpipe.core.ledger import Ledger
from ovpipe.core.routed import read_routed, write_routed
from ovpipe.core.shards import (
    MANIFEST_DIR,
    Location,
    default_source,
    read_manifest_entries,
    read_table,
    write_bytes_atomic,
    write_json,
)
from ovpipe.core.stage import (
    Pass,
    PassContext,
    PassResult,
    Shard,
    ShardOutput,
    ShardTask,
    Stage,
    StageSummary,
)
from packing import tokenizer as ptok
from packing.pack import (
    BucketPlan,
    LengthCounts,
    PackResult,
    RepairSplit,
    fill_plan,
    lower_bound,
    plan_buckets,
    split_repair,
)
from packing.schema import PACK_SCHEMA, PACK_SCHEMA_VERSION

if TYPE_CHECKING:  # annotations only: the root config composes every stage's section
    from ovpipe.config import Config

STAGED_DIR = "_staged"
IMAGE_STORE_DIR = "images"  # an input's image store (`ovpipe merge` writes it; ImageStore)
PAYLOAD_DIR = "_payload"
COUNTS_DIR = "_counts"  # in _staged: per shard, each bucket's (length, samples) counts
ROUTED = ".routed"  # routed files (ovpipe.core.routed): staged payloads and counts, pool files
REDONE_MARK = "#payload-redone-"  # in a staged shard's stamp: redone because its payload was removed
LENGTHS_DIR = "_lengths"
POOL_DIR = "_pool"
LOW_FILL = 0.8  # pack_stats warns below this fill, saying what the user can change
STATS_FILE = "pack_stats.json"
PLOT_FILE = "pack_stats.png"
HIST_BINS = 64  # length / fill histograms: max_len split into 64 equal bins

STAGED_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("sample_hash", pa.uint64(), nullable=False),
        pa.field("bucket", pa.int32(), nullable=False),
        pa.field("num_tokens", pa.int32(), nullable=False),
        pa.field("image_tokens", pa.int32(), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("conversation", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("loss_mask", pa.list_(pa.uint8()), nullable=False),
        pa.field("images", pa.list_(pa.binary()), nullable=False),
        pa.field("image_hw", pa.list_(pa.list_(pa.int32())), nullable=False),
    ]
)
COUNTS_SCHEMA = pa.schema([pa.field("bucket", pa.int32()), pa.field("num_tokens", pa.int32()),
                           pa.field("samples", pa.int64())])
INDEX_COLUMNS = ["sample_id", "sample_hash", "bucket", "num_tokens", "image_tokens", "truncated"]


class SampleError(ValueError):
    """A sample that cannot be packed; becomes a ledger row with this reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ------------------------------------------------------------------ readers
# Each yields dicts: locator, sample_id, sample_hash, source, and either num_tokens (lengths only)
# or conversations + images (bytes) + sizes ((h, w) before resize); or an "error" SampleError.


def _read_lengths(pf: pq.ParquetFile, uri: str, source: str) -> Iterator[dict]:
    names = pf.schema_arrow.names
    if "sample_id" not in names:
        raise ValueError(f"{uri}: a num_tokens input needs a sample_id column too (has {names})")
    cols = [c for c in ("sample_id", "sample_hash", "num_tokens", "source") if c in names]
    row = 0
    for batch in pf.iter_batches(columns=cols, batch_size=65536):
        d = batch.to_pydict()
        sources = d.get("source") or [None] * batch.num_rows  # once per batch, not per row
        for i in range(batch.num_rows):
            sid = d["sample_id"][i]
            rec = {"locator": f"{uri}#row={row}", "sample_id": sid, "num_tokens": d["num_tokens"][i],
                   "source": sources[i] or source}
            h = d["sample_hash"][i] if "sample_hash" in d else None
            rec["sample_hash"] = h if h is not None else (text_hash(sid) if sid else 0)
            if not sid:
                rec["error"] = SampleError("missing_sample_id", "sample_id is null or empty")
            yield rec
            row += 1


def _lengths_table(pf: pq.ParquetFile, uri: str, source: str, cfg, ledger: Ledger, buckets: int) -> pa.Table | None:
    """The lengths-only input (``sample_id`` + integer ``num_tokens``) as whole columns: the same
    checks, ledger rows and staged rows as ``_read_lengths`` + ``_sample``, without a Python step
    per row (only per dropped row, and one xxhash call per id without a ``sample_hash``).
    None when a column has a type the row path handles differently (it is then used)."""
    schema = pf.schema_arrow
    names = schema.names
    if "sample_id" not in names:
        raise ValueError(f"{uri}: a num_tokens input needs a sample_id column too (has {names})")
    is_str = lambda c: c not in names or pa.types.is_string(schema.field(c).type)  # noqa: E731
    if not (pa.types.is_integer(schema.field("num_tokens").type) and is_str("sample_id") and is_str("source")
            and ("sample_hash" not in names or schema.field("sample_hash").type == pa.uint64())):
        return None
    cols = [c for c in ("sample_id", "sample_hash", "num_tokens", "source") if c in names]
    t = pf.read(columns=cols)
    sid, num = t.column("sample_id"), t.column("num_tokens")
    no_id = np.asarray(pc.fill_null(pc.equal(pc.utf8_length(sid), 0), True))
    bad = np.asarray(pc.fill_null(pc.less_equal(num, 0), True))
    over = np.asarray(pc.fill_null(pc.greater(num, cfg.max_len), False))
    dropped = no_id | bad | over
    for row in np.flatnonzero(dropped).tolist():  # input order, first failing check, as row by row
        s, n = sid[row].as_py(), num[row].as_py()
        if no_id[row]:
            err = SampleError("missing_sample_id", "sample_id is null or empty")
        elif bad[row]:
            err = SampleError("bad_num_tokens", f"num_tokens {n!r} is not a positive integer")
        else:
            err = SampleError("overlong", f"{n} tokens > max_len {cfg.max_len} (precomputed lengths "
                              "cannot be truncated)")
        ledger.drop(f"{uri}#row={row}", err.reason, err.detail, s)
    keep = pa.array(~dropped)
    t = t.filter(keep)
    k = t.num_rows
    sid = t.column("sample_id").combine_chunks()
    ids = sid.to_pylist()
    if "sample_hash" in names:
        hashes = t.column("sample_hash").fill_null(0).to_numpy().copy()
        for i in np.flatnonzero(np.asarray(t.column("sample_hash").is_null())).tolist():
            hashes[i] = text_hash(ids[i])
    else:
        hashes = np.fromiter(map(text_hash, ids), dtype=np.uint64, count=k)
    if "source" in names:
        src = t.column("source")
        named = pc.fill_null(pc.greater(pc.utf8_length(src), 0), False)
        sources = pc.if_else(named, src, pa.scalar(source, pa.string())).combine_chunks()
    else:
        sources = pa.repeat(pa.scalar(source, pa.string()), k)
    none = pa.array(np.zeros(k + 1, np.int32))  # list offsets of k empty lists
    columns = {
        "sample_id": sid, "sample_hash": pa.array(hashes, pa.uint64()),
        "bucket": pa.array((hashes % np.uint64(buckets)).astype(np.int32)),
        "num_tokens": pa.array(np.asarray(t.column("num_tokens"), dtype=np.int64).astype(np.int32)),
        "image_tokens": pa.array(np.zeros(k, np.int32)), "truncated": pa.array(np.zeros(k, bool)),
        "source": sources, "conversation": pa.repeat(pa.scalar("", pa.string()), k),
        "input_ids": pa.ListArray.from_arrays(none, pa.array([], pa.int32())),
        "loss_mask": pa.ListArray.from_arrays(none, pa.array([], pa.uint8())),
        "images": pa.ListArray.from_arrays(none, pa.array([], pa.binary())),
        "image_hw": pa.ListArray.from_arrays(none, pa.array([], pa.list_(pa.int32()))),
    }
    return pa.Table.from_pydict(columns, schema=STAGED_SCHEMA)


def _read_captions(pf: pq.ParquetFile, uri: str, source: str, cfg, filesystem) -> Iterator[dict]:
    names = pf.schema_arrow.names
    cols = [c for c in ("sample_id", "sample_hash", "source", "image_uri", "image_member", "image_row",
                        "width", "height", "caption", "language") if c in names]
    row = 0
    for batch in pf.iter_batches(columns=cols, batch_size=256):
        table = pa.Table.from_batches([batch])
        problems: dict[int, tuple[str, str]] = {}
        images = fetch_image_bytes(table.select(["sample_id", "image_uri", "image_member", "image_row"]),
                                   problems=problems)  # full URIs: not the input's filesystem
        d = table.to_pydict()
        for i in range(batch.num_rows):
            sid, caption = d["sample_id"][i], d["caption"][i]
            prompt = cfg.caption_prompt_zh if d.get("language", [None] * len(images))[i] == "zh" else cfg.caption_prompt_en
            rec = {"locator": f"{uri}#row={row}", "sample_id": sid,
                   "sample_hash": d["sample_hash"][i] if "sample_hash" in d else text_hash(sid or ""),
                   "source": d["source"][i] if "source" in d and d["source"][i] else source,
                   "conversations": [{"from": "human", "value": "<image>\n" + prompt},
                                     {"from": "gpt", "value": caption}],
                   "images": [images[i]], "sizes": [(d["height"][i], d["width"][i])]}
            if not isinstance(caption, str) or not caption.strip():
                rec["error"] = SampleError("empty_caption", "caption is null or blank")
            elif images[i] is None:
                reason, detail = problems.get(i, ("image_not_found", f"cannot read image {d['image_uri'][i]!r}"))
                rec["error"] = SampleError("missing_image", f"{reason}: {detail}"[:300])
            yield rec
            row += 1


def _image_root(task: ShardTask, cfg) -> Location:
    if cfg.image_folder:
        return Location.parse(cfg.image_folder, None if "://" in cfg.image_folder else
                              (task.input.fs if not task.input.is_local else None))
    return Location(task.input.fs, posixpath.dirname(task.input.path))


def _load_path(root: Location, rel: str) -> bytes:
    if not isinstance(rel, str) or not rel or rel.startswith("/") or ".." in rel.split("/"):
        raise SampleError("bad_image_path", f"image path {rel!r} must be relative, inside the image folder")
    loc = root.join(rel)
    try:
        return loc.read_bytes()
    except (OSError, ValueError) as e:
        raise SampleError("missing_image", f"{loc.uri()}: {e}") from None


def _conversation_record(rec: dict, images: list, root: Location, locator: str, source: str) -> dict:
    """A LLaVA record (dict) -> a reader dict; images: bytes or relative paths."""
    out = {"locator": locator, "source": source}
    try:
        conv = rec.get("conversations")
        if isinstance(conv, str):
            conv = json.loads(conv)
        if not isinstance(conv, list):
            raise SampleError("bad_conversation", "no 'conversations' list")
        conv = [{"from": t.get("from", t.get("role")), "value": t.get("value", t.get("content"))}
                if isinstance(t, dict) else t for t in conv]
        data = [_load_path(root, im) if isinstance(im, str) else im for im in images]
        if any(not isinstance(b, (bytes, bytearray)) for b in data):
            raise SampleError("missing_image", "an image is null")
        out["conversations"], out["images"] = conv, [bytes(b) for b in data]
        canonical = json.dumps(conv, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        digest = xxhash.xxh3_64(canonical.encode("utf-8"))
        for b in out["images"]:
            digest.update(xxhash.xxh3_64_digest(b))
        out["sample_id"], out["sample_hash"] = digest.hexdigest(), digest.intdigest()
    except SampleError as e:
        out.update(sample_id=None, sample_hash=0, error=e)
    except (ValueError, TypeError, AttributeError) as e:
        out.update(sample_id=None, sample_hash=0, error=SampleError("bad_conversation", str(e)[:200]))
    return out


def _record_images(rec: dict) -> list:
    img = rec.get("image", rec.get("images"))
    if img is None:
        return []
    return list(img) if isinstance(img, (list, tuple)) else [img]


def _read_llava_json(task: ShardTask, cfg, source: str) -> Iterator[dict]:
    uri = task.input.uri()
    root = _image_root(task, cfg)
    text = task.input.read_bytes().decode("utf-8")
    if task.input.path.endswith(".jsonl"):
        records: list = []
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                records.append(SampleError("bad_record", f"not JSON: {e}"))
    else:
        records = json.loads(text)
        if not isinstance(records, list):
            raise ValueError(f"{uri}: a LLaVA .json file holds a list of records")
    for row, rec in enumerate(records):
        locator = f"{uri}#row={row}"
        if not isinstance(rec, dict):
            err = rec if isinstance(rec, SampleError) else SampleError("bad_record", "record is not an object")
            yield {"locator": locator, "sample_id": None, "sample_hash": 0, "source": source, "error": err}
            continue
        yield _conversation_record(rec, _record_images(rec), root, locator, source)


def _parquet_images(value) -> list:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    return [v.get("bytes") or v.get("path") if isinstance(v, dict) else v for v in items]


class ImageStore:
    """Images stored once by content id: an ``ovpipe merge`` output's ``images/`` (docs/
    data-contracts.md, "Merge output"): Parquet of ``image_id`` + ``bytes``, partition
    int(image_id, 16) mod ``partitions``, rows sorted by id, found through its manifest."""

    def __init__(self, root: Location):
        entries = read_manifest_entries(root)
        counts = {e.get("partitions") for e in entries.values()}
        if len(counts) != 1 or None in counts:
            raise ValueError(f"{root.uri()}: an image store's manifest entries must all name the same "
                             f"'partitions' (found {sorted(map(str, counts))}); re-run `ovpipe merge`")
        self.root, self.partitions = root, counts.pop()
        self.files = {e["partition"]: root.join(e["output"]) for e in entries.values()}

    @classmethod
    def of(cls, input_root: Location) -> ImageStore | None:
        """The store of a stage input (``INPUT/images/``), or None."""
        loc = input_root.join(IMAGE_STORE_DIR)
        return cls(loc) if loc.join(MANIFEST_DIR).is_dir() else None

    def lookup(self, ids: list[str]) -> dict[str, bytes]:
        """{id: bytes} of the ids the store holds: only their partitions are opened, and of those
        only the row groups whose id range can hold one are read (pyarrow filter)."""
        by_part: dict[int, set[str]] = {}
        for i in set(ids):
            try:
                by_part.setdefault(int(i, 16) % self.partitions, set()).add(i)
            except (TypeError, ValueError):  # not a content id: reported as missing
                continue
        found: dict[str, bytes] = {}
        for p, want in sorted(by_part.items()):
            loc = self.files.get(p)
            if loc is not None:
                t = pq.read_table(loc.path, filesystem=loc.fs, filters=[("image_id", "in", sorted(want))])
                found.update(zip(t.column("image_id").to_pylist(), t.column("bytes").to_pylist()))
        return found


def _store_images(pf: pq.ParquetFile, task: ShardTask) -> tuple[ImageStore, dict[str, bytes]]:
    """A shard whose rows name their images by ``image_ids`` (no bytes): the input's image store
    and the images this shard names (one lookup per shard: its images are held anyway)."""
    store = ImageStore.of(task.input_root)
    if store is None:
        raise ValueError(
            f"{task.input.uri()}: the rows name their images by image_ids (no image/images column), but "
            f"{task.input_root.join(IMAGE_STORE_DIR).uri()} is no image store. Pack the `ovpipe merge` output "
            "folder itself (--input OUT, which holds data/ and images/), not a file or folder inside it.")
    ids = pc.list_flatten(pf.read(columns=["image_ids"]).column("image_ids")).drop_null().to_pylist()
    return store, store.lookup(ids)


def _read_conversation_parquet(pf: pq.ParquetFile, task: ShardTask, cfg, source: str) -> Iterator[dict]:
    uri = task.input.uri()
    root = _image_root(task, cfg)
    names = pf.schema_arrow.names
    image_col = next((c for c in ("images", "image") if c in names), None)
    store, by_id = None, {}
    if image_col is None and "image_ids" in names:  # an `ovpipe merge` output: images stored once
        store, by_id = _store_images(pf, task)
        image_col = "image_ids"
    cols = [c for c in ("conversations", image_col, "source") if c]
    row = 0
    for batch in pf.iter_batches(columns=cols, batch_size=256):
        for rec in batch.to_pylist():
            locator, src = f"{uri}#row={row}", rec.get("source") or source
            row += 1
            if store is None:
                images = _parquet_images(rec.get(image_col)) if image_col else []
            else:
                ids = rec.get("image_ids") or []
                missing = [i for i in ids if i not in by_id]
                if missing:
                    yield {"locator": locator, "sample_id": None, "sample_hash": 0, "source": src,
                           "error": SampleError("missing_image", f"image {missing[0]!r} is not in the image "
                                                f"store {store.root.uri()}")}
                    continue
                images = [by_id[i] for i in ids]
            yield _conversation_record(rec, images, root, locator, src)


# ------------------------------------------------------------------ pass 1


class PackPrepPass(Pass):
    """Pass 1: one input shard -> its rendered samples grouped by bucket (the payload), their
    index (the pass's data shard) and the ledger of the samples that cannot be packed."""

    name = "pack"  # also the ledger's stage
    config_sections = ("pack", "run")
    schema_version = 3  # 3: payloads and counts are routed files (were Parquet, a row group per bucket)
    input_suffixes = (".parquet", ".jsonl", ".json")
    folder = STAGED_DIR

    def __init__(self) -> None:
        self.buckets = 1  # set by prepare (pack.buckets, or from the input size)

    def shard_files(self, shard: str) -> list[str]:
        return [f"{PAYLOAD_DIR}/{shard}{ROUTED}", f"{COUNTS_DIR}/{shard}{ROUTED}"]

    def list_shards(self, ctx: PassContext) -> list[Shard]:
        """The input shards; but once a finished run removed the payload (pack.keep_staged = false),
        a run whose input changed (a new, removed or rewritten shard: `ovpipe retry` upstream, more
        data) redoes every staged shard whose payload is gone, since the buckets it then redoes read
        all of them. A redone shard's stamp gets a mark, so an unchanged input later redoes nothing."""
        shards = super().list_shards(ctx)
        done = read_manifest_entries(ctx.output)
        if not done:
            return shards
        base = lambda stamp: (stamp or "").split(REDONE_MARK)[0]  # noqa: E731
        same = {s.name for s in shards
                if s.name in done and base(done[s.name].get("input_stamp")) == (s.stamp or "")}
        present = {posixpath.basename(f.path).removesuffix(ROUTED)
                   for f in ctx.output.join(PAYLOAD_DIR).list_files((ROUTED,), recursive=False)}
        gone = set(done) - present
        changed = same != set(done) or same != {s.name for s in shards}
        # a finished run with nothing new keeps its payload-less shards; otherwise (the input changed,
        # or a redo was cut short) they are redone: a stamp unlike the committed one
        redo = gone if gone and (changed or gone != set(done)) else set()
        return [replace(s, stamp=f"{s.stamp or ''}{REDONE_MARK}{text_hash(str(done[s.name].get('input_stamp'))):x}")
                if s.name in redo else replace(s, stamp=done[s.name].get("input_stamp")) if s.name in same else s
                for s in shards]

    def prepare(self, ctx: PassContext, shards: list[Shard]) -> dict[str, Any]:
        """The tokenizer and chat template's identity: part of the config hash, so staged samples
        rendered by another tokenizer are refused, not mixed in."""
        p = ctx.cfg.pack
        tok = ptok.load_tokenizer(p.tokenizer)
        self.buckets = p.buckets or auto_buckets([s.input for s in shards], p.samples_per_bucket,
                                                  p.lengths_samples_per_bucket)
        return {**ptok.template_identity(tok, p.min_pixels, p.max_pixels, p.loss_on, p.system_prompt),
                "buckets": self.buckets}

    @staticmethod
    def _source(task: ShardTask) -> str:
        return task.config.pack.source or default_source(task.input, task.input_root)

    def _records(self, task: ShardTask) -> tuple[Any, str]:
        """(records, kind); for kind "lengths", the open ParquetFile (read as whole columns)."""
        cfg = task.config.pack
        source = self._source(task)
        if task.input.path.endswith((".json", ".jsonl")):
            return _read_llava_json(task, cfg, source), "conversations"
        f = task.input.fs.open_input_file(task.input.path)
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if "num_tokens" in names:
            return pf, "lengths"
        if "conversations" in names:
            return _read_conversation_parquet(pf, task, cfg, source), "conversations"
        if "caption" in names and "image_uri" in names:
            fs = None if task.input.is_local else task.input.fs
            return _read_captions(pf, task.input.uri(), source, cfg, fs), "captions"
        raise ValueError(
            f"{task.input.uri()}: cannot tell what this is (columns {names}). ovpipe pack reads caption "
            "shards (caption + image_uri/width/height), conversation data (conversations [+ image/images]) "
            "or precomputed lengths (sample_id + num_tokens)."
        )

    def process(self, task: ShardTask) -> ShardOutput:
        cfg = task.config.pack
        ledger = Ledger(self.name)
        records, kind = self._records(task)
        if kind == "lengths":
            table = _lengths_table(records, task.input.uri(), self._source(task), cfg, ledger, self.buckets)
            if table is not None:
                return self._stage_rows(task, table, table.num_rows + len(ledger), ledger)
            records = _read_lengths(records, task.input.uri(), self._source(task))
        rows: dict[str, list] = {f.name: [] for f in STAGED_SCHEMA}
        tok = None if kind == "lengths" else ptok.load_tokenizer(cfg.tokenizer)  # lengths need no tokenizer
        n_in = 0
        for rec in records:
            n_in += 1
            try:
                if "error" in rec:
                    raise rec["error"]
                sample = self._sample(rec, cfg, tok)
            except SampleError as e:
                ledger.drop(rec["locator"], e.reason, e.detail, rec.get("sample_id"))
                continue
            h = int(rec["sample_hash"])
            sample.update(sample_id=rec["sample_id"], sample_hash=h, bucket=h % self.buckets, source=rec["source"])
            for k in rows:
                rows[k].append(sample[k])
        return self._stage_rows(task, pa.Table.from_pydict(rows, schema=STAGED_SCHEMA), n_in, ledger)

    def _stage_rows(self, task: ShardTask, table: pa.Table, n_in: int, ledger: Ledger) -> ShardOutput:
        # Grouped by bucket (stable: input order within a bucket), one batch per bucket; and
        # each bucket's length counts, all that pass 2 reads.
        buckets = np.asarray(table.column("bucket"))
        order = np.argsort(buckets, kind="stable")  # sorted once: write_routed keeps grouped rows as they are
        table, buckets = table.take(order), buckets[order]
        write_routed(task.output_root.join(PAYLOAD_DIR, f"{task.shard}{ROUTED}"), table, buckets, self.buckets,
                     _compression(table))
        counts = _length_counts(buckets, np.asarray(table.column("num_tokens")))
        write_routed(task.output_root.join(COUNTS_DIR, f"{task.shard}{ROUTED}"), counts,
                     np.asarray(counts.column("bucket")), self.buckets, compression=None)
        return ShardOutput(table.select(INDEX_COLUMNS), ledger, n_in, stats={"buckets": self.buckets})

    @staticmethod
    def _sample(rec: dict, cfg, tok: ptok.Tokenizer) -> dict:
        empty = {"image_tokens": 0, "truncated": False, "conversation": "", "input_ids": [], "loss_mask": [],
                 "images": [], "image_hw": []}
        if "num_tokens" in rec:
            n = rec["num_tokens"]
            if not isinstance(n, int) or n <= 0:
                raise SampleError("bad_num_tokens", f"num_tokens {n!r} is not a positive integer")
            if n > cfg.max_len:
                raise SampleError("overlong", f"{n} tokens > max_len {cfg.max_len} (precomputed lengths "
                                  "cannot be truncated)")
            return {**empty, "num_tokens": n}
        images, sizes = rec["images"], rec.get("sizes")
        if len(images) > cfg.max_images_per_sample:
            raise SampleError("too_many_images", f"{len(images)} > {cfg.max_images_per_sample}")
        hw = []
        for k, data in enumerate(images):
            if sizes is None or sizes[k][0] is None:
                try:
                    info = probe_image(data, cfg.max_image_bytes, MAX_SOURCE_PIXELS)  # what the trainer accepts
                except BadImage as e:
                    raise SampleError(e.reason, e.detail) from None
                h, w = info.height, info.width
            else:
                if len(data) > cfg.max_image_bytes:
                    raise SampleError("image_too_large", f"{len(data):,} bytes > {cfg.max_image_bytes:,}")
                h, w = int(sizes[k][0]), int(sizes[k][1])
                if h * w > MAX_SOURCE_PIXELS:  # ingest may have been run with a larger max_pixels
                    raise SampleError("too_many_pixels", f"{w}x{h} = {h * w:,} px > {MAX_SOURCE_PIXELS:,}, "
                                                         "more than the trainer decodes")
            try:
                hw.append(ptok.smart_resize(h, w, cfg.min_pixels, cfg.max_pixels))
            except ValueError as e:
                raise SampleError("bad_image_size", str(e)) from None
        conv = rec["conversations"]
        if cfg.system_prompt != ptok.DEFAULT_SYSTEM_PROMPT and not (
                conv and isinstance(conv[0], dict) and conv[0].get("from") == "system"):
            conv = [{"from": "system", "value": cfg.system_prompt}] + conv  # stored as rendered
        try:
            r = ptok.render_sample(conv, hw, tok, loss_on=cfg.loss_on)
        except ValueError as e:
            reason = "image_count_mismatch" if "placeholders" in str(e) else "bad_conversation"
            raise SampleError(reason, str(e)[:300]) from None
        truncated = len(r) > cfg.max_len
        if truncated:
            if cfg.overlong == "drop":
                raise SampleError("overlong", f"{len(r)} tokens > max_len {cfg.max_len}")
            r, _kept = ptok.truncate(r, cfg.max_len, tok)
            if r.loss_tokens == 0:
                raise SampleError("overlong", f"truncated to {len(r)} tokens, no trained token is left")
        store = cfg.store_token_ids
        return {
            "num_tokens": len(r), "truncated": truncated,
            "image_tokens": sum(ptok.image_tokens(h, w) for h, w in hw[: r.num_images]),
            "conversation": json.dumps(conv, ensure_ascii=False),
            "input_ids": r.input_ids if store else [], "loss_mask": r.loss_mask if store else [],
            # All of a truncated sample's images are kept: the collator renders the whole
            # conversation, then applies the same truncate().
            "images": images, "image_hw": [list(x) for x in hw],
        }


def auto_buckets(inputs: list[Location], per_bucket: int, lengths_per_bucket: int | None = None) -> int:
    """pack.buckets = 0: the smallest power of two giving at most ``per_bucket`` samples per bucket
    (``lengths_per_bucket`` for the samples of inputs of precomputed lengths: Parquet with
    ``num_tokens``, nothing rendered), samples counted from the Parquet footers (a JSON/JSONL file:
    one per KiB). A power of two, so that a few more inputs seldom change it (a change is a config
    change: --overwrite)."""
    rendered, lengths = 0, 0  # samples of each kind
    for loc in inputs:
        if loc.path.endswith(".parquet"):
            with loc.fs.open_input_file(loc.path) as f:
                pf = pq.ParquetFile(f)
                if lengths_per_bucket and "num_tokens" in pf.schema_arrow.names:
                    lengths += pf.metadata.num_rows
                else:
                    rendered += pf.metadata.num_rows
        else:
            rendered += loc.fs.get_file_info(loc.path).size // 1024 + 1
    load = rendered / per_bucket + (lengths / lengths_per_bucket if lengths else 0)  # buckets' worth
    return 1 << max(0, int(np.ceil(np.log2(max(load, 1 / per_bucket)))))


# ------------------------------------------------------------------ pass 2


def _length_counts(buckets: np.ndarray, lengths: np.ndarray) -> pa.Table:
    """COUNTS_SCHEMA rows: samples per (bucket, length) present, sorted."""
    keys, counts = np.unique((buckets.astype(np.int64) << 32) | lengths.astype(np.int64), return_counts=True)
    return pa.table({"bucket": pa.array((keys >> 32).astype(np.int32)),
                     "num_tokens": pa.array((keys & 0xFFFFFFFF).astype(np.int32)),
                     "samples": pa.array(counts.astype(np.int64))}, schema=COUNTS_SCHEMA)


def _compression(samples: pa.Table) -> str | None:
    """zstd for rendered samples (text, token ids); none for rows of precomputed lengths (ids and
    integers: compressing each small buffer costs more read time than it saves)."""
    rendered = samples.num_rows and pc.max(pc.utf8_length(samples.column("conversation"))).as_py()
    return "zstd" if rendered else None


def _read_group(files: list[Location], group: int, schema: pa.Schema = STAGED_SCHEMA) -> pa.Table:
    """Batch ``group`` (a bucket, or a repair shard of pool files) of every routed file, in the
    given order."""
    try:
        return read_routed(files, group, schema)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{e.filename}: the pack stage's intermediate payload is gone (removed after the last "
            "successful run, pack.keep_staged = false), and this run must redo some buckets. Re-run "
            "with --overwrite, or set pack.keep_staged = true for runs that add inputs later.") from None


def _list_of(values: pa.Array, offsets: np.ndarray) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)


def _nested_offsets(col: pa.ChunkedArray, offsets: np.ndarray) -> tuple[pa.Array, np.ndarray]:
    """Flatten a per-sample list column (samples in pack order) and give per-pack offsets into it."""
    arr = col.combine_chunks()
    lens = np.asarray(arr.value_lengths().fill_null(0), dtype=np.int64)
    inner = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=inner[1:])
    return arr.flatten(), inner[offsets]


def build_packs(t: pa.Table, offsets: np.ndarray, shard: str, seed: int) -> pa.Table:
    """Pack rows (PACK_SCHEMA) from samples in pack order (pack p: rows offsets[p]:offsets[p+1]);
    packs sorted by pack_id."""
    n_packs = len(offsets) - 1
    ids = t.column("sample_id").to_pylist()
    pack_ids = [xxhash.xxh3_64_hexdigest((f"{shard}:{seed}:" + "\n".join(ids[offsets[p]:offsets[p + 1]])).encode())
                for p in range(n_packs)]
    lens = np.asarray(t.column("num_tokens"), dtype=np.int64)
    tokens = np.add.reduceat(lens, offsets[:-1]) if n_packs else np.zeros(0, np.int64)
    ids_flat, ids_off = _nested_offsets(t.column("input_ids"), offsets)
    mask_flat, _ = _nested_offsets(t.column("loss_mask"), offsets)
    img_flat, img_off = _nested_offsets(t.column("images"), offsets)
    hw_flat, _ = _nested_offsets(t.column("image_hw"), offsets)
    per_sample_imgs = np.asarray(t.column("images").combine_chunks().value_lengths(), dtype=np.int64)
    owner = np.repeat(np.arange(len(t), dtype=np.int64), per_sample_imgs)
    first_of_pack = np.repeat(offsets[:-1], np.diff(offsets))
    image_sample = (owner - first_of_pack[owner]).astype(np.int32) if len(owner) else np.zeros(0, np.int32)
    cols = {
        "pack_id": pa.array(pack_ids, pa.string()),
        "num_tokens": pa.array(tokens.astype(np.int32)),
        "sample_ids": _list_of(t.column("sample_id").combine_chunks(), offsets),
        "sample_lens": _list_of(t.column("num_tokens").combine_chunks(), offsets),
        "input_ids": _list_of(ids_flat, ids_off),
        "loss_mask": _list_of(mask_flat, ids_off),
        "images": _list_of(img_flat, img_off),
        "image_hw": _list_of(hw_flat, img_off),
        "image_sample": _list_of(pa.array(image_sample, pa.int32()), img_off),
        "sources": _list_of(t.column("source").combine_chunks(), offsets),
        "conversations": _list_of(t.column("conversation").combine_chunks(), offsets),
    }
    table = pa.Table.from_pydict(cols, schema=PACK_SCHEMA)
    return table.take(np.argsort(np.asarray(pack_ids, dtype=object), kind="stable"))


def room_edges(max_len: int) -> list[int]:
    """Bins of the tokens a pack leaves unused: 0, 1, 2-3, 4-7, ... (readable for any run size)."""
    return [0] + [1 << k for k in range(int(max_len).bit_length() + 1)]


def _hist(values: np.ndarray, max_len: int) -> list[int]:
    edges = np.linspace(0, max_len, HIST_BINS + 1)
    return np.histogram(values, bins=edges)[0].astype(int).tolist()


def bucket_name(bucket: int) -> str:
    return f"bucket-{bucket:05d}"


def repair_name(k: int) -> str:
    return f"repair-{k:05d}"


def staged_digest(staged: dict[str, dict[str, Any]]) -> str:
    """What passes 2 and 3 read, as a digest of pass 1's committed entries (per staged shard: its
    kept rows, config hash and input stamp): every bucket's stamp, so that a bucket is redone when
    a staged shard is added, removed or redone."""
    return config_hash({"staged": {k: (e["kept_rows"], e["config_hash"], e.get("input_stamp"))
                                   for k, e in staged.items()}})


def _staged_buckets(ctx: PassContext) -> int:
    """The bucket count pass 1 chose (pack.buckets, or from the input size): in its entries."""
    return max(e["buckets"] for e in ctx.done[PackPrepPass.name].entries.values())


def _staged_files(ctx: PassContext, folder: str) -> list[Location]:
    """Every staged shard's routed file in ``folder`` (PAYLOAD_DIR: samples, COUNTS_DIR: length
    counts), by shard name (the same order whatever the worker count)."""
    staged = ctx.done[PackPrepPass.name]
    return [staged.output.join(folder, f"{s}{ROUTED}") for s in sorted(staged.entries)]


class PackLengthsPass(Pass):
    """Pass 2: one virtual shard per bucket -> its exact length histogram (``OUT/_lengths/``), the
    sum of its batch of every staged shard's length counts (no payload bytes)."""

    name = "pack_lengths"
    config_sections = ("pack",)
    reads = PackPrepPass.name
    folder = LENGTHS_DIR
    counts_samples = False  # its rows are lengths; pass 3 reads the samples of pass 1

    def __init__(self) -> None:
        self.counts: list[Location] = []

    def list_shards(self, ctx: PassContext) -> list[Shard]:
        stamp = staged_digest(ctx.done[self.reads].entries)
        return [Shard(bucket_name(b), None, stamp, b) for b in range(_staged_buckets(ctx))]

    def prepare(self, ctx: PassContext, shards: list[Shard]) -> dict[str, Any]:
        self.counts = _staged_files(ctx, COUNTS_DIR)
        return {}

    def process(self, task: ShardTask) -> ShardOutput:
        parts = _read_group(self.counts, task.index, COUNTS_SCHEMA)
        lens = np.asarray(parts.column("num_tokens"), np.int64)
        counts = np.bincount(lens, weights=np.asarray(parts.column("samples")), minlength=1).astype(np.int64)
        at = np.flatnonzero(counts)
        table = pa.table({"num_tokens": pa.array(at.astype(np.int32)), "samples": pa.array(counts[at])})
        n = int(counts.sum())
        return ShardOutput(table, Ledger(self.name), input_rows=n, kept_samples=n)


def read_histograms(ctx: PassContext, buckets: int, max_len: int) -> LengthCounts:
    """Samples of each length in each bucket, from pass 2's shards: only the lengths a bucket
    holds (sparse), never B x (max_len + 1)."""
    lengths = ctx.done[PackLengthsPass.name]
    bucket, length, count = [], [], []
    for b in range(buckets):
        t = read_table(lengths.output.join(lengths.entries[bucket_name(b)]["output"]))
        length.append(np.asarray(t.column("num_tokens"), np.int64))
        count.append(np.asarray(t.column("samples"), np.int64))
        bucket.append(np.full(len(length[-1]), b, np.int64))
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)  # noqa: E731
    return LengthCounts.from_entries(cat(bucket), cat(length), cat(count), buckets, max_len)


class PackBucketPass(Pass):
    """Pass 3: the packs of one global best-fit-decreasing plan, formed in parallel.

    Its shards: one per bucket (``bucket-XXXXX``: the plan's packs that bucket can form from its own
    samples; the rest of its samples go to ``OUT/_pool/bucket-XXXXX.routed``, one batch per repair
    shard) and then the repair shards (``repair-XXXXX``: the plan's other packs, from their batch
    of every pool file). All land in ``OUT/data/``. The plan is computed once, on the
    driver, from pass 2's histograms (packing.pack.plan_buckets), so the pack count is exactly
    the global BFD's whatever the bucket or worker count."""

    name = "pack_buckets"
    config_sections = ("pack", "run")  # pack.plot and run's execution fields are NOT_HASHED
    schema_version = PACK_SCHEMA_VERSION
    reads = PackPrepPass.name  # its samples are pass 1's (the accounting chain); the plan is pass 2's
    folder = ""

    def __init__(self) -> None:
        self.payloads: list[Location] = []  # set by list_shards: every staged payload, by shard name
        # Set by list_shards, shipped to every task: sparse, its size follows the plan's groups and
        # the buckets' (bucket, length) pairs (packing.pack.BucketPlan, RepairSplit)
        self.plan: BucketPlan | None = None
        self.repair: RepairSplit | None = None

    def list_shards(self, ctx: PassContext) -> list[Shard]:
        p = ctx.cfg.pack
        buckets = _staged_buckets(ctx)
        self.payloads = _staged_files(ctx, PAYLOAD_DIR)
        hists = read_histograms(ctx, buckets, p.max_len)
        self.plan = plan_buckets(hists, p.max_len, p.max_samples_per_pack or None)
        del hists
        # As many repair shards as buckets (some may be empty): a fixed list of shard names, so a
        # re-run on more input redoes them rather than finding shards it no longer lists.
        n_repair = buckets
        self.repair = split_repair(self.plan, n_repair)
        stamp = staged_digest(ctx.done[self.reads].entries)
        return ([Shard(bucket_name(b), None, stamp, b) for b in range(buckets)]
                + [Shard(repair_name(k), None, stamp, buckets + k) for k in range(n_repair)])

    def shard_files(self, shard: str) -> list[str]:
        return [f"{POOL_DIR}/{shard}{ROUTED}"] if shard.startswith("bucket-") else []

    def execute(self, pending: list[ShardTask], ctx: PassContext, progress) -> dict[str, str]:
        """The buckets first (they write the pool files), then the repair shards that read them."""
        buckets = [t for t in pending if t.shard.startswith("bucket-")]
        failed = super().execute(buckets, ctx, progress) if buckets else {}
        repairs = [t for t in pending if not t.shard.startswith("bucket-")]
        if repairs and not failed:
            failed = super().execute(repairs, ctx, progress)
        return failed

    def process(self, task: ShardTask) -> ShardOutput:
        cfg = task.config
        buckets = self.plan.buckets
        if task.index < buckets:
            samples = _read_group(self.payloads, task.index)
            copies = self.plan.alloc_row(task.index)
        else:
            k = task.index - buckets
            pools = [task.output_root.join(POOL_DIR, f"{bucket_name(b)}{ROUTED}") for b in range(buckets)]
            samples = _read_group(pools, k)
            copies = self.repair.copies_of(k, self.plan.groups)
        res, pool = self._pack(samples, copies, cfg)
        if task.index < buckets:
            self._write_pool(task, samples, pool, cfg.pack.max_len)
        elif len(pool):
            raise AssertionError(f"{task.shard}: {len(pool)} pooled samples have no slot (a bug)")
        packed = samples.take(res.order)
        table = build_packs(packed, res.offsets, task.shard, cfg.run.seed)
        stats = self._stats(task, packed, res, len(pool), cfg.pack.max_len)
        # Every sample read is in exactly one pack or (buckets) passed on to a repair shard, which
        # counts it as its input: the table's rows are packs, not samples.
        return ShardOutput(table, Ledger(self.name), input_rows=len(res.order), kept_samples=len(res.order),
                           stats=stats, row_group_size=cfg.pack.packs_per_row_group)

    def _pack(self, samples: pa.Table, copies: np.ndarray, cfg) -> tuple[PackResult, np.ndarray]:
        p = cfg.pack
        lens = np.asarray(samples.column("num_tokens"), dtype=np.int64)
        img = np.asarray(samples.column("image_tokens"), dtype=np.int64)
        ops, n_packs = self.plan.ops(copies)
        return fill_plan(lens, ops, n_packs, p.max_len, sample_hash=np.asarray(samples.column("sample_hash")),
                         seed=cfg.run.seed, image_tokens=img if p.spread_images and img.any() else None)

    def _write_pool(self, task: ShardTask, samples: pa.Table, pool: np.ndarray, max_len: int) -> None:
        """The bucket's samples no pack of its own takes, to the repair shards: of each length L,
        pooled samples are numbered across buckets (bucket order, then the fill order), and repair
        shard k takes the numbers its slots of length L cover."""
        lens = np.asarray(samples.column("num_tokens"), dtype=np.int64)[pool]
        # ``pool`` is in (length, key) order: a sample's number within its length in this bucket
        run_start = np.flatnonzero(np.r_[True, lens[1:] != lens[:-1]]) if len(lens) else np.zeros(0, np.int64)
        rank = np.arange(len(lens)) - np.repeat(run_start, np.diff(np.r_[run_start, len(lens)]))
        number = self.plan.pooled_before(task.index, lens) + rank
        dest = self.repair.dest(lens, number)
        by_dest = np.argsort(dest, kind="stable")  # so that write_routed need not reorder the rows
        pooled = samples.take(pool[by_dest])
        write_routed(task.output_root.join(POOL_DIR, f"{task.shard}{ROUTED}"), pooled, dest[by_dest],
                     self.repair.shards, _compression(pooled))

    def _stats(self, task: ShardTask, packed: pa.Table, res: PackResult, pooled: int, max_len: int) -> dict:
        lens = np.asarray(packed.column("num_tokens"), dtype=np.int64)
        per_pack = np.diff(res.offsets)
        by_source = (pl.DataFrame({"source": packed.column("source").to_pylist(), "tokens": lens})
                     .group_by("source").agg(pl.col("tokens").sum()).sort("source"))
        return {
            "bucket": task.index if task.index < self.plan.buckets else None,
            "samples": len(lens), "packs": len(per_pack), "tokens": int(lens.sum()), "pooled": pooled,
            "over_half": int((2 * lens > max_len).sum()),
            "global_bfd_packs": self.plan.num_packs,
            "truncated": int(np.asarray(packed.column("truncated")).sum()),
            "max_pack_tokens": int(res.pack_tokens.max()) if len(per_pack) else 0,
            "max_samples_in_pack": int(per_pack.max()) if len(per_pack) else 0,
            "samples_per_pack": {str(k): int(v) for k, v in sorted(Counter(per_pack.tolist()).items())},
            "source_tokens": dict(zip(by_source["source"].to_list(), by_source["tokens"].to_list())),
            "length_hist": _hist(lens, max_len), "pack_tokens_hist": _hist(res.pack_tokens, max_len),
            "pack_room_hist": np.histogram(max_len - res.pack_tokens, bins=room_edges(max_len))[0].tolist(),
        }


# ------------------------------------------------------------------ the stage


class PackStage(Stage):
    """`ovpipe pack`: pass 1 into OUT/_staged, pass 2 into OUT/_lengths, pass 3 (buckets, then
    repair shards) into OUT/data, then pack_stats; the intermediate payload is removed after."""

    name = "pack"

    def passes(self) -> list[Pass]:
        return [PackPrepPass(), PackLengthsPass(), PackBucketPass()]

    def report(self, out: Location, cfg: Config, summary: StageSummary, results: dict[str, PassResult]) -> list[str]:
        stats = pack_stats(results[PackBucketPass.name].entries, results[PackPrepPass.name].summary, cfg)
        dest = out.join(STATS_FILE)
        write_json(dest, stats)
        for w in stats["warnings"]:
            print(f"pack: warning: {w}", file=sys.stderr, flush=True)
        written = [dest.uri()]
        if cfg.pack.plot:
            png = out.join(PLOT_FILE)
            plot_stats(stats, png)
            written.append(png.uri())
        if not cfg.pack.keep_staged:  # every pack is committed: the second copy of their bytes goes
            out.join(STAGED_DIR, PAYLOAD_DIR).delete_tree()
            out.join(STAGED_DIR, COUNTS_DIR).delete_tree()
            out.join(POOL_DIR).delete_tree()
        return written


def pack_stats(entries: dict[str, dict], first: StageSummary, cfg: Config) -> dict[str, Any]:
    """Totals over the pass-3 manifest entries (``first``: pass 1's summary, for the ledger): the
    figures pack_stats.json reports."""
    p = cfg.pack
    max_len = p.max_len
    samples = sum(e["samples"] for e in entries.values())
    packs = sum(e["packs"] for e in entries.values())
    tokens = sum(e["tokens"] for e in entries.values())
    spp: Counter = Counter()
    sources: Counter = Counter()
    for e in entries.values():
        spp.update({int(k): v for k, v in e["samples_per_pack"].items()})
        sources.update(e["source_tokens"])
    terms = {"tokens": lower_bound(tokens, max_len), "over_half": sum(e["over_half"] for e in entries.values())}
    if p.max_samples_per_pack:
        terms["max_samples"] = -(-samples // p.max_samples_per_pack)
    repairs = [e for e in entries.values() if e["bucket"] is None]
    reasons = first.dropped_by_reason
    stats = {
        "samples": samples, "packs": packs, "tokens": tokens, "max_len": max_len,
        "buckets": len(entries) - len(repairs),
        "lower_bound": max(terms.values()), "lower_bound_terms": terms,
        "global_bfd_packs": max((e["global_bfd_packs"] for e in entries.values()), default=0),
        "repair": {"shards": len(repairs), "samples": sum(e["samples"] for e in repairs),
                   "packs": sum(e["packs"] for e in repairs)},
        "fill": round(tokens / (packs * max_len), 6) if packs else 0.0,
        "compression": round(samples / packs, 4) if packs else 0.0,
        "mean_sample_tokens": round(tokens / samples, 2) if samples else 0.0,
        "max_pack_tokens": max((e["max_pack_tokens"] for e in entries.values()), default=0),
        "max_samples_in_pack": max((e["max_samples_in_pack"] for e in entries.values()), default=0),
        "samples_per_pack_hist": {str(k): spp[k] for k in sorted(spp)},
        "source_tokens": {k: sources[k] for k in sorted(sources)},
        "overlong": {"dropped": int(reasons.get("overlong", 0)),
                     "truncated": sum(e["truncated"] for e in entries.values()), "policy": p.overlong},
        "input_samples": first.input_rows, "ledgered": first.dropped_rows, "ledgered_by_reason": reasons,
        "length_hist": [sum(h) for h in zip(*(e["length_hist"] for e in entries.values()))] if entries else [],
        "pack_tokens_hist": [sum(h) for h in zip(*(e["pack_tokens_hist"] for e in entries.values()))] if entries else [],
        "hist_bin_width": max_len / HIST_BINS,
        "pack_room_hist": [sum(h) for h in zip(*(e["pack_room_hist"] for e in entries.values()))] if entries else [],
        "pack_room_edges": room_edges(max_len),
    }
    stats["warnings"] = fill_warnings(stats, cfg)
    return stats


def fill_warnings(stats: dict[str, Any], cfg: Config) -> list[str]:
    """Why the fill is low, when the user can change it (a tiny run's last pack is not)."""
    p, fill, out = cfg.pack, stats["fill"], []
    if fill >= LOW_FILL or stats["packs"] <= 1:
        return out
    limit = p.max_samples_per_pack
    at_limit = stats["samples_per_pack_hist"].get(str(limit), 0) if limit else 0
    if limit and at_limit >= stats["packs"] / 2:
        out.append(f"fill {fill:.3f}: {at_limit:,} of {stats['packs']:,} packs hold pack.max_samples_per_pack = "
                   f"{limit} samples with room left; raise it (0 = no limit) to fill packs")
    terms = stats["lower_bound_terms"]
    if terms["over_half"] > terms["tokens"]:
        out.append(f"fill {fill:.3f}: {terms['over_half']:,} samples are longer than max_len / 2 = "
                   f"{p.max_len // 2} and each needs a pack of its own; a larger pack.max_len (or "
                   "pack.overlong = truncate with a smaller one) packs tighter")
    if stats["tokens"] < p.max_len * LOW_FILL * 4:
        out.append(f"fill {fill:.3f}: the whole input is {stats['tokens']:,} tokens, a few packs of "
                   f"pack.max_len = {p.max_len}; a smaller max_len fits such a small run")
    return out


def plot_stats(stats: dict[str, Any], dest: Location) -> None:
    """Three panels (sample lengths; tokens left unused per pack, in bins 0, 1, 2-3, 4-7, ...;
    samples per pack), x ranges cut to the data, integer count axes, and the pack count against
    its lower bound and the global BFD in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    width = stats["hist_bin_width"]
    x = np.arange(HIST_BINS) * width
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    lengths = np.asarray(stats["length_hist"] or [0] * HIST_BINS)
    axes[0].bar(x, lengths, width=width, align="edge")
    axes[0].set(title=f"sample lengths ({stats['samples']:,} samples, mean {stats['mean_sample_tokens']:,})",
                xlabel="tokens", ylabel="samples")
    axes[0].axvline(stats["max_len"] / 2, color="grey", ls=":",
                    label=f"max_len / 2 ({stats['lower_bound_terms']['over_half']:,} samples longer)")
    axes[0].legend(loc="upper right", fontsize=8)
    terms = stats["lower_bound_terms"]
    room = np.asarray(stats["pack_room_hist"])
    edges = stats["pack_room_edges"]
    labels = [str(lo) if hi - lo == 1 else f"{lo}-{hi - 1}" for lo, hi in zip(edges[:-1], edges[1:])]
    used = np.flatnonzero(room)
    keep = slice(0, int(used[-1]) + 1 if len(used) else 1)
    axes[1].bar(np.arange(len(room))[keep], room[keep], color="tab:green",
                label=f"{stats['packs']:,} packs, fill {stats['fill']:.4f}")
    axes[1].set_xticks(np.arange(len(room))[keep], labels[keep], rotation=45, ha="right", fontsize=8)
    axes[1].plot([], [], " ", label=f"global BFD: {stats['global_bfd_packs']:,} packs")
    axes[1].plot([], [], " ", label=f"lower bound {stats['lower_bound']:,} = max(⌈Σlen / max_len⌉ = "
                 f"{terms['tokens']:,},")
    axes[1].plot([], [], " ", label=f"    samples > max_len / 2 = {terms['over_half']:,}"
                 + (f", ⌈samples / max per pack⌉ = {terms['max_samples']:,})" if "max_samples" in terms else ")"))
    axes[1].set(title=f"tokens left unused per pack (max_len {stats['max_len']:,})", xlabel="unused tokens",
                ylabel="packs")
    axes[1].set_ylim(0, max(int(room.max()) if len(room) else 1, 1) * 1.6)  # room for the legend
    axes[1].legend(loc="upper right", fontsize=8)
    used = np.flatnonzero(lengths)
    lo = x[used[0]] if len(used) else 0.0
    hi = x[used[-1]] + width if len(used) else stats["max_len"]
    axes[0].set_xlim(max(0.0, lo - width), min(stats["max_len"], hi + width))
    spp = stats["samples_per_pack_hist"]
    axes[2].bar([int(k) for k in spp], list(spp.values()), color="tab:orange", width=0.8)
    axes[2].set(title=f"samples per pack (mean {stats['compression']:.2f})", xlabel="samples in pack", ylabel="packs")
    if spp:
        axes[2].set_xlim(min(int(k) for k in spp) - 0.6, max(int(k) for k in spp) + 0.6)
    axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if stats["warnings"]:
        fig.suptitle("warning: " + stats["warnings"][0][:150], fontsize=9, color="tab:red")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    write_bytes_atomic(dest, buf.getvalue())
