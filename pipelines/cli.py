"""The `vitok` command: the DAG through Prefect, one stage without Prefect, one stage as a Ray job,
the Prefect deployments, the state of a run root, and configs.

    vitok run [--preset P | --config F] [--stages S ...] [--force S ...] [key=value ...]
    vitok stage NAME [--preset P] [--force] [key=value ...]
    vitok submit NAME --address http://HEAD:8265 [--preset P] [key=value ...]
    vitok serve
    vitok status [RUN_ROOT]
    vitok index OUTPUT
    vitok study [--preset cpu_study] [--out docs] [--data .data/study] [key=value ...]
    vitok config show [--preset P] [key=value ...]

Every command checks what it can before any Ray or Prefect work (the config, the ingest source, the first
stage's inputs). An expected failure (one of those, no cluster at the address, a failed Ray job, Ctrl-C or
SIGTERM) ends in one line on stderr and a non-zero exit code; `--debug` adds its traceback. SIGTERM is
handled like Ctrl-C: a Ray job the command is waiting on is stopped before it exits.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import signal
import sys
import traceback
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vitok_core.config import VitokConfig

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback-only local Ray (see jobs/common.py)
# Prefect state of local runs stays in the project (no server: Prefect starts a temporary one); its
# telemetry job can lock the SQLite database, so it is off.
os.environ.setdefault("PREFECT_HOME", os.path.abspath(".prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # 20 s is short on a busy 2-core box

EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM
say = functools.partial(print, flush=True)  # a streamed job log reaches a pipe (tee, a log file) as it comes


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt so that the same cleanup runs (the Ray job being
    waited on is stopped, a Prefect flow run is marked crashed) instead of the process just vanishing."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # A second SIGTERM kills at once: the first one's cleanup may be stuck on a cluster that stopped answering.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated()


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


@contextlib.contextmanager
def _temporary_prefect_server() -> Iterator[None]:
    """Stop the temporary Prefect server that a flow run without PREFECT_API_URL starts, when the flow ends
    rather than at exit: its "Stopping temporary server" log line then comes before the command's last line
    (the results, or the one-line error) instead of after it. A server already running (a test harness's) is
    left alone."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the instance Prefect's client starts on first use (one per process)
    ours = not server.running
    try:
        yield
    finally:
        if ours and server.running:
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            # What is still queued for the API goes first, or it fails against the stopped server at exit.
            APILogWorker.drain_all(timeout=30)
            EventsWorker.drain_all(timeout=30)
            server.stop()


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines import stages
    from pipelines.cluster import connect
    from pipelines.paths import for_cluster

    source = _source(args)
    selected = stages.check_stages(args.stages or list(stages.STAGES))
    stages.check_stages(args.force or [], "force")
    # The flow repeats these checks (a deployment starts it without this command). Here they come before
    # Prefect starts its temporary server, so a bad config or a missing source costs a second and one line,
    # not a server start and a flow run's traceback.
    cfg = stages.preflight(source, stages.resolve_overrides(source, args.overrides), selected)
    # Cluster mode: relative paths made absolute (or refused, in one line) here rather than in the flow, so
    # that the flow run's parameters show where the Ray jobs write.
    overrides = for_cluster(source, args.overrides, say)
    if cfg.orchestrate.mode == "cluster":
        connect(cfg.orchestrate.address)  # no cluster at the address: one line now, not a failed flow run
    from pipelines.flows import full_pipeline

    with _temporary_prefect_server():
        results = full_pipeline(source, overrides, args.stages or None, args.force or [])
    for stage, manifest in results.items():
        print(f"{stage:14s} {'skipped' if manifest.get('skipped') else 'ran':8s} {manifest.get('output')}")
    _print_evaluation(results)
    return 0


def _prepare(stage: str, source: str, overrides: list[str]) -> tuple[list[str], VitokConfig]:
    """(overrides, config) of one stage after every check that needs no cluster: the stage name, the config,
    the ingest source (the demo photos where the preset allows them) and the stage's inputs; in cluster mode,
    relative paths are then made absolute (or refused: see pipelines.paths), so that the output printed is
    where the job writes."""
    from pipelines import stages
    from pipelines.paths import for_cluster
    from vitok_core.config import load_config

    stages.check_stages([stage], "stage")
    overrides = stages.resolve_overrides(source, overrides)
    stages.preflight(source, overrides, [stage])
    overrides = for_cluster(source, overrides, say)
    if stage == "evaluate":
        overrides = stages.with_samples(load_config(source, overrides), overrides)
    return overrides, load_config(source, overrides)


def cmd_stage(args: argparse.Namespace) -> int:
    from pipelines import stages

    overrides, cfg = _prepare(args.name, _source(args), args.overrides)
    if args.force:
        stages.force_rerun(args.name, cfg)
    if cfg.orchestrate.mode == "cluster":
        return _submit(args.name, _source(args), overrides, cfg)
    manifest = stages.run_local(args.name, cfg)
    print(f"{args.name}: {manifest.get('output')}")
    _print_evaluation({args.name: manifest} if args.name == "evaluate" else {})
    return 0


def _submit(stage: str, source: str, overrides: list[str], cfg: VitokConfig) -> int:
    from pipelines import stages
    from pipelines.cluster import run_on_cluster

    out = stages.planned_output(stage, cfg)
    key = out.rstrip("/").rsplit("/", 1)[-1]
    run_on_cluster(stage, key, stages.entrypoint(stage, source, overrides), cfg, say)
    say(f"{stage}: {out}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    cluster = ["orchestrate.mode=cluster", f"orchestrate.address={args.address}"]
    overrides, cfg = _prepare(args.name, _source(args), [*args.overrides, *cluster])
    return _submit(args.name, _source(args), overrides, cfg)


def cmd_serve(args: argparse.Namespace) -> int:
    from pipelines.deploy import serve

    serve()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from pipelines.stages import status
    from vitok_core.fingerprint import changed_text

    rows = status(args.root)
    if not rows:
        print(f"no stage outputs under {args.root}")
        return 0
    for row in rows:
        state = "done" if row["done"] else "incomplete"
        found = row["code"] or {"state": "-"}  # the code that made a done output: current, stale or unknown
        code = "code:" + (found["state"].upper() if found["state"] == "stale" else found["state"])
        details = " | ".join(x for x in (row["config"], row["summary"]) if x)
        print(f"{row['stage']:14s} {row['key']}  {state:10s} {code:13s} {row['written'] or '-':16s}  {details}")
        if found["state"] == "stale":
            changed = changed_text(found["changed"])
            print(f"  stale: made by code {found['recorded']}, this checkout is {found['current']}; changed: {changed}")
            print(f"  rerun, with the preset and key=value overrides that made it: {found['rerun']}")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from vitok_core.row_index import index_output

    info = index_output(args.output, threads=args.threads)
    print(
        f"wrote {info['index']}: {info['stage']} output, {info['files']} files, {info['row_groups']} row groups, "
        f"{info['rows']} rows, {info['runs']} index rows ({info['seconds']:.1f} s)"
    )
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from vitok_core.config import load_config

    source = args.config or args.preset or "cpu_study"
    load_config(source, args.overrides)  # a bad key fails here, before downloads and Prefect
    from pipelines.study import study_flow

    with _temporary_prefect_server():
        result = study_flow(source, list(args.overrides), args.out, args.data)
    print(f"study report: {result['report']}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from vitok_core.config import describe, load_config

    print(describe(load_config(_source(args), args.overrides)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    # --debug on every subcommand too (`vitok run --debug`); SUPPRESS keeps a subcommand's default from
    # overwriting `vitok --debug run`.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="tracebacks of errors")
    parser = argparse.ArgumentParser(prog="vitok", description=__doc__.splitlines()[0], parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", parents=[common], help="the whole DAG (or --stages) through Prefect")
    _preset_args(run)
    run.add_argument("--stages", nargs="+", help="run only these stages (their inputs must exist)")
    run.add_argument("--force", nargs="+", help="rerun these stages even when done")
    run.set_defaults(func=cmd_run)
    stage = sub.add_parser("stage", parents=[common], help="one stage, without Prefect (local, or cluster by config)")
    stage.add_argument("name")
    _preset_args(stage)
    stage.add_argument("--force", action="store_true", help="rerun even when done")
    stage.set_defaults(func=cmd_stage)
    submit = sub.add_parser("submit", parents=[common], help="one stage as a Ray job on a cluster")
    submit.add_argument("name")
    submit.add_argument("--address", required=True, help="Ray Jobs API, e.g. http://HEAD:8265")
    _preset_args(submit)
    submit.set_defaults(func=cmd_submit)
    serve = sub.add_parser("serve", parents=[common], help="serve the Prefect deployments (needs a Prefect server)")
    serve.set_defaults(func=cmd_serve)
    status = sub.add_parser("status", parents=[common], help="what is done under a run root, when, with what config")
    status.add_argument("root", nargs="?", default="runs")
    status.set_defaults(func=cmd_status)
    index = sub.add_parser(
        "index",
        parents=[common],
        help="write index.parquet (the row-group index readers plan from) for an ingest or cache_latents "
        "output written before outputs had one, from its data files' footers",
    )
    index.add_argument("output", help="the output directory: runs/ingest/<key>, s3://bucket/runs/ingest/<key>, ...")
    index.add_argument("--threads", type=int, default=16, help="data files read at a time (default 16)")
    index.set_defaults(func=cmd_index)
    study = sub.add_parser(
        "study", parents=[common], help="the CPU training study (~90 min): both arms, evaluation, results.md"
    )
    _preset_args(study)
    study.add_argument("--out", default="docs", help="where results.md and results/*.png go (default docs)")
    study.add_argument("--data", default=".data/study", help="photos, crops and held-out set (default .data/study)")
    study.set_defaults(func=cmd_study)
    config = sub.add_parser("config", parents=[common], help="configs")
    config_sub = config.add_subparsers(dest="action", required=True)
    show = config_sub.add_parser("show", parents=[common], help="the resolved config, its hash and parameter counts")
    _preset_args(show)
    show.set_defaults(func=cmd_config)
    return parser


class _NoTracebacks(logging.Formatter):
    """Log records without their tracebacks: Prefect logs a failed task's and flow's traceback at ERROR,
    which would bury the one line the command ends with. The record itself is left as it was, for other
    handlers (Prefect's API handler sends the traceback to the UI)."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _setup_logging(debug: bool) -> None:
    fmt = "%(asctime)s %(name)s %(levelname)s %(message)s"
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(fmt) if debug else _NoTracebacks(fmt))
    logging.basicConfig(level=logging.INFO, handlers=[handler])  # a no-op where logging is set up already
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise


def expected_error(err: BaseException) -> tuple[str, int] | None:
    """(one-line message, exit code) of an error the user caused or can fix; None for anything else, whose
    traceback is then shown as usual (a bug)."""
    from pipelines.cluster import JobFailed
    from vitok_core.config import ConfigError

    if isinstance(err, Terminated):
        return "terminated (SIGTERM)", EXIT_TERMINATED
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (Ctrl-C)", EXIT_INTERRUPTED
    if isinstance(err, ConfigError):
        return f"config error: {err}", 1
    if isinstance(err, (FileNotFoundError, ValueError, ConnectionError, JobFailed)):
        return f"{type(err).__name__}: {err}", 1
    return None


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    # key=value overrides may come before or after the options (argparse alone fills the positional list
    # from the first run of positionals only).
    args, extra = parser.parse_known_args(argv)
    unknown = [x for x in extra if x.startswith("-") or "=" not in x]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*getattr(args, "overrides", []), *extra]
    for name in ("stages", "force"):  # `--stages ingest k=v`: nargs="+" takes k=v too, and no stage has a "="
        values = getattr(args, name, None)
        if isinstance(values, list) and any("=" in v for v in values):
            setattr(args, name, [v for v in values if "=" not in v])
            args.overrides = [*args.overrides, *(v for v in values if "=" in v)]
            if not getattr(args, name):
                parser.error(f"--{name} needs at least one stage name")
    debug = getattr(args, "debug", False)
    _setup_logging(debug)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    # Ctrl-C raises KeyboardInterrupt even when the parent started us with SIGINT ignored (a shell's
    # background job does that), so that the same cleanup stops the Ray job.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = args.func(args)
    except BaseException as err:
        expected = expected_error(err)
        if expected is None:
            raise
        message, code = expected
        if debug:
            traceback.print_exc()
        print(f"vitok {args.command}: {message}", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    sys.exit(code)


if __name__ == "__main__":
    main()
