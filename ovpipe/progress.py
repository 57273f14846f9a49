"""Progress lines for long work (done, rows, rate, ETA) and the end-of-stage summary table."""

from __future__ import annotations

import sys
import time
from datetime import timedelta


def _fmt_duration(seconds: float) -> str:
    return str(timedelta(seconds=int(max(seconds, 0))))


class Progress:
    """Prints one line per interval to stderr: shards done, rows, rows/s, ETA."""

    def __init__(self, label: str, total_units: int, interval_s: float = 5.0, stream=None):
        self.label = label
        self.total = total_units
        self.interval = interval_s
        self.stream = stream or sys.stderr
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
