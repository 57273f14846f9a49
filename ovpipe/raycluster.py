"""Connecting to Ray: RAY_ADDRESS (set by `ray job submit`) or `ray.address` joins a cluster;
otherwise a local Ray starts on this node (the embedded default)."""

from __future__ import annotations

import logging
import os

from ovpipe.config import Config


def ensure_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or cfg.ray.address
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(
            num_cpus=cfg.ray.num_cpus or None,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
