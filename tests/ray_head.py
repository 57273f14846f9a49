"""A real Ray head on 127.0.0.1 for tests that use `ray job submit`, stopped at the end.

Started with `ray start --head --block` in its own process group and a short temp dir (Unix
socket paths must stay under ~107 characters, which pytest's tmp_path can exceed). Stopping
kills only this cluster's processes, never other Ray instances on the machine (no `ray stop`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from tests.conftest import subprocess_env

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def head_env() -> dict[str, str]:
    """Auth off for this private test cluster, and the venv first on PATH so that a job's
    `python` entrypoint is this environment's Python."""
    env = subprocess_env(RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = str(VENV_BIN) + os.pathsep + env.get("PATH", "")
    return env


@contextlib.contextmanager
def ray_head(num_cpus: int = 2, timeout_s: float = 120) -> Iterator[dict[str, str]]:
    """Yields {"dashboard": http address, "gcs": host:port, "temp_dir": ...}."""
    gcs_port, dash_port = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ovr", dir="/tmp")
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
         f"--num-cpus={num_cpus}", "--disable-usage-stats", "--include-dashboard=true",
         f"--temp-dir={temp_dir}",
         # Every agent port free too: the defaults (52365, ...) clash with any other Ray on the
         # machine (the test session's own), and then the job agent never starts.
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--ray-client-server-port={free_port()}"],
        env=head_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash_port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except OSError:
                if head.poll() is not None:
                    raise RuntimeError(f"ray head exited: {head.stdout.read().decode()[-3000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError("ray head did not answer on its dashboard port in time")
                time.sleep(0.5)
        yield {"dashboard": address, "gcs": f"127.0.0.1:{gcs_port}", "temp_dir": temp_dir}
    finally:
        _stop(head, temp_dir)


def _stop(head: subprocess.Popen, temp_dir: str) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGTERM)
    try:  # `ray start --block` often outlives SIGTERM (seen: never within 30 s); its daemons are
        head.wait(timeout=3)  # stopped below by name either way
    except subprocess.TimeoutExpired:
        pass
    # Ray's daemons may outlive the group; every one of this cluster's processes names its temp dir.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        subprocess.run(["pkill", f"-{sig.name[3:]}", "-f", temp_dir], check=False)
        time.sleep(1)
    shutil.rmtree(temp_dir, ignore_errors=True)


def ray_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "ray"), *args], env=head_env(), capture_output=True,
                          text=True, timeout=timeout)


def submit_job(dashboard: str, *entrypoint: str, working_dir: str, timeout: float = 600,
               agent_wait_s: float = 300) -> subprocess.CompletedProcess:
    """`ray job submit ... -- <entrypoint>`, retried while the head's job agent is still starting
    (the dashboard answers a few seconds before the agent accepts jobs)."""
    deadline = time.monotonic() + agent_wait_s
    while True:
        result = ray_cli("job", "submit", "--address", dashboard, "--working-dir", working_dir,
                         "--", *entrypoint, timeout=timeout)
        if "No available agent" not in result.stdout + result.stderr or time.monotonic() > deadline:
            return result
        time.sleep(2)
