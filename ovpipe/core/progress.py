"""Progress lines for long work (done, rows, rate, ETA) and the end-of-stage summary table."""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta


def _fmt_duration(seconds: float) -> str:
    return str(timedelta(seconds=int(max(seconds, 0))))


class Progress:
    """Prints one line to stderr when work starts (before Ray or a model starts, which takes a
    while), then one per interval: shards done, rows, rows/s, ETA. The rate and the ETA are from
    rows, measured from the first finished shard on (start-up is not throughput); the ETA counts
    the rows left (``total_rows`` when known, else the mean rows of a finished shard). A pass that
    reads no sample rows (a summary pass) shows shards only."""

    def __init__(self, label: str, total_units: int, interval_s: float = 5.0, stream=None, quiet: bool = False,
                 total_rows: int | None = None, starting: str = ""):
        self.label = label
        self.total = total_units
        self.total_rows = total_rows
        self.interval = interval_s
        self.stream = open(os.devnull, "w") if quiet else (stream or sys.stderr)
        self.start = time.monotonic()
        self.last_print = 0.0
        self.units = 0
        self.rows = 0
        self.first: tuple[float, int] | None = None  # (time, rows) when the first shard finished
        if starting:
            print(f"[{label}] {total_units} shard(s) to do · {starting}", file=self.stream, flush=True)

    def update(self, units: int = 1, rows: int = 0, force: bool = False) -> None:
        self.units += units
        self.rows += rows
        now = time.monotonic()
        if self.first is None and self.units:
            self.first = (now, self.rows)
        if force or now - self.last_print >= self.interval or self.units == self.total:
            self.last_print = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float | None = None) -> str:
        now = now or time.monotonic()
        elapsed = now - self.start
        head = f"[{self.label}] {self.units}/{self.total} shards"
        if self.units >= self.total:
            return f"{head} · {self.rows:,} rows · elapsed {_fmt_duration(elapsed)}" if self.rows else \
                f"{head} · elapsed {_fmt_duration(elapsed)}"
        rate, eta = self._rate_eta(now)
        rows = f" · {self.rows:,} rows · {rate:,.0f} rows/s" if self.rows else ""
        eta_text = "?" if eta is None else _fmt_duration(eta)
        return f"{head}{rows} · elapsed {_fmt_duration(elapsed)} · ETA {eta_text}"

    def _rate_eta(self, now: float) -> tuple[float, float | None]:
        """(rows/s, seconds left): from the rows since the first finished shard; before a second
        shard finished there is no steady rate, and the ETA is unknown."""
        if self.first is None or now <= self.first[0] or self.units < 2:
            return (self.rows / (now - self.start) if now > self.start else 0.0), None
        t0, rows0 = self.first
        if not self.rows:  # a summary pass: shards per second since the first one
            return 0.0, (now - t0) / (self.units - 1) * (self.total - self.units)
        rate = (self.rows - rows0) / (now - t0)
        left = (self.total_rows - self.rows if self.total_rows is not None
                else self.rows / self.units * (self.total - self.units))
        return rate, (max(left, 0) / rate if rate > 0 else None)


def start_note(cfg) -> str:
    """The first progress line's note: Ray (and the model in it) takes a while to start."""
    if getattr(cfg.run, "executor", "ray") == "local":
        return "starting…"
    ray = sys.modules.get("ray")  # never import Ray just to ask
    return "starting…" if ray is not None and ray.is_initialized() else "starting Ray…"


def parquet_rows(files: list, limit: int = 2000) -> int | None:
    """Rows of the input files from their Parquet footers (local files only, at most ``limit``):
    the ETA's total. None when unknown (object stores, tars, image folders)."""
    import pyarrow.parquet as pq

    if not files or len(files) > limit:
        return None
    total = 0
    for f in files:
        if f is None or not getattr(f, "is_local", False) or not f.path.endswith(".parquet"):
            return None
        try:
            total += pq.read_metadata(f.path).num_rows
        except Exception:
            return None
    return total


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


def _rate(per_s: float) -> str:
    """Two significant digits below 10/s: a training step reads ~0.06 packs/s, not "0/s"."""
    return f"{per_s:,.0f}/s" if per_s >= 10 or per_s == 0 else f"{per_s:.2g}/s"


def summary_table(summaries: list[dict]) -> str:
    """Per stage: in, kept, dropped by reason, time, resumed shards (and rows/s where known)."""
    with_rate = all("rows_per_s" in s for s in summaries)
    rows = []
    for s in summaries:
        reasons = ", ".join(f"{r}={c}" for r, c in s["dropped_by_reason"].items()) or "-"
        rate = [_rate(s["rows_per_s"])] if with_rate else []
        rows.append([s["stage"], s["input_rows"], s["kept_rows"], s["dropped_rows"], reasons,
                     f"{s['seconds']:.1f}s", *rate, f"{s['shards_skipped']}/{s['shards']}"])
    headers = ["stage", "in", "kept", "dropped", "dropped by reason", "time", *(["rows/s"] if with_rate else []),
               "resumed"]
    return format_table(headers, rows)
