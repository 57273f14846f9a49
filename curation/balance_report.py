"""The balance stage's report, written next to its output once every shard is committed.

Reads:  the balance stage's committed output shards (the select pass's manifest entries) and the
        global state its select pass's prepare() found (``BalanceState``: the concept counts and
        source counts of the usable input rows, summed from the counts pass's ``OUT/_counts/``).
Writes: ``OUT/_report/balance_report.json``: sizes, per-concept counts before/after, coverage
        (concepts with at least one image), entropy, Gini, top-50 share, per-source counts
        before/after; and PNG plots: ``concept_frequency_by_rank.png`` (before/after: each
        concept's share of occurrences by rank, log-log, the paper's Fig. 3a normalised so the
        flattening shows, beside the cumulative coverage curve; entropy and Gini in the
        legends), ``source_mix.png`` (Fig. 3b), ``contact_sheet.png`` (a few selected images of
        the most and least frequent concepts, labelled with their names from the vocabulary the
        upstream assign stage used, when their bytes are reachable through the image reference
        columns).

Called by ``BalanceStage.report`` (curation/balance.py) once run_stage's accounting check passed;
imports the sampler (curation/balance_core.py), never the stage.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from PIL import Image

from curation.balance_core import (BalanceState, add_sparse, map_shards, read_columns, shard_groups, shard_rows,
                                   source_counts, sparse)
from ovpipe.core.images import (MAX_FETCH_BYTES, MAX_SOURCE_PIXELS, BadImage, fetch_image_bytes, open_image,
                                probe_image)
from ovpipe.core.shards import MANIFEST_DIR, STAGE_FILE, Location, read_json, read_manifest_entries, write_bytes_atomic

if TYPE_CHECKING:  # annotations only: the root config composes every stage's section
    from curation.config import BalanceSection
    from ovpipe.config import Config

REPORT_DIR = "_report"
REF_COLUMNS = ("image_uri", "image_member", "image_row")
THUMB = 96  # px, contact-sheet tile


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of the concept counts (zeros included): 0 = every concept equally often,
    near 1 = a few concepts hold nearly every occurrence."""
    c = np.sort(counts.astype(np.float64))
    n, total = len(c), c.sum()
    if n < 2 or total <= 0:
        return 0.0
    cum = np.cumsum(c)
    return float((n + 1 - 2 * (cum / total).sum()) / n)


def concept_stats(counts: np.ndarray, top: int = 50, reference_top: np.ndarray | None = None) -> dict[str, Any]:
    """Coverage, Shannon entropy (bits; and divided by log2 of the coverage), the Gini coefficient
    over the covered concepts and the share of concept occurrences held by the `top` most frequent
    concepts."""
    total = int(counts.sum())
    nz = counts[counts > 0].astype(np.float64)
    p = nz / total if total else nz
    entropy = float(-(p * np.log2(p)).sum()) if total else 0.0
    order = np.argsort(-counts, kind="stable")[:top]
    out = {
        "occurrences": total,
        "coverage": int((counts > 0).sum()),
        "entropy_bits": round(entropy, 6),
        "normalized_entropy": round(entropy / np.log2(len(nz)), 6) if len(nz) > 1 else 0.0,
        "gini": round(gini(counts[counts > 0]), 6),
        f"top{top}_share": round(float(counts[order].sum() / total), 6) if total else 0.0,
    }
    if reference_top is not None:
        out[f"top{top}_of_before_share"] = round(float(counts[reference_top].sum() / total), 6) if total else 0.0
    return out


def _after_pass(bcfg: BalanceSection, locs: list[Location]) -> dict[str, Any]:
    """Concept counts (sparse) and usable rows per source of a group of selected shards."""
    counts, sources = np.zeros(0, dtype=np.int64), Counter()
    for loc in locs:
        rows = shard_rows(read_columns(loc, "mean"), "mean", bcfg.top_k, bcfg.num_concepts)
        counts = add_sparse(counts, *sparse(np.bincount(rows.lists.values).astype(np.int64)))
        sources.update(source_counts(rows))
    ids, counts = sparse(counts)
    return {"ids": ids, "counts": counts, "sources": sources}


def _examples_pass(bcfg: BalanceSection, concepts: np.ndarray, per_concept: int, loc: Location) -> list[tuple]:
    """(concept, sample_hash, image_uri, image_member, image_row) of the `per_concept` selected
    rows with the smallest sample_hash for each wanted concept (deterministic)."""
    table = read_columns(loc, "mean", REF_COLUMNS)
    if "image_uri" not in table.column_names:
        return []
    rows = shard_rows(table, "mean", bcfg.top_k, bcfg.num_concepts)
    usable = np.flatnonzero(rows.usable)
    lens = np.diff(rows.lists.offsets)
    row_of = np.repeat(np.arange(rows.lists.rows), lens)
    hit = np.isin(rows.lists.values, concepts)
    refs = {c: table.column(c).to_pylist() if c in table.column_names else [None] * table.num_rows
            for c in REF_COLUMNS}
    out = []
    for concept in concepts.tolist():
        local = np.unique(row_of[hit & (rows.lists.values == concept)])
        local = local[np.argsort(rows.sample_hash[local], kind="stable")][:per_concept]
        for r in local.tolist():
            i = int(usable[r])
            out.append((concept, int(rows.sample_hash[r]), refs["image_uri"][i], refs["image_member"][i],
                        refs["image_row"][i]))
    return out


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def plot_rank_frequency(before: np.ndarray, after: np.ndarray, mode: str) -> bytes:
    """Two panels that show the flattening. Left: each concept's share of all concept occurrences
    by rank (log-log; raw counts would only shift the after-curve down, since the selection is
    smaller): balancing lowers the head and lifts the tail, so the curves cross. Right: the
    cumulative share held by the most frequent concepts (a Lorenz-style coverage curve): the
    closer to the diagonal, the more balanced. Legends give normalised entropy and Gini."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, cov) = plt.subplots(1, 2, figsize=(11.5, 4.4))
    for counts, label, style in ((before, "before", "-"), (after, "after", "--")):
        c = np.sort(counts[counts > 0])[::-1].astype(np.float64)
        if not len(c):
            continue
        stats = concept_stats(counts)
        legend = (f"{label}: {len(c):,} concepts, {int(c.sum()):,} hits\n"
                  f"entropy {stats['normalized_entropy']:.3f} (normalised), Gini {stats['gini']:.3f}")
        ranks = np.arange(1, len(c) + 1)
        ax.loglog(ranks, c / c.sum(), style, label=legend)
        cov.plot(np.concatenate([[0.0], ranks / len(c)]), np.concatenate([[0.0], np.cumsum(c) / c.sum()]),
                 style, label=legend)
    ax.set_xlabel("concept rank (most frequent first)")
    ax.set_ylabel("share of concept occurrences")
    ax.set_title("Concept share by rank")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    cov.plot([0, 1], [0, 1], ":", color="grey", label="perfectly balanced")
    cov.set_xlabel("share of concepts (most frequent first)")
    cov.set_ylabel("cumulative share of occurrences")
    cov.set_title("Coverage curve (closer to the diagonal = flatter)")
    cov.set_xlim(0, 1)
    cov.set_ylim(0, 1.01)
    cov.grid(True, alpha=0.3)
    cov.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Concept frequency before/after balance ({mode})")
    return _png(fig)


def plot_source_mix(before: dict[str, int], after: dict[str, int]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(set(before) | set(after))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(names) + 2), 4.2))
    if not names:
        ax.text(0.5, 0.5, "the input has no `source` column", ha="center", va="center")
        ax.set_axis_off()
        return _png(fig)
    x = np.arange(len(names))
    for offset, counts, label in ((-0.2, before, "before"), (0.2, after, "after")):
        total = sum(counts.values()) or 1
        vals = [counts.get(n, 0) for n in names]
        bars = ax.bar(x + offset, [v / total for v in vals], width=0.4, label=f"{label} ({total:,} images)")
        for bar, v in zip(bars, vals):
            ax.annotate(f"{v:,}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=7)
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel("share of images")
    ax.set_title("Source mix before/after balance")
    ax.legend()
    return _png(fig)


def _thumbnail(data: bytes | None):
    """A small RGB tile; None for bytes that are missing or not a safe image."""
    try:
        # fetch_image_bytes already refused more than MAX_FETCH_BYTES; bombs are refused before decode
        probe_image(data, MAX_FETCH_BYTES, MAX_SOURCE_PIXELS)
        img = open_image(data)
        img.draft("RGB", (THUMB, THUMB))
        img = img.convert("RGB")
        img.thumbnail((THUMB, THUMB))
        return img
    except (BadImage, OSError, ValueError, Image.DecompressionBombError):
        return None


def plot_contact_sheet(rows: list[tuple[str, list]]) -> bytes:
    """rows: (label, [PIL images]) per concept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(imgs) for _, imgs in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.3 * cols + 1.5, 1.35 * len(rows)), squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(imgs) and imgs[c] is not None:
                ax.imshow(np.asarray(imgs[c]))
            else:
                ax.set_axis_off()
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle("Selected images of the most (top rows) and least frequent concepts", fontsize=9)
    return _png(fig)


def _contact_sheet(state: BalanceState, shards: list[Location], cfg: Config, after: np.ndarray,
                   report: dict, out: Location, quiet: bool = False) -> bytes | None:
    before = state.counts
    k, m = cfg.balance.report_concepts, cfg.balance.report_images
    present = np.flatnonzero(after[: len(before)] > 0)
    if not len(present) or not k:
        report["contact_sheet"] = {"written": False, "why": "no selected concepts"}
        return None
    by_freq = present[np.lexsort((present, -before[present]))]  # most frequent first, ties by id
    chosen = list(dict.fromkeys(by_freq[:k].tolist() + by_freq[::-1][:k][::-1].tolist()))
    found: dict[int, list[tuple]] = {c: [] for c in chosen}
    for part in map_shards(_examples_pass, shards, (cfg.balance, np.array(chosen), m), cfg, "contact sheet", quiet):
        for row in part:
            found[row[0]].append(row)
    if not any(found.values()):
        report["contact_sheet"] = {"written": False, "why": "the output has no image reference columns"}
        return None
    picks = [(c, sorted(found[c], key=lambda r: r[1])[:m]) for c in chosen]
    flat = [r for _, rows in picks for r in rows]
    refs = pa.table({"image_uri": [r[2] for r in flat], "image_member": [r[3] for r in flat],
                     "image_row": pa.array([r[4] for r in flat], pa.int64())})
    images = iter([_thumbnail(b) for b in fetch_image_bytes(refs)])
    names = concept_names(out) or []
    rows = [(f"{_concept_label(c, names)}\n{int(before[c]):,} -> {int(after[c]):,}", [next(images) for _ in ps])
            for c, ps in picks]
    shown = sum(img is not None for _, imgs in rows for img in imgs)
    report["contact_sheet"] = {"written": shown > 0, "concepts": chosen, "images_shown": shown,
                               "images_unreachable": len(flat) - shown}
    return plot_contact_sheet(rows) if shown else None


def _concept_label(concept: int, names: list[str]) -> str:
    name = names[concept] if 0 <= concept < len(names) else None
    return f"{name[:28]} ({concept})" if name else f"concept {concept}"


def assign_header(out: Location, hops: int = 8) -> dict[str, Any] | None:
    """The config header of the output that assigned the concept ids: ``out`` itself or the
    nearest stage output upstream of it, followed through the manifest entries' ``input`` (each
    a data file of the stage output before)."""
    for _ in range(hops):
        header_file = out.join(MANIFEST_DIR, STAGE_FILE)
        if not header_file.exists():
            return None
        header = read_json(header_file)
        if header.get("payload", {}).get("config", {}).get("assign"):
            return header
        inputs = [e["input"] for _, e in sorted(read_manifest_entries(out).items()) if e.get("input")]
        if not inputs:
            return None
        upstream = _owning_output(Location(out.fs, inputs[0].split("://", 1)[-1]) if not out.is_local
                                  else Location.parse(inputs[0]))
        if upstream is None or upstream.path == out.path:
            return None
        out = upstream
    return None


def _owning_output(file: Location, levels: int = 3) -> Location | None:
    """The stage output a data file belongs to: the nearest folder above it with a stage header."""
    folder = file.path
    for _ in range(levels):
        folder = folder.rsplit("/", 1)[0]
        if not folder:
            return None
        if Location(file.fs, folder).join(MANIFEST_DIR, STAGE_FILE).exists():
            return Location(file.fs, folder)
    return None


def concept_names(out: Location | None, vocabulary: str | None = None) -> list[str] | None:
    """Concept names by id: from ``vocabulary`` if given, else from the vocabulary the assign stage
    upstream of ``out`` used. None when that cannot be found or read (callers show bare ids)."""
    spec = vocabulary
    if spec is None and out is not None:
        header = assign_header(out)
        spec = header["payload"]["config"]["assign"].get("vocabulary") if header else None
    if not spec:
        return None
    from curation.concepts import VocabularyError, load_vocabulary

    try:
        return load_vocabulary(spec)
    except (VocabularyError, OSError):
        return None


def write_report(state: BalanceState, out: Location, cfg: Config, shards: list[Location],
                 selected_rows: int, quiet: bool = False) -> list[str]:
    """Build balance_report.json and the plots under OUT/_report/ from the global state, the
    committed output shards and their selected (kept) rows; returns the written URIs."""
    after = np.zeros(len(state.counts), dtype=np.int64)
    sources_after: Counter = Counter()
    # per group of shards, sparse: the driver holds O(concepts + shards), never a dense array per shard
    for part in map_shards(_after_pass, shard_groups(shards), (cfg.balance,), cfg, "report counts", quiet):
        after = add_sparse(after, part["ids"], part["counts"])
        sources_after.update(part["sources"])
    before = state.counts
    top_before = np.argsort(-before, kind="stable")[:50]
    present = np.flatnonzero(before > 0)
    bcfg = cfg.balance
    report: dict[str, Any] = {
        "mode": state.mode,
        "weighting": bcfg.weighting if state.mode == "inverse_frequency" else None,
        "top_k": bcfg.top_k,
        "seed": state.seed,
        "input_rows": state.input_rows,
        "usable_rows": state.usable_rows,
        "unusable_rows_by_reason": state.invalid,
        "selected_rows": int(selected_rows),
        "size": {
            "target": bcfg.target or None,
            "fraction": bcfg.fraction or None,
            "n_select": state.n_select,
            "threshold": state.threshold,
            "threshold_solved": state.threshold_solved,
            "expected_size": state.expected_size,
        },
        "concepts_before": concept_stats(before),
        "concepts_after": concept_stats(after, reference_top=top_before),
        "sources_before": state.sources,
        "sources_after": dict(sorted(sources_after.items())),
        "concept_counts": {"concept_id": present.tolist(), "before": before[present].tolist(),
                           "after": after[present].tolist()},
    }
    folder = out.join(REPORT_DIR)
    files = {
        "concept_frequency_by_rank.png": plot_rank_frequency(before, after, state.mode),
        "source_mix.png": plot_source_mix(state.sources, dict(sources_after)),
    }
    sheet = _contact_sheet(state, shards, cfg, after, report, out, quiet)
    if sheet is not None:
        files["contact_sheet.png"] = sheet
    report["plots"] = sorted(files)
    written = []
    for name, data in files.items():
        write_bytes_atomic(folder.join(name), data)
        written.append(folder.join(name).uri())
    # Compact JSON: the per-concept lists run to 500K entries at full scale.
    text = json.dumps(report, sort_keys=False, ensure_ascii=False, separators=(",", ":"))
    write_bytes_atomic(folder.join("balance_report.json"), (text + "\n").encode("utf-8"))
    return [folder.join("balance_report.json").uri()] + written
