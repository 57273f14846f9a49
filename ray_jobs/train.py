"""`python -m ray_jobs.train --input PACKED --output RUN_DIR [--config run.toml] [--set k=v]
[--num-workers N] [--use-gpu]`: the FSDP2 trainer (trainer/train.py) under Ray Train.

Submit to a cluster with `ray job submit --working-dir . -- python -m ray_jobs.train ...`.
Ray Train's ``TorchTrainer`` starts one worker per GPU (or N CPU workers), sets up the
torch.distributed group (NCCL on GPU, gloo on CPU) and runs the same ``train()`` as
``torchrun -m trainer.train``: same packed-shard reader, same checkpoints. RUN_DIR must be a path
every worker sees (a shared filesystem); the checkpoints there are ordinary trainer checkpoints,
so a run started here resumes with `ovpipe train` and the other way round (at any world size).
The training phase is a config key: `--set train.phase=1.5` (`train.stage`, its old name, is still
accepted). One phase per job, into RUN_DIR itself (trainer/launch.py is the torchrun path).
"""

from __future__ import annotations

import json
import os
import sys

from ovpipe import registry
from ovpipe.cli import stage_overrides, stage_parser
from ovpipe.config import Config, load_config
from ovpipe.core.executor import ensure_ray
from trainer.train import KILL_ENV, train


def _loop(config: dict) -> None:
    if config.get("kill_after") is not None:  # tests: a worker killed mid-run
        os.environ[KILL_ENV] = str(config["kill_after"])
    train(config["input"], config["output"], Config.model_validate(config["config"]))


def main(argv: list[str] | None = None) -> int:
    """The train stage's arguments from the registry (as `ovpipe train`), plus Ray Train's own."""
    ap = stage_parser("train", prog="python -m ray_jobs.train")
    ap.add_argument("--num-workers", type=int, default=0,
                    help="Ray Train workers; 0 = train.nproc_per_node, else one per GPU, else 1")
    ap.add_argument("--use-gpu", action="store_true", help="GPU workers (implied when the cluster has GPUs)")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs each worker reserves")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, stage_overrides(args, registry.entry("train")))

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ensure_ray(cfg)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = args.use_gpu or gpus > 0
    workers = args.num_workers or cfg.train.nproc_per_node or (gpus if use_gpu else 1)
    trainer = TorchTrainer(
        _loop,
        train_loop_config={"input": args.input, "output": os.path.abspath(args.output),
                           "config": cfg.model_dump(), "kill_after": os.environ.get(KILL_ENV)},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": args.cpus_per_worker}),
        run_config=RunConfig(name="ovpipe-train", storage_path=os.path.abspath(os.path.join(args.output, "_ray"))),
    )
    trainer.fit()
    from trainer.metrics import summary_text  # the numbers are in RUN_DIR/summary.json

    with open(os.path.join(args.output, "summary.json")) as f:
        print(summary_text(json.load(f), args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
