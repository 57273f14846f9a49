"""A real multi-node Ray cluster on this machine, for the scale benchmark and the two-node test.

``cluster()`` starts a head (0 CPUs: the driver's node, so every task and actor runs on the
workers) and worker nodes, each ``ray start --block`` on 127.0.0.1 in its own process group, and
stops them by those groups' ids, then by pid the Ray workers re-parented out of them (found by this
cluster's own temp dir on their command line). It never runs ``ray stop``: other Ray instances
on the machine are left alone.
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
from collections.abc import Iterator
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
CLUSTER_NODES: dict[str, list[int]] = {}  # address -> its nodes' `ray start` process ids
# Workers bind ports the OS picks: no range shared with this cluster's other nodes or with another
# Ray on the machine (every Ray's default is 10002-19999).
RANDOM_WORKER_PORTS = ("--min-worker-port=0", "--max-worker-port=0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def cluster(worker_cpus: int = 2, object_store_mb: int = 400, workers: int = 2,
            env: dict[str, str] | None = None) -> Iterator[str]:
    """A head (0 CPUs) and `workers` worker nodes of `worker_cpus` CPUs; yields the GCS address
    (CLUSTER_NODES[address] lists the nodes' `ray start` pids, head first)."""
    temp_dir = tempfile.mkdtemp(prefix="ovs", dir="/tmp")
    env = dict(env or os.environ, RAY_AUTH_MODE="disabled",
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    gcs = _free_port()
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> None:
        ports = [f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
                 f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                 f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"]
        procs.append(subprocess.Popen(
            [str(VENV_BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
             f"--object-store-memory={object_store_mb << 20}", *ports, *args],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))

    address = f"127.0.0.1:{gcs}"
    try:
        start("--head", f"--port={gcs}", "--num-cpus=0", "--include-dashboard=false", *RANDOM_WORKER_PORTS,
              f"--ray-client-server-port={_free_port()}", f"--temp-dir={temp_dir}")
        wait_nodes(address, 1, env)
        CLUSTER_NODES[address] = [p.pid for p in procs]
        for n in range(workers):  # one at a time: two joining at once lost one (seen)
            start(f"--address={address}", f"--num-cpus={worker_cpus}", *RANDOM_WORKER_PORTS)
            wait_nodes(address, n + 2, env)
            CLUSTER_NODES[address].append(procs[-1].pid)
        yield address
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        time.sleep(3)
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                p.wait(timeout=10)
        _kill_leftovers(temp_dir)
        CLUSTER_NODES.pop(address, None)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _kill_leftovers(temp_dir: str) -> None:
    """Ray workers re-parented out of the nodes' groups: each names this cluster's own temp dir."""
    import psutil

    for p in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(Exception):
            if any(temp_dir in part for part in p.info["cmdline"] or ()) and p.info["pid"] != os.getpid():
                os.kill(p.info["pid"], signal.SIGKILL)


def wait_nodes(address: str, n: int, env: dict, timeout_s: float = 180) -> None:
    """Until the cluster has `n` alive nodes (asked from a process of its own)."""
    probe = ("import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
             "print(sum(1 for x in ray.nodes() if x['Alive']))")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run([sys.executable, "-c", probe, address], env=env, capture_output=True, text=True)
        lines = out.stdout.strip().splitlines()
        if out.returncode == 0 and lines and int(lines[-1]) >= n:
            return
        time.sleep(2)
    raise RuntimeError(f"the Ray cluster at {address} did not reach {n} nodes in {timeout_s:.0f} s")


def alive_nodes(address: str, env: dict) -> dict[str, float]:
    """{node id: CPUs} of the cluster's alive nodes (the head has 0 CPUs)."""
    probe = ("import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
             "print(' '.join(f\"{x['NodeID']}={x['Resources'].get('CPU', 0)}\" for x in ray.nodes() if x['Alive']))")
    out = subprocess.run([sys.executable, "-c", probe, address], env=dict(env, RAY_AUTH_MODE="disabled"),
                         capture_output=True, text=True, check=True)
    return {k: float(v) for k, v in (x.split("=") for x in out.stdout.strip().splitlines()[-1].split())}
