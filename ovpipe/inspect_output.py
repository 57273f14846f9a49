"""`ovpipe inspect PATH`: what a stage output holds, for a person at a terminal.

Reads any ovpipe stage output (through its manifest: ``read_manifest_entries`` /
``list_input_shards``, so only committed shards count, wherever the data files live), a pipeline
output root (``runs/``: its step folders), or a single Parquet file. Prints, from the first
committed shard(s) only (a 85M-row output is never read whole):

* what it is: the stage (its ``_manifest/_stage.json``), shards committed, rows (from the
  manifest entries), drops by reason;
* the Arrow schema;
* a few rows, each column shortened for a terminal: captions and text as quoted strings, concept
  ids with their names from the vocabulary the assign stage used, image references and sizes,
  byte columns as sizes, embeddings as their length;
* for a pack output: the first pack decoded back to text with the pack stage's tokenizer, runs of
  image-pad tokens shown as ``<image #i HxW: N tokens>`` markers, one block per sample;
* ledger examples (``--stage`` / ``--reason`` filter them): the dropped samples with where they
  were and why.

Writes nothing.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from ovpipe.core.shards import MANIFEST_DIR, STAGE_FILE, SUMMARY_FILE, Location, read_json, read_manifest_entries

MAX_CELL = 100  # characters of one value in a row listing
PACK_ID_COLUMNS = ("sample_ids", "sample_lens", "input_ids")


class InspectError(ValueError):
    """Not something inspect can read; the message says what to pass instead."""


def describe(path: str, *, rows: int = 3, stage: str | None = None, reason: str | None = None,
             ledger_rows: int = 5, vocabulary: str | None = None) -> str:
    """The whole printout for ``path`` (see the module docstring)."""
    from curation.balance_report import concept_names  # numpy, PIL: not on `ovpipe --help`'s path

    loc = Location.parse(path)
    if not loc.exists():
        raise InspectError(f"{path!r} does not exist; pass a stage output folder (e.g. out/caption) or a "
                           ".parquet file")
    if loc.join("runs").is_dir() and not loc.join(MANIFEST_DIR).is_dir():
        return _describe_root(loc, stage, reason, ledger_rows)
    if not loc.is_dir():
        try:
            _num_rows(loc)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError; its text names no file
            raise InspectError(f"{loc.uri()!r} is not a readable Parquet file ({e}); pass a stage output folder "
                               "or a .parquet file") from None
        names = concept_names(None, vocabulary) if vocabulary else None
        lines = [f"file: {loc.uri()}", *_table_block(_read_head(loc, rows), _num_rows(loc), names)]
        return "\n".join(lines + (pack_text(loc, None) if _is_pack_output(loc) else []))
    header_file = loc.join(MANIFEST_DIR, STAGE_FILE)
    if not header_file.exists():
        raise InspectError(f"{loc.uri()!r} is not an ovpipe stage output (no {MANIFEST_DIR}/{STAGE_FILE}); pass "
                           "the --output of a stage, a pipeline output root, or a .parquet file")
    header = read_json(header_file)
    entries = read_manifest_entries(loc)
    summary_file = loc.join(MANIFEST_DIR, SUMMARY_FILE)
    summary = read_json(summary_file) if summary_file.exists() else None
    name = (summary or {}).get("stage") or header.get("stage", "?")
    lines = [f"stage output: {loc.uri()}",
             f"stage: {name} (pass {header.get('stage')}, config hash {header.get('config_hash')})",
             f"shards committed: {len(entries):,}" + ("" if summary else " (the stage has not finished: no "
                                                          f"{MANIFEST_DIR}/{SUMMARY_FILE})")]
    kept = sum(e.get("output_rows", e.get("kept_rows", 0)) for e in entries.values())
    dropped: dict[str, int] = {}
    for e in entries.values():
        for k, v in e.get("dropped_by_reason", {}).items():
            dropped[k] = dropped.get(k, 0) + v
    lines.append(f"rows: {kept:,} in the data files" + (f"; samples read {summary['input_rows']:,}, kept "
                                                       f"{summary['kept_rows']:,}, dropped {summary['dropped_rows']:,}"
                                                       if summary else ""))
    if dropped:
        lines.append("dropped by reason (this pass): " + ", ".join(f"{k}={v:,}" for k, v in sorted(dropped.items())))
    files = [loc.join(e["output"]) for e in sorted(entries.values(), key=lambda e: e["output"]) if e.get("output")]
    if files:
        names = concept_names(loc, vocabulary)
        lines += _table_block(_read_head_of(files, rows), kept, names)
        if _is_pack_output(files[0]):
            lines += pack_text(files[0], header)
    else:
        lines.append("no committed data shards yet")
    lines += ledger_block(loc, stage, reason, ledger_rows)
    return "\n".join(lines)


def _describe_root(root: Location, stage: str | None, reason: str | None, ledger_rows: int) -> str:
    """A pipeline output root: its step folders (inspect one of them for rows) and its ledgers."""
    lines = [f"pipeline output: {root.uri()}"]
    latest = root.join("runs", "LATEST")
    if latest.exists():
        run_id = latest.read_bytes().decode().strip()
        manifest = read_json(root.join("runs", f"{run_id}.json"))
        lines.append(f"latest run: {run_id} (finished {manifest.get('finished_at')})")
        for s in manifest["stages"]:
            lines.append(f"  {s['stage']:>8}: {s['kept_rows']:>10,} kept of {s['input_rows']:,}   {s['output']}")
        lines.append("inspect one step's folder for its schema and rows: ovpipe inspect <folder above>")
    lines += ledger_block(root, stage, reason, ledger_rows)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- rows


def _num_rows(loc: Location) -> int:
    with loc.fs.open_input_file(loc.path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def _read_head(loc: Location, n: int) -> pa.Table:
    """The first ``n`` rows of one Parquet file (one row group at a time: packs are large)."""
    with loc.fs.open_input_file(loc.path) as f:
        pf = pq.ParquetFile(f)
        tables, have = [], 0
        for i in range(pf.num_row_groups):
            if have >= n:
                break
            t = pf.read_row_group(i)
            tables.append(t.slice(0, n - have))
            have += tables[-1].num_rows
        return pa.concat_tables(tables) if tables else pf.schema_arrow.empty_table()


def _read_head_of(files: list[Location], n: int) -> pa.Table:
    tables, have = [], 0
    for loc in files:
        if have >= n:
            break
        t = _read_head(loc, n - have)
        if t.num_rows:
            tables.append(t)
            have += t.num_rows
    if not tables:
        return _read_head(files[0], 0)
    return pa.concat_tables(tables, promote_options="permissive")


def _table_block(table: pa.Table, total: int, names: list[str] | None) -> list[str]:
    lines = ["", "schema:"]
    lines += [f"  {f.name}: {f.type}" for f in table.schema]
    lines += ["", f"first {table.num_rows} of {total:,} rows:"]
    for i, row in enumerate(table.to_pylist()):
        lines.append(f"  [{i}]")
        width = max((len(k) for k in row), default=0)
        for key, value in row.items():
            lines.append(f"    {key:<{width}}  {format_value(key, value, names)}")
    return lines


def format_value(key: str, value: Any, names: list[str] | None = None) -> str:
    """One cell, shortened for a terminal; concept ids get their names."""
    if value is None:
        return "null"
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value):,} bytes>"
    if key == "concept_ids" and isinstance(value, list):
        return ", ".join(f"{c} {names[c]!r}" if names and 0 <= c < len(names) else str(c) for c in value)
    if isinstance(value, list):
        if value and isinstance(value[0], (bytes, bytearray)):
            return f"[{len(value)} items: " + ", ".join(f"<{len(v):,} bytes>" for v in value[:4]) + \
                   (", …]" if len(value) > 4 else "]")
        if key in ("embedding",) or len(value) > 16:
            shown = ", ".join(_short(v) for v in value[:6])
            return f"[{len(value):,} values: {shown}, …]"
        return "[" + ", ".join(_short(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str):
        return _clip(json.dumps(value, ensure_ascii=False))
    return _clip(str(value))


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v):,} bytes>"
    if isinstance(v, list):
        return "[" + ", ".join(_short(x) for x in v[:6]) + (", …]" if len(v) > 6 else "]")
    return _clip(json.dumps(v, ensure_ascii=False) if isinstance(v, str) else str(v), 40)


def _clip(text: str, limit: int = MAX_CELL) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ----------------------------------------------------------------------------------- packs


def _is_pack_output(loc: Location) -> bool:
    with loc.fs.open_input_file(loc.path) as f:
        names = pq.ParquetFile(f).schema_arrow.names
    return all(c in names for c in PACK_ID_COLUMNS)


def pack_text(loc: Location, header: dict[str, Any] | None, samples: int = 3) -> list[str]:
    """The first pack of a pack shard decoded back to text, one block per sample (the first
    ``samples`` of them)."""
    table = _read_head(loc, 1)
    if not table.num_rows:
        return []
    pack = table.to_pylist()[0]
    spec = ((header or {}).get("payload", {}).get("config", {}).get("pack", {}) or {}).get("tokenizer", "qwen")
    lines = ["", f"pack {pack.get('pack_id')} decoded ({pack.get('num_tokens'):,} tokens, "
                 f"{len(pack['sample_ids'])} samples, tokenizer {spec!r}; trained tokens are in the loss):"]
    ids = pack["input_ids"]
    if not ids:  # store_token_ids = false, or a packing plan of (sample_id, num_tokens)
        convs = pack.get("conversations") or [""] * len(pack["sample_ids"])
        for sid, conv in list(zip(pack["sample_ids"], convs))[:samples]:
            lines.append(f"  --- sample {sid}: (no token ids stored) {_clip(conv, 400)}")
        return lines
    from packing.tokenizer import load_tokenizer

    tok = load_tokenizer(spec)
    hw = pack.get("image_hw") or []
    mask = pack.get("loss_mask") or [0] * len(ids)
    start, image = 0, 0
    for i, (sid, n) in enumerate(zip(pack["sample_ids"], pack["sample_lens"])):
        if i == samples:
            lines.append(f"  … {len(pack['sample_ids']) - samples} more samples in this pack")
            break
        text, image = decode_with_markers(tok, ids[start:start + n], hw, image)
        trained = sum(mask[start:start + n])
        lines.append(f"  --- sample {sid} ({n:,} tokens, {trained:,} in the loss)")
        lines += ["  " + ln for ln in text.splitlines()]
        start += n
    return lines


def decode_with_markers(tok, ids: list[int], image_hw: list, first_image: int = 0) -> tuple[str, int]:
    """Text of ``ids`` with each run of image-pad tokens replaced by ``<image #i HxW: N tokens>``;
    returns the text and the number of the next image."""
    parts: list[str] = []
    image = first_image
    for is_pad, run in _runs(ids, tok.image_pad):
        if is_pad:
            hw = image_hw[image] if image < len(image_hw) else None
            size = f" {hw[0]}x{hw[1]}" if hw else ""
            parts.append(f"<image #{image}{size}: {len(run)} tokens>")
            image += 1
        else:
            parts.append(tok.decode(run))
    return "".join(parts), image


def _runs(ids: Iterable[int], pad: int) -> list[tuple[bool, list[int]]]:
    out: list[tuple[bool, list[int]]] = []
    for i in ids:
        is_pad = i == pad
        if out and out[-1][0] == is_pad:
            out[-1][1].append(i)
        else:
            out.append((is_pad, [i]))
    return out


# ----------------------------------------------------------------------------------- ledger


def ledger_block(root: Location, stage: str | None, reason: str | None, n: int) -> list[str]:
    """Counts by stage and reason, then ``n`` examples of the chosen (or most frequent) reason."""
    import polars as pl

    from ovpipe.core.ledger import read_ledger

    df = read_ledger(root)
    lines = [""]
    if not df.height:
        return lines + ["ledger: nothing dropped"]
    if stage:
        df = df.filter(pl.col("stage") == stage)
    if reason:
        df = df.filter(pl.col("reason") == reason)
    if not df.height:
        known = read_ledger(root).select("stage", "reason").unique().sort("stage", "reason").rows()
        return lines + [f"ledger: no rows with stage={stage or '*'} reason={reason or '*'}; the ledger has: "
                        + ", ".join(f"{s}/{r}" for s, r in known)]
    counts = df.group_by("stage", "reason").agg(pl.len().alias("count")).sort(["count", "stage", "reason"],
                                                                              descending=[True, False, False])
    lines.append("ledger (dropped samples) by stage and reason:")
    lines += [f"  {s:<14} {r:<24} {c:>10,}" for s, r, c in counts.rows()]
    top_stage, top_reason = counts.row(0)[0], counts.row(0)[1]
    examples = df.filter((pl.col("stage") == top_stage) & (pl.col("reason") == top_reason)).sort("locator").head(n)
    lines.append(f"examples of {top_stage}/{top_reason} (--stage/--reason choose others):")
    for row in examples.iter_rows(named=True):
        lines.append(f"  {row['sample_id'] or '(no id)'}  {row['locator']}")
        if row["detail"]:
            lines.append(f"      {_clip(row['detail'], 160)}")
    return lines


# ----------------------------------------------------------------------------------- command line

HELP = "show what a stage output holds: schema, rows, a decoded pack, ledger examples"
EXAMPLE = "ovpipe inspect demo_out/caption --rows 2;  ovpipe inspect demo_out --stage ingest --reason duplicate"


def add_arguments(parser) -> None:
    """The arguments of `ovpipe inspect` (registered in ovpipe/cli.py)."""
    parser.add_argument("path", help="a stage output folder, a pipeline output root, or a .parquet file")
    parser.add_argument("--rows", type=int, default=3, help="rows to show (default: 3)")
    parser.add_argument("--stage", default=None, help="ledger examples of this stage only (default: every stage)")
    parser.add_argument("--reason", default=None, help="ledger examples of this drop reason only "
                                                      "(default: the most frequent one)")
    parser.add_argument("--ledger-rows", type=int, default=5, help="ledger examples to show (default: 5)")
    parser.add_argument("--vocabulary", default=None, help="concept vocabulary for concept names (default: the "
                                                          "one the assign stage upstream used)")


def main(args) -> int:
    print(describe(args.path, rows=args.rows, stage=args.stage, reason=args.reason, ledger_rows=args.ledger_rows,
                   vocabulary=args.vocabulary))
    return 0
