"""The fault drill of a Ray Train job on a real multi-node cluster (tests/ray_cluster.py), shared by the
train_ae and train_flow tests.

The job runs as its own driver process against the cluster, as under `ray job submit`. While it runs, the
drill (1) SIGKILLs one training worker process, found through Ray's state API, once Ray Train has
registered the checkpoint of step `kill_worker_past` and the run is past it; (2) once the restarted run is
past a registered `kill_node_past`, kills a whole worker node that hosts a training worker; (3) the job's
own `kill_in_checkpoint_at_step` fault makes a rank SIGKILL itself halfway through uploading that
checkpoint. Ray Train restarts the worker group after each.

A checkpoint counts once Ray Train's controller has registered it (every rank's report taken; it polls
every 2 s): a fault in between restarts from the one before, which the assertions allow for.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import fsspec

from jobs.train_common import PROGRESS, read_starts
from tests.ray_cluster import REPO, LocalCluster, ray_env
from vitok_core.artifacts import join


@dataclass
class Drill:
    output: str
    returncode: int
    wall_s: float
    log: str
    faults: list[dict] = field(default_factory=list)  # {"kind", "step" (last logged), "time"}
    starts: list[dict] = field(default_factory=list)  # the run's own records: {"step", "checkpoint", "time"}
    # (time, step) each time Ray Train's controller registered a checkpoint (its snapshot in the run directory)
    registered: list[tuple[float, int]] = field(default_factory=list)

    def registered_at(self, at: float) -> int:
        """The newest checkpoint step Ray Train had registered at time `at` (0: none)."""
        return max([step for t, step in self.registered if t <= at], default=0)

    def start_after(self, at: float) -> dict:
        """The first worker-group start after time `at`."""
        return next(s for s in self.starts if s["time"] > at)


def _progress(out: str) -> dict:
    fs, path = fsspec.core.url_to_fs(join(out, PROGRESS))
    try:
        with fs.open(path, "r") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or being rewritten
        return {}


def registered_step(out: str) -> int:
    """The latest checkpoint Ray Train's controller has registered, from the snapshot it keeps in the run."""
    fs, path = fsspec.core.url_to_fs(join(out, "checkpoint_manager_snapshot.json"))
    try:
        with fs.open(path, "r") as f:
            latest = json.load(f).get("latest_checkpoint_result") or {}
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return int(latest.get("metrics", {}).get("step", 0))


def step_at_kill(out: str, before: dict) -> int:
    """The step a run had reached once a kill was done: training goes on while the workers are found and the
    kill is carried out (a node's takes a while), and a checkpoint it takes then is from before the fault
    (seen once: train_flow restarted from a step-12 checkpoint after a node loss decided past step 8)."""
    return max(before.get("step", 0), _progress(out).get("step", 0), registered_step(out))


def _training_workers(cluster: LocalCluster) -> list[dict]:
    """The training worker processes alive now. The state API can list a dead worker as ALIVE for a moment
    after a restart: every pid is checked on this machine, where all the nodes run."""
    from ray.util.state import list_actors

    filters = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    found = [{"pid": a.pid, "node_id": a.node_id} for a in list_actors(cluster.dashboard, filters=filters)]
    return [w for w in found if os.path.exists(f"/proc/{w['pid']}")]


def run_drill(
    cluster: LocalCluster,
    module: str,
    overrides: list[str],
    out: str,
    log_path: Path,
    kill_worker_past: int,
    kill_node_past: int,
    timeout: float = 900,
) -> Drill:
    started = time.time()
    command = [sys.executable, "-m", module, "--config", "tiny", *overrides]
    env = {**ray_env(), "RAY_ADDRESS": cluster.address}
    with open(log_path, "w") as log:
        job = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    faults: list[dict] = []
    registered: list[tuple[float, int]] = []

    def trace() -> None:
        step = registered_step(out)
        if step and (not registered or registered[-1][1] != step):
            registered.append((time.time(), step))

    def wait_past(checkpoint: int, after: float) -> dict:
        """Until Ray Train has registered the checkpoint of step `checkpoint` and a group started after
        `after` has logged a step past it."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            trace()
            progress = _progress(out)
            past = progress.get("step", 0) > checkpoint and progress.get("time", 0) > after
            if past and registered and registered[-1][1] >= checkpoint:
                return progress
            if job.poll() is not None:
                raise AssertionError(
                    f"{module} exited ({job.returncode}) before step {step}:\n{log_path.read_text()[-3000:]}"
                )
            time.sleep(0.2)
        raise AssertionError(f"{module} did not pass a registered step {checkpoint} in {timeout}s")

    try:
        # (1) A training worker process, SIGKILLed: the OOM killer or a preempted container.
        progress = wait_past(kill_worker_past, 0)
        workers = _wait_for_workers(cluster, 2)
        os.kill(workers[-1]["pid"], signal.SIGKILL)
        faults.append({"kind": "worker SIGKILL", "step": step_at_kill(out, progress), "time": time.time()})

        # (2) A whole node lost, once the restarted group is past `kill_node_after`.
        progress = wait_past(kill_node_past, faults[-1]["time"])
        hosts = {cluster.name_of(w["node_id"]) for w in _wait_for_workers(cluster, 2)} - {None, "head"}
        victim = sorted(hosts)[0]
        cluster.kill(victim)
        faults.append({"kind": f"node lost ({victim})", "step": step_at_kill(out, progress), "time": time.time()})

        while job.poll() is None and time.time() - started < timeout:
            trace()
            time.sleep(0.2)
    finally:
        if job.poll() is None:
            job.kill()
        job.wait()
    trace()
    wall = time.time() - started
    fs, path = fsspec.core.url_to_fs(join(out, "faults"))
    for marker in fs.glob(f"{path}/kill_in_checkpoint-*"):  # the time the rank decided to die
        step = int(marker.rsplit("-", 1)[1])
        faults.append({"kind": "rank SIGKILL mid-checkpoint", "step": step, "time": os.path.getmtime(marker)})
    return Drill(out, job.returncode, wall, log_path.read_text(), faults, read_starts(out), registered)


def _wait_for_workers(cluster: LocalCluster, count: int, timeout: float = 60) -> list[dict]:
    deadline = time.time() + timeout
    while len(workers := _training_workers(cluster)) != count and time.time() < deadline:
        time.sleep(0.2)
    assert len(workers) == count, workers
    return workers


def assert_recovered(drill: Drill, kind: str) -> dict:
    """The fault of `kind` happened, and the worker-group start after it loaded the newest checkpoint Ray
    Train had registered by then (or a later one it registered before the restart), never one past the fault
    (a checkpoint cut short is never registered, so never loaded). Returns the recovery: seconds from the
    fault to the restarted group's first step, steps redone."""
    fault = next(f for f in drill.faults if f["kind"].startswith(kind))
    start = drill.start_after(fault["time"])
    registered = {step for _, step in drill.registered} | {0}
    assert start["step"] in registered, (start, drill.registered)
    assert drill.registered_at(fault["time"]) <= start["step"], (fault, start, drill.registered)
    assert start["step"] <= fault["step"] and (kind != "rank SIGKILL" or start["step"] < fault["step"])
    assert (start["checkpoint"] is None) == (start["step"] == 0)
    return {
        "fault": fault["kind"],
        "at_step": fault["step"],
        "restarted_from": start["step"],
        "steps_redone": fault["step"] - start["step"],
        "restart_s": round(start["time"] - fault["time"], 1),
    }
