"""Fault drills for the data stages and for a cluster-mode flow, on a real multi-node Ray cluster on 127.0.0.1
(tests/ray_cluster.py: a head with no CPUs, where drivers attach, and three 1-CPU worker nodes, where the work
runs).

- ingest, cache_latents, evaluate: a worker node is lost (SIGKILL of its raylet and every process on it) while
  the stage's map runs on it. The job, a driver attached to the cluster as `ray job submit` would start it,
  must finish by itself through Ray's retries (Ray Data retries a task lost with its node, and restarts a
  lost actor of a pool elsewhere and resubmits its calls), with outputs identical to an uninterrupted run
  of the same config on the same cluster.
- A cluster-mode `vitok run` SIGKILLed while its stage's Ray job runs: the same command run again attaches to
  that job instead of submitting a twin, and completes with the stage complete.

One cluster for the module (~15 s to start); a lost node is added back after its drill. Each drill prints
what it measured (wall time of the faulted and of the uninterrupted run, what Ray retried); `pytest -s`
shows it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.cluster import _status
from tests.ingest_samples import make_training_folder
from tests.ray_cluster import LocalCluster, ray_env
from tests.test_pipelines import FAST
from vitok_core.artifacts import is_complete, join, read_json

pytestmark = pytest.mark.slow
VARIANT = "Tid2-Tid4/1x16x16"
N_PHOTOS = 32
INGEST_TASKS = N_PHOTOS // 2  # ingest.files_per_task=2
EVAL_IMAGES, EVAL_TASKS = 16, 8  # evaluate.max_images, at evaluate.images_per_task=2
WORKERS = 3  # two actors of a pool, and a node left for a lost actor to restart on


def ingest_args(photos: Path, root: Path) -> list[str]:
    # Two files a task (16 tasks) and four rows an output file (9 files: cache_latents' tasks): enough tasks
    # that a node can be lost with most of them still to run.
    return [
        f"ingest.source={photos}",
        f"ingest.root={root}",
        "ingest.files_per_task=2",
        "ingest.rows_per_file=4",
        "ingest.label_from=folder",
        "data.budgets=[64]",
        "data.budget_switch=[]",
    ]


@dataclass
class Run:
    """One driver run of a stage: exit code, wall time, its log; for a faulted run, the node lost, how many
    of the map's tasks had finished when it was lost, and what Ray retried (from the state API)."""

    rc: int
    wall: float
    log: str
    job_id: str = ""
    killed: str | None = None
    done_at_kill: int = 0
    retried: dict = field(default_factory=dict)

    def output(self, prefix: str) -> str:
        line = next((x for x in self.log.splitlines() if x.startswith(prefix)), None)
        assert self.rc == 0 and line, self.log[-4000:]
        return line.removeprefix(prefix).split()[0]


@pytest.fixture(scope="module")
def multinode():
    cluster = LocalCluster.start(workers=WORKERS)
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="module")
def inputs(multinode, tmp_path_factory):
    """Photos, an encoder export (a random tiny autoencoder: the drills compare runs, not quality) and an
    uninterrupted ingest on the cluster: the ingest drill's reference and the other drills' eval set."""
    import torch

    from vitok_core.checkpoint import save_published
    from vitok_core.model import build_autoencoder

    root = tmp_path_factory.mktemp("faults")
    make_training_folder(root / "photos", n=N_PHOTOS)
    torch.manual_seed(3)
    save_published(build_autoencoder(VARIANT), str(root / "export"), metadata={"variant": VARIANT, "step": 0})
    ingest = drive(multinode, "ingest", ingest_args(root / "photos", root / "reference"), root)
    return {"root": root, "ingest": ingest.output("ingest output: "), "ingest_run": ingest}


def drive(cluster: LocalCluster, stage: str, args: list[str], logs: Path, kill: Callable | None = None) -> Run:
    """Run `python -m jobs.<stage>` as a driver attached to the cluster. With `kill`, poll it while the driver
    runs; when it names a node (with the number of tasks done so far), that node is lost at once."""
    env = {**ray_env(), "RAY_ADDRESS": cluster.address}
    log_path = logs / f"{stage}-{time.monotonic_ns()}.log"
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", f"jobs.{stage}", "--config", "tiny", *args], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        killed, done = None, 0
        try:
            while kill is not None and killed is None and proc.poll() is None:
                found = kill(cluster)
                if found:
                    killed, done = found
                    cluster.kill(killed)
                time.sleep(0.1)
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    wall = time.monotonic() - started
    run = Run(proc.returncode, wall, log_path.read_text(), job_id=_job_of(cluster, proc.pid), killed=killed,
              done_at_kill=done)  # fmt: skip
    return run


def _job_of(cluster: LocalCluster, pid: int) -> str:
    from ray.util.state import list_jobs

    for job in list_jobs(address=cluster.dashboard, detail=True):
        if job.driver_info is not None and str(job.driver_info.pid) == str(pid):
            return job.job_id
    return ""


def retried_by_ray(cluster: LocalCluster, job_id: str, name: str, deadline_s: float = 10) -> dict:
    """What Ray redid for a job's tasks called `name`: attempts that failed (by error type), tasks that
    finished only on a later attempt, restarts of the job's actors. Task events reach the state API a
    second or so late: waits for a finished retry to be visible."""
    from ray.util.state import list_actors, list_tasks

    deadline = time.monotonic() + deadline_s
    while True:
        tasks = [t for t in list_tasks(address=cluster.dashboard, filters=[("job_id", "=", job_id)], detail=True,
                                       limit=10_000, raise_on_missing_output=False) if name in t.name]  # fmt: skip
        failed = [t.error_type or t.state for t in tasks if t.state == "FAILED"]
        redone = {t.task_id for t in tasks if t.state == "FINISHED" and t.attempt_number > 0}
        if redone or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    actors = list_actors(address=cluster.dashboard, filters=[("job_id", "=", job_id)], detail=True,
                         raise_on_missing_output=False)  # fmt: skip
    restarts = sum(a.num_restarts or 0 for a in actors if name in a.class_name)
    return {
        "tasks": len({t.task_id for t in tasks}),
        "failed_attempts": {e: failed.count(e) for e in sorted(set(failed))},
        "finished_on_a_retry": len(redone),
        "actor_restarts": restarts,
    }


def when_running(pattern: str, staged: Callable[[], int], total: int) -> Callable:
    """A `kill` for `drive`: once at least one of the map's `total` tasks is done and fewer than all, the
    worker node where a task or actor whose name holds `pattern` is running now (the state API)."""
    from ray.util.state import list_actors, list_tasks

    def pick(cluster: LocalCluster) -> tuple[str, int] | None:
        done = staged()
        if not 1 <= done < total:
            return None
        state = {"address": cluster.dashboard, "detail": True, "raise_on_missing_output": False}
        tasks = list_tasks(filters=[("state", "=", "RUNNING")], **state)
        actors = list_actors(filters=[("state", "=", "ALIVE")], **state)
        running = [t.node_id for t in tasks if pattern in t.name] + [
            a.node_id for a in actors if pattern in a.class_name
        ]
        name = next((n for n in map(cluster.name_of, running) if n and n != "head"), None)
        return (name, staged()) if name else None

    return pick


def count(folder: Path, glob: str) -> Callable[[], int]:
    return lambda: len(list(folder.glob(glob)))


def restore(cluster: LocalCluster, run: Run) -> None:
    """Add back the node a drill lost, so that the next drill has as many nodes."""
    if run.killed:
        cluster.add_worker(run.killed)


def report(stage: str, faulted: Run, reference: Run) -> None:
    print(
        f"\n[node loss] {stage}: lost {faulted.killed} with {faulted.done_at_kill} tasks done; faulted run "
        f"{faulted.wall:.1f} s vs uninterrupted {reference.wall:.1f} s ({faulted.wall - reference.wall:+.1f} s); "
        f"Ray redid: {faulted.retried}"
    )


def tables(out: str, *parts: str) -> dict[str, object]:
    """Every Parquet file under out/<part> by its relative path, read whole."""
    found = {}
    for part in parts:
        for path in sorted(Path(out, part).rglob("*")):
            if path.is_file():
                found[str(path.relative_to(out))] = pq.read_table(path)
    return found


def assert_same_tables(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)  # the same files, and nothing else (no stray temporary file)
    for name, table in want.items():
        assert got[name].equals(table), name


# ------------------------------------------------------------------------------------------------
# A node lost mid-map
# ------------------------------------------------------------------------------------------------
def test_ingest_survives_a_lost_node(multinode, inputs, tmp_path):
    from jobs.ingest import output_uri
    from vitok_core.config import load_config

    args = ingest_args(inputs["root"] / "photos", tmp_path)
    tasks = Path(join(output_uri(load_config("tiny", args)), "_staging", "tasks"))
    faulted = drive(
        multinode, "ingest", args, tmp_path, when_running("ingest_task", count(tasks, "*.parquet"), INGEST_TASKS)
    )
    restore(multinode, faulted)
    out, reference = faulted.output("ingest output: "), inputs["ingest_run"]
    assert faulted.killed and 1 <= faulted.done_at_kill < INGEST_TASKS, "the node must be lost mid-map"
    faulted.retried = retried_by_ray(multinode, faulted.job_id, "ingest_task")
    report("ingest", faulted, reference)
    # The node is killed where the state API showed a running task; on a loaded machine that task can finish
    # in between (seen once in CI), and then Ray had nothing to redo. A task that did die is redone.
    if faulted.retried["failed_attempts"].get("NODE_DIED"):
        assert faulted.retried["finished_on_a_retry"] >= 1

    want = inputs["ingest"]
    assert_same_tables(tables(out, "data", "rejects"), tables(want, "data", "rejects"))  # rows, bytes, files
    assert read_json(join(out, "manifest.json"))["counts"] == read_json(join(want, "manifest.json"))["counts"]
    assert not Path(out, "_staging").exists()


def cache_args(inputs: dict, root: Path) -> list[str]:
    return [
        f"cache.root={root}",
        f"cache.ingest={inputs['ingest']}",
        f"cache.encoder={inputs['root'] / 'export'}",
        "cache.flip=true",
        "cache.batch_size=4",
    ]


def test_cache_latents_survives_a_lost_node(multinode, inputs, tmp_path):
    from jobs.cache_latents import plan
    from vitok_core.config import load_config

    reference = drive(multinode, "cache_latents", cache_args(inputs, tmp_path / "reference"), tmp_path)
    want = reference.output("cache_latents output: ")
    files = len(list(Path(inputs["ingest"], "data").rglob("*.parquet")))

    args = cache_args(inputs, tmp_path / "faulted")
    out = plan(load_config("tiny", args))[3]
    # What a writer killed mid-write leaves in data/ (its temporary file): the job must not publish it.
    Path(out, "data").mkdir(parents=True)
    Path(out, "data", "part-00000.parquet.tmp-0123456789abcdef").write_bytes(b"PAR1 cut short")
    stats = count(Path(out, "_staging", "stats"), "*.json")
    faulted = drive(multinode, "cache_latents", args, tmp_path, when_running("EncodeFiles", stats, files))
    restore(multinode, faulted)
    assert faulted.output("cache_latents output: ") == out
    assert faulted.killed and 1 <= faulted.done_at_kill < files, "the node must be lost mid-map"
    faulted.retried = retried_by_ray(multinode, faulted.job_id, "EncodeFiles")
    report("cache_latents", faulted, reference)
    assert faulted.retried["actor_restarts"] >= 1 and faulted.retried["finished_on_a_retry"] >= 1

    assert_same_tables(tables(out, "data"), tables(want, "data"))  # every latent's bytes, file by file
    assert read_json(join(out, "stats.json")) == read_json(join(want, "stats.json"))
    assert read_json(join(out, "manifest.json"))["rows"] == 2 * N_PHOTOS


def evaluate_args(inputs: dict, root: Path) -> list[str]:
    # PSNR / SSIM only: the Inception features of rFID cost ~0.25 s per image and pass on a CPU; the per-task
    # staging and the in-order merge they go through are those of every metric.
    return [
        f"evaluate.root={root}",
        f"evaluate.data={inputs['ingest']}",
        f"evaluate.autoencoder={inputs['root'] / 'export'}",
        "evaluate.settings=[{name: 64p, size: 64, mode: center_crop}]",
        "evaluate.generation_setting=64p",
        "evaluate.features=[]",
        f"evaluate.max_images={EVAL_IMAGES}",
        "evaluate.images_per_task=2",
    ]


def test_evaluate_survives_a_lost_node(multinode, inputs, tmp_path):
    from jobs.evaluate import plan
    from vitok_core.config import load_config

    reference = drive(multinode, "evaluate", evaluate_args(inputs, tmp_path / "reference"), tmp_path)
    want = str(Path(reference.output("evaluate report: ")).parent)

    args = evaluate_args(inputs, tmp_path / "faulted")
    out = plan(load_config("tiny", args))["out"]
    staged = count(Path(out, "_staging", "tasks"), "*.npz")
    faulted = drive(multinode, "evaluate", args, tmp_path, when_running("EvaluateTasks", staged, EVAL_TASKS))
    restore(multinode, faulted)
    assert str(Path(faulted.output("evaluate report: ")).parent) == out
    assert faulted.killed and 1 <= faulted.done_at_kill < EVAL_TASKS, "the node must be lost mid-map"
    faulted.retried = retried_by_ray(multinode, faulted.job_id, "EvaluateTasks")
    report("evaluate", faulted, reference)
    assert faulted.retried["actor_restarts"] >= 1 and faulted.retried["finished_on_a_retry"] >= 1

    got, expected = read_json(join(out, "metrics.json")), read_json(join(want, "metrics.json"))
    assert got["results"] == expected["results"] and got["eval_set"] == expected["eval_set"]
    assert [r["images"] for r in got["results"]] == [EVAL_IMAGES, EVAL_IMAGES]  # ae and bicubic, every image once
    assert pq.read_table(join(out, "per_image.parquet")).equals(pq.read_table(join(want, "per_image.parquet")))


# ------------------------------------------------------------------------------------------------
# A cluster-mode flow's process killed while its Ray job runs
# ------------------------------------------------------------------------------------------------
VITOK = str(Path(sys.executable).parent / "vitok")


class JobWatch(threading.Thread):
    """Polls the Jobs API every 0.25 s and remembers every set of a stage key's jobs seen PENDING or RUNNING
    at once."""

    def __init__(self, client, prefix: str) -> None:
        super().__init__(daemon=True)
        self.client, self.prefix, self.seen, self.stop = client, prefix, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            jobs = [j for j in self.client.list_jobs() if (j.submission_id or "").startswith(self.prefix)]
            self.seen.append(sorted(j.submission_id for j in jobs if str(j.status.value) in ("PENDING", "RUNNING")))
            time.sleep(0.25)


def test_killed_cluster_mode_flow_attaches_to_its_running_job(multinode, inputs, prefect_harness, tmp_path):
    """The cluster has lost nodes (the drills above, or one lost here when this test runs alone): `vitok run`'s
    check that every node is this machine (orchestrate.shared_filesystem=auto) must count only the live ones
    (it failed on any dead node before)."""
    import prefect.settings
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_nodes

    from pipelines import stages
    from vitok_core.config import load_config

    if all(node.state == "ALIVE" for node in list_nodes(address=multinode.dashboard)):
        multinode.kill("worker0")
        multinode.add_worker("worker0")
    overrides = [
        *ingest_args(inputs["root"] / "photos", Path(inputs["ingest"]).parent.parent),  # its ingest is done
        *FAST,
        f"train.root={tmp_path / 'runs'}",
        "train.steps=12",
        "orchestrate.mode=cluster",
        f"orchestrate.address={multinode.dashboard}",
        "orchestrate.working_dir=''",  # the nodes import this checkout (PYTHONPATH): nothing to upload
        "orchestrate.poll_s=0.5",
    ]
    out = stages.planned_output("train_ae", load_config("tiny", overrides))
    job_id = f"vitok-train_ae-{out.rsplit('/', 1)[-1]}-0"
    command = [VITOK, "run", "--stages", "train_ae", "--preset", "tiny", *overrides]
    env = {**ray_env(), "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env["PREFECT_API_URL"] = prefect.settings.PREFECT_API_URL.value()  # the session's harness
    client = JobSubmissionClient(multinode.dashboard)
    watch = JobWatch(client, job_id.rsplit("-", 1)[0] + "-")
    watch.start()
    try:
        started = time.monotonic()
        with open(tmp_path / "first.log", "w") as log:
            first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # fmt: skip
        while (status := _status(client, job_id)) != "RUNNING":
            ended = first.poll() is not None or status not in (None, "PENDING")
            assert not ended, f"{job_id}: {status}; {(tmp_path / 'first.log').read_text()[-4000:]}"
            assert time.monotonic() - started < 300, f"{job_id} did not start"
            time.sleep(0.25)
        os.killpg(first.pid, signal.SIGKILL)  # the flow's process, while its stage's Ray job runs
        first.wait()
        killed = time.monotonic()
        assert _status(client, job_id) == "RUNNING"  # nothing stopped it: the waiting process just vanished

        second = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)  # fmt: skip
        lines, attached = [], None
        for line in second.stdout:
            lines.append(line)
            if attached is None and f"attached to Ray job {job_id}" in line:
                attached = time.monotonic()
        second.wait(timeout=60)
        done = time.monotonic()
    finally:
        watch.stop.set()
        watch.join()
    log = "".join(lines)
    (tmp_path / "second.log").write_text(log)
    assert second.returncode == 0, log[-4000:]
    assert attached is not None, log[-4000:]
    assert f"train_ae       ran      {out}" in log and is_complete(out)
    assert read_json(join(out, "manifest.json"))["step"] == 12
    # One job for the stage key, ever: never two of them pending or running at once, and no second attempt.
    assert max(len(active) for active in watch.seen) == 1
    assert [j.submission_id for j in client.list_jobs() if (j.submission_id or "").startswith(watch.prefix)] == [job_id]
    assert _status(client, job_id) == "SUCCEEDED"
    print(
        f"\n[driver killed] train_ae: job RUNNING {killed - started:.1f} s after the first `vitok run` started; "
        f"the second attached {attached - killed:.1f} s after the kill and completed {done - killed:.1f} s after it"
    )
