"""The whole pipeline: `ovpipe run`, incremental versions, object storage (a real S3-compatible
server on 127.0.0.1), a two-node Ray cluster, a killed worker, a killed driver, `ray job submit`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ovpipe.config import load_config
from ovpipe.core.config import to_toml
from ovpipe.demo import demo_config
from ovpipe.demo_data import make_demo_data
from ovpipe.pipeline import run_pipeline
from ovpipe.core.shards import Location, list_input_shards
from tests.conftest import REPO, python_exe, subprocess_env
from tests.ray_head import free_port, ray_head, submit_job
from tests.helpers import data_files

PER_SHARD_STEPS = ["ingest", "embed", "assign"]


def small_raw(root: Path, n: int = 30, seed: int = 3) -> Path:
    make_demo_data(str(root), n=n, seed=seed, rows_per_shard=6)
    return root


def cfg_for_tests(*overrides: str):
    return demo_config(load_config(overrides=["run.progress_interval_s=60", *overrides]))


def outputs(root: Path, version: str | None = None) -> dict[str, list]:
    """Rows of every data and ledger file of every step (per-shard steps shared, global ones from
    a version). Paths inside rows that point into this output root (ledger locators of later
    stages) are written relative to it, so two output folders compare by content."""
    files = {}
    for step in PER_SHARD_STEPS:
        files.update({f"{step}/{k}": root / step / k for k in data_files(root / step)})
    if version:
        vroot = root / "versions" / version
        for step in sorted(p.name for p in vroot.iterdir()):
            files.update({f"{step}/{k}": vroot / step / k for k in data_files(vroot / step)
                          if not k.startswith("_report")})
    prefixes = [str(root / "versions" / version) if version else None, str(root)]
    out = {}
    for name, path in sorted(files.items()):
        text = json.dumps(pq.read_table(path).to_pylist(), default=repr, ensure_ascii=False)
        for prefix in filter(None, prefixes):
            text = text.replace(prefix, "<out>")
        out[name] = text
    return out


def write_config(folder: Path, cfg) -> str:
    """The resolved config as a TOML file, for subprocesses and jobs."""
    path = folder / "run.toml"
    path.write_text(to_toml(cfg), encoding="utf-8")
    return str(path)


def assert_accounting(manifest: dict) -> None:
    for s in manifest["stages"]:
        assert s["input_rows"] == s["kept_rows"] + s["dropped_rows"], s


@pytest.mark.slow
def test_incremental_run_processes_only_new_shards_and_equals_from_scratch(ray_address, tmp_path):
    full = small_raw(tmp_path / "all")
    shards = sorted(p.relative_to(full) for p in full.rglob("*.parquet"))
    first, later = shards[:-2], shards[-2:]
    raw = tmp_path / "raw"
    for rel in first:
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(full / rel, raw / rel)
    cfg = cfg_for_tests("balance.fraction=0.5")
    v1 = run_pipeline(str(raw), str(tmp_path / "inc"), cfg, run_id="v1")
    for rel in later:
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(full / rel, raw / rel)
    v2 = run_pipeline(str(raw), str(tmp_path / "inc"), cfg, run_id="v2")
    assert_accounting(v1), assert_accounting(v2)
    by_stage = {s["stage"]: s for s in v2["stages"]}
    for step in PER_SHARD_STEPS:  # only the two new shards were ingested, embedded, assigned
        assert by_stage[step]["shards_skipped"] == len(first) and by_stage[step]["shards"] == len(shards)
    assert by_stage["balance"]["input_rows"] == by_stage["assign"]["kept_rows"]  # global: the union
    run_pipeline(str(raw), str(tmp_path / "scratch"), cfg, run_id="s")  # same files, all at once
    assert outputs(tmp_path / "inc", "v2") == outputs(tmp_path / "scratch", "s")
    # v1 is still there, untouched, and the run manifests say what each run did
    assert (tmp_path / "inc" / "versions" / "v1" / "pack").is_dir()
    assert (tmp_path / "inc" / "runs" / "LATEST").read_text() == "v2"
    assert json.loads((tmp_path / "inc" / "runs" / "v1.json").read_text())["inputs"] != v2["inputs"]


@pytest.mark.slow
def test_resubmitted_run_finishes_its_version_instead_of_repeating(ray_address, tmp_path):
    raw = small_raw(tmp_path / "raw", n=12)
    cfg = cfg_for_tests("balance.fraction=0.5")
    first = run_pipeline(str(raw), str(tmp_path / "out"), cfg, steps=["ingest", "embed"])
    again = run_pipeline(str(raw), str(tmp_path / "out"), cfg)
    assert first["run_id"] == again["run_id"]  # same inputs + config -> same run id
    stages = {s["stage"]: s for s in again["stages"]}
    assert stages["ingest"]["shards_skipped"] == stages["ingest"]["shards"]
    assert stages["embed"]["shards_skipped"] == stages["embed"]["shards"]
    assert stages["pack"]["kept_rows"] > 0


@pytest.mark.slow
def test_worker_killed_mid_stage_is_retried_without_duplicates(ray_address, tmp_path):
    raw = small_raw(tmp_path / "raw", n=24)
    cfg = cfg_for_tests()
    reference = tmp_path / "ref"
    run_pipeline(str(raw), str(reference), cfg, steps=["ingest"], versioned=False)
    pid_file = tmp_path / "pids"
    # The driver starts its own local Ray, so its workers inherit the fault hooks' variables.
    env = subprocess_env(OVPIPE_FAULT_PID_FILE=str(pid_file), OVPIPE_FAULT_SHARD_DELAY_S="1.0")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([python_exe(), "-m", "ray_jobs.ingest", "--input", str(raw), "--output",
                             str(tmp_path / "out"), "--workers", "1", "--set", "ray.num_cpus=2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (pid_file.exists() and pid_file.read_text().strip()):
        assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.05)
    victim = int(pid_file.read_text().split()[0])
    os.kill(victim, signal.SIGKILL)  # a Ray worker dies between writing a shard and committing it
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out.decode()[-3000:]
    lines = pid_file.read_text().split("\n")
    assert len({line.split()[0] for line in lines if line}) >= 2  # the task ran again elsewhere
    assert data_files(tmp_path / "out") == data_files(reference / "ingest")


@pytest.mark.slow
def test_driver_sigkilled_then_resubmitted_gives_identical_output(ray_address, tmp_path):
    raw = small_raw(tmp_path / "raw", n=24)
    cfg = cfg_for_tests("balance.fraction=0.5")
    run_pipeline(str(raw), str(tmp_path / "ref"), cfg, run_id="r")
    config = write_config(tmp_path, cfg)
    cmd = [python_exe(), "-m", "ray_jobs.pipeline", "--input", str(raw), "--output", str(tmp_path / "out"),
           "--run-id", "r", "--config", config]
    env = subprocess_env(ray_address, OVPIPE_FAULT_SHARD_DELAY_S="0.3")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    manifest = tmp_path / "out" / "embed" / "_manifest"
    deadline = time.monotonic() + 300
    while not (manifest.exists() and any(p.name != "_stage.json" for p in manifest.glob("*.json"))):
        assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read().decode()[-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies in the middle of the embed step
    proc.wait()
    time.sleep(1.0)
    again = subprocess.run(cmd, env=subprocess_env(ray_address), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert outputs(tmp_path / "out", "r") == outputs(tmp_path / "ref", "r")
    assert_accounting(json.loads((tmp_path / "out" / "runs" / "r.json").read_text()))


TWO_NODE_SCRIPT = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster
from ovpipe.config import load_config
from ovpipe.core.config import to_toml
from ovpipe.demo import demo_config
from ovpipe.pipeline import run_pipeline
from ovpipe.core.shards import Location, list_input_shards

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=1)
ray.init(address=cluster.address)
cfg = demo_config(load_config(overrides=["run.progress_interval_s=60", "run.workers=2"]))
manifest = run_pipeline(sys.argv[1], sys.argv[2], cfg, steps=["ingest", "embed", "assign"], versioned=False)
print(json.dumps({"nodes": len(ray.nodes()), "stages": manifest["stages"]}))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow
def test_two_node_cluster_uses_both_nodes_and_equals_one_node(ray_address, tmp_path):
    raw = small_raw(tmp_path / "raw", n=30)
    cfg = cfg_for_tests()
    run_pipeline(str(raw), str(tmp_path / "one"), cfg, steps=PER_SHARD_STEPS, versioned=False)
    env = subprocess_env()
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([python_exe(), "-c", TWO_NODE_SCRIPT, str(raw), str(tmp_path / "two")],
                            env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["nodes"] == 2
    nodes = {json.loads(p.read_text())["node"] for p in (tmp_path / "two" / "ingest" / "_manifest").glob("*.json")
             if not p.name.startswith("_")}
    assert len(nodes) == 2, f"ingest shards ran on {nodes}"
    assert outputs(tmp_path / "two") == outputs(tmp_path / "one")


@pytest.mark.slow
def test_ray_job_submit_runs_the_demo_pipeline(tmp_path):
    raw = small_raw(tmp_path / "raw", n=18)
    out = tmp_path / "out"
    with ray_head() as head:
        config = write_config(tmp_path, cfg_for_tests("balance.fraction=0.5"))
        result = submit_job(head["dashboard"], "python", "-m", "ray_jobs.pipeline", "--input", str(raw),
                            "--output", str(out), "--run-id", "job", "--config", config,
                            working_dir=str(REPO))
        assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    manifest = json.loads((out / "runs" / "job.json").read_text())
    assert [s["stage"] for s in manifest["stages"]] == ["ingest", "embed", "assign", "balance", "caption", "pack",
                                                          "train"]
    assert_accounting(manifest)
    packs = list_input_shards(Location.parse(str(out / "versions" / "job" / "pack")))
    assert sum(pq.read_metadata(p.path).num_rows for p in packs) > 0


@pytest.fixture
def s3_server(tmp_path):
    """moto's S3-compatible server on 127.0.0.1, stopped at the end."""
    port = free_port()
    moto = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        import pyarrow.fs as pafs

        deadline = time.monotonic() + 30
        while True:
            try:
                fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="test",
                                       secret_key="test", region="us-east-1", allow_bucket_creation=True)
                fs.create_dir("ovpipe-test")
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "moto server did not start"
                time.sleep(0.3)
        yield fs, env
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.slow
def test_demo_pipeline_with_input_and_output_on_s3(s3_server, tmp_path):
    fs, env = s3_server
    raw = small_raw(tmp_path / "raw", n=18)
    for path in raw.rglob("*.parquet"):
        with fs.open_output_stream(f"ovpipe-test/raw/{path.relative_to(raw)}") as f:
            f.write(path.read_bytes())
    run_env = subprocess_env(**env)
    run_env.pop("RAY_ADDRESS", None)  # its own local Ray, which inherits the S3 settings
    result = subprocess.run(
        [python_exe(), "-m", "ray_jobs.pipeline", "--input", "s3://ovpipe-test/raw", "--output",
         "s3://ovpipe-test/out", "--run-id", "s3", "--config",
         write_config(tmp_path, cfg_for_tests("balance.fraction=0.5", "ray.num_cpus=2",
                                              f"train.run_dir={str(tmp_path / 'runs')!r}"))],
        env=run_env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    with fs.open_input_stream("ovpipe-test/out/runs/s3.json") as f:
        manifest = json.loads(f.read())
    assert_accounting(manifest)
    stages = {s["stage"]: s for s in manifest["stages"]}
    assert stages["pack"]["kept_rows"] > 0 and stages["pack"]["dropped_rows"] == 0
    assert (tmp_path / "runs" / "s3" / "train").is_dir()  # trained on the packs read from S3
    shards = list_input_shards(Location(fs, "ovpipe-test/out/versions/s3/pack"))  # through its manifest
    assert sum(pq.read_metadata(s.path, filesystem=fs).num_rows for s in shards) > 0
