"""Progress lines for long work (done, rows, rate, ETA) and the end-of-stage summary table."""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta


def _fmt_duration(seconds: float) -> str:
    return str(timedelta(seconds=int(max(seconds, 0))))


class Progress:
    """Prints one line per interval to stderr: shards done, rows, rows/s, ETA."""

    def __init__(self, label: str, total_units: int, interval_s: float = 5.0, stream=None, quiet: bool = False):
        self.label = label
        self.total = total_units
        self.interval = interval_s
        self.stream = open(os.devnull, "w") if quiet else (stream or sys.stderr)
        self.start = time.monotonic()
        self.last_print = 0.0
        self.units = 0
        self.rows = 0

    def update(self, units: int = 1, rows: int = 0, force: bool = False) -> None:
        self.units += units
        self.rows += rows
        now = time.monotonic()
        if force or now - self.last_print >= self.interval or self.units == self.total:
            self.last_print = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.monotonic()) - self.start
        rate = self.rows / elapsed if elapsed > 0 else 0.0
        eta = elapsed / self.units * (self.total - self.units) if self.units else float("nan")
        eta_text = _fmt_duration(eta) if self.units else "?"
        return (
            f"[{self.label}] {self.units}/{self.total} shards · {self.rows:,} rows · "
            f"{rate:,.0f} rows/s · elapsed {_fmt_duration(elapsed)} · ETA {eta_text}"
        )


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    """A plain monospace table; numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [[f"{c:,}" if isinstance(c, int) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(isinstance(r[i], (int, float)) for r in rows) for i in range(len(headers))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)).rstrip()

    lines = [fmt(cells[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in cells[1:]]
    return "\n".join(lines)


def summary_table(summaries: list[dict]) -> str:
    """Per stage: in, kept, dropped by reason, time, resumed shards (and rows/s where known)."""
    with_rate = all("rows_per_s" in s for s in summaries)
    rows = []
    for s in summaries:
        reasons = ", ".join(f"{r}={c}" for r, c in s["dropped_by_reason"].items()) or "-"
        rate = [f"{s['rows_per_s']:,.0f}/s"] if with_rate else []
        rows.append([s["stage"], s["input_rows"], s["kept_rows"], s["dropped_rows"], reasons,
                     f"{s['seconds']:.1f}s", *rate, f"{s['shards_skipped']}/{s['shards']}"])
    headers = ["stage", "in", "kept", "dropped", "dropped by reason", "time", *(["rows/s"] if with_rate else []),
               "resumed"]
    return format_table(headers, rows)
