"""Caption stage: selected samples -> samples with an English or Chinese caption, filtered.

Reads:  any ovpipe shards with ``sample_id``, optional ``sample_hash`` (uint64) and ``source``,
        and an image reference (``image_uri``, ``image_member``, ``image_row``; bytes fetched
        with ``ovpipe.core.images.fetch_image_bytes``). The ``concepts`` backend reads
        ``concept_ids`` (list<int32>, best first, from assign) instead of images.
Writes: ``OUT/<shard>.parquet``: the input columns + ``caption`` (string), ``language``
        ("en" / "zh") and ``captioner`` ("<model>@<prompt_version>"); ledger rows with stage
        ``caption`` and the reasons of ``curation.caption_filter`` plus ``image_unavailable``,
        ``caption_request_failed``, ``duplicate_caption``, ``near_duplicate_caption`` and, when
        ``caption.min_image_text_similarity`` > -1, ``caption_low_similarity`` (English captions
        whose embed-model text embedding is far from the row's image ``embedding``).
        Also ``OUT/_captions/`` (pass 1's committed output: a stage output of its own, with
        manifest and ledger) and ``OUT/_dedup/<shard>.parquet`` (pass 2's per-shard loser lists:
        row, reason, detail; rewritten identically on every run).

``CaptionStage`` is two passes, run by ``ovpipe.core.stage.run_stage`` (both resume through
their manifests; run_stage does the commits, the accounting and ``OUT/_manifest/_summary.json``):

1. ``CaptionPass`` -> ``OUT/_captions/``: per input shard, every sample is captioned (requests
   concurrent inside the shard, ``caption.max_in_flight`` open at once) and checked by the
   per-sample filter. Each kept row also carries ``caption_key`` (uint64 hash of the normalised
   caption), ``caption_minhash`` (uint32 MinHash signature) and ``caption_locator`` (where the
   sample was read): the per-shard hash lists. With ``--overwrite`` its (costly) captions are kept
   when the pass's config is unchanged (``keep_on_overwrite``): only pass 2 is redone.
2. ``CaptionDedupPass`` -> ``OUT/``: its ``prepare()`` reduces those hash columns to the set of
   duplicate losers (winner = smallest (sample_hash, sample_id)) as a shuffle partitioned by
   caption key and LSH band key (curation/caption_dedup.py; no process holds every caption),
   staging each shard's losers under ``OUT/_tmp``, and puts a digest of that set in the config
   hash; each shard task then copies its losers to ``OUT/_dedup/<shard>.parquet``, ledgers them
   and writes the final rows without the helper columns.

A crash in pass 1 loses at most the shards in progress (finished shards are never captioned
again); a crash in pass 2 redoes only its unfinished shards, from the same loser set. Pass 2
needs every pass-1 shard, so it starts only when pass 1 is complete. Ledger rows of both passes
have stage ``caption``.

Language: ``language_by_source`` when the sample's source is listed, else Chinese when
xxh3(seed, sample_id) / 2**64 < ``zh_share``: deterministic, independent of order and sharding.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import importlib.util
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pyarrow as pa
import xxhash
from PIL import Image

from curation.caption_client import ChatClient, ClientSettings, RequestFailed
from curation.caption_dedup import clear_scratch, find_duplicates
from curation.caption_filter import FilterRules, caption_key, check_caption, minhash
from curation.config import CaptionSection
from curation.embed import ModelSpec, load_model
from ovpipe.core.hashing import text_hash
from ovpipe.core.images import fetch_image_bytes, open_image
from ovpipe.core.ledger import Ledger
from ovpipe.core.progress import Progress
from ovpipe.core.shards import TMP_DIR, Location, read_table, write_bytes_atomic
from ovpipe.core.stage import (
    Pass,
    PassContext,
    Shard,
    ShardOutput,
    ShardTask,
    Stage,
    record_result,
    run_shard_safely,
)

if TYPE_CHECKING:  # annotations only: the root config composes every stage's section
    from ovpipe.config import Config

DEFAULT_VOCABULARY = Path(__file__).parent / "data" / "concepts_bilingual.tsv"
PASS1_DIR = "_captions"  # pass 1's folder under OUT
DEDUP_DIR = "_dedup"  # pass 2's loser lists under OUT
LEDGER_STAGE = "caption"
OUTPUT_COLUMNS = [pa.field("caption", pa.string()), pa.field("language", pa.string()),
                  pa.field("captioner", pa.string())]
HELPER_COLUMNS = [pa.field("caption_key", pa.uint64()), pa.field("caption_minhash", pa.list_(pa.uint32())),
                  pa.field("caption_locator", pa.string())]  # where pass 1 read the sample
IMAGE_REF = ("image_uri", "image_member", "image_row")


class MissingBackend(RuntimeError):
    """The chosen backend needs a package that is not installed."""


# --- language and seeds ------------------------------------------------------------------------

def _unit(seed: int, sample_id: str, salt: str) -> float:
    return text_hash(f"{salt}:{seed}:{sample_id}") / 2.0**64


def choose_languages(sample_ids: list[str], sources: list[str | None], cfg: CaptionSection, seed: int) -> list[str]:
    by_source = dict(item.split("=", 1) for item in cfg.language_by_source)
    return [by_source.get(src) or ("zh" if _unit(seed, sid, "lang") < cfg.zh_share else "en")
            for sid, src in zip(sample_ids, sources)]


def request_seed(sample_id: str, seed: int, attempt: int) -> int:
    """Per-sample sampling seed sent to the server; attempt 1 is the retry of a rejected caption."""
    return text_hash(f"req:{seed}:{attempt}:{sample_id}") % 2**31


def filter_rules(cfg: CaptionSection) -> FilterRules:
    return FilterRules(cfg.min_words, cfg.min_chars_zh, cfg.max_caption_tokens, cfg.wrong_script_share,
                       cfg.repeat_run, cfg.min_distinct_ngram_ratio, token_counter=cfg.token_counter)


def captioner_id(cfg: CaptionSection, vocabulary_digest: str = "") -> str:
    if cfg.backend == "concepts":
        return f"concepts-top{cfg.concepts_top_k}:{vocabulary_digest}@{cfg.prompt_version}"
    return f"{cfg.model}@{cfg.prompt_version}"


# --- concepts backend --------------------------------------------------------------------------

def load_vocabulary(path: str) -> tuple[list[str], list[str], str]:
    """(English names, Chinese names, digest) from a TSV with header id/en/zh, id == row index."""
    loc = Location.parse(path or str(DEFAULT_VOCABULARY))
    if not loc.exists():
        raise FileNotFoundError(f"concept vocabulary {loc.uri()!r} does not exist; set caption.concepts_vocabulary "
                                "to the bilingual TSV (id, en, zh) that assign used")
    raw = loc.read_bytes()
    lines = raw.decode("utf-8").splitlines()
    if not lines or lines[0].split("\t")[:3] != ["id", "en", "zh"]:
        raise ValueError(f"concept vocabulary {loc.uri()!r} must start with the header 'id\\ten\\tzh'")
    en, zh = [], []
    for n, line in enumerate(lines[1:]):
        parts = line.split("\t")
        if len(parts) < 3 or parts[0] != str(n):
            raise ValueError(f"concept vocabulary {loc.uri()!r} line {n + 2}: expected '{n}\\t<en>\\t<zh>', got {line!r}")
        en.append(parts[1].strip())
        zh.append(parts[2].strip())
    return en, zh, xxhash.xxh3_64_hexdigest(raw)


def _article(name: str) -> str:
    if name.lower().startswith(("a ", "an ", "the ")) or name.endswith("s"):
        return name
    return ("an " if name[:1].lower() in "aeiou" else "a ") + name


def concept_caption(names: list[str], language: str) -> str:
    """'A photo with a dog, a ball and grass.' / '一张包含狗、球和草地的照片。'"""
    if not names:
        return ""
    if language == "zh":
        listed = names[0] if len(names) == 1 else "、".join(names[:-1]) + "和" + names[-1]
        return f"一张包含{listed}的照片。"
    words = [_article(n) for n in names]
    listed = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    return f"A photo with {listed}."


# --- images ------------------------------------------------------------------------------------

def image_data_url(data: bytes, max_pixels: int) -> str:
    """A data URL of the image, downscaled and re-encoded as JPEG only when over the budget
    (or in a format servers may not take): most images are sent as they are, base64 only."""
    with open_image(data) as img:
        w, h = img.size
        fmt = (img.format or "").upper()
        if w * h <= max_pixels and fmt in ("JPEG", "PNG", "WEBP"):
            return f"data:image/{fmt.lower()};base64,{base64.b64encode(data).decode('ascii')}"
        scale = min(1.0, math.sqrt(max_pixels / (w * h)))
        size = (max(1, int(w * scale)), max(1, int(h * scale)))
        out = io.BytesIO()
        img.convert("RGB").resize(size, Image.BICUBIC).save(out, format="JPEG", quality=90)
    return f"data:image/jpeg;base64,{base64.b64encode(out.getvalue()).decode('ascii')}"


# --- answers -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Answer:
    text: str | None
    rejected: tuple[str, str] | None = None  # (ledger reason, detail)


def _judge(text: str, finish: str, language: str, rules: FilterRules, retried: bool) -> Answer:
    bad = check_caption(text, finish, language, rules)
    if bad is None:
        return Answer(text.strip())
    return Answer(None, (bad[0], bad[1] + (" (also after one retry with another seed)" if retried else "")))


def _messages(url: str, prompt: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": prompt}]}]


def caption_openai(sample_ids: list[str], images: list[bytes | None], languages: list[str],
                   cfg: CaptionSection, seed: int, on_done: Callable[[], None] | None = None,
                   ) -> tuple[list[Answer], int]:
    """Caption one shard's samples over HTTP; returns the answers and the number of retries.
    ``on_done`` is called as each sample finishes (benchmarks time completions with it)."""
    settings = ClientSettings(cfg.base_url, cfg.model, cfg.api_key_env, cfg.max_in_flight, cfg.request_timeout_s,
                              cfg.max_retries, cfg.backoff_base_s, cfg.backoff_max_s, cfg.max_response_bytes)
    rules = filter_rules(cfg)

    async def run() -> tuple[list[Answer], int]:
        gate = asyncio.Semaphore(cfg.max_in_flight)  # bounds data URLs held in memory too
        async with ChatClient(settings) as client:
            async def one(i: int) -> Answer:
                async with gate:
                    answer = await _caption_one(client, sample_ids[i], images[i], languages[i], cfg, rules, seed)
                if on_done is not None:
                    on_done()
                return answer
            answers = await asyncio.gather(*(one(i) for i in range(len(sample_ids))))
            return list(answers), client.retries

    return asyncio.run(run())


async def _caption_one(client: ChatClient, sample_id: str, data: bytes | None, language: str,
                       cfg: CaptionSection, rules: FilterRules, seed: int) -> Answer:
    if data is None:
        return Answer(None, ("image_unavailable", "the image reference could not be read"))
    try:
        url = image_data_url(data, cfg.image_max_pixels)
    except Exception as e:  # untrusted bytes: PIL raises many types
        return Answer(None, ("image_unavailable", f"image does not decode: {type(e).__name__}: {e}"[:300]))
    messages = _messages(url, cfg.prompt_zh if language == "zh" else cfg.prompt_en)
    answer = Answer(None)
    for attempt in range(2 if cfg.retry_rejected else 1):
        try:
            done = await client.complete(messages, request_id=f"{sample_id}/{attempt}",
                                         max_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                         seed=request_seed(sample_id, seed, attempt))
        except RequestFailed as e:
            return Answer(None, ("caption_request_failed", e.detail[:500]))
        answer = _judge(done.text, done.finish_reason, language, rules, attempt > 0)
        if answer.rejected is None:
            break
    return answer


def caption_vllm(sample_ids: list[str], images: list[bytes | None], languages: list[str],
                 cfg: CaptionSection, seed: int) -> list[Answer]:
    """Caption one shard with vLLM in-process on GPU actors (Ray Data's LLM processor)."""
    if importlib.util.find_spec("vllm") is None:
        raise MissingBackend(
            "caption.backend = 'vllm' needs vLLM and Ray's LLM extra on the GPU nodes: pip install "
            "'ovpipe[gpu]' (vllm, ray[llm]). Without a GPU, use backend 'openai' against a running "
            "`vllm serve`, or 'concepts'.")
    import ray.data
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    rules = filter_rules(cfg)
    answers: list[Answer | None] = [None] * len(sample_ids)
    rows = []
    for i, (sid, data, lang) in enumerate(zip(sample_ids, images, languages)):
        try:
            url = image_data_url(data, cfg.image_max_pixels) if data is not None else None
        except Exception as e:
            url, answers[i] = None, Answer(None, ("image_unavailable", f"image does not decode: {e}"[:300]))
        if url is None and answers[i] is None:
            answers[i] = Answer(None, ("image_unavailable", "the image reference could not be read"))
        if url is not None:
            rows.append({"i": i, "url": url, "prompt": cfg.prompt_zh if lang == "zh" else cfg.prompt_en,
                         "seeds": [request_seed(sid, seed, a) for a in range(2)]})
    config = vLLMEngineProcessorConfig(
        model_source=cfg.model, engine_kwargs=json.loads(cfg.vllm_engine_kwargs), concurrency=cfg.vllm_concurrency,
        batch_size=cfg.vllm_batch_size, prepare_multimodal_stage=True, should_continue_on_error=True)
    for attempt in range(2 if cfg.retry_rejected else 1):
        if not rows:
            break
        processor = build_processor(
            config,
            preprocess=lambda r, a=attempt: dict(
                i=r["i"], messages=_messages(r["url"], r["prompt"]),
                sampling_params=dict(temperature=cfg.temperature, max_tokens=cfg.max_new_tokens,
                                     seed=r["seeds"][a])),
            postprocess=lambda r: dict(i=r["i"], text=r.get("generated_text") or "",
                                       n=int(r.get("num_generated_tokens") or 0),
                                       error=str(r.get("__inference_error__") or "")),
        )
        results = processor(ray.data.from_items(rows)).take_all()
        retry = []
        for r in results:
            i = r["i"]
            if r["error"]:
                answers[i] = Answer(None, ("caption_request_failed", r["error"][:500]))
                continue
            finish = "length" if r["n"] >= cfg.max_new_tokens else "stop"
            answers[i] = _judge(r["text"], finish, languages[i], rules, attempt > 0)
            if answers[i].rejected is not None:
                retry.append(i)
        by_index = {row["i"]: row for row in rows}
        rows = [by_index[i] for i in retry]
    return [a if a is not None else Answer(None, ("caption_request_failed", "no result from the engine"))
            for a in answers]


# --- pass 1 ------------------------------------------------------------------------------------

def check_caption_config(cfg: Config) -> None:
    """What the config alone can tell is wrong, before any pass (or, in a pipeline, any step) runs."""
    c = cfg.caption
    if c.minhash_perms % c.minhash_bands:
        raise ValueError(f"caption.minhash_bands ({c.minhash_bands}) must divide caption.minhash_perms "
                         f"({c.minhash_perms})")
    if c.backend == "concepts":
        if not c.concepts_vocabulary and cfg.assign.vocabulary != "builtin":
            # concept ids index assign's vocabulary; the built-in TSV would name other concepts
            raise ValueError(
                f"caption.backend = 'concepts' names concept ids, and assign used the vocabulary "
                f"{cfg.assign.vocabulary!r}, not the built-in one; set caption.concepts_vocabulary to "
                "a TSV (id, en, zh) with that vocabulary's ids, or use the openai/vllm backend")
        return
    if not c.model:
        raise ValueError(f"caption.backend = {c.backend!r} needs caption.model (--model NAME)")
    if c.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        caption_vllm([], [], [], c, 0)  # raises the clear MissingBackend message


class CaptionPass(Pass):
    """Pass 1: caption and filter every sample of one input shard (``OUT/_captions``)."""

    name = "caption"
    config_sections = ("run", "caption")
    schema_version = 1
    folder = PASS1_DIR
    keep_on_overwrite = True  # --overwrite after a change of dedup settings only: keep the captions

    def __init__(self) -> None:
        self.vocabulary: tuple[list[str], list[str], str] | None = None

    def prepare(self, ctx: PassContext, shards: list[Shard]) -> dict[str, Any]:
        cfg = ctx.cfg
        c = cfg.caption  # the config alone was checked by CaptionStage.check, before any pass ran
        digest: dict[str, Any] = {}
        if c.min_image_text_similarity > -1:  # the embed model is part of what decides the output
            digest["similarity_model"] = ModelSpec.from_config(cfg.embed).identity()
        if c.backend == "concepts":
            self.vocabulary = load_vocabulary(c.concepts_vocabulary)
            return {**digest, "vocabulary": self.vocabulary[2], "concepts": len(self.vocabulary[0])}
        return digest

    def execute(self, pending: list[ShardTask], ctx: PassContext, progress: Progress) -> dict[str, str]:
        """vLLM: the engine actors are the parallelism, so shards run one at a time in this process."""
        if ctx.cfg.caption.backend != "vllm":
            return super().execute(pending, ctx, progress)
        failed: dict[str, str] = {}
        for task in pending:
            record_result(self.name, run_shard_safely(self, task), failed, progress)
        return failed

    def process(self, task: ShardTask) -> ShardOutput:
        c, seed = task.config.caption, task.config.run.seed
        table = read_table(task.input)
        _require(table, task, ["sample_id"] + (["concept_ids"] if c.backend == "concepts" else list(IMAGE_REF))
                 + (["embedding"] if c.min_image_text_similarity > -1 else []))
        table = table.drop_columns([f.name for f in OUTPUT_COLUMNS + HELPER_COLUMNS if f.name in table.column_names])
        ids = table.column("sample_id").to_pylist()
        sources = table.column("source").to_pylist() if "source" in table.column_names else [None] * len(ids)
        languages = choose_languages(ids, sources, c, seed)
        if c.backend == "concepts":
            answers = self._concept_answers(table, languages, c)
        else:
            problems: dict[int, tuple[str, str]] = {}
            images = fetch_image_bytes(table.select(["sample_id", *IMAGE_REF]), problems=problems)
            if c.backend == "openai":
                answers, _retries = caption_openai(ids, images, languages, c, seed)
            else:
                answers = caption_vllm(ids, images, languages, c, seed)
            for i, (reason, detail) in problems.items():  # rows sent no request: say why
                answers[i] = Answer(None, ("image_unavailable", f"{reason}: {detail}"[:300]))
        if c.min_image_text_similarity > -1:
            answers = similarity_filter(table, languages, answers, task.config)
        return self._output(task, table, ids, languages, answers)

    def _concept_answers(self, table: pa.Table, languages: list[str], c: CaptionSection) -> list[Answer]:
        en, zh, _ = self.vocabulary
        rules = filter_rules(c)
        answers = []
        for ids, lang in zip(table.column("concept_ids").to_pylist(), languages):
            names_of = zh if lang == "zh" else en
            ids = [i for i in (ids or []) if i is not None]
            bad = [i for i in ids if not 0 <= i < len(names_of)]
            if bad:
                answers.append(Answer(None, ("caption_empty", f"concept ids {bad[:3]} outside the vocabulary "
                                                              f"of {len(names_of)}: was assign run with another one?")))
                continue
            names = list(dict.fromkeys(names_of[i] for i in ids if names_of[i]))[: c.concepts_top_k]
            answers.append(_judge(concept_caption(names, lang), "stop", lang, rules, False))
        return answers

    def _output(self, task: ShardTask, table: pa.Table, ids: list[str], languages: list[str],
                answers: list[Answer]) -> ShardOutput:
        c = task.config.caption
        ledger = Ledger(LEDGER_STAGE)
        keep, captions, keys, sigs = [], [], [], []
        uri = task.input.uri()
        for row, (sid, lang, ans) in enumerate(zip(ids, languages, answers)):
            if ans.rejected is not None:
                ledger.drop(f"{uri}#row={row}", ans.rejected[0], f"[{lang}] {ans.rejected[1]}", sid)
                continue
            keep.append(row)
            captions.append(ans.text)
            keys.append(caption_key(ans.text))
            sigs.append(minhash(ans.text, lang, c.minhash_perms).tolist())
        out = table.take(pa.array(keep, pa.int64()))
        who = captioner_id(c, self.vocabulary[2] if self.vocabulary else "")
        columns = [captions, [languages[r] for r in keep], [who] * len(keep), keys, sigs,
                   [f"{uri}#row={r}" for r in keep]]
        for f, values in zip(OUTPUT_COLUMNS + HELPER_COLUMNS, columns):
            out = out.append_column(f, pa.array(values, f.type))
        return ShardOutput(out, ledger, table.num_rows)


@functools.lru_cache(maxsize=1)
def _text_tower(spec):
    import open_clip

    return load_model(spec, "cpu"), open_clip.get_tokenizer(spec.name)


def image_text_cosine(captions: list[str], image_embeddings: np.ndarray, cfg: Config) -> np.ndarray:
    """Cosine similarity of each caption (embed model's text tower, CPU) with its image embedding."""
    import torch

    model, tokenizer = _text_tower(ModelSpec.from_config(cfg.embed))
    with torch.no_grad():
        text = model.encode_text(tokenizer(captions)).float().numpy()
    text /= np.linalg.norm(text, axis=1, keepdims=True) + 1e-12
    img = image_embeddings.astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True) + 1e-12
    return (text * img).sum(axis=1)


def similarity_filter(table: pa.Table, languages: list[str], answers: list[Answer], cfg: Config) -> list[Answer]:
    """Reject English captions that do not describe their image (MetaCLIP's text tower is English)."""
    threshold = cfg.caption.min_image_text_similarity
    rows = [i for i, (a, lang) in enumerate(zip(answers, languages)) if a.rejected is None and lang == "en"]
    if not rows:
        return answers
    emb = table.column("embedding").combine_chunks().take(pa.array(rows))
    flat = emb.flatten().to_numpy(zero_copy_only=False).reshape(len(rows), -1)
    cosine = image_text_cosine([answers[i].text for i in rows], flat, cfg)
    out = list(answers)
    for i, cos in zip(rows, cosine.tolist()):
        if cos < threshold:
            out[i] = Answer(None, ("caption_low_similarity", f"image-text cosine {cos:.3f} < {threshold}"))
    return out


def _require(table: pa.Table, task: ShardTask, columns: list[str]) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        hint = (" The concepts backend reads assign output (concept_ids); use --backend openai or vllm "
                "for shards without it." if "concept_ids" in missing else "")
        raise ValueError(f"caption input {task.input.uri()!r} lacks columns {missing}; it has "
                         f"{table.column_names}.{hint}")


# --- pass 2: the global duplicate pass ---------------------------------------------------------

class CaptionDedupPass(Pass):
    """Pass 2 (``OUT``). ``prepare`` runs the global reduction as a hash-partitioned shuffle
    (curation/caption_dedup.py: no process holds every caption; the driver holds file names and
    per-shard counts), which stages each shard's loser rows under ``OUT/_tmp``; each shard task,
    which runs only once the runner has accepted this pass's output folder, copies its own staged
    file to ``OUT/_dedup/<shard>.parquet`` (row, reason, detail) and reads only that. A refused
    run changes nothing outside ``OUT/_tmp``."""

    name = "caption_dedup"
    config_sections = ("run", "caption")
    schema_version = 1
    reads = CaptionPass.name
    folder = ""

    def prepare(self, ctx: PassContext, shards: list[Shard]) -> dict[str, Any]:
        c = ctx.cfg.caption
        staged, losers, digest = find_duplicates([s.input for s in shards], c, ctx.cfg, ctx.output.join(TMP_DIR),
                                                 ctx.done[CaptionPass.name].summary.kept_rows)
        self._staged = {s.name: loc for s, loc in zip(shards, staged)}
        return {"dedup": {"exact": c.dedup_exact, "near_dup_threshold": c.near_dup_threshold,
                          "minhash_bands": c.minhash_bands},
                "losers": losers, "losers_digest": digest}

    def execute(self, pending: list[ShardTask], ctx: PassContext, progress: Progress) -> dict[str, str]:
        try:
            return super().execute(pending, ctx, progress)
        finally:
            clear_scratch(ctx.output.join(TMP_DIR))

    def process(self, task: ShardTask) -> ShardOutput:
        table = read_table(task.input)
        dedup = task.output_root.join(DEDUP_DIR, f"{task.shard}.parquet")
        write_bytes_atomic(dedup, self._staged[task.shard].read_bytes())  # the staged bytes, unchanged
        losers = read_table(dedup)
        ledger = Ledger(LEDGER_STAGE)
        ids = table.column("sample_id").to_pylist()
        locators = table.column("caption_locator").to_pylist()  # the caption stage's input, not OUT/_captions
        rows = losers.column("row").to_pylist()
        for row, reason, detail in zip(rows, losers.column("reason").to_pylist(), losers.column("detail").to_pylist()):
            ledger.drop(locators[row], reason, detail, ids[row])
        mask = np.ones(table.num_rows, dtype=bool)
        mask[rows] = False
        out = table.filter(pa.array(mask)).drop_columns([f.name for f in HELPER_COLUMNS])
        return ShardOutput(out, ledger, table.num_rows)

    def shard_files(self, shard: str) -> list[str]:
        return [f"{DEDUP_DIR}/{shard}.parquet"]


# --- the stage ---------------------------------------------------------------------------------

class CaptionStage(Stage):
    """What `ovpipe caption` runs: pass 1 into OUT/_captions, pass 2 into OUT."""

    name = "caption"

    def passes(self) -> list[Pass]:
        return [CaptionPass(), CaptionDedupPass()]

    def check(self, cfg: Config, output: str) -> None:
        check_caption_config(cfg)
