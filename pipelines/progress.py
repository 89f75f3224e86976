"""A local stage's progress in its Prefect flow run's log (cluster mode streams the Ray job's log there instead).

In local mode a stage runs in the Prefect task's own process, but its training step lines are logged by Ray Train
worker processes: Prefect never sees them (Ray prints them to the terminal). Two things bring them to the run log:
- `watch` polls the run's progress.json (written by rank 0 at every logged step: jobs.train_common.Progress) from a
  thread and logs each new step with its loss, tokens/s and ETA; a file works the same on local disk and S3, for
  any number of workers and across worker restarts, where forwarding worker log records would depend on Ray's
  log plumbing;
- `forward` sends the records of the `vitok.*` loggers of this process (the stage drivers: counts, resumes,
  where the output went) to the run's log as well.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import fsspec

from vitok_core.artifacts import join

PROGRESS = "progress.json"  # jobs.train_common.PROGRESS (not imported: that module imports torch)


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_line(progress: dict[str, Any]) -> str:
    """`train_ae: step 40/100, loss 0.1234, 5210 tok/s, ETA 1m05s` from a progress.json dict."""
    parts = [f"step {progress['step']}/{progress['stop']}"]
    if progress.get("stop") != progress.get("total"):
        parts[0] += f" (of {progress['total']})"  # train.stop_at_step pauses this run early
    if isinstance(progress.get("loss"), (int, float)):
        parts.append(f"loss {progress['loss']:.4g}")
    if isinstance(progress.get("tokens_per_s"), (int, float)):
        parts.append(f"{progress['tokens_per_s']:.0f} tok/s")
    parts.append(f"ETA {format_eta(progress.get('eta_s'))}")
    return f"{progress.get('stage', '?')}: " + ", ".join(parts)


def read_progress(fs: Any, path: str) -> dict[str, Any] | None:
    """The progress file, or None while there is none or it is being rewritten (a partial JSON is read as
    None: the next poll gets the whole file)."""
    try:
        return json.loads(fs.cat_file(path))  # cat_file reads the object itself: no cached listing on S3
    except (FileNotFoundError, ValueError):
        return None


@contextlib.contextmanager
def watch(out: str, log: Callable[[str], None], every_s: float = 30.0) -> Iterator[None]:
    """While the body runs, log the newest step of `out`/progress.json every `every_s` seconds (30: a line per
    half minute keeps a days-long run's log readable; the terminal has every step), and once more when it ends,
    so the last step is logged however short the run. A progress file left by an earlier session of the same run
    is not repeated as news."""
    fs, path = fsspec.core.url_to_fs(join(out, PROGRESS))
    stop = threading.Event()
    start = read_progress(fs, path)
    seen = {"time": start.get("time") if start else None}

    def poll() -> None:
        progress = read_progress(fs, path)
        if progress is not None and progress.get("time") != seen["time"]:
            seen["time"] = progress.get("time")
            log(progress_line(progress))

    def loop() -> None:
        while not stop.wait(every_s):
            try:
                poll()
            except Exception as err:  # a watcher must never stop the stage it watches (a flaky S3 read, say)
                logging.getLogger(__name__).debug("progress poll of %s failed: %s", out, err)

    thread = threading.Thread(target=loop, name=f"progress {out}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=every_s + 30)
        with contextlib.suppress(Exception):
            poll()


def run_log_handler() -> logging.Handler:
    """A handler that sends records to the current Prefect task run's log (Prefect's API only: where logging is
    configured, `vitok run` for one, the terminal shows the records already). The run ids are set on every record,
    so that records logged by any thread of the stage land in this task run."""
    from prefect.context import TaskRunContext
    from prefect.logging.handlers import APILogHandler

    run = TaskRunContext.get().task_run
    handler = APILogHandler(logging.INFO)

    def add_run_ids(record: logging.LogRecord) -> bool:
        record.flow_run_id, record.task_run_id = run.flow_run_id, run.id
        return True

    handler.addFilter(add_run_ids)
    return handler


@contextlib.contextmanager
def forward(handler: logging.Handler, name: str = "vitok") -> Iterator[None]:
    """Hand INFO and above of logger `name` (and its children) to `handler` too while the body runs. The logger is
    set to INFO meanwhile where it is not already: unconfigured, it would inherit the root's WARNING and drop the
    drivers' INFO lines."""
    source = logging.getLogger(name)
    level = source.level
    source.addHandler(handler)
    if source.getEffectiveLevel() > logging.INFO:
        source.setLevel(logging.INFO)
    try:
        yield
    finally:
        source.removeHandler(handler)
        source.setLevel(level)
