"""`ovpipe report`: one self-contained HTML page for a pipeline run or for one stage output.

Reads (nothing but what the stages already wrote):

* a pipeline output root (``runs/LATEST`` names its newest run), a run manifest
  ``runs/<run_id>.json`` (ovpipe/pipeline.py), or one stage output (``_manifest/_summary.json``);
* per stage: its summary (in the manifest, or ``_manifest/_summary.json``), its config header
  (``_manifest/_stage.json``) and its report: balance ``_report/balance_report.json`` + PNGs, pack
  ``pack_stats.json`` + ``pack_stats.png``, train ``summary.json`` + ``loss.png`` + ``metrics.jsonl``
  of each phase folder.

Writes one HTML file (default: ``runs/<run_id>.html`` beside the run manifest, or
``OUT/_report.html`` for a stage output) with every image inlined as a ``data:`` URI, no script
and no external reference, so it opens from a laptop, a mail attachment or an air-gapped machine.
Sections: the funnel (raw samples -> ingested -> ... -> packed samples -> packs, drops by reason
per stage), timings and throughput, every stage's key figures and plots, the config.
"""

from __future__ import annotations

import base64
import html
import json
import posixpath
from typing import Any

from ovpipe.core.shards import MANIFEST_DIR, STAGE_FILE, SUMMARY_FILE, Location, read_json, write_bytes_atomic

REPORT_FILE = "_report.html"  # a stage output's report (underscore: never listed as data)
# What the funnel calls the rows a stage keeps (the raw input is the first stage's input).
KEPT_LABEL = {"ingest": "ingested", "embed": "embedded", "assign": "assigned concepts",
              "dedup": "deduplicated", "decontaminate": "decontaminated", "balance": "selected (balanced)",
              "caption": "captioned", "merge": "merged conversations", "pack": "packed samples"}
MAX_IMAGE_BYTES = 8 * 1024 * 1024  # a plot bigger than this is linked by path, not inlined


class ReportError(ValueError):
    """The path is not something a report can be written for; the message says what to pass."""


# ---------------------------------------------------------------------------------- gathering


def load_run(path: str | Location, run_id: str | None = None) -> dict[str, Any]:
    """The run manifest (a pipeline run) or a one-stage manifest built from a stage output's
    ``_summary.json``; ``kind`` says which, ``where`` where the report goes by default."""
    loc = path if isinstance(path, Location) else Location.parse(path)
    if loc.name.endswith(".json") and not loc.is_dir():
        if not loc.exists():
            raise ReportError(f"{path!r} does not exist; pass a pipeline output folder or a stage output")
        manifest = read_json(loc)
        return _pipeline_run(manifest, loc)
    if not loc.exists():
        raise ReportError(f"{path!r} does not exist; pass a pipeline output folder (with runs/) or a stage output")
    runs = loc.join("runs")
    if run_id or runs.join("LATEST").exists():
        rid = run_id or runs.join("LATEST").read_bytes().decode().strip()
        file = runs.join(f"{rid}.json")
        if not file.exists():
            raise ReportError(f"no run {rid!r} under {runs.uri()!r}; the runs are "
                              f"{sorted(f.name[:-5] for f in runs.list_files(('.json',)))}")
        return _pipeline_run(read_json(file), file)
    summary = loc.join(MANIFEST_DIR, SUMMARY_FILE)
    if summary.exists():
        s = read_json(summary)
        s.setdefault("wall_seconds", s.get("seconds"))
        return {"kind": "stage", "run_id": s["stage"], "output": loc.uri(), "stages": [s],
                "seconds": s.get("seconds"), "where": loc.join(REPORT_FILE), "folders": {s["stage"]: loc}}
    raise ReportError(
        f"{path!r} is neither a pipeline output (no runs/LATEST) nor a finished stage output (no "
        f"{MANIFEST_DIR}/{SUMMARY_FILE}); pass the --output of `ovpipe run` / `ovpipe demo` or of one stage")


def _pipeline_run(manifest: dict[str, Any], file: Location) -> dict[str, Any]:
    folders = {s["stage"]: _stage_folder(s["output"], file) for s in manifest["stages"]}
    return {**manifest, "kind": "run", "where": Location(file.fs, file.path[:-len(".json")] + ".html"),
            "folders": folders}


def _stage_folder(uri: str, manifest: Location) -> Location:
    """A stage's folder, on the run manifest's filesystem (the one the pipeline wrote through);
    a train step of an object-store run writes to a local or shared path (train.run_dir)."""
    if "://" in uri:
        return Location(manifest.fs, uri.split("://", 1)[1]) if not manifest.is_local else Location.parse(uri)
    return Location(manifest.fs, uri) if manifest.is_local else Location.parse(uri)


def _read_json_or_none(loc: Location) -> Any:
    try:
        return read_json(loc) if loc.exists() else None
    except (OSError, ValueError):
        return None


def _png(loc: Location) -> dict[str, Any] | None:
    if not loc.exists():
        return None
    if loc.size() > MAX_IMAGE_BYTES:
        return {"name": loc.name, "path": loc.uri(), "data": None}
    return {"name": loc.name, "path": loc.uri(), "data": loc.read_bytes()}


def stage_details(stage: dict[str, Any], folder: Location) -> dict[str, Any]:
    """Key figures, plots and config of one stage, from its folder."""
    name = stage["stage"]
    header = _read_json_or_none(folder.join(MANIFEST_DIR, STAGE_FILE)) or {}
    out: dict[str, Any] = {"figures": {}, "plots": [], "config": header.get("payload", {}).get("config", {}),
                           "notes": []}
    if name == "balance":
        rep = folder.join("_report")
        data = _read_json_or_none(rep.join("balance_report.json")) or {}
        before, after = data.get("concepts_before", {}), data.get("concepts_after", {})
        out["figures"] = {
            "usable rows": data.get("usable_rows"), "selected rows": data.get("selected_rows"),
            "mode": data.get("mode"),
            "concepts covered (before -> after)": _arrow(before.get("coverage"), after.get("coverage")),
            "normalised entropy (before -> after)": _arrow(before.get("normalized_entropy"),
                                                            after.get("normalized_entropy")),
            "top-50 concepts' share (before -> after)": _arrow(before.get("top50_share"),
                                                                after.get("top50_of_before_share")),
        }
        out["plots"] = [p for p in (_png(rep.join(n)) for n in data.get("plots", [])) if p]
        # the header of the select pass's folder is the stage's own; the counts pass is below it
    elif name == "pack":
        stats = _read_json_or_none(folder.join("pack_stats.json")) or {}
        out["figures"] = {k: stats.get(k) for k in ("samples", "packs", "tokens", "max_len", "fill",
                                                   "compression", "lower_bound", "mean_sample_tokens")}
        out["plots"] = [p for p in [_png(folder.join("pack_stats.png"))] if p]
    elif name == "train":
        out.update(_train_details(folder))
    elif name == "merge":
        out["figures"] = _merge_figures(_read_json_or_none(folder.join("merge_report.json")) or {})
        out["plots"] = _registered_plots(name, folder)
    elif name in ("dedup", "decontaminate"):  # their reports (curation/dedup.py, decontaminate.py)
        out["figures"] = _removal_figures(_read_json_or_none(folder.join("_report", f"{name}_report.json")) or {})
        out["plots"] = _registered_plots(name, folder)
    else:
        out["figures"] = {"shards": stage.get("shards"), "resumed shards": stage.get("shards_skipped")}
        out["plots"] = _registered_plots(name, folder)
    retried = stage.get("retried_by_reason") or {}
    for reason, c in sorted(retried.items()):  # `ovpipe retry` (ovpipe/retry.py)
        out["figures"][f"{reason}: retried / recovered / still failing"] = (
            f"{c.get('retried', 0):,} / {c.get('recovered', 0):,} / {c.get('still_failing', 0):,}")
    return out


def _merge_figures(rep: dict[str, Any]) -> dict[str, Any]:
    """merge_report.json (curation/merge_report.py): each category's share before dedup -> after
    dedup -> after the mixture, and the samples dedup removed, by reason."""
    shares = rep.get("shares", {})
    steps = [shares.get(k, {}) for k in ("before_dedup", "after_dedup", "after_mixture")]
    figures: dict[str, Any] = {
        f"share of {c} (before dedup -> after dedup -> after mixture)": " -> ".join(f"{s.get(c, 0):.1%}" for s in steps)
        for c in sorted(set().union(*steps))}
    for reason, n in sorted(rep.get("dropped_by_reason", {}).get("merge_dedup", {}).items()):
        figures[f"removed by dedup: {reason}"] = n
    return figures


def _removal_figures(data: dict[str, Any]) -> dict[str, Any]:
    """dedup's and decontaminate's key figures: what was removed, at which threshold, per benchmark."""
    figures = {"removed": data.get("removed"), "method": data.get("method"),
               "threshold (cosine)": data.get("threshold"), "phash bits": data.get("phash_bits")}
    for t, n in (data.get("removed_at_threshold") or {}).items():
        figures[f"would remove at cosine {t}"] = n
    for bench, n in (data.get("overlaps_per_benchmark") or {}).items():
        figures[f"overlaps: {bench}"] = n
    return figures


def _registered_plots(name: str, folder: Location) -> list[dict[str, Any]]:
    """The PNGs of a stage's registered report (ovpipe/registry.py ``report``: a .png file, or a
    folder of them, e.g. merge's merge_report.png, dedup's _report/pairs.png)."""
    from ovpipe import registry

    entry = registry.find(name)
    if entry is None or not entry.report:
        return []
    rep = folder.join(entry.report)
    if rep.path.endswith(".png"):
        files = [rep]
    else:
        files = sorted(rep.list_files((".png",), recursive=False), key=lambda f: f.path) if rep.is_dir() else []
    return [p for p in map(_png, files) if p]


def _reads_raw_input(stage: str) -> bool:
    from ovpipe import registry

    entry = registry.find(stage)
    return entry is not None and entry.reads == registry.INPUT


def _arrow(a: Any, b: Any) -> str | None:
    return None if a is None and b is None else f"{a} -> {b}"


def _train_details(folder: Location) -> dict[str, Any]:
    """A train step's folder is one run folder (summary.json) or, for the demo's chain of phases,
    one sub-folder per phase."""
    runs = [folder] if folder.join("summary.json").exists() else sorted(
        (Location(folder.fs, posixpath.dirname(f.path)) for f in folder.list_files(("summary.json",))
         if posixpath.dirname(posixpath.dirname(f.path)) == folder.path), key=lambda loc: _phase_key(loc.name))
    figures: dict[str, Any] = {}
    plots: list[dict[str, Any]] = []
    config: dict[str, Any] = {}
    for run in runs:
        summary = _read_json_or_none(run.join("summary.json")) or {}
        phase = summary.get("phase", run.name)
        rate = _mean_tokens_per_s(run.join("metrics.jsonl"))
        figures[f"phase {phase}"] = (
            f"{summary.get('steps')} steps, final loss {_num(summary.get('final_loss'))}, "
            f"{_num(summary.get('seconds'))} s" + (f", {rate:,.0f} effective tokens/s" if rate else "")
            + (f", export: {summary['export']}" if summary.get("export") else ""))
        plot = _png(run.join("loss.png"))
        if plot:
            plots.append({**plot, "name": f"phase {phase}: loss.png"})
        cfg = _read_json_or_none(run.join("train_config.json")) or {}
        if cfg.get("train"):
            config[f"train (phase {phase})"] = cfg["train"]
    return {"figures": figures, "plots": plots, "config": config}


def _phase_key(name: str) -> tuple[float, str]:
    try:
        return (float(name), name)
    except ValueError:
        return (float("inf"), name)


def _mean_tokens_per_s(loc: Location) -> float | None:
    if not loc.exists():
        return None
    rates = []
    for line in loc.read_bytes().decode("utf-8", "replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "effective_tokens_per_s" in rec:
            rates.append(float(rec["effective_tokens_per_s"]))
    return sum(rates) / len(rates) if rates else None


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "?" if v is None else str(v)


def funnel(run: dict[str, Any], details: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the funnel: the raw input, then what each sample stage keeps, then the packs; each
    with the drops (by reason) that led to it."""
    rows: list[dict[str, Any]] = []
    stages = [s for s in run["stages"] if s["stage"] != "train"]
    for i, s in enumerate(stages):
        if i == 0 or _reads_raw_input(s["stage"]):  # a stage of its own input starts a chain (merge)
            rows.append({"label": "raw samples" if s["stage"] == "ingest" else f"{s['stage']} input",
                         "count": s["input_rows"], "stage": None, "dropped": {}})
        rows.append({"label": KEPT_LABEL.get(s["stage"], f"{s['stage']} kept"), "count": s["kept_rows"],
                     "stage": s["stage"], "dropped": s.get("dropped_by_reason", {})})
    packs = details.get("pack", {}).get("figures", {}).get("packs")
    if packs is not None:
        per = details["pack"]["figures"].get("compression")
        rows.append({"label": "packs", "count": packs, "stage": "pack", "dropped": {}, "unit": "packs",
                     "note": f"{per} samples per pack" if per else ""})
    return rows


# ---------------------------------------------------------------------------------- rendering

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;
     color:#1d232a;background:#fff;padding:0 16px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #dde3ea;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px} .muted{color:#5b6773} code,pre{font:12px ui-monospace,Menlo,Consolas,monospace}
pre{background:#f5f7f9;border:1px solid #e3e8ee;padding:10px;overflow:auto;max-height:420px}
table{border-collapse:collapse;margin:6px 0 10px} td,th{padding:3px 10px;border-bottom:1px solid #e9edf1;text-align:left}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.bar{height:18px;background:#3b82c4;border-radius:2px;min-width:2px}
.bar.time{background:#6a9f58}
.funnel td:first-child{white-space:nowrap} .drop{color:#a23b3b;font-size:12px} img{max-width:100%;border:1px solid #e3e8ee;margin:6px 0}
figure{margin:8px 0} figcaption{font-size:12px;color:#5b6773}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:8px 0}
.card{border:1px solid #dde3ea;border-radius:6px;padding:8px 12px;min-width:120px}
.card b{display:block;font-size:18px}
"""


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _count(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) else _e(_num(v))


def _img(plot: dict[str, Any]) -> str:
    if plot["data"] is None:
        return f"<p class=muted>{_e(plot['name'])}: too large to inline, see <code>{_e(plot['path'])}</code></p>"
    b64 = base64.b64encode(plot["data"]).decode("ascii")
    return (f"<figure><img alt=\"{_e(plot['name'])}\" src=\"data:image/png;base64,{b64}\">"
            f"<figcaption>{_e(plot['name'])} — {_e(plot['path'])}</figcaption></figure>")


def _funnel_html(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p class=muted>no sample stages in this run</p>"
    top = max(r["count"] for r in rows if r.get("unit") != "packs") or 1
    out = ["<table class=funnel><tr><th>step</th><th class=n>count</th><th style='width:45%'></th>"
           "<th>dropped on the way, by reason</th></tr>"]
    for r in rows:
        share = r["count"] / top
        drops = ", ".join(f"{_e(k)} {v:,}" for k, v in r["dropped"].items())
        label = _e(r["label"]) + (f" <span class=muted>({_e(r['stage'])})</span>" if r["stage"] else "")
        bar = (f"<div class=bar style='width:{100 * share:.1f}%'></div>" if r.get("unit") != "packs" else
               f"<span class=muted>{_e(r.get('note', ''))}</span>")
        out.append(f"<tr><td>{label}</td><td class=n>{_count(r['count'])}</td><td>{bar}</td>"
                   f"<td class=drop>{drops or '<span class=muted>-</span>'}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def _timings_html(stages: list[dict[str, Any]]) -> str:
    longest = max([s.get("wall_seconds") or s.get("seconds") or 0 for s in stages] or [0]) or 1
    out = ["<table><tr><th>stage</th><th class=n>in</th><th class=n>kept</th><th class=n>dropped</th>"
           "<th class=n>wall time</th><th class=n>throughput</th><th class=n>resumed shards</th>"
           "<th style='width:30%'></th></tr>"]
    for s in stages:
        wall = s.get("wall_seconds") or s.get("seconds") or 0
        unit = "packs" if s["stage"] == "train" else "rows"
        rate = s["input_rows"] / wall if wall else 0.0
        out.append(
            f"<tr><td>{_e(s['stage'])}</td><td class=n>{s['input_rows']:,}</td><td class=n>{s['kept_rows']:,}</td>"
            f"<td class=n>{s['dropped_rows']:,}</td><td class=n>{wall:.1f} s</td>"
            f"<td class=n>{_rate(rate)} {unit}/s</td><td class=n>{s.get('shards_skipped', 0)}/{s.get('shards', 0)}</td>"
            f"<td><div class='bar time' style='width:{100 * wall / longest:.1f}%'></div></td></tr>")
    out.append("</table>")
    return "\n".join(out)


def _rate(r: float) -> str:
    """Small rates keep two significant digits (a training step reads ~0.1 packs/s, not 0)."""
    return f"{r:,.0f}" if r >= 10 else f"{r:.2g}"


def _stage_html(stage: dict[str, Any], d: dict[str, Any]) -> str:
    name = stage["stage"]
    cards = [("in", stage["input_rows"]), ("kept", stage["kept_rows"]), ("dropped", stage["dropped_rows"]),
             ("seconds", stage.get("wall_seconds") or stage.get("seconds"))]
    out = [f"<h3 id='stage-{_e(name)}'>{_e(name)}</h3>",
           f"<p class=muted>output: <code>{_e(stage.get('output', ''))}</code></p>",
           "<div class=cards>" + "".join(f"<div class=card><span class=muted>{_e(k)}</span><b>{_count(v)}</b></div>"
                                        for k, v in cards) + "</div>"]
    if stage.get("dropped_by_reason"):
        out.append("<table><tr><th>drop reason</th><th class=n>rows</th></tr>" + "".join(
            f"<tr><td>{_e(k)}</td><td class=n>{v:,}</td></tr>" for k, v in stage["dropped_by_reason"].items())
                   + "</table>")
    figures = {k: v for k, v in d["figures"].items() if v is not None}
    if figures:
        out.append("<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(_num(v) if not isinstance(v, int) else f'{v:,}')}"
                                       f"</td></tr>" for k, v in figures.items()) + "</table>")
    out += [_img(p) for p in d["plots"]]
    return "\n".join(out)


def _config_html(run: dict[str, Any], details: dict[str, dict[str, Any]]) -> str:
    if run.get("config"):
        from ovpipe.core.config import to_toml

        return f"<pre>{_e(to_toml(run['config']))}</pre>"
    # an older manifest (or one stage): the sections each stage hashed into its output header
    per_stage = {name: d["config"] for name, d in details.items() if d["config"]}
    return "".join(f"<h3>{_e(name)}</h3><pre>{_e(json.dumps(cfg, indent=1, ensure_ascii=False))}</pre>"
                   for name, cfg in per_stage.items()) or "<p class=muted>no config recorded</p>"


def render_html(run: dict[str, Any], details: dict[str, dict[str, Any]]) -> str:
    title = (f"ovpipe run {run['run_id']}" if run["kind"] == "run" else f"ovpipe {run['run_id']} output")
    meta = [("output", run.get("output")), ("input", run.get("input")), ("finished", run.get("finished_at")),
            ("total wall time", f"{run['seconds']:.1f} s" if run.get("seconds") is not None else None),
            ("config hash", run.get("config_hash"))]
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        "<meta name=viewport content='width=device-width,initial-scale=1'>",
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        "<table>" + "".join(f"<tr><th>{_e(k)}</th><td><code>{_e(v)}</code></td></tr>" for k, v in meta if v) + "</table>",
        "<h2>Funnel</h2>", _funnel_html(funnel(run, details)),
        "<h2>Timings and throughput</h2>", _timings_html(run["stages"]),
        "<h2>Stages</h2>",
        *(_stage_html(s, details[s["stage"]]) for s in run["stages"]),
        "<h2>Config</h2>", _config_html(run, details),
        "<p class=muted>written by <code>ovpipe report</code>; self-contained (no network needed).</p>",
        "</body></html>",
    ]
    return "\n".join(parts)


def write_report(path: str | Location, out: str | Location | None = None, run_id: str | None = None) -> str:
    """Write the HTML report for ``path`` (see the module docstring); returns where it went."""
    run = load_run(path, run_id)
    details = {s["stage"]: stage_details(s, run["folders"][s["stage"]]) for s in run["stages"]}
    dest = run["where"] if out is None else out if isinstance(out, Location) else Location.parse(out)
    write_bytes_atomic(dest, render_html(run, details).encode("utf-8"))
    return dest.uri()


# ---------------------------------------------------------------------------------- command line

HELP = "write one self-contained HTML page for a pipeline run or a stage output"
EXAMPLE = "ovpipe report demo_out   (then open demo_out/runs/demo.html)"


def add_arguments(parser) -> None:
    """The arguments of `ovpipe report` (registered in ovpipe/cli.py)."""
    parser.add_argument("path", help="a pipeline output root (the --output/--out of `ovpipe run` / `ovpipe demo`), "
                                     "a run manifest runs/<run_id>.json, or one stage's output folder")
    parser.add_argument("--out", default=None, help="HTML file to write (default: runs/<run_id>.html beside the "
                                                    "run manifest; OUT/_report.html for a stage output)")
    parser.add_argument("--run-id", default=None, help="which run of a pipeline output (default: runs/LATEST)")


def main(args) -> int:
    print(f"report: {write_report(args.path, args.out, args.run_id)}")
    return 0
