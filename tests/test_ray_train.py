"""The trainer under Ray Train (TorchTrainer, 2 gloo CPU workers on the session's local Ray): a
worker killed after step 2 leaves a checkpoint that `ovpipe train` (torchrun) resumes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from packing import tokenizer as ptok
from tests.conftest import subprocess_env
from tests.helpers import write_test_packs
from trainer.train import KILL_ENV


@pytest.mark.slow
def test_ray_train_checkpoint_resumes_with_ovpipe_train(ray_address, tmp_path):
    packs = tmp_path / "packs"
    write_test_packs(packs, ptok.load_tokenizer("qwen"), n_shards=2, packs_per_shard=3, loss_on="last")
    run = tmp_path / "run"
    sets = ["--set", "train.steps=4", "--set", "train.checkpoint_interval=2", "--set", "train.lr=0.001",
            "--set", "train.export=false"]
    env = subprocess_env(ray_address, OMP_NUM_THREADS="1", **{KILL_ENV: "1"})  # SIGKILL after step index 1
    r = subprocess.run([sys.executable, "-m", "ray_jobs.train", "--num-workers", "2", "--cpus-per-worker", "0.5",
                        "--input", str(packs), "--output", str(run), *sets],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode != 0  # the workers died
    assert (run / "checkpoints/latest").read_text().strip() == "step-00000002"
    meta = json.loads((run / "checkpoints/step-00000002/trainer.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 2

    env.pop(KILL_ENV)
    r = subprocess.run([sys.executable, "-m", "ovpipe.cli", "train", "--input", str(packs), "--output", str(run),
                        "--nproc-per-node", "1", *sets], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["resumed_from_step"] == 2 and s["world_size"] == 1
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]
