"""The `ovpipe` command line. Every stage has the same shape:

    ovpipe <stage> --input IN --output OUT [--config run.toml] [--set key=value ...] [--overwrite]

and is also `python -m ray_jobs.<stage>` with the same arguments (a `ray job submit`
entrypoint). Stage-specific flags are shortcuts for config keys (STAGES below).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from ovpipe.config import ConfigError, describe_defaults, load_config, to_toml
from ovpipe.progress import format_table


@dataclass(frozen=True)
class StageCommand:
    help: str
    factory: Callable[[], object]
    shortcuts: dict[str, tuple[str, type]] = field(default_factory=dict)  # flag -> (config key, type)


def _ingest():
    from curation.ingest import IngestStage

    return IngestStage()


def _embed():
    from curation.embed import EmbedStage

    return EmbedStage()


def _assign():
    from curation.assign import AssignStage

    return AssignStage()


def _caption():
    from curation.caption import CaptionRunner

    return CaptionRunner()


def _balance():
    from curation.balance import BalanceStage

    return BalanceStage()


def _pack():
    from packing.stage import PackRunner

    return PackRunner()


COMMON_SHORTCUTS = {"--workers": ("run.workers", int), "--seed": ("run.seed", int)}

STAGES: dict[str, StageCommand] = {
    "ingest": StageCommand(
        "raw image(-text) Parquet shards -> one row per sample (sample_id, sizes, provenance)",
        _ingest,
        {"--source": ("ingest.source", str), "--max-pixels": ("ingest.max_pixels", int)},
    ),
    "embed": StageCommand(
        "ingested samples -> + L2-normalised float16 open_clip image embedding (Ray Data actor pool)",
        _embed,
        {"--model": ("embed.model", str), "--pretrained": ("embed.pretrained", str),
         "--batch-size": ("embed.batch_size", int), "--pool-size": ("embed.pool_size", int),
         "--num-gpus-per-actor": ("embed.num_gpus_per_actor", float),
         "--num-cpus-per-actor": ("embed.num_cpus_per_actor", float)},
    ),
    "assign": StageCommand(
        "embedded samples -> + top-k concept_ids / concept_scores (FAISS or torch; cached concept index)",
        _assign,
        {"--vocabulary": ("assign.vocabulary", str), "--k": ("assign.k", int),
         "--backend": ("assign.backend", str), "--template": ("assign.template", str),
         "--cache-dir": ("assign.cache_dir", str)},
    ),
    "caption": StageCommand(
        "selected samples -> + English/Chinese caption (openai server, in-process vLLM or concepts), filtered",
        _caption,
        {"--backend": ("caption.backend", str), "--base-url": ("caption.base_url", str),
         "--model": ("caption.model", str), "--zh-share": ("caption.zh_share", float)},
    ),
    "balance": StageCommand(
        "concept assignments -> concept-balanced selection (inverse_frequency or metaclip) + report",
        _balance,
        {"--mode": ("balance.mode", str), "--target": ("balance.target", int),
         "--fraction": ("balance.fraction", float), "--threshold": ("balance.threshold", float)},
    ),
    "pack": StageCommand(
        "captioned samples / LLaVA conversations / (sample_id, num_tokens) -> packed Parquet shards of <= max-len tokens",
        _pack,
        {"--max-len": ("pack.max_len", int), "--max-samples-per-pack": ("pack.max_samples_per_pack", int),
         "--buckets": ("pack.buckets", int), "--tokenizer": ("pack.tokenizer", str),
         "--overlong": ("pack.overlong", str)},
    ),
}


def add_stage_arguments(parser: argparse.ArgumentParser, command: StageCommand) -> None:
    parser.add_argument("--input", required=True, help="input folder, file or URI (s3://, gs://)")
    parser.add_argument("--output", required=True, help="output folder or URI")
    _add_config_arguments(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an existing output of this stage and start again")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    for flag, (key, typ) in {**COMMON_SHORTCUTS, **command.shortcuts}.items():
        parser.add_argument(flag, type=typ, default=None, help=f"shortcut for --set {key}=…")


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="run config (TOML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set run.seed=3 (repeatable)")


def _overrides(args: argparse.Namespace, command: StageCommand) -> list[str]:
    out = list(args.overrides)
    for flag, (key, _typ) in {**COMMON_SHORTCUTS, **command.shortcuts}.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            out.append(f"{key}={json.dumps(value, ensure_ascii=False)}")
    return out


def run_stage_command(name: str, args: argparse.Namespace) -> int:
    from ovpipe.stage import run_stage

    command = STAGES[name]
    cfg = load_config(args.config, _overrides(args, command))
    stage = command.factory()
    run = getattr(stage, "run", None) or (lambda *a, **kw: run_stage(stage, *a, **kw))  # multi-pass stages
    summary = run(args.input, args.output, cfg, overwrite=args.overwrite, quiet=args.quiet)
    print(summary_table([summary.to_json()]))
    print(f"output: {summary.output}")
    return 0


def summary_table(summaries: list[dict]) -> str:
    rows = []
    for s in summaries:
        reasons = ", ".join(f"{r}={c}" for r, c in s["dropped_by_reason"].items()) or "-"
        rows.append([s["stage"], s["input_rows"], s["kept_rows"], s["dropped_rows"], reasons,
                     f"{s['seconds']:.1f}s", f"{s['shards_skipped']}/{s['shards']}"])
    return format_table(["stage", "in", "kept", "dropped", "dropped by reason", "time", "resumed"], rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ovpipe", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="show the resolved config")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the resolved config as TOML")
    _add_config_arguments(show)
    show.add_argument("--describe", action="store_true", help="every key with its default and meaning")

    for name, command in STAGES.items():
        add_stage_arguments(sub.add_parser(name, help=command.help), command)

    ledger = sub.add_parser("ledger", help="counts of dropped samples by stage and reason")
    ledger.add_argument("dir", help="a stage output or a demo folder")

    demo_data = sub.add_parser("make-demo-data", help="write synthetic demo input shards")
    demo_data.add_argument("out")
    demo_data.add_argument("--n", type=int, default=240, help="good rows in total")
    demo_data.add_argument("--seed", type=int, default=0)

    run = sub.add_parser("run", help="the whole pipeline from one config (locally, or submitted to a cluster)")
    add_pipeline_arguments(run)
    run.add_argument("--address", default=None,
                     help="submit to this Ray cluster's job server (http://HEAD:8265) and follow the logs")
    run.add_argument("--no-wait", action="store_true", help="with --address: submit and return")

    train = sub.add_parser("train", help="FSDP2 training on packed shards (torchrun -m trainer.train)")
    train.add_argument("--input", required=True, help="packed shards (the pack stage's output)")
    train.add_argument("--output", required=True, help="run folder: checkpoints, metrics, export")
    _add_config_arguments(train)
    train.add_argument("--nproc-per-node", type=int, default=0, help="processes; 0 = one per GPU, 1 on CPU")
    train.add_argument("--stage", default=None, choices=["1", "1.5", "2"], help="shortcut for --set train.stage=…")

    demo = sub.add_parser("demo", help="make demo data and run every stage on it")
    demo.add_argument("--out", default="demo_out")
    demo.add_argument("--n", type=int, default=240)
    _add_config_arguments(demo)
    demo.add_argument("--overwrite", action="store_true")
    return parser


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", default=None, help="raw input (folder or URI); else pipeline.input")
    parser.add_argument("--output", default=None, help="output root (folder or URI); else pipeline.output")
    parser.add_argument("--run-id", default=None, help="version name; else pipeline.run_id or a hash of config + inputs")
    parser.add_argument("--steps", default=None, help="comma-separated steps to run (default: all)")
    _add_config_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="delete earlier outputs of these steps first")


def pipeline_config(args: argparse.Namespace):
    """The resolved config with the flags folded in, checked for an input and an output."""
    overrides = list(args.overrides)
    for flag, key in (("input", "input"), ("output", "output"), ("run_id", "run_id")):
        if getattr(args, flag):
            overrides.append(f"pipeline.{key}={json.dumps(getattr(args, flag))}")
    if args.steps:
        overrides.append(f"pipeline.steps={json.dumps(args.steps.split(','))}")
    cfg = load_config(args.config, overrides)
    if not cfg.pipeline.input or not cfg.pipeline.output:
        raise ConfigError("the pipeline needs an input and an output: pass --input/--output or set "
                          "pipeline.input and pipeline.output in the config")
    return cfg


def run_pipeline_command(args: argparse.Namespace) -> int:
    from ovpipe.pipeline import run_pipeline, run_summary_table

    cfg = pipeline_config(args)
    p = cfg.pipeline
    manifest = run_pipeline(p.input, p.output, cfg, run_id=p.run_id or None, overwrite=args.overwrite,
                            steps=p.steps or None)
    print(run_summary_table(manifest))
    print(f"run {manifest['run_id']} finished in {manifest['seconds']:.1f}s; run manifest: "
          f"{manifest['output'].rstrip('/')}/runs/{manifest['run_id']}.json")
    return 0


def _guarded(prog: str, fn: Callable[[], int]) -> int:
    """Expected failures print one clear message instead of a traceback."""
    try:
        return fn()
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # OutputConflict, AccountingError, failed shards
        print(f"{prog}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _guarded("ovpipe", lambda: _dispatch(args))


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "config":
        if args.describe:
            print(describe_defaults())
        else:
            print(to_toml(load_config(args.config, args.overrides)), end="")
        return 0
    if args.command in STAGES:
        return run_stage_command(args.command, args)
    if args.command == "train":
        from trainer.train import launch

        sets = args.overrides + ([f'train.stage="{args.stage}"'] if args.stage else [])
        return launch(args.input, args.output, args.config, sets, args.nproc_per_node)
    if args.command == "ledger":
        from ovpipe.ledger import ledger_counts
        from ovpipe.shards import Location

        counts = ledger_counts(Location.parse(args.dir))
        print(format_table(["stage", "reason", "count"], [list(r) for r in counts.iter_rows()]))
        print(f"total dropped: {int(counts['count'].sum()):,}")
        return 0
    if args.command == "make-demo-data":
        from ovpipe.demo_data import make_demo_data

        counts = make_demo_data(args.out, args.n, args.seed)
        print(json.dumps({"out": args.out, "rows_by_source": counts}))
        return 0
    if args.command == "demo":
        from ovpipe.demo import run_demo

        from ovpipe.pipeline import run_summary_table

        start = time.monotonic()
        manifest = run_demo(args.out, args.n, load_config(args.config, args.overrides), args.overwrite)
        print(run_summary_table(manifest))
        print(f"demo finished in {time.monotonic() - start:.1f}s; outputs under {args.out}")
        return 0
    if args.command == "run":
        if args.address:
            from ovpipe.submit import submit_pipeline

            return submit_pipeline(args.address, pipeline_config(args), wait=not args.no_wait,
                                   overwrite=args.overwrite)
        return run_pipeline_command(args)
    raise AssertionError(args.command)


def pipeline_main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m ray_jobs.pipeline`: the same arguments as `ovpipe run`."""
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.pipeline", description="the whole pipeline")
    add_pipeline_arguments(parser)
    args = parser.parse_args(argv)
    return _guarded("pipeline", lambda: run_pipeline_command(args))


def stage_main(name: str, argv: list[str] | None = None) -> int:
    """Entry point of `python -m ray_jobs.<stage>`: the same arguments as `ovpipe <stage>`."""
    parser = argparse.ArgumentParser(prog=f"python -m ray_jobs.{name}", description=STAGES[name].help)
    add_stage_arguments(parser, STAGES[name])
    args = parser.parse_args(argv)
    return _guarded(name, lambda: run_stage_command(name, args))


if __name__ == "__main__":
    sys.exit(main())
