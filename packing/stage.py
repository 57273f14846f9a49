"""`ovpipe pack`: samples -> packed training shards of at most ``pack.max_len`` tokens.

Reads (one format per input file, detected from its name and columns):
* caption shards (the caption stage's output, or any Parquet with ``caption`` + an image
  reference ``image_uri``/``image_member``/``image_row`` + ``width``/``height``): one-turn
  conversations, ``<image>`` + a per-language prompt as the user turn, the caption as the answer;
* LLaVA conversation data: ``.json`` (a list of records) or ``.jsonl`` files with
  ``{"id", "image": path | [paths] (optional), "conversations": [{"from", "value"}, ...]}``,
  images read from ``pack.image_folder`` (default: the file's folder); or Parquet with a
  ``conversations`` column (list of {from, value} structs, or JSON text) and images as bytes
  (``image``/``images``: binary, Hugging Face {bytes, path} structs, or lists of them) or paths;
* any Parquet with ``num_tokens`` (and ``sample_id``): lengths used as they are, nothing rendered.

Writes (docs/data-contracts.md), as ``PackStage``, two passes of ovpipe.core.stage.run_stage:
* ``OUT/_staged/`` (pass ``pack``, ``PackPrepPass``; also the ledger's stage name): per input shard
  ``<shard>.parquet`` (the index: INDEX_COLUMNS), ``_payload/<shard>.parquet`` (the rendered
  samples, STAGED_SCHEMA, one row group per bucket = sample_hash mod B), ``_ledger/<shard>.parquet``
  (the samples dropped: overlong, bad images, bad conversations, ...) and ``_manifest/``;
* ``OUT/bucket-XXXXX.parquet`` (pass ``pack_buckets``, ``PackBucketPass``): one row per pack,
  PACK_SCHEMA (packing/schema.py), self-contained; ``OUT/_manifest/bucket-XXXXX.json`` its
  commit record (with the bucket's counts and histograms); ``OUT/_manifest/_summary.json`` the
  stage's summary;
* ``OUT/pack_stats.json`` (+ ``OUT/pack_stats.png`` with ``pack.plot``), the stage's report:
  counts, lower bound, fill, histograms.

How it runs: pass 1 is one task per input shard (render, measure, fetch images, ledger overlong
and bad samples, write rows grouped by bucket). Pass 2 is one task per bucket (a virtual shard
whose stamp is a digest of the staged shards, so a bucket is redone when they change): read that
bucket's row group of every staged payload (sorted by shard name), pack from the length histogram
(packing/pack.py). run_stage commits, resumes and checks the accounting (inputs = packed +
ledgered; every staged sample is read by pass 2).
"""

from __future__ import annotations

import io
import json
import posixpath
from collections import Counter
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from ovpipe.core.config import config_hash
from ovpipe.core.hashing import text_hash
from ovpipe.core.images import MAX_SOURCE_PIXELS, BadImage, fetch_image_bytes, probe_image
from ovpipe.core.ledger import Ledger
from ovpipe.core.shards import (
    PARQUET_WRITE_OPTIONS,
    Location,
    default_source,
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
from packing.pack import lower_bound, pack_lengths
from packing.schema import PACK_SCHEMA, PACK_SCHEMA_VERSION

if TYPE_CHECKING:  # annotations only: the root config composes every stage's section
    from ovpipe.config import Config

STAGED_DIR = "_staged"
PAYLOAD_DIR = "_payload"
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


def _lengths_table(pf: pq.ParquetFile, uri: str, source: str, cfg, ledger: Ledger) -> pa.Table | None:
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
        "bucket": pa.array((hashes % np.uint64(cfg.buckets)).astype(np.int32)),
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


def _read_conversation_parquet(pf: pq.ParquetFile, task: ShardTask, cfg, source: str) -> Iterator[dict]:
    uri = task.input.uri()
    root = _image_root(task, cfg)
    names = pf.schema_arrow.names
    image_col = next((c for c in ("images", "image") if c in names), None)
    cols = [c for c in ("conversations", image_col, "source") if c]
    row = 0
    for batch in pf.iter_batches(columns=cols, batch_size=256):
        for rec in batch.to_pylist():
            images = _parquet_images(rec.get(image_col)) if image_col else []
            yield _conversation_record(rec, images, root, f"{uri}#row={row}", rec.get("source") or source)
            row += 1


# ------------------------------------------------------------------ pass 1


class PackPrepPass(Pass):
    """Pass 1: one input shard -> its rendered samples grouped by bucket (the payload), their
    index (the pass's data shard) and the ledger of the samples that cannot be packed."""

    name = "pack"  # also the ledger's stage
    config_sections = ("pack", "run")
    schema_version = 1
    input_suffixes = (".parquet", ".jsonl", ".json")
    folder = STAGED_DIR

    def shard_files(self, shard: str) -> list[str]:
        return [f"{PAYLOAD_DIR}/{shard}.parquet"]

    def prepare(self, ctx: PassContext, shards: list[Shard]) -> dict[str, Any]:
        """The tokenizer and chat template's identity: part of the config hash, so staged samples
        rendered by another tokenizer are refused, not mixed in."""
        p = ctx.cfg.pack
        tok = ptok.load_tokenizer(p.tokenizer)
        return ptok.template_identity(tok, p.min_pixels, p.max_pixels, p.loss_on, p.system_prompt)

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
            table = _lengths_table(records, task.input.uri(), self._source(task), cfg, ledger)
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
            sample.update(sample_id=rec["sample_id"], sample_hash=h, bucket=h % cfg.buckets, source=rec["source"])
            for k in rows:
                rows[k].append(sample[k])
        return self._stage_rows(task, pa.Table.from_pydict(rows, schema=STAGED_SCHEMA), n_in, ledger)

    @staticmethod
    def _stage_rows(task: ShardTask, table: pa.Table, n_in: int, ledger: Ledger) -> ShardOutput:
        # Group by bucket (stable: input order within a bucket), one row group per bucket.
        table = table.take(np.argsort(np.asarray(table.column("bucket")), kind="stable"))
        _write_payload(task.output_root.join(PAYLOAD_DIR, f"{task.shard}.parquet"), table)
        return ShardOutput(table.select(INDEX_COLUMNS), ledger, n_in)

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


def _write_payload(dest: Location, table: pa.Table) -> None:
    """One row group per bucket, so pass 2 reads only its bucket from every staged shard."""
    buckets = np.asarray(table.column("bucket"))
    starts = np.flatnonzero(np.r_[True, buckets[1:] != buckets[:-1]]) if len(buckets) else np.zeros(0, int)
    groups = {int(buckets[s]): i for i, s in enumerate(starts)}
    schema = table.schema.with_metadata({b"ovpipe.bucket_row_groups": json.dumps(groups).encode()})
    sink = io.BytesIO()
    opts = {k: v for k, v in PARQUET_WRITE_OPTIONS.items() if k != "row_group_size"}
    with pq.ParquetWriter(sink, schema, **opts) as w:
        bounds = list(starts) + [len(buckets)]
        for s, e in zip(bounds[:-1], bounds[1:]):
            w.write_table(table.slice(int(s), int(e - s)).replace_schema_metadata(schema.metadata),
                          row_group_size=max(int(e - s), 1))
    write_bytes_atomic(dest, sink.getvalue())


# ------------------------------------------------------------------ pass 2


def _read_bucket(payloads: list[Location], bucket: int) -> pa.Table:
    parts = []
    for loc in payloads:
        with loc.fs.open_input_file(loc.path) as f:
            pf = pq.ParquetFile(f)
            groups = json.loads(pf.schema_arrow.metadata[b"ovpipe.bucket_row_groups"])
            if str(bucket) in groups:
                parts.append(pf.read_row_group(groups[str(bucket)]).replace_schema_metadata(None))
    if not parts:
        return STAGED_SCHEMA.empty_table()
    return pa.concat_tables(parts).cast(STAGED_SCHEMA)


def _list_of(values: pa.Array, offsets: np.ndarray) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)


def _nested_offsets(col: pa.ChunkedArray, offsets: np.ndarray) -> tuple[pa.Array, np.ndarray]:
    """Flatten a per-sample list column (samples in pack order) and give per-pack offsets into it."""
    arr = col.combine_chunks()
    lens = np.asarray(arr.value_lengths().fill_null(0), dtype=np.int64)
    inner = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=inner[1:])
    return arr.flatten(), inner[offsets]


def build_packs(samples: pa.Table, order: np.ndarray, offsets: np.ndarray, bucket: int, seed: int) -> pa.Table:
    """Pack rows (PACK_SCHEMA) from samples in pack order; packs sorted by pack_id."""
    t = samples.take(order)
    n_packs = len(offsets) - 1
    ids = t.column("sample_id").to_pylist()
    pack_ids = [xxhash.xxh3_64_hexdigest((f"{bucket}:{seed}:" + "\n".join(ids[offsets[p]:offsets[p + 1]])).encode())
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


def _hist(values: np.ndarray, max_len: int) -> list[int]:
    edges = np.linspace(0, max_len, HIST_BINS + 1)
    return np.histogram(values, bins=edges)[0].astype(int).tolist()


def bucket_name(bucket: int) -> str:
    return f"bucket-{bucket:05d}"


def staged_digest(staged: dict[str, dict[str, Any]]) -> str:
    """What pass 2 reads, as a digest of pass 1's committed entries (per staged shard: its kept
    rows, config hash and input stamp): every bucket's stamp, so that a bucket is redone when a
    staged shard is added, removed or redone."""
    return config_hash({"staged": {k: (e["kept_rows"], e["config_hash"], e.get("input_stamp"))
                                   for k, e in staged.items()}})


class PackBucketPass(Pass):
    """Pass 2: one virtual shard per bucket -> that bucket's packs (``OUT/bucket-XXXXX.parquet``)."""

    name = "pack_buckets"
    config_sections = ("pack", "run")  # pack.plot and run's execution fields are NOT_HASHED
    schema_version = PACK_SCHEMA_VERSION
    reads = PackPrepPass.name
    folder = ""

    def __init__(self) -> None:
        self.payloads: list[Location] = []  # set by prepare: every staged payload, by shard name

    def list_shards(self, ctx: PassContext) -> list[Shard]:
        stamp = staged_digest(ctx.done[self.reads].entries)
        return [Shard(bucket_name(b), None, stamp, b) for b in range(ctx.cfg.pack.buckets)]

    def prepare(self, ctx: PassContext, shards: list[Shard]) -> dict[str, Any]:
        self.payloads = [ctx.input.join(PAYLOAD_DIR, f"{s}.parquet") for s in sorted(ctx.done[self.reads].entries)]
        return {}

    def process(self, task: ShardTask) -> ShardOutput:
        cfg, bucket = task.config, task.index
        p = cfg.pack
        samples = _read_bucket(self.payloads, bucket)
        lens = np.asarray(samples.column("num_tokens"), dtype=np.int64)
        img = np.asarray(samples.column("image_tokens"), dtype=np.int64)
        res = pack_lengths(lens, p.max_len, max_items=p.max_samples_per_pack or None,
                           sample_hash=np.asarray(samples.column("sample_hash")), seed=cfg.run.seed,
                           image_tokens=img if p.spread_images and img.any() else None)
        table = build_packs(samples, res.order, res.offsets, bucket, cfg.run.seed)
        per_pack = np.diff(res.offsets)
        stats = {
            "bucket": bucket, "samples": len(samples), "packs": table.num_rows, "tokens": int(lens.sum()),
            "truncated": int(np.asarray(samples.column("truncated")).sum()),
            "max_pack_tokens": int(res.pack_tokens.max()) if len(per_pack) else 0,
            "max_samples_in_pack": int(per_pack.max()) if len(per_pack) else 0,
            "samples_per_pack": {str(k): int(v) for k, v in sorted(Counter(per_pack.tolist()).items())},
            "length_hist": _hist(lens, p.max_len), "pack_tokens_hist": _hist(res.pack_tokens, p.max_len),
        }
        # Every sample of the bucket is in exactly one pack: the table's rows are packs, not samples.
        # Row groups of pack.packs_per_row_group packs: the trainer reads a row group at a time.
        return ShardOutput(table, Ledger(self.name), input_rows=len(samples), kept_samples=len(samples),
                           stats=stats, row_group_size=p.packs_per_row_group)


# ------------------------------------------------------------------ the stage


class PackStage(Stage):
    """`ovpipe pack`: pass 1 into OUT/_staged, pass 2 per bucket into OUT, then pack_stats."""

    name = "pack"

    def passes(self) -> list[Pass]:
        return [PackPrepPass(), PackBucketPass()]

    def report(self, out: Location, cfg: Config, summary: StageSummary, results: dict[str, PassResult]) -> list[str]:
        stats = pack_stats(results[PackBucketPass.name].entries, results[PackPrepPass.name].summary, cfg)
        dest = out.join(STATS_FILE)
        write_json(dest, stats)
        written = [dest.uri()]
        if cfg.pack.plot:
            png = out.join(PLOT_FILE)
            plot_stats(stats, png)
            written.append(png.uri())
        return written


def pack_stats(entries: dict[str, dict], first: StageSummary, cfg: Config) -> dict[str, Any]:
    """Totals over the buckets' manifest entries (``first``: pass 1's summary, for the ledger):
    the figures pack_stats.json reports."""
    max_len = cfg.pack.max_len
    samples = sum(e["samples"] for e in entries.values())
    packs = sum(e["packs"] for e in entries.values())
    tokens = sum(e["tokens"] for e in entries.values())
    spp: Counter = Counter()
    for e in entries.values():
        spp.update({int(k): v for k, v in e["samples_per_pack"].items()})
    reasons = first.dropped_by_reason
    return {
        "samples": samples, "packs": packs, "tokens": tokens, "max_len": max_len,
        "buckets": cfg.pack.buckets,
        "lower_bound": lower_bound(tokens, max_len),
        "lower_bound_per_bucket_sum": sum(lower_bound(e["tokens"], max_len) for e in entries.values()),
        "fill": round(tokens / (packs * max_len), 6) if packs else 0.0,
        "compression": round(samples / packs, 4) if packs else 0.0,
        "mean_sample_tokens": round(tokens / samples, 2) if samples else 0.0,
        "max_pack_tokens": max((e["max_pack_tokens"] for e in entries.values()), default=0),
        "max_samples_in_pack": max((e["max_samples_in_pack"] for e in entries.values()), default=0),
        "samples_per_pack_hist": {str(k): spp[k] for k in sorted(spp)},
        "overlong": {"dropped": int(reasons.get("overlong", 0)),
                     "truncated": sum(e["truncated"] for e in entries.values()), "policy": cfg.pack.overlong},
        "input_samples": first.input_rows, "ledgered": first.dropped_rows, "ledgered_by_reason": reasons,
        "length_hist": [sum(h) for h in zip(*(e["length_hist"] for e in entries.values()))] if entries else [],
        "pack_tokens_hist": [sum(h) for h in zip(*(e["pack_tokens_hist"] for e in entries.values()))] if entries else [],
        "hist_bin_width": max_len / HIST_BINS,
    }


def plot_stats(stats: dict[str, Any], dest: Location) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = stats["hist_bin_width"]
    x = np.arange(HIST_BINS) * width
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].bar(x, stats["length_hist"] or [0] * HIST_BINS, width=width, align="edge")
    axes[0].set(title=f"sample lengths ({stats['samples']:,} samples)", xlabel="tokens", ylabel="samples")
    axes[1].bar(x, stats["pack_tokens_hist"] or [0] * HIST_BINS, width=width, align="edge", color="tab:green")
    axes[1].set(title=f"pack fill: {stats['fill']:.4f}, {stats['packs']:,} packs (bound {stats['lower_bound']:,})",
                xlabel="tokens in pack", ylabel="packs")
    spp = stats["samples_per_pack_hist"]
    axes[2].bar([int(k) for k in spp], list(spp.values()), color="tab:orange")
    axes[2].set(title=f"samples per pack (mean {stats['compression']:.2f})", xlabel="samples", ylabel="packs")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    write_bytes_atomic(dest, buf.getvalue())
