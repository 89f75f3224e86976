"""Plumbing shared by every job entrypoint: the command line and joining or starting Ray."""

from __future__ import annotations

import argparse
import gc
import logging
import os
from typing import Any

from tqdm import tqdm

from vitok_core.config import ConfigError, VitokConfig, load_config

# Without this Ray binds its ports on every interface; with it the node IP is 127.0.0.1. It must be in
# the environment before Ray is imported; a cluster started with `ray start` is not affected.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# Credentials and endpoints reach Ray workers through the environment, never through config files.
_FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
)


def parse_config(description: str, argv: list[str] | None = None) -> VitokConfig:
    """`--config PRESET|FILE [key=value ...]` -> a validated config; exits with the bad key before any work."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="tiny", help="preset name (configs/) or YAML path")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. ingest.source=DIR")
    args = parser.parse_args(argv)
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as err:
        parser.exit(2, f"config error: {err}\n")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start a loopback-only local Ray."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # passing resources when joining a cluster is an error
        return
    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    # address="local": a new local Ray even when `ray start` (or a test cluster) left its address in
    # /tmp/ray/ray_current_cluster, which a bare ray.init() would join.
    ray.init(
        address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": env} if env else None
    )


def map_with_actors(
    items: list[dict[str, Any]],
    actor: type,
    constructor_kwargs: dict[str, Any],
    *,
    actors: int,
    cpus_per_actor: float,
    use_gpu: bool,
    desc: str,
    total: int,
    done: int = 0,
) -> list[dict[str, Any]]:
    """Run one call of a pool of `actor` instances per item (Ray Data map_batches with batch size 1 and an
    ActorPoolStrategy: each actor loads its models once) and return the rows the calls produce.

    A failure is raised as RuntimeError outside any except block, after a garbage collection: Ray Data shuts
    a dataset's executor and its actor pool down when the dataset is collected, and until then the actors
    hold their CPUs, so a traceback that keeps the dataset alive would make a rerun in this process wait
    forever."""
    if not items:
        return []
    import ray
    from ray.data import ActorPoolStrategy

    ray.data.DataContext.get_current().op_resource_reservation_enabled = False  # see jobs/ingest.py
    rows: list[dict[str, Any]] = []
    failure = None
    try:
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(
            actor,
            batch_size=1,
            compute=ActorPoolStrategy(size=min(actors, len(items))),
            fn_constructor_kwargs=constructor_kwargs,
            num_gpus=1 if use_gpu else 0,
            num_cpus=cpus_per_actor,
        )
        with tqdm(total=total, initial=done, unit="task", desc=desc) as bar:
            for row in ds.iter_rows():
                rows.append(row)
                bar.update(1)
    except Exception as err:
        logging.getLogger(f"vitok.{desc}").exception("%s failed", desc)
        failure = f"{desc} failed: {type(err).__name__}: {err}"
    if failure is not None:
        gc.collect()
        raise RuntimeError(failure)
    return rows


def fail_once(out: str, name: str, message: str) -> None:
    """Raise RuntimeError(message) the first time only: a marker file under the output's staging area
    remembers that the fault fired, so the rerun of a drill goes through."""
    import fsspec

    from vitok_core.artifacts import join

    fs, path = fsspec.core.url_to_fs(join(out, "_staging", "faults", name))
    if not fs.exists(path):
        fs.makedirs(os.path.dirname(path), exist_ok=True)
        fs.touch(path)
        raise RuntimeError(message)


def retry_transient_tasks(io: Any) -> None:
    """Make Ray Data retry, `io.task_retries` times, a map task (or actor task) that failed with a TransientIOError:
    a read that outlived its own retries (vitok_core/io_retry.py). Any other error still fails the task at once.
    Set on the driver before the datasets are built (they take the DataContext with them)."""
    import ray

    from vitok_core.io_retry import TRANSIENT_MARK

    context = ray.data.DataContext.get_current()
    context.retried_map_errors = [TRANSIENT_MARK] if io.task_retries > 0 else False
    context.max_map_retries = int(io.task_retries)
