"""examples/: the tiny and the production config load (every key known, every value valid), say
what they claim, and the tiny one passes `ovpipe run --dry-run`'s checks on demo data."""

from __future__ import annotations

import os
from pathlib import Path

from ovpipe import cli
from ovpipe.config import load_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_the_production_example_is_a_valid_production_config():
    cfg = load_config(EXAMPLES / "production.toml")
    assert cfg.embed.model == "ViT-H-14-quickgelu" and cfg.embed.pretrained.endswith(".pt")  # MetaCLIP-H/14 file
    assert cfg.assign.vocabulary.endswith("metadata.json")  # MetaCLIP's 500K entries
    assert cfg.caption.backend == "openai" and cfg.caption.base_url.startswith("http")  # a vLLM server
    assert cfg.balance.target == 85_000_000 and cfg.pack.max_len == 8192
    assert cfg.train.llm_path and cfg.train.run_dir  # checkpoints on a shared filesystem (output on S3)


def test_the_tiny_example_loads_and_passes_the_dry_run_on_demo_data(tmp_path, capsys, monkeypatch):
    cfg = load_config(EXAMPLES / "tiny.toml")
    assert cfg.embed.pretrained == "random" and cfg.caption.backend == "concepts" and not cfg.train.llm_path
    monkeypatch.chdir(tmp_path)  # its paths are relative: raw/ in, tiny_out/ out
    assert cli.main(["make-demo-data", "--out", cfg.pipeline.input, "--n", "12"]) == 0
    capsys.readouterr()
    assert cli.main(["run", "--config", str(EXAMPLES / "tiny.toml"), "--dry-run"]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].strip() for line in plan] == cfg.pipeline.steps
    assert all(line.endswith("[new]") for line in plan)
    assert not os.path.exists(cfg.pipeline.output)  # a dry run writes nothing
