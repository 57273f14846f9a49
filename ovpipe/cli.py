"""The `ovpipe` command line, generated from the stage registry (ovpipe/registry.py).

    ovpipe <stage> --input IN --output OUT [--config run.toml] [--set key=value ...] [--overwrite]

Every registered stage has this shape and is also `python -m ray_jobs.<stage>` with the same
arguments (a `ray job submit` entrypoint); its flags are shortcuts for config keys. Besides the
stages: `ovpipe run` (the whole pipeline), `demo`, `config show`, `ledger`, `make-demo-data`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable

from ovpipe import registry
from ovpipe.config import describe_defaults, load_config
from ovpipe.core.config import ConfigError, to_toml
from ovpipe.core.ledger import ledger_counts
from ovpipe.core.progress import format_table, summary_table
from ovpipe.core.shards import Location
from ovpipe.demo import run_demo
from ovpipe.demo_data import make_demo_data
from ovpipe.pipeline import run_pipeline, run_summary_table
from ovpipe.registry import StageEntry
from ovpipe.submit import submit_pipeline


def add_stage_arguments(parser: argparse.ArgumentParser, entry: StageEntry) -> None:
    """A stage's arguments, from its registry entry: --input/--output/--config/--set, the run flags
    of per-shard stages, and the entry's shortcuts for config keys."""
    parser.add_argument("--input", required=True, help="input folder, file or URI (s3://, gs://)")
    parser.add_argument("--output", required=True, help="output folder or URI")
    _add_config_arguments(parser)
    if entry.run_flags:
        parser.add_argument("--overwrite", action="store_true",
                            help="delete an existing output of this stage and start again")
        parser.add_argument("--quiet", action="store_true", help="no progress lines")
    for flag, f in entry.all_flags().items():
        parser.add_argument(flag, *f.aliases, dest=_dest(flag), type=f.type, default=None,
                            choices=list(f.choices) or None,
                            help=f"{f.help + '; ' if f.help else ''}shortcut for --set {f.key}=…")


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="run config (TOML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set run.seed=3 (repeatable)")


def stage_overrides(args: argparse.Namespace, entry: StageEntry) -> list[str]:
    """--set overrides plus the flags that are shortcuts for config keys."""
    out = list(args.overrides)
    for flag, f in entry.all_flags().items():
        value = getattr(args, _dest(flag))
        if value is not None:
            out.append(f"{f.key}={json.dumps(value, ensure_ascii=False)}")
    return out


def run_stage_command(name: str, args: argparse.Namespace) -> int:
    entry = registry.entry(name)
    cfg = load_config(args.config, stage_overrides(args, entry))
    stage = entry.load()
    summary = stage.run(args.input, args.output, cfg, overwrite=getattr(args, "overwrite", False),
                        quiet=getattr(args, "quiet", False))
    print(summary_table([summary.to_json()]))
    print(f"output: {summary.output}")
    return 0


def _stage_parser_kwargs(entry: StageEntry) -> dict:
    return dict(help=entry.summary, description=entry.summary,
                epilog=f"example: {entry.example}" if entry.example else None)


DESCRIPTION = "LLaVA-OneVision-1.5-style data curation and FSDP2 training, on Ray: stages {}."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ovpipe", description=DESCRIPTION.format(" -> ".join(registry.names())),
        epilog="ovpipe demo --out demo_out runs every stage on seeded demo data; "
               "ovpipe <command> --help describes one command.")
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="show the resolved config")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the resolved config as TOML")
    _add_config_arguments(show)
    show.add_argument("--describe", action="store_true", help="every key with its default and meaning")

    for entry in registry.STAGES:
        add_stage_arguments(sub.add_parser(entry.name, **_stage_parser_kwargs(entry)), entry)

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
    parser.add_argument("--steps", default=None,
                        help=f"comma-separated steps to run (default: all: {','.join(registry.names())})")
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
    if registry.find(args.command):
        return run_stage_command(args.command, args)
    if args.command == "ledger":
        counts = ledger_counts(Location.parse(args.dir))
        print(format_table(["stage", "reason", "count"], [list(r) for r in counts.iter_rows()]))
        print(f"total dropped: {int(counts['count'].sum()):,}")
        return 0
    if args.command == "make-demo-data":
        counts = make_demo_data(args.out, args.n, args.seed)
        print(json.dumps({"out": args.out, "rows_by_source": counts}))
        return 0
    if args.command == "demo":
        start = time.monotonic()
        manifest = run_demo(args.out, args.n, load_config(args.config, args.overrides), args.overwrite)
        print(run_summary_table(manifest))
        print(f"demo finished in {time.monotonic() - start:.1f}s; outputs under {args.out}")
        return 0
    if args.command == "run":
        if args.address:
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


def stage_parser(name: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The arguments of `python -m ray_jobs.<stage>`: the same as `ovpipe <stage>`."""
    entry = registry.entry(name)
    kwargs = _stage_parser_kwargs(entry)
    kwargs.pop("help")
    parser = argparse.ArgumentParser(prog=prog or f"python -m ray_jobs.{name}", **kwargs)
    add_stage_arguments(parser, entry)
    return parser


def stage_main(name: str, argv: list[str] | None = None) -> int:
    """Entry point of `python -m ray_jobs.<stage>`: the same arguments as `ovpipe <stage>`."""
    parser = stage_parser(name)
    args = parser.parse_args(argv)
    return _guarded(name, lambda: run_stage_command(name, args))


if __name__ == "__main__":
    sys.exit(main())
