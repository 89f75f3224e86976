"""A stage as a Ray job on a cluster, through the Ray Jobs API (`JobSubmissionClient`), free of Prefect.

The submission id is `vitok-<stage>-<key>-<attempt>`: a retry of the same stage finds the job it already
submitted and attaches to it (while it is pending or running) instead of starting a twin; once an attempt
has ended, the next one gets the next number. Logs are polled and handed to a
callback line by line; `should_stop` lets the caller (a Prefect task watching for cancellation) stop
the job, which is also stopped when the waiting process is interrupted (Ctrl-C, or SIGTERM once the `vitok`
command has turned it into an exception). `cluster_is_here` tells whether every node of a cluster is this
machine: what orchestrate.shared_filesystem=auto means (see pipelines/paths.py).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import time
from collections.abc import Callable
from typing import Any

from vitok_core.config import VitokConfig

# Left out of an uploaded working_dir: environments, data caches, local runs (Ray also skips .gitignore'd files).
EXCLUDES = [".venv", ".data", "runs", ".git", "benchmarks/results", "**/__pycache__"]
_ACTIVE = ("PENDING", "RUNNING")
AGENT_WAIT_S = 120.0  # how long a submission waits for a starting cluster's job agent
MAX_NODES = 10_000  # nodes asked of the state API, dead ones included: the most its server returns


class JobFailed(RuntimeError):
    """A stage's Ray job ended in a state other than SUCCEEDED; the message says how to read its log."""


def connect(address: str) -> Any:
    """A Jobs API client for `address`; a ConnectionError naming the setting when nothing answers there
    (Ray's own message names the address only)."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except ConnectionError as err:
        raise ConnectionError(
            f"no Ray Jobs API answers at {address} (orchestrate.address, or --address of vitok submit): is the "
            "cluster up and its dashboard port reachable?"
        ) from err


def this_machine() -> set[str]:
    """The IP addresses a Ray node started on this machine could report as its node IP (loopback addresses
    aside): those of its host name, and that of its default route, which is how Ray picks a node IP."""
    found: set[str] = set()
    with contextlib.suppress(OSError):
        found |= {str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None)}
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("8.8.8.8", 80))  # UDP: nothing is sent, the kernel only picks the outgoing interface
        found.add(probe.getsockname()[0])
    return found


def is_this_machine(ip: str, here: set[str]) -> bool:
    """Whether a node IP is this machine: a loopback address, or one of `here` (see `this_machine`)."""
    try:
        return ipaddress.ip_address(ip).is_loopback or ip in here
    except ValueError:  # not an IP address
        return False


def cluster_is_here(address: str) -> tuple[bool, list[str]]:
    """(whether every alive node of the cluster at `address` runs on this machine, the nodes' IPs).

    Nodes added later by an autoscaler are not seen: such a cluster needs orchestrate.shared_filesystem set."""
    from ray.util.state import list_nodes

    connect(address)  # nothing answers: the ConnectionError naming the setting
    try:
        # Every node the GCS remembers, filtered here: with a server-side state filter, Ray 2.60 counts the
        # nodes left out (dead ones) as truncated output and raises, so a cluster that ever lost a node failed.
        nodes = [n for n in list_nodes(address=address, limit=MAX_NODES) if n.state == "ALIVE"]
    except Exception as err:  # the state API can fail where the Jobs API works (auth, an old dashboard)
        first = (str(err).splitlines() or [""])[0]
        raise ConnectionError(
            f"cannot list the nodes of the cluster at {address} to decide orchestrate.shared_filesystem=auto "
            f"({type(err).__name__}: {first}): set it to true or false"
        ) from err
    ips = sorted({node.node_ip for node in nodes})
    here = this_machine()
    return bool(ips) and all(is_this_machine(ip, here) for ip in ips), ips


def runtime_env(cfg: VitokConfig) -> dict[str, Any]:
    o = cfg.orchestrate
    env: dict[str, Any] = {}
    if o.working_dir:
        env["working_dir"] = o.working_dir
        env["excludes"] = EXCLUDES
    if o.image:
        env["image_uri"] = o.image
    return env


def _status(client: Any, submission_id: str) -> str | None:
    try:
        return str(client.get_job_status(submission_id).value)
    except Exception as err:  # the Jobs API answers an unknown id with an error
        if "does not exist" in str(err) or "not found" in str(err).lower():
            return None
        raise


def submit_or_attach(client: Any, stage: str, key: str, command: str, cfg: VitokConfig) -> tuple[str, bool]:
    """(submission id, attached): the running attempt of this stage and key, else a new submission."""
    attempt = 0
    while True:
        submission_id = f"vitok-{stage}-{key}-{attempt}"
        status = _status(client, submission_id)
        if status is None:
            break
        if status in _ACTIVE:
            return submission_id, True
        attempt += 1  # ended (the caller found the artifact incomplete: failed, stopped, paused or forced)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            client.submit_job(
                entrypoint=command,
                submission_id=submission_id,
                runtime_env=runtime_env(cfg),
                entrypoint_num_cpus=cfg.orchestrate.entrypoint_cpus,
                entrypoint_num_gpus=cfg.orchestrate.entrypoint_gpus,
                metadata={"vitok_stage": stage, "vitok_key": key},
            )
            return submission_id, False
        except RuntimeError as err:  # a fresh cluster answers before its job agent is up
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def wait(
    client: Any,
    submission_id: str,
    log: Callable[[str], None],
    should_stop: Callable[[], bool] = lambda: False,
    poll_s: float = 2.0,
) -> str:
    """Stream the job's logs until it ends; returns its final status. Stops the job when `should_stop()`
    says so or when this process is interrupted (KeyboardInterrupt, a termination signal)."""
    shown = 0
    try:
        while True:
            status = _status(client, submission_id)
            logs = client.get_job_logs(submission_id)
            for line in logs[shown:].splitlines():
                log(line)
            shown = len(logs)
            if status not in _ACTIVE:
                return str(status)
            if should_stop():
                client.stop_job(submission_id)
                log(f"stopped Ray job {submission_id} (the flow run was cancelled)")
            time.sleep(poll_s)
    except BaseException:
        if _status(client, submission_id) in _ACTIVE:
            client.stop_job(submission_id)
            log(f"stopped Ray job {submission_id} (the waiting process was interrupted)")
        raise


def failure(client: Any, submission_id: str, status: str, address: str) -> JobFailed:
    """The one-line error of a job that did not succeed: its status, the first line of Ray's message (the
    exit code, or why it never started) and the command that prints its whole log."""
    message = (client.get_job_info(submission_id).message or "").strip().splitlines()
    # Ray's first line goes on with ", last available logs (truncated ...):": the command below prints them.
    reason = f": {message[0].split(', last available logs')[0]}" if message else ""
    return JobFailed(
        f"Ray job {submission_id} ended {status}{reason}; its log: ray job logs {submission_id} --address {address}"
    )


def run_on_cluster(
    stage: str,
    key: str,
    command: str,
    cfg: VitokConfig,
    log: Callable[[str], None],
    should_stop: Callable[[], bool] = lambda: False,
) -> str:
    """Submit (or attach to) the stage's Ray job and wait for it; returns the submission id. Raises
    ConnectionError when no cluster answers at orchestrate.address, JobFailed when the job does not succeed.

    An interrupt during the submission request itself can leave the new job running: the next run of the
    same stage and key attaches to it rather than starting a twin."""
    client = connect(cfg.orchestrate.address)
    submission_id, attached = submit_or_attach(client, stage, key, command, cfg)
    log(f"{'attached to' if attached else 'submitted'} Ray job {submission_id}: {command}")
    status = wait(client, submission_id, log, should_stop, cfg.orchestrate.poll_s)
    if status != "SUCCEEDED":
        raise failure(client, submission_id, status, cfg.orchestrate.address)
    return submission_id
