"""The `vitok` command: the DAG through Prefect, one stage without Prefect, one stage as a Ray job,
the Prefect deployments, the state of a run root, and configs.

    vitok run [--preset P | --config F] [--stages S ...] [--force S ...] [key=value ...]
    vitok stage NAME [--preset P] [--force] [key=value ...]
    vitok submit NAME --address http://HEAD:8265 [--preset P] [key=value ...]
    vitok serve
    vitok status [RUN_ROOT]
    vitok config show [--preset P] [key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback-only local Ray (see jobs/common.py)
# Prefect state of local runs stays in the project (no server: Prefect starts a temporary one); its
# telemetry job can lock the SQLite database, so it is off.
os.environ.setdefault("PREFECT_HOME", os.path.abspath(".prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # 20 s is short on a busy 2-core box


def _preset_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--preset", default=None, help="preset name in configs/ (default: tiny)")
    group.add_argument("--config", default=None, help="a YAML config file")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")


def _source(args: argparse.Namespace) -> str:
    return args.config or args.preset or "tiny"


def _print_evaluation(results: dict[str, Any]) -> None:
    evaluation = results.get("evaluate")
    if not evaluation:
        return
    print(f"evaluation report: {evaluation['report']}")
    for row in evaluation.get("headline", []):
        values = [(k, row.get(k)) for k in ("setting", "images", "psnr", "ssim", "rfid") if row.get(k) is not None]
        print("  " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values))


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.flows import full_pipeline

    results = full_pipeline(_source(args), args.overrides, args.stages or None, args.force or [])
    for stage, manifest in results.items():
        print(f"{stage:14s} {'skipped' if manifest.get('skipped') else 'ran':8s} {manifest.get('output')}")
    _print_evaluation(results)
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from pipelines import stages
    from vitok_core.config import load_config

    stages.check_stages([args.name], "stage")
    overrides = stages.resolve_overrides(_source(args), args.overrides)
    if args.name == "evaluate":
        overrides = stages.with_samples(load_config(_source(args), overrides), overrides)
    cfg = load_config(_source(args), overrides)
    if args.force:
        stages.force_rerun(args.name, cfg)
    if cfg.orchestrate.mode == "cluster":
        return _submit(args.name, _source(args), overrides)
    manifest = stages.run_local(args.name, cfg)
    print(f"{args.name}: {manifest.get('output')}")
    _print_evaluation({args.name: manifest} if args.name == "evaluate" else {})
    return 0


def _submit(stage: str, source: str, overrides: list[str]) -> int:
    from pipelines import stages
    from pipelines.cluster import run_on_cluster
    from vitok_core.config import load_config

    cfg = load_config(source, overrides)
    out = stages.planned_output(stage, cfg)
    key = out.rstrip("/").rsplit("/", 1)[-1]
    run_on_cluster(stage, key, stages.entrypoint(stage, source, overrides), cfg, print)
    print(f"{stage}: {out}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pipelines import stages

    stages.check_stages([args.name], "stage")
    overrides = [*args.overrides, "orchestrate.mode=cluster", f"orchestrate.address={args.address}"]
    return _submit(args.name, _source(args), overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    from pipelines.deploy import serve

    serve()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from pipelines.stages import status

    rows = status(args.root)
    if not rows:
        print(f"no stage outputs under {args.root}")
        return 0
    for row in rows:
        print(f"{row['stage']:14s} {row['key']}  {'done' if row['done'] else 'incomplete':10s} {row['summary']}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from vitok_core.config import describe, load_config

    print(describe(load_config(_source(args), args.overrides)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitok", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the whole DAG (or --stages) through Prefect")
    _preset_args(run)
    run.add_argument("--stages", nargs="+", help="run only these stages (their inputs must exist)")
    run.add_argument("--force", nargs="+", help="rerun these stages even when done")
    run.set_defaults(func=cmd_run)
    stage = sub.add_parser("stage", help="one stage, without Prefect (local, or cluster by config)")
    stage.add_argument("name")
    _preset_args(stage)
    stage.add_argument("--force", action="store_true", help="rerun even when done")
    stage.set_defaults(func=cmd_stage)
    submit = sub.add_parser("submit", help="one stage as a Ray job on a cluster")
    submit.add_argument("name")
    submit.add_argument("--address", required=True, help="Ray Jobs API, e.g. http://HEAD:8265")
    _preset_args(submit)
    submit.set_defaults(func=cmd_submit)
    serve = sub.add_parser("serve", help="serve the Prefect deployments (needs a Prefect server)")
    serve.set_defaults(func=cmd_serve)
    status = sub.add_parser("status", help="which stages are done under a run root")
    status.add_argument("root", nargs="?", default="runs")
    status.set_defaults(func=cmd_status)
    config = sub.add_parser("config", help="configs")
    config_sub = config.add_subparsers(dest="action", required=True)
    show = config_sub.add_parser("show", help="the resolved config, its hash and parameter counts")
    _preset_args(show)
    show.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> None:
    from vitok_core.config import ConfigError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise
    parser = build_parser()
    # key=value overrides may come before or after the options (argparse alone fills the positional list
    # from the first run of positionals only).
    args, extra = parser.parse_known_args(argv)
    unknown = [x for x in extra if x.startswith("-") or "=" not in x]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*getattr(args, "overrides", []), *extra]
    try:
        sys.exit(args.func(args))
    except (ConfigError, FileNotFoundError, ValueError) as err:
        sys.exit(f"vitok {args.command}: {type(err).__name__}: {err}")


if __name__ == "__main__":
    main()
