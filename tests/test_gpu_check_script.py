"""scripts/gpu_check_embed_stage.py: its synthetic images, and its CPU dry run end to end (the GPU
run itself needs a CUDA machine: scripts/gpu_check.sh)."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess

import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import REPO, python_exe, subprocess_env


def load_script():
    path = REPO / "scripts" / "gpu_check_embed_stage.py"
    spec = importlib.util.spec_from_file_location("gpu_check_embed_stage", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synthetic_images_are_distinct_jpegs_of_256_to_512_px(tmp_path):
    script = load_script()
    script.make_images(str(tmp_path), 5, 3, procs=1)
    images = [b for p in sorted(tmp_path.glob("*.parquet")) for b in pq.read_table(p)["image"].to_pylist()]
    assert len(images) == len(set(images)) == 5  # ingest's exact dedup keeps every one
    for data in images:
        img = Image.open(io.BytesIO(data))
        assert img.format == "JPEG" and all(256 <= side <= 512 for side in img.size)


@pytest.mark.slow  # starts its own Ray: about 40 s on a busy 2-core machine
def test_embed_stage_dry_run_prints_its_json_line_last():
    out = subprocess.run([python_exe(), "scripts/gpu_check_embed_stage.py", "--dry-run", "--images", "120"],
                         cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["check"] == "gpu_check_embed_stage" and result["dry_run"] is True
    assert result["images"] == 120 and result["dtype"] == "float32"
    assert result["stage_images_per_s"] > 0 and result["forward_images_per_s"] > 0
    assert result["headline_ratio"] == pytest.approx(result["stage_images_per_s"] / result["forward_images_per_s"],
                                                     rel=0.01)
