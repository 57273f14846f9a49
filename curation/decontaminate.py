"""Decontaminate stage: training samples that show an evaluation image are ledgered, not trained on.

Reads:  any stage output after embed (embed, assign, dedup): ``sample_id``, ``embedding`` (for the
        cosine test; assign keeps it with ``assign.keep_embedding = true``) and the image reference
        (``image_uri`` / ``image_member`` / ``image_row``, for the perceptual hash); and the
        evaluation sets of ``decontaminate.benchmarks``: folders of images (benchmark name = the
        folder's name, eval id = the file's path below it) or Parquet files (image bytes in
        ``image``/``jpg``/``png``/``img``, Hugging Face image structs too; benchmark name from a
        ``benchmark`` column, else the file's name; eval id from ``id``/``question_id``/``key``,
        else the row number); ``NAME=PATH`` names a set explicitly. Text side (optional): on
        instruction data (merge's output: ``conversations``), the evaluation questions of
        ``decontaminate.questions`` (Parquet / JSON Lines, a ``question``/``text``/``prompt``
        column; name and id as above).
Writes: ``OUT/data/<shard>``: the input rows that match no evaluation image or question, unchanged
        (same schema); ledger rows (stage ``decontaminate``) ``benchmark_overlap`` with detail
        ``benchmark=<name> eval_id=<id> match=exact|embedding|phash cosine=<c> phash_distance=<d>``
        or ``... match=question|question_whole ngrams=<n>``;
        ``OUT/_report/decontaminate_report.json``: overlaps per benchmark and example matches.

A training image matches an evaluation image when its bytes are the same (``sample_id`` = xxh3 of
the bytes), when their embeddings' cosine is >= ``threshold`` (method embedding or both), or when
their 64-bit perceptual hashes differ in <= ``phash_bits`` bits (phash or both). The evaluation
images are embedded once, on the driver, with the model that made the input's embeddings (read from
the input's ``_manifest/_stage.json``: embed records its model, assign / dedup / decontaminate the
model of their input; ``decontaminate.input_model = "config"`` uses ``embed.*`` instead), and cached
by the content hash of (model identity, every eval image's bytes) like the concept vocabulary; every
task holds the (small) evaluation set and compares its shard against all of it. A user turn
overlaps an evaluation question when they share ``decontaminate.ngram`` consecutive normalised
words (a shorter question: when the turn is that question whole); docs/dedup.md.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from curation.dedup import (EMBEDDING, REF_COLUMNS, model_spec_for, phash64, provenance_state, recorded_embed_model,
                           spec_fields, unit_rows)
from ovpipe.core.images import BadImage, fetch_image_bytes
from ovpipe.core.ledger import Ledger, read_ledger
from ovpipe.core.shards import TMP_DIR, Location, read_table, write_json
from ovpipe.core.stage import PassContext, PassResult, Shard, ShardOutput, ShardTask, SinglePassStage, StageSummary

if TYPE_CHECKING:
    from ovpipe.config import Config

REASON = "benchmark_overlap"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_COLUMNS = ("image", "jpg", "png", "img")
ID_COLUMNS = ("id", "question_id", "key")
MAX_EVAL_IMAGE_BYTES = 32 * 1024 * 1024
CHUNK = 4096  # training rows compared with the whole eval set at once
QUESTION_COLUMNS = ("question", "text", "prompt")
MAX_QUESTION_CHARS = 64 * 1024  # an evaluation question or a training turn longer than this is cut
# A ledger detail; names and ids may hold spaces (a file "copy of 1.jpg"), so not split on spaces;
# after match=, key=value fields (cosine, phash_distance for images; ngrams for questions).
DETAIL = re.compile(r"^benchmark=(?P<benchmark>.*) eval_id=(?P<eval_id>.*) match=(?P<match>\S+)"
                    r"(?P<extra>(?: \S+=\S+)*)$")


@dataclass
class EvalSet:
    """Every evaluation image: its benchmark, id, exact hash, perceptual hash and embedding."""

    benchmark: list[str]
    eval_id: list[str]
    sample_id: list[str]
    phash: np.ndarray  # uint64 [m]
    has_phash: np.ndarray  # bool [m]
    embedding: np.ndarray  # float32 [m, D], unit rows (D = 0 when not embedded)

    def __len__(self) -> int:
        return len(self.eval_id)


# ------------------------------------------------------------------------- loading eval sets


def _split_spec(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    return (name, path) if sep and not os.path.exists(spec) else ("", spec)


def load_benchmark_images(specs: list[str], limit: int) -> list[tuple[str, str, bytes]]:
    """(benchmark, eval id, bytes) of every evaluation image, in a fixed order."""
    out: list[tuple[str, str, bytes]] = []
    for spec in specs:
        name, path = _split_spec(spec)
        p = Path(path)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ValueError(f"decontaminate.benchmarks: folder {path!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            for f in files:
                if f.stat().st_size > MAX_EVAL_IMAGE_BYTES:
                    raise ValueError(f"evaluation image {str(f)!r} is over {MAX_EVAL_IMAGE_BYTES:,} bytes")
                out.append((name or p.name, str(f.relative_to(p)), f.read_bytes()))
        elif p.is_file() and p.suffix == ".parquet":
            out += _parquet_images(p, name)
        else:
            raise ValueError(f"decontaminate.benchmarks: {path!r} is neither a folder of images nor a .parquet "
                             "file; give a folder (name = folder name), a Parquet file, or NAME=PATH")
        if len(out) > limit:
            raise ValueError(f"decontaminate: more than decontaminate.max_eval_images = {limit:,} evaluation images")
    return out


def _parquet_images(p: Path, name: str) -> list[tuple[str, str, bytes]]:
    table = pq.read_table(p)
    column = next((c for c in IMAGE_COLUMNS if c in table.column_names), None)
    if column is None:
        raise ValueError(f"evaluation Parquet {str(p)!r} has none of the image columns {IMAGE_COLUMNS}")
    images = table.column(column).combine_chunks()
    if pa.types.is_struct(images.type):  # Hugging Face image struct {bytes, path}
        images = images.field("bytes")
    ids_col = next((c for c in ID_COLUMNS if c in table.column_names), None)
    ids = [str(v) for v in table.column(ids_col).to_pylist()] if ids_col else [str(i) for i in range(table.num_rows)]
    names = (table.column("benchmark").to_pylist() if "benchmark" in table.column_names and not name
             else [name or p.stem] * table.num_rows)
    out = []
    for b, i, data in zip(names, ids, images.to_pylist()):
        if not isinstance(data, bytes) or len(data) > MAX_EVAL_IMAGE_BYTES:
            raise ValueError(f"evaluation Parquet {str(p)!r}, id {i!r}: no image bytes, or over "
                             f"{MAX_EVAL_IMAGE_BYTES:,} bytes")
        out.append((str(b), i, data))
    return out


def embed_images(datas: list[bytes], spec, cfg: Config, what: list[str]) -> np.ndarray:
    """Unit float32 embeddings of encoded images with the model ``spec`` (in this process; batch
    size, device and pixel limit from embed.*)."""
    from curation.embed import Embedder, decode_image, preprocess_config, split_transform

    embedder = Embedder(spec, cfg.embed.batch_size, cfg.embed.device)
    pil, _, _ = split_transform(preprocess_config(spec))
    pixels = []
    for data, name in zip(datas, what):
        try:
            pixels.append(decode_image(data, pil, cfg.embed.max_pixels))
        except BadImage as e:
            raise ValueError(f"evaluation image {name}: {e}; remove or replace it") from None
    emb = embedder.embed(np.stack(pixels)).astype(np.float32)
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def default_cache_dir() -> Path:
    root = os.environ.get("OVPIPE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ovpipe")
    return Path(root) / "eval"


def load_eval_set(cfg: Config, spec=None, log=None) -> tuple[EvalSet, str]:
    """The evaluation set with hashes and, with a model ``spec``, embeddings, from the cache when its
    key (the model's identity and every eval image's content hash) matches; its key."""
    log = log or sys.stderr
    d = cfg.decontaminate
    items = load_benchmark_images(d.benchmarks, d.max_eval_images)
    sample_ids = [xxhash.xxh3_64_hexdigest(data) for _b, _i, data in items]
    need_emb = spec is not None
    identity = spec.identity() if need_emb else None
    key = xxhash.xxh3_64_hexdigest(json.dumps(
        {"model": identity, "items": [[b, i, s] for (b, i, _), s in zip(items, sample_ids)], "format": 1,
         "phash_min_decided": d.phash_min_decided},
        sort_keys=True).encode())
    folder = Path(d.cache_dir).expanduser() if d.cache_dir else default_cache_dir()
    path = folder / f"{key}.parquet"
    if path.is_file():
        t = pq.read_table(path)
        if t.column("sample_id").to_pylist() == sample_ids:
            print(f"[decontaminate] eval cache hit: {len(items):,} images from {path}", file=log, flush=True)
            return _from_table(t), key
    hashes = [phash64(data, d.phash_min_decided) for _b, _i, data in items]
    names = [f"{b}/{i}" for b, i, _ in items]
    emb = (embed_images([data for *_, data in items], spec, cfg, names) if need_emb
           else np.zeros((len(items), 0), np.float32))
    table = pa.table({"benchmark": [b for b, _, _ in items], "eval_id": [i for _, i, _ in items],
                      "sample_id": sample_ids, "phash": pa.array(hashes, pa.uint64()),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()),
                                                                     emb.shape[1]) if emb.shape[1] else
                      pa.array([None] * len(items), pa.null())})
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{key}.{os.getpid()}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    print(f"[decontaminate] embedded {len(items):,} evaluation images -> {path}", file=log, flush=True)
    return _from_table(table), key


def _from_table(t: pa.Table) -> EvalSet:
    ph = t.column("phash").combine_chunks()
    emb_col = t.column("embedding")
    emb = (unit_rows(emb_col)[0] if pa.types.is_fixed_size_list(emb_col.type)
           else np.zeros((t.num_rows, 0), np.float32))
    return EvalSet(t.column("benchmark").to_pylist(), t.column("eval_id").to_pylist(),
                   t.column("sample_id").to_pylist(), ph.fill_null(0).to_numpy().astype(np.uint64),
                   np.asarray(ph.is_valid()), emb)


# ---------------------------------------------------------------------------------- matching


def match(ev: EvalSet, sample_ids: list[str], emb: np.ndarray | None, ok: np.ndarray | None,
          hashes: list[int | None] | None, threshold: float, bits: int) -> list[tuple[int, str, float, int] | None]:
    """Per training row: (eval index, how, cosine, phash distance) of its best match, or None.
    Exact bytes win; then the most similar embedding at or above the threshold; then the nearest hash."""
    exact = {s: i for i, s in reversed(list(enumerate(ev.sample_id)))}  # the first eval item wins
    n = len(sample_ids)
    best_cos = np.full(n, -2.0, np.float32)
    arg_cos = np.zeros(n, np.int64)
    if emb is not None and ev.embedding.shape[1]:
        for s in range(0, n, CHUNK):
            sim = emb[s:s + CHUNK] @ ev.embedding.T
            arg_cos[s:s + CHUNK] = np.argmax(sim, axis=1)
            best_cos[s:s + CHUNK] = np.where(ok[s:s + CHUNK], sim.max(axis=1), -2.0)
    best_ham = np.full(n, 99, np.int16)
    arg_ham = np.zeros(n, np.int64)
    if hashes is not None:
        has = np.array([h is not None for h in hashes], bool)
        h = np.array([x or 0 for x in hashes], np.uint64)
        for s in range(0, n, CHUNK):
            d = np.bitwise_count(h[s:s + CHUNK, None] ^ ev.phash[None, :]).astype(np.int16)
            d[:, ~ev.has_phash] = 99
            arg_ham[s:s + CHUNK] = np.argmin(d, axis=1)
            best_ham[s:s + CHUNK] = np.where(has[s:s + CHUNK], d.min(axis=1), 99)
    out: list[tuple[int, str, float, int] | None] = []
    for r, sid in enumerate(sample_ids):
        if sid in exact:
            out.append((exact[sid], "exact", float(best_cos[r]), int(best_ham[r])))
        elif best_cos[r] >= threshold:
            out.append((int(arg_cos[r]), "embedding", float(best_cos[r]), int(best_ham[r])))
        elif best_ham[r] <= bits:
            out.append((int(arg_ham[r]), "phash", float(best_cos[r]), int(best_ham[r])))
        else:
            out.append(None)
    return out


# --------------------------------------------------------------------------- the text side


def words(text: str) -> list[str]:
    """Normalised words: merge's normalisation (NFKC, case-folded, <image> removed), punctuation
    dropped (a question re-punctuated is the same question)."""
    from curation.merge import normalise_text

    return re.findall(r"\w+", normalise_text(text[:MAX_QUESTION_CHARS]))


def gram_hashes(tokens: list[str], n: int) -> np.ndarray:
    """xxh3 of every run of n consecutive words (uint64)."""
    return np.array([xxhash.xxh3_64_intdigest(" ".join(tokens[k:k + n]).encode())
                     for k in range(len(tokens) - n + 1)], np.uint64)


def load_questions(specs: list[str], limit: int) -> list[tuple[str, str, str]]:
    """(benchmark, eval id, question) of every evaluation question, in a fixed order: Parquet or JSON
    Lines files with a question/text/prompt column (name and id as for images)."""
    import polars as pl

    out: list[tuple[str, str, str]] = []
    for spec in specs:
        name, path = _split_spec(spec)
        p = Path(path)
        if not p.is_file() or p.suffix not in (".parquet", ".jsonl", ".json"):
            raise ValueError(f"decontaminate.questions: {path!r} is not a .parquet or .jsonl file of evaluation "
                             "questions; give one (a question/text/prompt column), or NAME=PATH")
        try:
            frame = pl.read_parquet(p) if p.suffix == ".parquet" else pl.read_ndjson(p)
        except Exception as e:
            raise ValueError(f"decontaminate.questions: cannot read {path!r}: {e}") from None
        column = next((c for c in QUESTION_COLUMNS if c in frame.columns), None)
        if column is None:
            raise ValueError(f"evaluation questions {path!r} have none of the columns {QUESTION_COLUMNS}")
        ids_col = next((c for c in ID_COLUMNS if c in frame.columns), None)
        ids = [str(v) for v in frame[ids_col].to_list()] if ids_col else [str(i) for i in range(frame.height)]
        names = (frame["benchmark"].to_list() if "benchmark" in frame.columns and not name
                 else [name or p.stem] * frame.height)
        out += [(str(b), i, str(q or "")) for b, i, q in zip(names, ids, frame[column].to_list())]
        if len(out) > limit:
            raise ValueError(f"decontaminate: more than decontaminate.max_eval_images = {limit:,} evaluation questions")
    return out


@dataclass
class QuestionIndex:
    """The evaluation questions' n-grams (sorted hashes and the question each came from) and the
    whole word sequences of those shorter than n (matched only whole)."""

    benchmark: list[str]
    eval_id: list[str]
    grams: np.ndarray  # uint64, sorted
    owner: np.ndarray  # int64: the question of each gram
    whole: dict[int, int]  # hash of a short question's words -> its index
    n: int

    @classmethod
    def build(cls, items: list[tuple[str, str, str]], n: int) -> "QuestionIndex":
        grams, owner, whole = [], [], {}
        for k, (_b, _i, q) in enumerate(items):
            tokens = words(q)
            if len(tokens) >= n:
                h = gram_hashes(tokens, n)
                grams.append(h)
                owner.append(np.full(len(h), k, np.int64))
            elif tokens:
                whole.setdefault(xxhash.xxh3_64_intdigest(" ".join(tokens).encode()), k)
        g = np.concatenate(grams) if grams else np.zeros(0, np.uint64)
        o = np.concatenate(owner) if owner else np.zeros(0, np.int64)
        order = np.lexsort((o, g))  # by gram, then the first question
        return cls([b for b, _, _ in items], [i for _, i, _ in items], g[order], o[order], whole, n)

    def match(self, turns: list[str]) -> tuple[int, int] | None:
        """(question index, shared n-grams; 0 for a whole short question) of the evaluation question
        these user turns overlap most (ties: the first), or None."""
        counts: dict[int, int] = {}
        for turn in turns:
            tokens = words(turn)
            k = self.whole.get(xxhash.xxh3_64_intdigest(" ".join(tokens).encode())) if tokens else None
            if k is not None:
                return k, 0
            h = np.unique(gram_hashes(tokens, self.n)) if len(tokens) >= self.n else np.zeros(0, np.uint64)
            lo, hi = np.searchsorted(self.grams, h, "left"), np.searchsorted(self.grams, h, "right")
            for s, e in zip(lo[hi > lo].tolist(), hi[hi > lo].tolist()):  # the questions holding a gram
                for owner in set(self.owner[s:e].tolist()):
                    counts[owner] = counts.get(owner, 0) + 1
        if not counts:
            return None
        best = max(counts.values())
        return min(k for k, c in counts.items() if c == best), best


def user_turns(column: pa.ChunkedArray) -> list[list[str]]:
    """The user (human) turns of each row's conversation."""
    return [[t.get("value") or "" for t in (conv or []) if t.get("from") == "human"] for conv in column.to_pylist()]


def input_model(cfg: Config, first_shard: Location | None):
    """The ModelSpec that embeds the evaluation images: the model that made the input's embeddings
    (the eval vectors must live in the same space), as the input's stage recorded it; or embed.*
    with decontaminate.input_model = "config". Refuses when it cannot tell or cannot rebuild it."""
    from curation.embed import ModelSpec

    configured = ModelSpec.from_config(cfg.embed)
    if cfg.decontaminate.input_model == "config" or first_shard is None:
        return configured
    where, identity, recorded = recorded_embed_model(first_shard)
    if identity is None:
        raise ValueError(
            f"decontaminate: cannot tell which model embedded the input {where!r}: its _manifest/_stage.json "
            "records none (only embed, assign, dedup and decontaminate outputs do). The evaluation images must "
            "be embedded by that same model. Run on such an output, or set decontaminate.input_model=config "
            f"to embed them with embed.* of this config ({configured.name!r}, pretrained "
            f"{configured.pretrained!r}), or use --set decontaminate.method=phash")
    spec = model_spec_for(identity, recorded, configured)
    if spec is None:
        raise ValueError(
            f"decontaminate: the embeddings in {where!r} were made by {identity}, which cannot be rebuilt "
            "here (a checkpoint file that moved or changed, or a model this install lacks). Set embed.model "
            "and embed.pretrained to that model (a checkpoint: its path) so that its identity matches, or "
            "use --set decontaminate.method=phash")
    return spec


# ------------------------------------------------------------------------------------- stage


class DecontaminateStage(SinglePassStage):
    name = "decontaminate"
    config_sections = ("decontaminate",)
    schema_version = 1

    def check(self, cfg: Config, output: str) -> None:
        if not cfg.decontaminate.benchmarks and not cfg.decontaminate.questions:
            raise ValueError("decontaminate: no evaluation sets; pass --benchmarks DIR_OR_PARQUET (repeatable) "
                             "or set decontaminate.benchmarks (images), or decontaminate.questions (questions)")

    def enabled(self, cfg: Config) -> bool:
        return bool(cfg.decontaminate.benchmarks or cfg.decontaminate.questions)

    def prepare(self, ctx: PassContext, shards: list[Shard]) -> dict[str, Any]:
        d = ctx.cfg.decontaminate
        first = shards[0].input if shards else None
        state: dict[str, Any] = {}
        self.eval = self.model = self.questions = None
        spec = None
        if d.benchmarks:
            spec = input_model(ctx.cfg, first) if d.method != "phash" else None
            self.eval, key = load_eval_set(ctx.cfg, spec)
            self.model = spec.identity() if spec is not None else None
            state.update(eval_set=key, eval_images=len(self.eval))
        if d.questions:
            items = load_questions(d.questions, d.max_eval_images)
            self.questions = QuestionIndex.build(items, d.ngram)
            state["eval_questions"] = xxhash.xxh3_64_hexdigest(json.dumps([items, d.ngram]).encode())
        state.update({"embed_model": self.model, "embed_spec": spec_fields(spec)} if spec is not None
                     else provenance_state(first))  # a later decontaminate reads it
        return state

    def process(self, task: ShardTask) -> ShardOutput:
        table = read_table(task.input)
        ids = table.column("sample_id").to_pylist()
        found = self._image_matches(task, table) if self.eval is not None else [None] * table.num_rows
        if self.questions is not None:
            if "conversations" not in table.column_names:
                raise ValueError(f"input shard {task.input.uri()!r} has no 'conversations' column: the question "
                                 "side (decontaminate.questions) reads instruction data (merge's output)")
            for r, turns in enumerate(user_turns(table.column("conversations"))):
                hit = self.questions.match(turns) if found[r] is None else None
                if hit is not None:
                    found[r] = (self.questions.benchmark[hit[0]], self.questions.eval_id[hit[0]],
                                f"question ngrams={hit[1]}" if hit[1] else "question_whole ngrams=0")
        ledger = Ledger(self.name)
        keep = np.ones(table.num_rows, bool)
        for r, m in enumerate(found):
            if m is not None:
                keep[r] = False
                ledger.drop(f"{task.input.uri()}#row={r}", REASON, f"benchmark={m[0]} eval_id={m[1]} match={m[2]}",
                            ids[r])
        return ShardOutput(table.filter(pa.array(keep)), ledger, table.num_rows)

    def _image_matches(self, task: ShardTask, table: pa.Table) -> list[tuple[str, str, str] | None]:
        """Per row: (benchmark, eval id, "how cosine=… phash_distance=…") of its image match, or None."""
        d = task.config.decontaminate
        emb = ok = hashes = None
        if d.method in ("embedding", "both"):
            if EMBEDDING not in table.column_names:
                raise ValueError(f"input shard {task.input.uri()!r} has no {EMBEDDING!r} column: run on embed's "
                                 "output, run assign with --set assign.keep_embedding=true, or use "
                                 "--set decontaminate.method=phash")
            emb, ok = unit_rows(table.column(EMBEDDING))
            if emb.shape[1] != self.eval.embedding.shape[1]:
                raise ValueError(f"input shard {task.input.uri()!r} holds {emb.shape[1]}-d embeddings, but "
                                 f"the model {self.model} makes {self.eval.embedding.shape[1]}-d ones: the shard "
                                 "was not embedded by the model its folder records, or (decontaminate.input_model"
                                 "=config) not by embed.* of this config; pass the embed settings the input was "
                                 "embedded with (--set embed.model=… --set embed.pretrained=…)")
        if d.method in ("phash", "both") and all(c in table.column_names for c in REF_COLUMNS):
            hashes = [phash64(b, d.phash_min_decided)
                      for b in fetch_image_bytes(table.select(["sample_id", *REF_COLUMNS]))]
        found = match(self.eval, table.column("sample_id").to_pylist(), emb, ok, hashes, d.threshold, d.phash_bits)
        return [None if m is None else
                (self.eval.benchmark[m[0]], self.eval.eval_id[m[0]],
                 f"{m[1]} cosine={m[2]:.4f} phash_distance={m[3] if m[3] < 99 else -1}") for m in found]

    def report(self, out: Location, cfg: Config, summary: StageSummary, results: dict[str, PassResult]) -> list[str]:
        ledger = read_ledger(out)
        per: dict[str, int] = {}
        examples: dict[str, list] = {}
        for row in ledger.sort("sample_id").to_dicts():
            fields = DETAIL.match(row["detail"]).groupdict()
            fields.update(kv.split("=", 1) for kv in fields.pop("extra").split())
            per[fields["benchmark"]] = per.get(fields["benchmark"], 0) + 1
            ex = examples.setdefault(fields["benchmark"], [])
            if len(ex) < cfg.decontaminate.report_pairs:
                ex.append({"sample_id": row["sample_id"], "locator": row["locator"], **fields})
        out.join(TMP_DIR).delete_tree()  # the commit path's scratch: every shard is committed
        dest = out.join("_report", "decontaminate_report.json")
        write_json(dest, {"input_rows": summary.input_rows, "removed": summary.dropped_rows,
                          "overlaps_per_benchmark": dict(sorted(per.items())), "examples": examples,
                          "threshold": cfg.decontaminate.threshold, "phash_bits": cfg.decontaminate.phash_bits,
                          "method": cfg.decontaminate.method,
                          "ngram": cfg.decontaminate.ngram if cfg.decontaminate.questions else None})
        return [dest.uri()]
