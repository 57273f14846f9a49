"""Connecting to Ray: RAY_ADDRESS (set by `ray job submit`) or `ray.address` joins a cluster;
otherwise a local Ray starts on this node (the embedded default)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ovpipe.config import Config


def ensure_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or cfg.ray.address
    if address:
        # The fault-injection hooks (ovpipe.stage) must reach the workers of a cluster this driver
        # joins, not just the driver; they are set only by tests.
        faults = {k: v for k, v in os.environ.items() if k.startswith("OVPIPE_FAULT_")}
        extra = {"runtime_env": {"env_vars": faults}} if faults else {}
        ray.init(address=address, logging_level=logging.WARNING, **extra)
    else:
        ray.init(
            num_cpus=cfg.ray.num_cpus or None,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )


def cluster_workers(cfg: Config) -> int:
    """How many tasks to keep in flight: run.workers, else one per CPU in the cluster."""
    import ray

    return cfg.run.workers or max(int(ray.cluster_resources().get("CPU", 1)), 1)


def spread_tasks(fn: Callable, calls: Sequence[tuple], cfg: Config, max_retries: int = 3) -> Iterator[Any]:
    """fn(*args) for every args tuple as Ray tasks, results in completion order. At most
    `cluster_workers` are in flight, and they are SPREAD over the nodes: short I/O-bound shard tasks
    would otherwise pile onto the driver's node, which reuses its worker lease for the next queued
    task. A task that raises (after its retries) re-raises here."""
    import ray

    ensure_ray(cfg)
    workers = cluster_workers(cfg)
    remote = ray.remote(num_cpus=1, max_retries=max_retries, scheduling_strategy="SPREAD")(fn)
    queue, in_flight = list(calls), []
    while queue or in_flight:
        while queue and len(in_flight) < workers:
            in_flight.append(remote.remote(*queue.pop(0)))
        ready, in_flight = ray.wait(in_flight, num_returns=1)
        yield ray.get(ready[0])
