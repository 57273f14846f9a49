"""The `ovpipe` command line, generated from the stage registry (ovpipe/registry.py).

    ovpipe <stage> --input IN --output OUT [--config run.toml] [--set key=value ...] [--overwrite]

Every registered stage has this shape and is also `python -m ray_jobs.<stage>` with the same
arguments (a `ray job submit` entrypoint); its flags are shortcuts for config keys. Besides the
stages: `ovpipe run` (the whole pipeline), `demo`, `config show`, `ledger`, `make-demo-data`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import textwrap
import time
from typing import Callable

from ovpipe import inspect_output, registry, report, retry
from ovpipe import preflight
from ovpipe.config import Config, describe_defaults, load_config
from ovpipe.console import UserError, guarded
from ovpipe.core.config import ConfigError, to_toml
from ovpipe.core.ledger import ledger_counts
from ovpipe.core.ledger import retry_counts as ledger_retry_counts
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
    if "--input" not in entry.flags:  # a stage of several inputs declares its own (merge)
        parser.add_argument("--input", required=True, help="input folder, file or URI (s3://, gs://)")
    parser.add_argument("--output", required=True, help="output folder or URI")
    _add_config_arguments(parser)
    if entry.run_flags:  # training resumes its own run folder (trainer/launch.py)
        parser.add_argument("--overwrite", action="store_true",
                            help="delete an existing output of this stage and start again")
        parser.add_argument("--quiet", action="store_true", help="no progress lines (errors only)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the input, weights and output, print what would run (and resume), and exit")
    _add_debug_argument(parser)
    for flag, f in entry.all_flags().items():
        parser.add_argument(flag, *f.aliases, dest=_dest(flag), type=f.type, default=None, action=f.action or None,
                            choices=list(f.choices) or None,
                            help=f"{f.help + '; ' if f.help else ''}default: {_default_of(f.key)!r}; "
                                 f"shortcut for --set {f.key}=…")


def _default_of(key: str):
    """A config key's default (``embed.pretrained`` -> 'metaclip_fullcc'), for --help."""
    section, _, name = key.partition(".")
    field = Config.model_fields.get(section)
    model = field.annotation if field is not None else None
    found = getattr(model, "model_fields", {}).get(name)
    return found.default if found is not None else None


def _add_debug_argument(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand's default must not hide `ovpipe --debug <command>`
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="print tracebacks and every line of Ray's and torch's output on the terminal")


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
    input = stage.resolve_input(args.input, cfg)  # merge: several --input, its first source here
    # every check before Ray or a model starts (ovpipe/preflight.py)
    plan = preflight.plan_stage(name, input, args.output, cfg, overwrite=getattr(args, "overwrite", False))
    if getattr(args, "dry_run", False):
        print(plan.line())
        return 0
    summary = stage.run(input, args.output, cfg, overwrite=getattr(args, "overwrite", False),
                        quiet=getattr(args, "quiet", False))
    print(summary_table([summary.to_json()]))
    print(f"output: {summary.output}")
    return 0


def _stage_parser_kwargs(entry: StageEntry) -> dict:
    """--help of a stage, from its registry line: what it reads and writes, its config section,
    what it reads from, an example."""
    reads = preflight._producers(entry)
    description = (f"{entry.summary}.\n\nReads: " + (f"the output of {preflight._ovpipe(reads)}" if reads
                                                      else preflight.raw_kinds(entry))
                   + (f". Config: the [{entry.name}] section (`ovpipe config show --describe`); every flag "
                      "below is a shortcut for one of its keys." if entry.config else "."))
    description = "\n\n".join(textwrap.fill(part, 78) for part in description.split("\n\n"))
    return dict(help=entry.summary, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog=f"example:\n  {entry.example}" if entry.example else None)


DESCRIPTION = "LLaVA-OneVision-1.5-style data curation and FSDP2 training, on Ray: stages {}."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ovpipe", description=textwrap.fill(DESCRIPTION.format(" -> ".join(registry.names())), 78),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  ovpipe demo --out demo_out       every stage on seeded demo data\n"
               "  ovpipe run --config examples/tiny.toml\n"
               "  ovpipe <command> --help          one command, its defaults and an example")
    parser.add_argument("--version", action="version", version=f"ovpipe {_version()}")
    parser.add_argument("--debug", action="store_true",
                        help="print tracebacks and every line of Ray's and torch's output on the terminal")
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="show the resolved config", description="Show the resolved config.",
                            epilog="example: ovpipe config show --config examples/tiny.toml --set run.seed=3")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser(
        "show", help="print the resolved config as TOML",
        description="Print the resolved config (defaults, then --config, then --set) as TOML; with "
                    "--describe, every key with its default and meaning.",
        epilog="example: ovpipe config show --config examples/production.toml --describe")
    _add_config_arguments(show)
    show.add_argument("--describe", action="store_true", help="every key with its default and meaning")

    for entry in registry.STAGES:
        add_stage_arguments(sub.add_parser(entry.name, **_stage_parser_kwargs(entry)), entry)

    for name, module in (("report", report), ("inspect", inspect_output), ("retry", retry)):
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.HELP,
                                            epilog=f"example: {module.EXAMPLE}"))

    ledger = sub.add_parser("ledger", help="counts of dropped samples by stage and reason",
                            description="Counts of dropped samples by stage and reason, from the ledgers "
                                        "(_ledger/) of a stage output or of every stage under a run folder.",
                            epilog="example: ovpipe ledger demo_out")
    ledger.add_argument("dir", help="a stage output, a pipeline output or a demo folder")

    demo_data = sub.add_parser(
        "make-demo-data", help="write synthetic demo input shards",
        description="Write seeded synthetic image-text shards (Parquet and WebDataset tars, with a few "
                    "broken and duplicate images) to a folder.",
        epilog="example: ovpipe make-demo-data --out raw --n 240")
    demo_data.add_argument("out", nargs="?", default=None, help=argparse.SUPPRESS)  # the older spelling
    demo_data.add_argument("--out", dest="out_flag", default=None, help="folder to write (required)")
    demo_data.add_argument("--n", type=int, default=240, help="good rows in total (default: 240)")
    demo_data.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (default: 0)")

    run = sub.add_parser(
        "run", help="the whole pipeline from one config (locally, or submitted to a cluster)",
        description="The whole pipeline from one config, locally or submitted to a Ray cluster: steps "
                    f"{' -> '.join(registry.names())}; a re-run resumes, a new input shard is processed "
                    "incrementally. Everything is checked before the first step starts (--dry-run: only that).",
        epilog="examples:\n  ovpipe run --config examples/tiny.toml --dry-run\n"
               "  ovpipe run --config examples/production.toml --address http://head:8265",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pipeline_arguments(run)
    run.add_argument("--address", default=None,
                     help="submit to this Ray cluster's job server (http://HEAD:8265) and follow the logs")
    run.add_argument("--no-wait", action="store_true", help="with --address: submit and return")

    demo = sub.add_parser("demo", help="make demo data and run every stage on it",
                          description="Make seeded demo data and run every stage on it with tiny seeded "
                                      "models (no downloads), on a local Ray.",
                          epilog="example: ovpipe demo --out demo_out")
    demo.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    demo.add_argument("--n", type=int, default=240, help="good demo rows (default: 240)")
    _add_config_arguments(demo)
    demo.add_argument("--overwrite", action="store_true", help="delete an earlier demo output first")
    for command in (config, show, ledger, demo_data, run, demo):
        _add_debug_argument(command)
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("ovpipe")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", default=None, help="raw input (folder or URI); else pipeline.input")
    parser.add_argument("--output", default=None, help="output root (folder or URI); else pipeline.output")
    parser.add_argument("--run-id", default=None, help="version name; else pipeline.run_id or a hash of config + inputs")
    parser.add_argument("--steps", default=None,
                        help=f"comma-separated steps to run (default: every step of {','.join(registry.names())} "
                             "except optional ones their config section does not enable)")
    _add_config_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="delete earlier outputs of these steps first")
    parser.add_argument("--retry", action="store_true",
                        help="first retry the rows each step's earlier output dropped for a transient reason "
                             "(ovpipe retry), then continue: later steps redo only the shards that changed")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the input, weights and outputs, print the steps (and what would resume), and exit")


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
    plans = preflight.plan_pipeline(cfg, overwrite=args.overwrite)  # before any step starts
    if getattr(args, "dry_run", False):
        print("\n".join(plan.line() for plan in plans))
        return 0
    manifest = run_pipeline(p.input, p.output, cfg, run_id=p.run_id or None, overwrite=args.overwrite,
                            steps=p.steps or None, retry=getattr(args, "retry", False))
    print(run_summary_table(manifest))
    print(f"run {manifest['run_id']} finished in {manifest['seconds']:.1f}s; run manifest: "
          f"{manifest['output'].rstrip('/')}/runs/{manifest['run_id']}.json")
    return 0


def _guarded(prog: str, fn: Callable[[], int], args: argparse.Namespace | None = None) -> int:
    """One line per failure, a log file under the output, Ray's noise filtered, Ctrl-C = exit 130
    (ovpipe/console.py). Commands that only read or print get no log file."""
    command = getattr(args, "command", None) or prog
    works = registry.find(command) is not None or command in ("run", "demo", "pipeline")
    return guarded(prog, command, fn, output=lambda: _output_of(args), debug=bool(getattr(args, "debug", False)),
                   console=works and not getattr(args, "dry_run", False))


def _output_of(args: argparse.Namespace | None) -> str | None:
    """Where the command writes (its log file goes there), once the arguments are known."""
    if args is None:
        return None
    if getattr(args, "command", None) == "demo":
        return args.out
    if getattr(args, "output", None):
        return args.output
    try:  # `ovpipe run` with the output in its config
        return pipeline_config(args).pipeline.output if hasattr(args, "steps") else None
    except Exception:
        return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _guarded("ovpipe", lambda: _dispatch(args), args)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "config":
        if args.describe:
            print(describe_defaults())
        else:
            print(to_toml(load_config(args.config, args.overrides)), end="")
        return 0
    if registry.find(args.command):
        return run_stage_command(args.command, args)
    if args.command == "report":
        return report.main(args)
    if args.command == "inspect":
        return inspect_output.main(args)
    if args.command == "retry":
        return retry.main(args)
    if args.command == "ledger":
        _refuse_non_output(args.dir)
        counts = ledger_counts(Location.parse(args.dir))
        print(format_table(["stage", "reason", "count"], [list(r) for r in counts.iter_rows()]))
        print(f"total dropped: {int(counts['count'].sum()):,}")
        retried = ledger_retry_counts(Location.parse(args.dir))
        if retried.height:  # `ovpipe retry`: per reason, rows retried, recovered, still failing
            print(format_table(list(retried.columns), [list(r) for r in retried.iter_rows()]))
        return 0
    if args.command == "make-demo-data":
        out = args.out_flag or args.out
        if not out:
            raise UserError("make-demo-data: where to? pass --out FOLDER (e.g. --out raw)")
        counts = make_demo_data(out, args.n, args.seed)
        print(json.dumps({"out": out, "rows_by_source": counts}))
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


def _refuse_non_output(path: str) -> None:
    """`ovpipe ledger` reads ovpipe outputs only: anything else is a mistake, not "0 dropped"."""
    loc = Location.parse(path)
    if not loc.exists():
        raise UserError(f"ledger: {loc.uri()!r} does not exist; pass a stage output, a pipeline output or a demo "
                        "folder (e.g. ovpipe ledger demo_out)")
    if loc.join("_manifest", "_stage.json").exists() or loc.join("runs").is_dir():  # a stage or a pipeline output
        return
    import pyarrow.fs as pafs

    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True)) \
        if loc.is_dir() else []
    if not any(i.path.endswith("/_manifest/_stage.json") for i in infos):
        raise UserError(f"ledger: {loc.uri()!r} is not an ovpipe output (no _manifest/_stage.json in it or below); "
                        "pass a stage output, a pipeline output or a demo folder (e.g. ovpipe ledger demo_out)")


def pipeline_main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m ray_jobs.pipeline`: the same arguments as `ovpipe run`."""
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.pipeline", description="the whole pipeline")
    add_pipeline_arguments(parser)
    args = parser.parse_args(argv)
    return _guarded("pipeline", lambda: run_pipeline_command(args), args)


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
    args.command = name
    return _guarded(name, lambda: run_stage_command(name, args), args)


if __name__ == "__main__":
    sys.exit(main())
