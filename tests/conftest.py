"""Shared fixtures: one local Ray cluster per test session (Ray start-up costs seconds), and one
session-wide chain of stage outputs on small seeded demo data, built once and read by every test
module that needs it (demo_raw -> demo_ingested -> demo_embedded). Tests read these folders and
never write into them. Plain helpers are in tests/helpers.py."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_address():
    """A local Ray with 2 CPUs shared by every test; its GCS address lets subprocesses join."""
    import ray

    if not ray.is_initialized():  # "local": a new cluster, never one another process started here
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_raw(tmp_path_factory) -> Path:
    """Seeded demo input: 3 sources, 90 good rows and 5 bad ones (empty, corrupt, bomb, truncated, duplicate), in shards of 10 rows."""
    from ovpipe.demo_data import make_demo_data

    out = tmp_path_factory.mktemp("demo_raw")
    make_demo_data(str(out), n=90, seed=1, rows_per_shard=10)
    return out


@pytest.fixture(scope="session")
def demo_ingested(ray_address, demo_raw, tmp_path_factory) -> Path:
    """demo_raw through the ingest stage (default config, on the session's Ray)."""
    from curation.ingest import IngestStage
    from ovpipe.config import load_config
    from ovpipe.core.stage import run_stage

    out = tmp_path_factory.mktemp("chain") / "ingest"
    run_stage(IngestStage(), str(demo_raw), str(out), load_config(), quiet=True)
    return out


@pytest.fixture(scope="session")
def demo_embedded(demo_ingested) -> Path:
    """demo_ingested through the embed stage: the tiny seeded model, in-process (fast)."""
    from curation.embed import EmbedStage
    from ovpipe.config import load_config
    from ovpipe.core.stage import run_stage
    from tests.helpers import TINY_EMBED

    out = demo_ingested.parent / "embed"
    run_stage(EmbedStage(), str(demo_ingested), str(out), load_config(overrides=TINY_EMBED + ["run.executor=local"]),
              quiet=True)
    return out


def subprocess_env(ray_address: str | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    env.update(extra)
    return env


def python_exe() -> str:
    return sys.executable


def committed_shards(manifest: Path) -> set[str]:
    """Names of the shards a stage output's manifest has committed."""
    return {p.stem for p in manifest.glob("*.json") if not p.name.startswith("_")} if manifest.exists() else set()


def sigkill_after_commits(cmd: list[str], env: dict[str, str], manifest: Path, at_least: int,
                          timeout_s: float = 120) -> set[str]:
    """Start a driver in its own process group, SIGKILL the group once its stage has committed
    `at_least` shards, and return the shards committed when it died."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(committed_shards(manifest)) < at_least:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return committed_shards(manifest)


@pytest.fixture()
def process_group():
    """Code under test joins (or starts) a one-process gloo group in this process; leave none
    behind, and the distributed environment variables as they were."""
    import torch.distributed as dist

    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
