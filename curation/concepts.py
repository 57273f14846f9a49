"""Concept vocabularies: loading them, and (below) embedding + indexing them once per model.

Reads:  a vocabulary — ``builtin`` (``curation/data/concepts_bilingual.tsv``: ``id\ten\tzh``, about
        1,300 everyday concepts with English and Simplified Chinese names), MetaCLIP's metadata
        JSON (a JSON list of strings, 500K entries for the real run) or a text file with one
        concept per line.
Writes: the concept cache (``load_or_build``): concept table + float16 text embeddings + FAISS
        index, in a folder named by the hash of (model identity, vocabulary hash, template).

Concept id == row index of the vocabulary as loaded (for the built-in TSV, its ``id`` column).
The assign stage writes these ids; the caption stage looks names up by the same ids.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from curation.embed import forward_padded, load_model, resolve_device

BUILTIN = "builtin"
BUILTIN_TSV = "concepts_bilingual.tsv"

# Untrusted vocabulary files: bound what we are willing to read.
MAX_VOCABULARY_BYTES = 512 * 1024 * 1024
MAX_CONCEPT_CHARS = 1000


class VocabularyError(ValueError):
    """A vocabulary file that cannot be used; the message says which file and what to fix."""


def _builtin_tsv_text() -> str:
    return resources.files("curation").joinpath("data", BUILTIN_TSV).read_text(encoding="utf-8")


def load_builtin_vocabulary() -> list[tuple[str, str]]:
    """The built-in bilingual vocabulary as (English, Chinese) pairs; index == concept id."""
    reader = csv.reader(_builtin_tsv_text().splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader)
    if header != ["id", "en", "zh"]:
        raise VocabularyError(f"built-in vocabulary has header {header}, expected ['id', 'en', 'zh']")
    out = []
    for i, row in enumerate(reader):
        if int(row[0]) != i:
            raise VocabularyError(f"built-in vocabulary row {i} has id {row[0]}; ids must be 0..N-1")
        out.append((row[1], row[2]))
    return out


def load_vocabulary(path: str) -> list[str]:
    """Concept names, index == concept id.

    ``builtin`` -> the English names of the built-in vocabulary; ``*.json`` -> a JSON list of
    strings (MetaCLIP's metadata.json); anything else -> UTF-8 text, one concept per line
    (surrounding whitespace stripped; blank lines are an error, since they would shift ids)."""
    if path == BUILTIN:
        return [en for en, _zh in load_builtin_vocabulary()]
    p = Path(path)
    if not p.is_file():
        raise VocabularyError(
            f"concept vocabulary {path!r} does not exist; pass MetaCLIP's metadata.json (a JSON list "
            "of strings), a text file with one concept per line, or 'builtin'"
        )
    if p.stat().st_size > MAX_VOCABULARY_BYTES:
        raise VocabularyError(f"concept vocabulary {path!r} is over {MAX_VOCABULARY_BYTES:,} bytes")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        try:
            names = json.loads(text)
        except json.JSONDecodeError as e:
            raise VocabularyError(f"concept vocabulary {path!r} is not valid JSON: {e}") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise VocabularyError(f"concept vocabulary {path!r} must be a JSON list of strings")
    else:
        names = [line.strip() for line in text.splitlines()]
        while names and not names[-1]:  # a trailing newline is not a concept
            names.pop()
    return _validated(names, path)


def _validated(names: list[str], path: str) -> list[str]:
    if not names:
        raise VocabularyError(f"concept vocabulary {path!r} is empty")
    for i, name in enumerate(names):
        if not name.strip():
            raise VocabularyError(f"concept vocabulary {path!r}: entry {i} is blank (ids are row indices)")
        if len(name) > MAX_CONCEPT_CHARS:
            raise VocabularyError(f"concept vocabulary {path!r}: entry {i} is over {MAX_CONCEPT_CHARS} chars")
    return names


# ------------------------------------------------------------------ embedding + concept cache
#
# A cache entry is a folder named by its key, under assign.cache_dir (default
# $OVPIPE_CACHE/concepts or ~/.cache/ovpipe/concepts):
#
#   meta.json         the key's components (model identity, vocabulary hash, template) + sizes
#                     + the xxh3 of embeddings.npy, written last (the entry's commit record)
#   concepts.parquet  id (int32, row index), name (string) [+ zh for the built-in vocabulary]
#   embeddings.npy    float16 [N, D], L2-normalised text embeddings (np.save, read without pickle)
#   index.faiss       faiss.IndexFlatIP over the same vectors (faiss.write_index)


@dataclass
class ConceptTable:
    key: str
    names: list[str]
    embeddings: np.ndarray  # float16 [N, D], unit rows
    folder: Path
    hit: bool  # True when loaded from the cache without embedding anything

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])


class ConceptCacheMismatch(RuntimeError):
    """A cache folder whose contents do not match its key (edited, truncated, or a collision)."""


def default_cache_dir() -> Path:
    root = os.environ.get("OVPIPE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ovpipe")
    return Path(root) / "concepts"


def vocabulary_hash(names: list[str]) -> str:
    return xxhash.xxh3_64_hexdigest(json.dumps(names, ensure_ascii=False).encode("utf-8"))


def cache_key(model_identity: dict[str, Any], vocab_hash: str, template: str) -> tuple[str, dict[str, Any]]:
    components = {"model": model_identity, "vocabulary": vocab_hash, "template": template, "format": 1}
    text = json.dumps(components, sort_keys=True, ensure_ascii=False)
    return xxhash.xxh3_64_hexdigest(text.encode("utf-8")), components


def check_template(template: str) -> None:
    if template.count("{}") != 1:
        raise VocabularyError(f"assign.template {template!r} must contain '{{}}' exactly once")


def embed_concepts(names: list[str], spec, template: str, batch_size: int, device: str = "auto") -> np.ndarray:
    """Unit float16 text embeddings [N, D] from the model's text tower, in padded fixed-size
    passes (as for images: a concept's vector does not depend on its batch-mates)."""
    import open_clip
    import torch

    device = resolve_device(device)
    model = load_model(spec, device)
    tokenizer = open_clip.get_tokenizer(spec.name)

    def forward(tokens):
        with torch.inference_mode():
            feats = model.encode_text(tokens.to(device))
            return torch.nn.functional.normalize(feats.float(), dim=-1)

    out, chunk = [], max(batch_size, 1) * 16  # tokenise in slices: 500K concepts at once is a lot
    for start in range(0, len(names), chunk):
        tokens = tokenizer([template.format(n) for n in names[start:start + chunk]])
        vecs, batch_size = forward_padded(forward, tokens, batch_size)
        out.append(vecs.half().cpu().numpy())
    return np.concatenate(out)


def flat_ip_index(embeddings: np.ndarray):
    """Exact inner-product index over the (float16) vectors, upcast to float32 exactly."""
    import faiss

    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    return index


def _array_hash(a: np.ndarray) -> str:
    return xxhash.xxh3_64_hexdigest(np.ascontiguousarray(a).tobytes())


def _write_entry(folder: Path, names: list[str], zh: list[str] | None, emb: np.ndarray,
                 components: dict[str, Any], key: str) -> None:
    import faiss

    tmp = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True)
    cols = {"id": pa.array(np.arange(len(names), dtype=np.int32)), "name": pa.array(names, pa.string())}
    if zh is not None:
        cols["zh"] = pa.array(zh, pa.string())
    pq.write_table(pa.table(cols), tmp / "concepts.parquet")
    np.save(tmp / "embeddings.npy", emb, allow_pickle=False)
    faiss.write_index(flat_ip_index(emb), str(tmp / "index.faiss"))
    meta = {"key": key, "components": components, "num_concepts": len(names), "dim": int(emb.shape[1]),
            "embeddings_xxh3": _array_hash(emb)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, ensure_ascii=False))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def _read_entry(folder: Path, key: str, components: dict[str, Any], names: list[str]) -> np.ndarray:
    """The cached embeddings, after checking the entry against what we asked for."""
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    if meta.get("key") != key or meta.get("components") != components:
        raise ConceptCacheMismatch(f"meta.json says key {meta.get('key')} / {meta.get('components')}, "
                                   f"expected {key} / {components}")
    emb = np.load(folder / "embeddings.npy", allow_pickle=False)
    if emb.dtype != np.float16 or emb.shape != (meta["num_concepts"], meta["dim"]) or len(names) != emb.shape[0]:
        raise ConceptCacheMismatch(f"embeddings.npy is {emb.dtype}{list(emb.shape)}, meta.json says "
                                   f"float16[{meta['num_concepts']}, {meta['dim']}], vocabulary has {len(names)}")
    if _array_hash(emb) != meta["embeddings_xxh3"]:
        raise ConceptCacheMismatch("embeddings.npy does not hash to the value in meta.json (changed or truncated)")
    cached = pq.read_table(folder / "concepts.parquet", columns=["name"])["name"].to_pylist()
    if cached != names:
        raise ConceptCacheMismatch("concepts.parquet names differ from the vocabulary")
    return emb


def load_or_build(vocabulary: str, spec, template: str = "{}", cache_dir: str = "", batch_size: int = 256,
                  device: str = "auto", build: Callable | None = None, log=None) -> ConceptTable:
    """The concept table for (model, vocabulary, template): from the cache when present and
    consistent, else embedded now (``build(names, spec, template, batch_size, device)``, default
    ``embed_concepts`` in this process) and cached. Says which on `log`."""
    log = log or sys.stderr
    check_template(template)
    names = load_vocabulary(vocabulary)
    zh = [z for _en, z in load_builtin_vocabulary()] if vocabulary == BUILTIN else None
    key, components = cache_key(spec.identity(), vocabulary_hash(names), template)
    folder = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / key
    if (folder / "meta.json").is_file():
        try:
            emb = _read_entry(folder, key, components, names)
            print(f"[concepts] cache hit: {len(names):,} concepts x {emb.shape[1]} from {folder}",
                  file=log, flush=True)
            return ConceptTable(key, names, emb, folder, hit=True)
        except (ConceptCacheMismatch, OSError, ValueError, KeyError) as e:
            print(f"[concepts] cache entry {folder} does not match ({e}); rebuilding it", file=log, flush=True)
    start = time.monotonic()
    emb = (build or embed_concepts)(names, spec, template, batch_size, device)
    _write_entry(folder, names, zh, emb, components, key)
    print(f"[concepts] cache miss: embedded {len(names):,} concepts x {emb.shape[1]} in "
          f"{time.monotonic() - start:.1f}s -> {folder}", file=log, flush=True)
    return ConceptTable(key, names, emb, folder, hit=False)
