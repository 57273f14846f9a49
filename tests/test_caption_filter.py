"""The caption validity filter: each rejection kind in English and Chinese, and the global
duplicate pass's deterministic winners."""

import random

import numpy as np
import pytest

from curation.caption import choose_languages, concept_caption
from curation.caption_filter import (
    CJK,
    FilterRules,
    band_keys,
    caption_key,
    check_caption,
    exact_duplicates,
    jaccard_estimate,
    minhash,
    near_duplicate_candidates,
    proxy_token_count,
    winner_rank,
)
from curation.config import CaptionSection
from tests.helpers import LONG_EN, LONG_ZH

RULES = FilterRules(max_caption_tokens=150)

CASES = [
    # (caption, finish_reason, language asked, expected reason or None)
    ("A red circle on a white background, next to a blue square.", "stop", "en", None),
    ("一个白色背景上的红色圆形，旁边有一个蓝色正方形。", "stop", "zh", None),
    ("A street sign that reads 欢迎 (welcome) above a shop door.", "stop", "en", None),
    ("   ", "stop", "en", "caption_empty"),
    ("。。！", "stop", "zh", "caption_empty"),
    ("A red circle on a white background, next to a", "length", "en", "caption_truncated"),
    ("一个白色背景上的红色圆形，旁边", "length", "zh", "caption_truncated"),
    ("I'm sorry, but I can't help with identifying people in images.", "stop", "en", "caption_refusal"),
    ("As an AI language model, I cannot see the image you provided.", "stop", "en", "caption_refusal"),
    ("I am unable to describe this image.", "stop", "en", "caption_refusal"),
    ("抱歉，我无法查看这张图片。", "stop", "zh", "caption_refusal"),
    ("作为一个人工智能，我不能描述图片中的人物。", "stop", "zh", "caption_refusal"),
    ("我无法识别图片中的内容，请提供更多信息。", "stop", "zh", "caption_refusal"),
    ("A cat sits on a mat. " + "and the cat sits " * 8, "stop", "en", "caption_repetition"),
    ("一只猫坐在垫子上。" + "猫坐着，" * 8, "stop", "zh", "caption_repetition"),
    ("哈哈哈哈哈哈哈哈哈哈哈哈", "stop", "zh", "caption_repetition"),
    ("一只橘色的猫坐在窗台上晒太阳。", "stop", "en", "caption_wrong_script"),
    ("An orange cat is sitting on the windowsill in the sun.", "stop", "zh", "caption_wrong_script"),
    ("A cat.", "stop", "en", "caption_too_short"),
    ("猫咪。", "stop", "zh", "caption_too_short"),
    (LONG_EN, "stop", "en", "caption_too_long"),
    (LONG_ZH, "stop", "zh", "caption_too_long"),
]


@pytest.mark.parametrize("text,finish,language,expected", CASES)
def test_each_rejection_kind_in_english_and_chinese(text, finish, language, expected):
    got = check_caption(text, finish, language, RULES)
    assert (got[0] if got else None) == expected, got


def test_the_filter_is_not_fooled_by_a_refusal_word_late_in_a_caption():
    text = ("A crowded market street with fruit stalls, hanging lanterns and a handwritten sign at the far "
            "end of the lane that says 'sorry, we are closed' in red paint on a wooden board.")
    assert check_caption(text, "stop", "en", RULES) is None


def test_proxy_token_count_is_near_qwen_bpe():
    from packing.tokenizer import load_tokenizer

    tok = load_tokenizer("qwen")
    texts = [c[0] for c in CASES if c[0].strip()] + [LONG_EN, LONG_ZH]
    for lang in ("en", "zh"):
        picked = [t for t in texts if (CJK.search(t) is not None) == (lang == "zh")]
        proxy = sum(proxy_token_count(t) for t in picked)
        real = sum(len(tok.encode_text(t)) for t in picked)
        assert 0.85 <= proxy / real <= 1.3, (lang, proxy, real)
    rules = FilterRules(max_caption_tokens=200, token_counter="qwen")
    assert check_caption(LONG_EN, "stop", "en", rules)[0] == "caption_too_long"


def test_normalised_key_ignores_case_spacing_and_punctuation():
    assert caption_key("A red  circle, on white!") == caption_key("a red circle on white")
    assert caption_key("一个红色圆形。") == caption_key("一个红色圆形")
    assert caption_key("a red circle") != caption_key("a blue circle")


def test_exact_duplicate_winner_is_the_smallest_key_whatever_the_order():
    # (sample_hash, shard, row, caption_key)
    items = [(5, 0, 0, 1), (2, 1, 3, 1), (9, 0, 1, 1), (1, 0, 2, 7), (2, 0, 4, 1)]
    for seed in range(5):
        random.Random(seed).shuffle(items)
        h, sh, r, k = (np.array(col, dtype=t) for col, t in zip(zip(*items), (np.uint64, np.int32, np.int32, np.uint64)))
        losers, winners = exact_duplicates(k, winner_rank(h, sh, r))
        got = {(int(h[i]), int(sh[i])): (int(h[j]), int(sh[j])) for i, j in zip(losers, winners)}
        # hash 2 wins; its second copy (same hash, later shard) loses on input position
        assert got == {(5, 0): (2, 0), (9, 0): (2, 0), (2, 1): (2, 0)}


def test_minhash_finds_near_duplicates_and_not_different_captions():
    a = "A red circle on a white background next to a small blue square and a green triangle in the corner."
    b = "A red circle on a white background next to a small blue square and a green triangle in a corner."
    c = "Two children play football on a sandy beach at sunset while a dog watches them from the dunes."
    sig = np.stack([minhash(t, "en", 64) for t in (a, b, c)])
    assert jaccard_estimate(sig[0], sig[1]) >= 0.7
    assert jaccard_estimate(sig[0], sig[2]) < 0.2
    rank = np.array([2, 0, 1])  # b has the smallest key
    members, leaders = near_duplicate_candidates(band_keys(sig, 16), rank)
    assert members.tolist() == [0] and leaders.tolist() == [1]  # the larger key points at the smaller
    assert not (band_keys(sig, 16)[:, 0] == band_keys(sig[:, ::-1].copy(), 16)[:, 0]).all()


def test_language_shares_hold_and_are_deterministic():
    ids = [f"{i:016x}" for i in range(20000)]
    cfg = CaptionSection(zh_share=0.3)
    langs = choose_languages(ids, [None] * len(ids), cfg, seed=0)
    share = langs.count("zh") / len(langs)
    assert abs(share - 0.3) < 0.015
    assert langs == choose_languages(ids, [None] * len(ids), cfg, seed=0)
    other = choose_languages(ids, [None] * len(ids), cfg, seed=1)
    assert other != langs and abs(other.count("zh") / len(other) - 0.3) < 0.015
    paper = choose_languages(ids, [None] * len(ids), CaptionSection(), seed=0)  # 20M of 85M
    assert abs(paper.count("zh") / len(paper) - 20 / 85) < 0.015
    by_source = CaptionSection(zh_share=0.0, language_by_source=["laion_cn=zh"])
    langs = choose_languages(ids[:4], ["laion_cn", "coyo", None, "laion_cn"], by_source, seed=0)
    assert langs == ["zh", "en", "en", "zh"]


def test_bad_language_by_source_is_refused():
    with pytest.raises(ValueError, match="source=en"):
        CaptionSection(language_by_source=["laion_cn:zh"])


def test_concept_captions_in_both_languages():
    assert concept_caption(["dog", "apple", "grass"], "en") == "A photo with a dog, an apple and grass."
    assert concept_caption(["狗", "球", "草地"], "zh") == "一张包含狗、球和草地的照片。"
    assert concept_caption(["dog"], "en") == "A photo with a dog."
