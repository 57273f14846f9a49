"""Where tasks run: the one place that decides between this process and Ray.

``run.executor = "local"`` runs every task in this process, one after another (debugging, tests
that need no cluster); ``"ray"`` (the default) runs them as Ray tasks, at most ``run.workers`` in
flight, SPREAD over the nodes. Joining Ray: RAY_ADDRESS (set by ``ray job submit``) or
``ray.address`` joins a cluster; otherwise a local Ray starts on this node (the embedded default).
Stages that need actors (embed's Ray Data pool, assign's index holders) call ``ensure_ray`` and
``uses_ray`` from here too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any


def uses_ray(cfg: Any) -> bool:
    return cfg.run.executor != "local"


def ensure_ray(cfg: Any) -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or cfg.ray.address
    if address:
        # The fault-injection hooks (ovpipe.core.stage) must reach the workers of a cluster this
        # driver joins, not just the driver; they are set only by tests.
        faults = {k: v for k, v in os.environ.items() if k.startswith("OVPIPE_FAULT_")}
        extra = {"runtime_env": {"env_vars": faults}} if faults else {}
        ray.init(address=address, logging_level=logging.WARNING, **extra)
    else:  # a Ray of this run's own: never a cluster found by chance (a stale /tmp/ray file hangs)
        ray.init(
            address="local",
            num_cpus=cfg.ray.num_cpus or None,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )


def cluster_workers(cfg: Any) -> int:
    """How many tasks to keep in flight: run.workers, else one per CPU in the cluster."""
    import ray

    return cfg.run.workers or max(int(ray.cluster_resources().get("CPU", 1)), 1)


def map_tasks(fn: Callable, calls: Sequence[tuple], cfg: Any, *, shared: tuple = (),
              max_retries: int = 3) -> Iterator[Any]:
    """fn(*shared, *call) for every call, results in completion order. ``shared`` arguments (a
    pass with its global state) go to the object store once, not once per task."""
    if not uses_ray(cfg):
        for call in calls:
            yield fn(*shared, *call)
        return
    import ray

    ensure_ray(cfg)
    refs = tuple(ray.put(s) for s in shared)
    yield from spread_tasks(fn, [(*refs, *call) for call in calls], cfg, max_retries=max_retries)


def spread_tasks(fn: Callable, calls: Sequence[tuple], cfg: Any, max_retries: int = 3) -> Iterator[Any]:
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
