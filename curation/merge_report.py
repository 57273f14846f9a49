"""The merge stage's report, written once run_stage's accounting check passed.

Called by MergeStage.report (curation/merge.py), which hands it the passes' results and the
mixture rule; it imports nothing of the stage.

Reads:  the manifest entries of the merge stage's four passes (curation/merge.py): per source
        file what was read and ledgered; per partition the samples before and after dedup and
        after the mixture, by category and by source, with their tokens (the packer's length rule).
Writes: ``OUT/merge_report.json``: counts per source (read, invalid, duplicates), the category and
        source distribution before dedup, after dedup and after the mixture, the mixture plan
        (targets, achieved shares, rates, capped groups), tokens per category, images stored
        (each once) and referenced by the rows; and with
        ``merge.plot`` ``OUT/merge_report.png`` (the recipe's Fig. 3(c): category distribution
        before/after, source distribution, tokens per category).
"""

from __future__ import annotations

import io
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable

from ovpipe.core.shards import Location, write_bytes_atomic, write_json

if TYPE_CHECKING:
    from ovpipe.config import Config
    from ovpipe.core.stage import PassResult


def _sum(entries: list[dict], stage: str, key: str) -> dict[str, int]:
    c: Counter = Counter()
    for e in entries:
        c.update(e[stage][key])
    return dict(sorted(c.items()))


def _shares(counts: dict[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {k: round(v / total, 6) for k, v in counts.items()} if total else {}


def merge_stats(cfg: Config, results: list[PassResult], mixture: Callable) -> dict[str, Any]:
    """``results``: the map, dedup, mix and image-store passes' results; ``mixture``: counts ->
    (rates, plan)."""
    m = cfg.merge
    mapped, dedup, mixed, store = results
    results = results[:3]  # the sample passes
    dedup, mixed = list(dedup.entries.values()), list(mixed.entries.values())
    per_source: dict[str, Counter] = {}
    for e in mapped.entries.values():
        c = per_source.setdefault(e["source"], Counter())
        c.update({"read": e["input_rows"], "valid": e["kept_rows"], **e["dropped_by_reason"]})
    for e in dedup:
        for source, reasons in e["lost_by_source"].items():
            per_source.setdefault(source, Counter()).update(reasons)
    before = {k: _sum(dedup, "in", k) for k in ("by_category", "by_source", "tokens_by_category")}
    after_dedup = {k: _sum(dedup, "out", k) for k in ("by_category", "by_source", "tokens_by_category")}
    after_mix = {k: _sum(mixed, "out", k) for k in ("by_category", "by_source", "tokens_by_category")}
    rates, plan = mixture(after_dedup[f"by_{m.mixture_by}"], m)
    achieved = _shares(after_mix[f"by_{m.mixture_by}"])
    return {
        "sources": {k: dict(sorted(v.items())) for k, v in sorted(per_source.items())},
        "dropped_by_reason": {r.summary.stage: r.summary.dropped_by_reason for r in results},
        "before_dedup": before, "after_dedup": after_dedup, "after_mixture": after_mix,
        "mixture": {**plan, "by": m.mixture_by, "rates": {g: round(r, 6) for g, r in sorted(rates.items())},
                    "achieved": achieved, "max_repeat": m.max_repeat,
                    "rows": sum(after_mix["by_category"].values()),
                    "samples": sum(e["kept_rows"] for e in mixed),
                    "samples_repeated": sum(e["repeated"] for e in mixed)},
        "shares": {"before_dedup": _shares(before["by_category"]), "after_dedup": _shares(after_dedup["by_category"]),
                   "after_mixture": _shares(after_mix["by_category"])},
        "images": {"stored": sum(e["kept_rows"] for e in store.entries.values()),  # each image once
                   "references": sum(e["references"] for e in store.entries.values()),  # image_ids in the rows
                   "partitions": m.image_partitions},
    }


def write_report(out: Location, cfg: Config, results: list[PassResult], mixture: Callable) -> list[str]:
    stats = merge_stats(cfg, results, mixture)
    dest = out.join("merge_report.json")
    write_json(dest, stats)
    written = [dest.uri()]
    if cfg.merge.plot:
        png = out.join("merge_report.png")
        write_bytes_atomic(png, plot_report(stats))
        written.append(png.uri())
    return written


def plot_report(stats: dict[str, Any]) -> bytes:
    """Category shares before/after (bars), source counts before/after, tokens per category."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    stages = [("before dedup", stats["before_dedup"]), ("after dedup", stats["after_dedup"]),
              ("after mixture", stats["after_mixture"])]
    panels = ((axes[0], "by_category", "samples per category"), (axes[1], "by_source", "samples per source"))
    for ax, key, title in panels:
        names = sorted({k for _, s in stages for k in s[key]})
        x = np.arange(len(names))
        for j, (label, s) in enumerate(stages):
            total = sum(s[key].values()) or 1
            ax.bar(x + (j - 1) * 0.27, [s[key].get(n, 0) / total for n in names], 0.27, label=label)
        if key == "by_category" and stats["mixture"]["targets"]:
            t = stats["mixture"]["targets"]
            ax.scatter(x, [t.get(n, 0) for n in names], marker="_", s=400, c="k", zorder=3, label="target")
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_ylabel("share")
        ax.set_title(title)
        ax.legend(fontsize=8)
    tok = stats["after_mixture"]["tokens_by_category"]
    names = sorted(tok)
    axes[2].bar(names, [tok[n] for n in names], color="tab:green")
    axes[2].set_title("tokens per category after mixture (packer's length rule)")
    axes[2].tick_params(axis="x", rotation=30)
    fig.suptitle(f"merge: {stats['mixture']['samples']:,} samples, {stats['mixture']['rows']:,} rows")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()
