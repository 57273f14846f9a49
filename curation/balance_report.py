"""The balance stage's report, written next to its output once every shard is committed.

Reads:  the balance stage's committed output shards (the select pass's manifest entries) and the
        global state its select pass's prepare() found (``BalanceState``: the concept counts and
        source counts of the usable input rows, summed from the counts pass's ``OUT/_counts/``).
Writes: ``OUT/_report/balance_report.json``: sizes, per-concept counts before/after, coverage
        (concepts with at least one image), entropy, top-50 share, per-source counts
        before/after; and PNG plots: ``concept_frequency_by_rank.png`` (log-log, before/after:
        the paper's Fig. 3a), ``source_mix.png`` (Fig. 3b), ``contact_sheet.png`` (a few
        selected images of the most and least frequent concepts, when their bytes are
        reachable through the image reference columns).

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

from curation.balance_core import BalanceState, map_shards, read_columns, shard_rows, source_counts
from ovpipe.core.images import (MAX_FETCH_BYTES, MAX_SOURCE_PIXELS, BadImage, fetch_image_bytes, open_image,
                                probe_image)
from ovpipe.core.shards import Location, write_bytes_atomic

if TYPE_CHECKING:  # annotations only: the root config composes every stage's section
    from curation.config import BalanceSection
    from ovpipe.config import Config

REPORT_DIR = "_report"
REF_COLUMNS = ("image_uri", "image_member", "image_row")
THUMB = 96  # px, contact-sheet tile


def concept_stats(counts: np.ndarray, top: int = 50, reference_top: np.ndarray | None = None) -> dict[str, Any]:
    """Coverage, Shannon entropy (bits; and divided by log2 of the coverage) and the share of
    concept occurrences held by the `top` most frequent concepts."""
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
        f"top{top}_share": round(float(counts[order].sum() / total), 6) if total else 0.0,
    }
    if reference_top is not None:
        out[f"top{top}_of_before_share"] = round(float(counts[reference_top].sum() / total), 6) if total else 0.0
    return out


def _after_pass(bcfg: BalanceSection, loc: Location) -> dict[str, Any]:
    rows = shard_rows(read_columns(loc, "mean"), "mean", bcfg.top_k, bcfg.num_concepts)
    return {"counts": np.bincount(rows.lists.values).astype(np.int64),
            "sources": source_counts(rows)}


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for counts, label, style in ((before, "before", "-"), (after, "after", "--")):
        c = np.sort(counts[counts > 0])[::-1]
        if len(c):
            ax.loglog(np.arange(1, len(c) + 1), c, style, label=f"{label} ({len(c):,} concepts, {int(c.sum()):,} hits)")
    ax.set_xlabel("concept rank")
    ax.set_ylabel("images with the concept")
    ax.set_title(f"Concept frequency by rank, before/after balance ({mode})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
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
                   report: dict) -> bytes | None:
    before = state.counts
    k, m = cfg.balance.report_concepts, cfg.balance.report_images
    present = np.flatnonzero(after[: len(before)] > 0)
    if not len(present) or not k:
        report["contact_sheet"] = {"written": False, "why": "no selected concepts"}
        return None
    by_freq = present[np.lexsort((present, -before[present]))]  # most frequent first, ties by id
    chosen = list(dict.fromkeys(by_freq[:k].tolist() + by_freq[::-1][:k][::-1].tolist()))
    found: dict[int, list[tuple]] = {c: [] for c in chosen}
    for part in map_shards(_examples_pass, shards, (cfg.balance, np.array(chosen), m), cfg, "contact sheet"):
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
    rows = [(f"concept {c}\n{int(before[c]):,} -> {int(after[c]):,}", [next(images) for _ in ps]) for c, ps in picks]
    shown = sum(img is not None for _, imgs in rows for img in imgs)
    report["contact_sheet"] = {"written": shown > 0, "concepts": chosen, "images_shown": shown,
                               "images_unreachable": len(flat) - shown}
    return plot_contact_sheet(rows) if shown else None


def write_report(state: BalanceState, out: Location, cfg: Config, shards: list[Location],
                 selected_rows: int) -> list[str]:
    """Build balance_report.json and the plots under OUT/_report/ from the global state, the
    committed output shards and their selected (kept) rows; returns the written URIs."""
    after = np.zeros(len(state.counts), dtype=np.int64)
    sources_after: Counter = Counter()
    for part in map_shards(_after_pass, shards, (cfg.balance,), cfg, "report counts"):
        c = part["counts"]
        if len(c) > len(after):
            after = np.concatenate([after, np.zeros(len(c) - len(after), np.int64)])
        after[: len(c)] += c
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
    sheet = _contact_sheet(state, shards, cfg, after, report)
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
