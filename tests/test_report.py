"""`ovpipe report`: one self-contained HTML page per run (or stage output), checked as a person
would see it: rendered by headless Chromium, whose screenshot must not be blank and whose console
must stay silent. The run folder is laid out as ovpipe/pipeline.py writes it, with the plots made
by the stages' own plot functions; the slow test runs the real demo."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from curation.balance_report import plot_rank_frequency
from ovpipe.cli import main
from ovpipe.config import load_config
from ovpipe.core.shards import Location
from ovpipe.report import ReportError, write_report
from tests.conftest import python_exe, subprocess_env
from trainer.metrics import Metrics

STAGES = [  # (stage, in, kept, dropped by reason)
    ("ingest", 245, 240, {"corrupt_image": 3, "duplicate": 2}),
    ("embed", 240, 240, {}),
    ("balance", 240, 120, {"not_selected": 120}),
    ("caption", 120, 89, {"duplicate_caption": 31}),
    ("pack", 89, 89, {}),
    ("train", 2, 2, {}),
]


def _summary(name, n_in, kept, reasons, output):
    return {"stage": name, "output": output, "config_hash": "0" * 16, "shards": 7, "shards_skipped": 0,
            "input_rows": n_in, "kept_rows": kept, "dropped_rows": sum(reasons.values()),
            "dropped_by_reason": reasons, "seconds": 2.5, "failed": {}, "wall_seconds": 3.0,
            "rows_per_s": round(n_in / 3.0, 1)}


def _bar_png(values: list[int]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.bar(range(len(values)), values)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=60)
    plt.close(fig)
    return buf.getvalue()


def make_run(root: Path) -> Path:
    """A pipeline output root with run r1, its stage folders, reports and plots."""
    cfg = load_config(overrides=["balance.fraction=0.5"])
    stages = []
    for name, n_in, kept, reasons in STAGES:
        folder = root / (name if name in ("ingest", "embed") else f"versions/r1/{name}")
        (folder / "_manifest").mkdir(parents=True)
        (folder / "_manifest/_stage.json").write_text(json.dumps(
            {"stage": name, "config_hash": "0" * 16, "payload": {"config": {"run": {"seed": 0}}}}))
        stages.append(_summary(name, n_in, kept, reasons, str(folder)))
    rng = np.random.default_rng(0)
    before = np.sort(rng.zipf(1.6, 400).clip(max=500))[::-1].astype(np.int64)
    after = np.minimum(before, 20)
    rep = root / "versions/r1/balance/_report"
    rep.mkdir()
    (rep / "concept_frequency_by_rank.png").write_bytes(plot_rank_frequency(before, after, "inverse_frequency"))
    (rep / "balance_report.json").write_text(json.dumps({
        "mode": "inverse_frequency", "usable_rows": 240, "selected_rows": 120,
        "concepts_before": {"coverage": 400, "normalized_entropy": 0.61, "top50_share": 0.7},
        "concepts_after": {"coverage": 380, "normalized_entropy": 0.93, "top50_of_before_share": 0.2},
        "plots": ["concept_frequency_by_rank.png"]}))
    pack = root / "versions/r1/pack"
    stats = {"samples": 89, "packs": 2, "tokens": 10918, "max_len": 8192, "fill": 0.6664, "compression": 44.5,
             "lower_bound": 2, "mean_sample_tokens": 122.7}
    (pack / "pack_stats.json").write_text(json.dumps(stats))
    (pack / "pack_stats.png").write_bytes(_bar_png([41, 48]))
    for phase, losses in (("1", [11.96, 11.93, 11.91]), ("1.5", [11.90, 11.88])):
        run = root / "versions/r1/train" / phase
        m = Metrics(run, len(losses), phase=phase)
        for step, loss in enumerate(losses):
            m.write({"step": step, "loss": loss, "lr": 1e-3, "effective_tokens_per_s": 1200.0, "mfu": None})
        m.plot()
        (run / "summary.json").write_text(json.dumps({"phase": phase, "steps": len(losses), "final_loss": losses[-1],
                                                      "seconds": 12.0, "world_size": 1, "export": None}))
    manifest = {"run_id": "r1", "config_hash": "f" * 16, "input": str(root / "raw"), "output": str(root),
                "inputs": [], "stages": stages, "config": cfg.model_dump(mode="json"), "seconds": 80.0,
                "finished_at": "2026-12-03T01:00:00Z", "report": str(root / "runs/r1.html")}
    (root / "runs").mkdir()
    (root / "runs/r1.json").write_text(json.dumps(manifest))
    (root / "runs/LATEST").write_text("r1")
    return root


def test_report_is_one_self_contained_page_with_funnel_plots_config_and_timings(tmp_path):
    root = make_run(tmp_path / "out")
    path = Path(write_report(str(root)))
    assert path == root / "runs/r1.html"
    page = path.read_text()
    # self-contained: no script, every image inlined, nothing fetched from anywhere
    assert "<script" not in page and "url(" not in page and "@import" not in page
    refs = re.findall(r"""(?:src|href)=["']?([^"' >]*)""", page)
    assert refs and all(ref.startswith("data:") for ref in refs), [r[:40] for r in refs]
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 4  # balance's plot, pack's plot, two phases' loss curves
    for b64 in images:
        Image.open(io.BytesIO(base64.b64decode(b64))).verify()
    # the funnel: raw -> ... -> packed samples -> packs, in order, with the drops on the way
    funnel = page[page.index("<h2>Funnel"):page.index("<h2>Timings")]
    labels = re.findall(r"<tr><td>([^<]+?)(?: <span|</td>)", funnel)
    assert labels == ["raw samples", "ingested", "embedded", "selected (balanced)", "captioned", "packed samples",
                      "packs"]
    assert re.findall(r"<td class=n>([\d,]+)</td>", funnel) == ["245", "240", "240", "120", "89", "89", "2"]
    assert "corrupt_image 3, duplicate 2" in funnel and "duplicate_caption 31" in funnel
    assert "44.5 samples per pack" in funnel
    # timings and throughput: train in packs/s, not "0/s"
    assert "0.67 packs/s" in page and "82 rows/s" in page
    # stage figures and the config
    assert "0.61 -&gt; 0.93" in page and "phase 1.5" in page and "1,200 effective tokens/s" in page
    assert "[balance]" in page and "fraction = 0.5" in page


def test_report_of_one_stage_output_and_a_clear_error_otherwise(tmp_path, capsys):
    root = make_run(tmp_path / "out")
    pack = root / "versions/r1/pack"
    summary = json.loads((root / "runs/r1.json").read_text())["stages"][4]
    (pack / "_manifest/_summary.json").write_text(json.dumps(summary))
    assert main(["report", str(pack)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {pack / '_report.html'}"
    page = (pack / "_report.html").read_text()
    assert "ovpipe pack output" in page and page.count("data:image/png;base64,") == 1
    with pytest.raises(ReportError, match="neither a pipeline output"):
        write_report(str(tmp_path))
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------ in a browser


def chromium() -> str:
    """Debian's chromium (.ci/run installs it); the test skips, saying why, where there is none."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium; .ci/run does this "
                "where apt-get can reach the package mirror)")


def render(page: Path, png: Path, height: int = 1600) -> list[str]:
    """Screenshot ``page``; returns the page's console messages (errors, warnings, logs)."""
    r = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size=1100,{height}", f"--screenshot={png}", "--enable-logging=stderr", "--v=0",
                        "--allow-file-access-from-files", page.as_uri()],
                       capture_output=True, text=True, timeout=120, cwd=png.parent)
    assert png.exists(), r.stderr[-2000:]
    return [ln for ln in r.stderr.splitlines() if ":CONSOLE" in ln]


def not_blank(png: Path) -> float:
    """Share of the screenshot's pixels that are not background white."""
    img = np.asarray(Image.open(png).convert("L"))
    return float((img < 235).mean())


def test_report_renders_in_headless_chromium_without_console_errors(tmp_path):
    chromium()
    page = Path(write_report(str(make_run(tmp_path / "out"))))
    console = render(page, tmp_path / "shot.png")
    assert console == []
    shot = Image.open(tmp_path / "shot.png")
    assert shot.size == (1100, 1600)
    assert not_blank(tmp_path / "shot.png") > 0.03  # text, bars and plots, not an empty page
    colours = np.unique(np.asarray(shot.convert("RGB")).reshape(-1, 3), axis=0)
    assert len(colours) > 50  # the funnel's colours, text anti-aliasing and the plots
    # the checks can fail: a page with a console error, and a blank page, are caught
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><script>console.error('boom')</script></body></html>")
    assert any("boom" in line for line in render(bad, tmp_path / "bad.png"))
    assert not_blank(tmp_path / "bad.png") < 0.001


@pytest.mark.slow
def test_demo_writes_the_report_and_prints_its_path(tmp_path):
    """`ovpipe demo` ends with the report's path; the page holds every stage and renders."""
    out = tmp_path / "demo"
    r = subprocess.run([python_exe(), "-m", "ovpipe.cli", "demo", "--out", str(out), "--n", "60"],
                       capture_output=True, text=True, timeout=900, env=subprocess_env())
    assert r.returncode == 0, r.stderr[-3000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("run report")]
    assert line == [f"run report (open in a browser): {out / 'runs/demo.html'}"]
    page = (out / "runs/demo.html").read_text()
    for stage in ("ingest", "embed", "assign", "balance", "caption", "pack", "train"):
        assert f"id='stage-{stage}'" in page
    assert page.count("data:image/png;base64,") >= 5  # balance (3), pack, train phases
    if shutil.which("chromium"):
        assert render(out / "runs/demo.html", tmp_path / "demo.png", height=2400) == []
        assert not_blank(tmp_path / "demo.png") > 0.03
    assert "[train phase 1] step 1/3" in r.stderr  # the demo's training lines say which phase


if __name__ == "__main__":  # docs/reading-reports.png: python tests/test_report.py OUT_PNG [RUN_DIR]
    target = Path(sys.argv[1])
    run_dir = Path(sys.argv[2]) if len(sys.argv) > 2 else make_run(Path(os.environ.get("TMPDIR", "/tmp")) / "r")
    render(Path(write_report(str(run_dir))), target, height=1500)


def test_loss_plot_has_integer_steps_and_the_phase_and_training_ends_with_a_readable_summary(tmp_path):
    from trainer.metrics import summary_text

    m = Metrics(tmp_path / "1.5", 3, phase="1.5", log=lambda s: None)
    for step, loss in enumerate([2.0, 1.5, 1.2]):
        m.write({"step": step, "loss": loss, "lr": 1e-4, "effective_tokens_per_s": 900.0, "mfu": None})
    fig = m.figure()
    ax = fig.axes[0]
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert ax.get_title() == "training phase 1.5"  # its folder is named 1.5: said once
    m.plot()
    text = summary_text({"phase": "1.5", "steps": 3, "resumed_from_step": 0, "world_size": 1, "seconds": 4.2,
                         "final_loss": 1.2, "export": str(tmp_path / "1.5/export")}, tmp_path / "1.5")
    assert text.splitlines() == [
        "training phase 1.5: 3 steps on 1 process(es) in 4.2s",
        "  loss 2.0000 -> 1.2000; 900 effective tokens/s",
        f"  loss plot: {tmp_path / '1.5/loss.png'}",
        f"  model: {tmp_path / '1.5/export'} (Hugging Face folder: {tmp_path / '1.5/export'}/llm)"]


def test_concept_plot_shows_the_flattening_with_entropy_and_gini_in_the_legend():
    import matplotlib

    matplotlib.use("Agg")
    from unittest import mock

    from curation.balance_report import gini

    assert gini(np.array([5, 5, 5, 5])) == 0.0 and gini(np.array([0, 0, 0, 10])) == pytest.approx(0.75)
    before = np.array([400, 200, 100, 50, 25, 12, 6, 3])
    after = np.array([60, 50, 45, 40, 25, 12, 6, 3])
    import matplotlib.pyplot as plt

    with mock.patch.object(plt, "close"):  # keep the figure to look at it
        png = plot_rank_frequency(before, after, "inverse_frequency")
    fig = plt.gcf()
    Image.open(io.BytesIO(png)).verify()
    share, coverage = fig.axes[:2]
    legend = [t.get_text() for t in share.get_legend().get_texts()]
    assert f"Gini {gini(before):.3f}" in legend[0] and f"Gini {gini(after):.3f}" in legend[1]
    assert "entropy" in legend[0]
    # shares, not counts: the balanced curve is lower at the head and higher in the tail
    b, a = (line.get_ydata() for line in share.get_lines()[:2])
    assert a[0] < b[0] and a[-1] > b[-1]
    # the coverage curve of the balanced selection is nearer the diagonal
    cb, ca = (line.get_ydata() for line in coverage.get_lines()[:2])
    assert (ca <= cb + 1e-12).all() and ca[2] < cb[2]
    plt.close(fig)


def test_report_of_a_run_on_an_object_store_like_filesystem(tmp_path):
    """Stage folders named by URI (s3://…) are read through the run manifest's filesystem; a train
    step on a local run_dir (object-store runs) by its local path."""
    import pyarrow.fs as pafs

    root = make_run(tmp_path / "out")
    fs = pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem())
    manifest = json.loads((root / "runs/r1.json").read_text())
    for s in manifest["stages"]:
        if s["stage"] != "train":
            s["output"] = "subtree://" + str(Path(s["output"]).relative_to(root))
    (root / "runs/r1.json").write_text(json.dumps(manifest))
    dest = write_report(Location(fs, "runs/r1.json"), Location(fs, "runs/r1.html"))
    page = (root / "runs/r1.html").read_text()
    assert dest == "subtree://runs/r1.html" and page.count("data:image/png;base64,") == 4
    assert "0.61 -&gt; 0.93" in page and "44.5 samples per pack" in page
