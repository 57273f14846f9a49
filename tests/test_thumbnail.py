"""The ovpipe-thumbnail stand-in embedding: keeps image distances (unlike the tiny random CLIP),
is deterministic, and its text side spreads images over concepts."""

from __future__ import annotations

import numpy as np
import pytest

from curation.concepts import embed_concepts, load_builtin_vocabulary
from curation.embed import Embedder, ModelSpec, decode_image, preprocess_config, split_transform
from ovpipe.testing.near_dups import make_corpus


def embed_all(spec: ModelSpec, datas: list[bytes], batch: int = 16) -> np.ndarray:
    pil, _, _ = split_transform(preprocess_config(spec))
    pixels = np.stack([decode_image(d, pil, 10 ** 8) for d in datas])
    return Embedder(spec, batch).embed(pixels).astype(np.float32)


@pytest.fixture(scope="module")
def corpus():
    return make_corpus(n_base=20, copies=4, n_unrelated=20, seed=11)


def pair_cosines(emb: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = emb @ emb.T
    iu = np.triu_indices(len(emb), 1)
    same = (groups[:, None] == groups[None, :])[iu]
    return s[iu][same], s[iu][~same]


def test_thumbnail_separates_copies_from_distinct_images(corpus):
    datas, groups = [i.data for i in corpus], np.array([i.group for i in corpus])
    thumb = embed_all(ModelSpec("ovpipe-thumbnail", "random"), datas)
    assert thumb.shape == (len(corpus), 512)
    copies, distinct = pair_cosines(thumb, groups)
    print(f"thumbnail: copies min {copies.min():.3f}, distinct max {distinct.max():.3f}")
    assert copies.min() > 0.9 > 0.75 > distinct.max()


@pytest.mark.slow  # loading open_clip's tiny CLIP costs seconds
def test_tiny_clip_cannot_separate_them(corpus):
    datas, groups = [i.data for i in corpus], np.array([i.group for i in corpus])
    few = slice(0, 40)  # the tiny CLIP is slower: 8 base images and their copies show it
    tiny = embed_all(ModelSpec("ovpipe-tiny-clip", "random"), datas[few], batch=40)
    tiny_copies, tiny_distinct = pair_cosines(tiny, groups[few])
    print(f"tiny clip: copies min {tiny_copies.min():.5f}, distinct max {tiny_distinct.max():.5f}")
    assert tiny_distinct.max() > tiny_copies.min()  # why the stand-in exists: no threshold separates them


def test_thumbnail_is_deterministic_and_independent_of_batch(corpus):
    spec = ModelSpec("ovpipe-thumbnail", "random")
    datas = [i.data for i in corpus[:20]]
    a, b = embed_all(spec, datas, batch=4), embed_all(spec, datas, batch=32)
    assert np.array_equal(a, b)
    other = embed_all(ModelSpec("ovpipe-thumbnail", "random", init_seed=1), datas)
    assert not np.array_equal(a, other)  # the seed picks the projection
    assert spec.identity() != ModelSpec("ovpipe-thumbnail", "random", init_seed=1).identity()


def test_thumbnail_has_no_weights_to_load():
    with pytest.raises(ValueError, match="pretrained=random"):
        ModelSpec("ovpipe-thumbnail", "metaclip_fullcc").model_config()


def test_text_side_is_a_deterministic_stand_in_that_spreads_images_over_concepts(corpus):
    spec = ModelSpec("ovpipe-thumbnail", "random")
    names = [en for en, _zh in load_builtin_vocabulary()]
    text = embed_concepts(names, spec, "a photo of {}", 64, "cpu").astype(np.float32)
    again = embed_concepts(names[:10], spec, "a photo of {}", 7, "cpu").astype(np.float32)
    assert np.array_equal(text[:10], again)  # a name's vector does not depend on its batch
    assert np.allclose(np.linalg.norm(text, axis=1), 1, atol=1e-2)
    off = text @ text.T - np.eye(len(text))
    assert np.abs(off).max() < 0.35  # distinct names: unrelated random directions
    images = embed_all(spec, [i.data for i in corpus])
    top = np.argmax(images @ text.T, axis=1)
    bases = [i.alteration in ("original", "unrelated") for i in corpus]
    assert len(set(top[bases].tolist())) >= 0.6 * sum(bases)  # distinct images: mostly distinct concepts
    groups = np.array([i.group for i in corpus])
    same = [top[groups == g][0] == t for g, t in zip(groups, top)]
    assert np.mean(same) >= 0.8  # a copy mostly gets its original's top concept
