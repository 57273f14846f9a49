"""Caption validity filter: per-sample checks, and the global duplicate pass.

Per sample (``check_caption``), in this order, the first failing check is the ledger reason:

``caption_empty``        nothing but whitespace / punctuation;
``caption_truncated``    the server stopped at ``max_tokens`` (``finish_reason == "length"``);
``caption_refusal``      an English or Chinese refusal near the start ("I'm sorry, I can't…",
                         "As an AI…", "抱歉，我无法…", "作为一个人工智能…");
``caption_repetition``   a generation loop: one unit repeated ``repeat_run`` times in a row, or
                         fewer than ``min_distinct_ngram_ratio`` of the word (en) / character
                         (zh) 4-grams distinct;
``caption_wrong_script`` English asked, mostly CJK written; Chinese asked, mostly Latin written;
``caption_too_short``    fewer than ``min_words`` English words / ``min_chars_zh`` CJK characters;
``caption_too_long``     more than ``max_caption_tokens`` tokens.

Tokens: with ``token_counter = "proxy"`` (default) each CJK character counts 0.7, each digit and
punctuation mark 1 and each other word ceil(len/6) — within about 0.8-1.3x of Qwen's BPE on
English and Chinese prose (tests/test_caption_filter.py checks it). ``"qwen"`` (Qwen's BPE) or a local Hugging Face tokenizer folder
counts with ``packing.tokenizer`` instead, the packer's own tokenizer.

Global pass (``find_duplicates``), over every caption of the stage output:

* exact duplicates: same ``caption_key`` (xxh3-64 of the normalised caption: NFKC, lower case,
  punctuation and whitespace runs collapsed); the winner is the smallest (sample_hash,
  sample_id) (input position only breaks ties of a sample seen twice); every other row is
  ``duplicate_caption``;
* near duplicates (when ``near_dup_threshold`` > 0): MinHash of word 3-shingles (en) /
  character 3-shingles (zh), ``minhash_bands`` LSH bands. Within each band bucket the member
  with the smallest key is the leader; any other member whose estimated Jaccard similarity to
  a leader is >= the threshold is ``near_duplicate_caption``. The rule depends only on the set
  of captions, never on their order, so any shard or worker count gives the same losers.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
import xxhash

from ovpipe.core.hashing import text_hash
from packing.tokenizer import load_tokenizer  # the packer's tokenizer: the same counts downstream

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
LATIN = re.compile(r"[A-Za-z]")
_WORD = re.compile(r"[^\W\d_]+|\d+", re.UNICODE)
_CJK_CLASS = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKENS = re.compile(rf"[{_CJK_CLASS}]|\d|[^\W\d_{_CJK_CLASS}]+|[^\w\s]", re.UNICODE)
_PUNCT_SPACE = re.compile(r"[\W_]+", re.UNICODE)
_RUN_SRC = r"(.{2,60}?)(?:[\s,，。.、;；!！]*\1){%d,}"  # a unit, then (repeats - 1) more copies

REFUSALS_EN = (
    r"^\W*(i'?m|i am) (sorry|afraid)", r"\bi (can ?not|can'?t|am unable to|'m unable to|am not able to) "
    r"(help|assist|see|view|describe|provide|process|identify|determine|access)",
    r"\bas an ai\b", r"\bas a (large )?language model\b", r"\bunable to (see|view|process|describe) (the|this|any) image",
    r"\bno image (was|has been|is) (provided|attached|uploaded)",
)
REFUSALS_ZH = (
    r"^\W*(抱歉|对不起|很抱歉|不好意思)", r"我(无法|不能|没法|不可以)(帮|协助|查看|看到|识别|描述|提供|处理)",
    r"作为(一个)?(人工智能|AI|ai|语言模型)", r"(未|没有)(提供|上传)(任何)?图片",
)


@dataclass(frozen=True)
class FilterRules:
    min_words: int = 3
    min_chars_zh: int = 5
    max_caption_tokens: int = 1024
    wrong_script_share: float = 0.5
    repeat_run: int = 4
    min_distinct_ngram_ratio: float = 0.5
    refusal_window_chars: int = 160
    token_counter: str = "proxy"


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    return _PUNCT_SPACE.sub(" ", text).strip()


def caption_key(text: str) -> int:
    """64-bit key of the normalised caption: equal keys = exact duplicates."""
    return text_hash(normalise(text))


def proxy_token_count(text: str) -> int:
    n = 0.0
    for tok in _TOKENS.findall(text):
        if CJK.match(tok):
            n += 0.7  # Qwen's BPE merges common Chinese words: ~0.65 tokens per character
        else:
            n += 1 if len(tok) == 1 else math.ceil(len(tok) / 6)
    return math.ceil(n)


@lru_cache(maxsize=4)
def token_counter(spec: str) -> Callable[[str], int]:
    """'proxy', or anything packing.tokenizer.load_tokenizer takes ('qwen', a local HF folder)."""
    if spec == "proxy":
        return proxy_token_count
    tok = load_tokenizer(spec)
    return lambda text: len(tok.encode_text(text))


def _units(text: str, language: str) -> list[str]:
    """Words for English, CJK characters (and Latin words) for Chinese."""
    norm = normalise(text)
    if language == "zh":
        return [t for t in _TOKENS.findall(norm) if t.strip()]
    return _WORD.findall(norm)


def _is_repetition(text: str, language: str, rules: FilterRules) -> str | None:
    run = _RUN_PATTERNS(rules.repeat_run).search(text[:4000])  # bounded work on huge replies
    if run:
        return f"{run.group(1)!r} repeated {rules.repeat_run}+ times in a row"
    units = _units(text, language)
    grams = [tuple(units[i:i + 4]) for i in range(len(units) - 3)]
    if len(grams) >= 12:
        ratio = len(set(grams)) / len(grams)
        if ratio < rules.min_distinct_ngram_ratio:
            return f"only {ratio:.0%} of 4-grams distinct"
    return None


@lru_cache(maxsize=8)
def _RUN_PATTERNS(repeats: int) -> re.Pattern:
    return re.compile(_RUN_SRC % (repeats - 1), re.DOTALL)


@lru_cache(maxsize=2)
def _refusal_pattern(language: str) -> re.Pattern:
    return re.compile("|".join(REFUSALS_EN + REFUSALS_ZH), re.IGNORECASE)


def check_caption(text: str | None, finish_reason: str, language: str, rules: FilterRules) -> tuple[str, str] | None:
    """None if the caption is valid, else (ledger reason, detail)."""
    text = (text or "").strip()
    if not normalise(text):
        return "caption_empty", f"caption {text[:40]!r} has no words"
    if finish_reason == "length":
        return "caption_truncated", "finish_reason 'length': cut off at max_tokens"
    head = text[: rules.refusal_window_chars]
    refusal = _refusal_pattern(language).search(head)
    if refusal:
        return "caption_refusal", f"refusal phrase {refusal.group(0)!r}"
    loop = _is_repetition(text, language, rules)
    if loop:
        return "caption_repetition", loop
    cjk, latin = len(CJK.findall(text)), len(LATIN.findall(text))
    if cjk + latin:
        if language == "en" and cjk / (cjk + latin) > rules.wrong_script_share:
            return "caption_wrong_script", f"English asked; {cjk} CJK vs {latin} Latin letters"
        if language == "zh" and cjk / (cjk + latin) < 1 - rules.wrong_script_share:
            return "caption_wrong_script", f"Chinese asked; {cjk} CJK vs {latin} Latin letters"
    if language == "zh" and cjk < rules.min_chars_zh:
        return "caption_too_short", f"{cjk} CJK characters < {rules.min_chars_zh}"
    if language == "en" and len(_WORD.findall(text)) < rules.min_words:
        return "caption_too_short", f"{len(_WORD.findall(text))} words < {rules.min_words}"
    n = token_counter(rules.token_counter)(text)
    if n > rules.max_caption_tokens:
        return "caption_too_long", f"{n} tokens ({rules.token_counter}) > {rules.max_caption_tokens}"
    return None


# --- near-duplicate signatures -----------------------------------------------------------------

_MASK64 = (1 << 64) - 1


@lru_cache(maxsize=4)
def _perms(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed xor masks and odd multipliers: one cheap 64-bit hash family member per row."""
    rng = np.random.default_rng(0x0CA9)
    xors = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    mults = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    return xors, mults


def shingles(text: str, language: str, k: int = 3) -> set[str]:
    units = _units(text, language)
    if len(units) < k:
        return {" ".join(units)}
    return {" ".join(units[i:i + k]) for i in range(len(units) - k + 1)}


def minhash(text: str, language: str, num_perm: int) -> np.ndarray:
    """uint32[num_perm] MinHash signature of the caption's shingles."""
    hashes = np.fromiter((xxhash.xxh3_64_intdigest(s.encode("utf-8")) for s in shingles(text, language)),
                         dtype=np.uint64)
    xors, mults = _perms(num_perm)
    with np.errstate(over="ignore"):
        mixed = ((hashes[None, :] ^ xors[:, None]) * mults[:, None]) >> np.uint64(32)
    return mixed.min(axis=1).astype(np.uint32)


_BAND_MULT = np.uint64(0x100000001B3)  # FNV-1a 64-bit prime


def band_keys(signatures: np.ndarray, bands: int) -> np.ndarray:
    """uint64[n, bands]: one LSH bucket key per band of each signature (vectorised; the band
    index seeds the hash, so equal values in different bands never share a bucket)."""
    n, num_perm = signatures.shape
    rows = num_perm // bands
    sig = signatures.reshape(n, bands, rows).astype(np.uint64)
    h = np.broadcast_to(np.arange(1, bands + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15), (n, bands)).copy()
    with np.errstate(over="ignore"):
        for j in range(rows):
            h = (h ^ sig[:, :, j]) * _BAND_MULT
            h ^= h >> np.uint64(29)
    return h


# --- the global pass (vectorised: about 32 bytes per caption, plus 8 per band for near dups) ------

def winner_rank(sample_hash: np.ndarray, shard: np.ndarray, row: np.ndarray) -> np.ndarray:
    """Rank of every caption under the winner order (sample_hash, then input position for the
    same sample seen twice); smaller wins. sample_id is the hex of sample_hash, so this is the
    (sample_hash, sample_id) order."""
    order = np.lexsort((row, shard, sample_hash))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank


def _group_heads(keys: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(members, heads): every index whose key is shared with a smaller-ranked one, and the
    smallest-ranked index of its group."""
    order = np.lexsort((rank, keys))
    k = keys[order]
    first = np.ones(len(k), dtype=bool)
    first[1:] = k[1:] != k[:-1]
    head = np.maximum.accumulate(np.where(first, np.arange(len(k)), 0))
    return order[~first], order[head[~first]]


def exact_duplicates(keys: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(losers, winners) index arrays: each loser has the same caption_key as its winner."""
    return _group_heads(keys, rank)


def near_duplicate_candidates(bands: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(members, leaders), unique pairs sorted by member then leader rank: a member shares an LSH
    bucket with the leader, the smallest-ranked caption in that bucket."""
    pairs = [np.stack(_group_heads(bands[:, b], rank), axis=1) for b in range(bands.shape[1])]
    pairs = np.unique(np.concatenate(pairs), axis=0) if pairs else np.empty((0, 2), np.int64)
    if not len(pairs):
        return pairs[:, 0], pairs[:, 1]
    order = np.lexsort((rank[pairs[:, 1]], pairs[:, 0]))
    return pairs[order, 0], pairs[order, 1]


def jaccard_estimate(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))
