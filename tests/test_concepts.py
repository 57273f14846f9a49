"""Concept vocabularies and the concept cache (tiny seeded open_clip text tower)."""

import json
import re

import numpy as np
import pytest

from curation.concepts import (
    VocabularyError,
    default_cache_dir,
    load_builtin_vocabulary,
    load_or_build,
    load_vocabulary,
)
from curation.embed import ModelSpec

SPEC = ModelSpec("ovpipe-tiny-clip", "random", 0, "auto")


def test_builtin_vocabulary_is_bilingual_and_indexed_by_id():
    vocab = load_builtin_vocabulary()
    assert 1000 <= len(vocab) <= 1500
    en, zh = zip(*vocab)
    assert len(set(en)) == len(en) and len(set(zh)) == len(zh)
    assert all(re.search(r"[\u4e00-\u9fff]", z) for z in zh)
    assert all(e.strip() == e and e for e in en)
    assert load_vocabulary("builtin") == list(en)
    assert vocab[0] == ("red", "红色") and ("circle", "圆形") in vocab  # the demo images' words


def test_json_and_text_vocabularies(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps(["cat", "dog", "北京"]), encoding="utf-8")
    assert load_vocabulary(str(tmp_path / "m.json")) == ["cat", "dog", "北京"]
    (tmp_path / "v.txt").write_text("cat\n dog \nsea lion\n\n", encoding="utf-8")
    assert load_vocabulary(str(tmp_path / "v.txt")) == ["cat", "dog", "sea lion"]


@pytest.mark.parametrize("name,content,match", [
    ("a.json", "{\"cat\": 1}", "JSON list of strings"),
    ("b.json", "[\"cat\", 3]", "JSON list of strings"),
    ("c.json", "[\"cat\"", "not valid JSON"),
    ("d.txt", "cat\n\ndog\n", "entry 1 is blank"),
    ("e.txt", "", "is empty"),
])
def test_bad_vocabularies_fail_clearly(tmp_path, name, content, match):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(VocabularyError, match=match):
        load_vocabulary(str(tmp_path / name))
    with pytest.raises(VocabularyError, match="does not exist"):
        load_vocabulary(str(tmp_path / "missing.json"))


def test_cache_miss_then_hit_then_mismatch_is_detected(tmp_path, capsys):
    vocab = tmp_path / "v.txt"
    vocab.write_text("\n".join(["cat", "dog", "red circle", "blue square", "stripes", "cat"]) + "\n")
    first = load_or_build(str(vocab), SPEC, "a photo of {}.", str(tmp_path / "cache"), batch_size=4)
    assert not first.hit and "cache miss" in capsys.readouterr().err
    assert first.embeddings.dtype == np.float16 and first.embeddings.shape == (6, 64)
    assert np.allclose(np.linalg.norm(first.embeddings.astype(np.float32), axis=1), 1, atol=2e-3)
    assert np.array_equal(first.embeddings[0], first.embeddings[5])  # same text, same vector
    for name in ("meta.json", "concepts.parquet", "embeddings.npy", "index.faiss"):
        assert (first.folder / name).is_file()
    import faiss

    index = faiss.read_index(str(first.folder / "index.faiss"))
    assert index.ntotal == 6 and index.metric_type == faiss.METRIC_INNER_PRODUCT

    second = load_or_build(str(vocab), SPEC, "a photo of {}.", str(tmp_path / "cache"), batch_size=2)
    assert second.hit and "cache hit" in capsys.readouterr().err
    assert second.key == first.key and np.array_equal(second.embeddings, first.embeddings)

    # another template, vocabulary or seed is another key
    other = [load_or_build(str(vocab), SPEC, "{}", str(tmp_path / "cache")).key,
             load_or_build(str(vocab), ModelSpec("ovpipe-tiny-clip", "random", 1), "a photo of {}.",
                           str(tmp_path / "cache")).key]
    assert first.key not in other and len(set(other)) == 2

    # an entry whose contents no longer match its key is detected and rebuilt
    emb = np.load(first.folder / "embeddings.npy")
    emb[0] = 0
    np.save(first.folder / "embeddings.npy", emb)
    capsys.readouterr()
    third = load_or_build(str(vocab), SPEC, "a photo of {}.", str(tmp_path / "cache"))
    err = capsys.readouterr().err
    assert not third.hit and "does not match" in err and "rebuilding" in err
    assert np.array_equal(third.embeddings, first.embeddings)


def test_template_must_have_one_slot(tmp_path):
    with pytest.raises(VocabularyError, match="must contain"):
        load_or_build("builtin", SPEC, "a photo", str(tmp_path))


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("OVPIPE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "concepts"
