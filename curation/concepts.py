"""Concept vocabularies: loading them, and (below) embedding + indexing them once per model.

Reads:  a vocabulary — ``builtin`` (``curation/data/concepts_bilingual.tsv``: ``id\ten\tzh``, about
        1,300 everyday concepts with English and Simplified Chinese names), MetaCLIP's metadata
        JSON (a JSON list of strings, 500K entries for the real run) or a text file with one
        concept per line.
Writes: nothing here; the concept cache (embeddings + FAISS index) is built further down.

Concept id == row index of the vocabulary as loaded (for the built-in TSV, its ``id`` column).
The assign stage writes these ids; the caption stage looks names up by the same ids.
"""

from __future__ import annotations

import csv
import json
from importlib import resources
from pathlib import Path

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
