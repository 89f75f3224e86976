"""The Prefect DAG for real: local Ray, Prefect's test harness, every stage at tiny size.

One run root on S3 (moto on 127.0.0.1) carries the story: a `vitok run` killed during train_ae, the
rerun (ingest skipped, train_ae resumed from its checkpoint, the rest run), a second run (everything
skipped), one run with a changed cache_latents key (it and the later stages rerun) and a forced ingest
(rerun in place; train_ae skipped). Then bad configs, and a stage through the Ray Jobs API on a real `ray start --head`
cluster, with a cancelled flow run stopping its Ray job; `vitok submit` on that cluster (a stage run, a failed
job in one line, SIGTERM stopping the job), `vitok submit` and `vitok run` with the default relative roots (the
outputs are where the command says, not in the job's working directory), and `vitok run` failing inside its
flow in one line.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import fsspec
import prefect.settings
import pytest

from pipelines import stages
from pipelines.flows import full_pipeline, run_stage
from pipelines.publish import artifact_key
from tests.ingest_samples import make_training_folder
from tests.training_faults import registered_step
from vitok_core.artifacts import is_complete, join, read_json
from vitok_core.config import ConfigError, load_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
# The tiny preset cut to seconds per stage: 64 tokens, a few steps, one evaluation setting.
FAST = [
    "data.budgets=[64]",
    "data.budget_switch=[]",
    "train.steps=6",
    "train.batch_size=4",
    "train.checkpoint_every=2",
    "train.log_every=2",
    "flow.steps=4",
    "flow.batch_size=8",
    "flow.micro_batch_size=4",  # buckets of 5-6 images: 2 accumulation steps of 4
    "flow.checkpoint_every=4",
    "flow.log_every=2",
    "flow.sample.per_class=1",
    "flow.sample.rows=4",
    "flow.sample.cols=4",
    "flow.sample.steps=2",
    "evaluate.settings=[{name: 64p, size: 64, mode: center_crop}]",
    "evaluate.generation_setting=64p",
    "evaluate.max_images=8",
    "evaluate.images_per_task=4",
    # One worker / actor per stage: start-up is most of a tiny stage's time, and the stages' own tests run
    # them with two.
    "train.workers=1",
    "flow.workers=1",
    "cache.actors=1",
    "evaluate.actors=1",
]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dag") / "photos"
    make_training_folder(folder, n=16)
    return folder


def args_for(photos: Path, root: str, *extra: str) -> list[str]:
    roots = [f"{key}={root}" for key in stages.ROOTS.values()]
    return [f"ingest.source={photos}", "ingest.label_from=folder", *roots, *FAST, *extra]


def outputs(overrides: list[str]) -> dict[str, str]:
    """Every stage's artifact as the DAG plans it (its evaluate scores the DAG's samples)."""
    cfg = load_config("tiny", overrides)
    found = {stage: stages.planned_output(stage, cfg) for stage in stages.STAGES[:-1]}
    with_samples = load_config("tiny", stages.with_samples(cfg, overrides))
    return {**found, "evaluate": stages.planned_output("evaluate", with_samples)}


def ran(results: dict) -> list[str]:
    return [stage for stage, manifest in results.items() if not manifest["skipped"]]


def test_dag_on_s3_crash_resume_skip_rerun_and_force(ray_local, prefect_harness, s3_endpoint, photos, tmp_path):
    bucket = s3_endpoint("vitok-dag")
    root = f"s3://{bucket}/runs"
    overrides = args_for(photos, root)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    # A `vitok run` killed while train_ae trains. Step 4's metric lines are written after step 2's
    # checkpoint was reported, so a checkpoint to resume from exists when they appear.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env["PREFECT_API_URL"] = prefect.settings.PREFECT_API_URL.value()  # the harness's server: no second one
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "run", "--preset", "tiny", *overrides],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    pattern = f"{bucket}/runs/train_ae/*/metrics/step-0000000[4-6].jsonl"
    deadline = time.time() + 600

    def resumable() -> bool:
        # A checkpoint counts once Ray Train's controller has registered it (it polls every 2 s): killed
        # before that, the rerun would rightly start over (seen once in CI).
        found = fs.glob(pattern)
        return bool(found) and registered_step("s3://" + found[0].rsplit("/metrics/", 1)[0]) >= 2

    while time.time() < deadline and not resumable():
        assert driver.poll() is None, "the pipeline ended before train_ae checkpointed"
        time.sleep(0.3)
        fs.invalidate_cache()
    os.killpg(driver.pid, signal.SIGKILL)  # the flow, its local Ray and the training workers
    driver.wait()
    [first] = fs.glob(f"{bucket}/runs/train_ae/*/metrics/step-00000002.jsonl")
    written = fs.info(first)["LastModified"]
    ingest_out = stages.planned_output("ingest", load_config("tiny", overrides))
    assert is_complete(ingest_out) and not fs.glob(f"{bucket}/runs/train_ae/*/_SUCCESS")

    state = full_pipeline("tiny", overrides, return_state=True)
    results = state.result()
    assert ran(results) == ["train_ae", "cache_latents", "train_flow", "evaluate"]  # ingest was done
    assert results["train_ae"]["status"] == "complete" and results["train_ae"]["step"] == 6
    fs.invalidate_cache()
    assert fs.info(first)["LastModified"] == written  # resumed, not restarted: steps 1-2 were kept
    paths = outputs(overrides)
    for stage, uri in paths.items():
        assert uri.startswith(f"{root}/{stage}/") and is_complete(uri)
    metrics = read_json(join(paths["evaluate"], "metrics.json"))
    assert metrics["generation"] and metrics["generation"][0]["images"] == 4  # 4 classes x 1 sample
    assert "loss_curves" in metrics["figures"]  # from the metric lines of the train_ae run on S3
    assert fs.exists(join(paths["evaluate"], "report.md"))
    check_ui_of_a_run(state.state_details.flow_run_id, paths)

    started = time.time()
    state = full_pipeline("tiny", overrides, return_state=True)
    again = state.result()
    assert ran(again) == [] and time.time() - started < 60
    assert {s: m["output"] for s, m in again.items()} == paths
    # A run where nothing ran says so: the flow run, every task run, and one artifact per stage.
    artifacts, _, tasks = ui_of(state.state_details.flow_run_id)
    assert state.name == "Skipped" and set(tasks.values()) == {"Skipped"}
    assert sorted(a.data.splitlines()[0] for a in artifacts) == sorted(f"## {s}: skipped" for s in stages.STAGES)
    for artifact in artifacts:
        stage = artifact.data.split()[1].rstrip(":")  # "## ingest: skipped"
        assert artifact.key is None and f"`{paths[stage]}`" in artifact.data

    # One run: a changed cache_latents key reruns it and every later stage under new keys, a forced ingest
    # reruns where it was (its output deleted first), train_ae (done, its key unchanged) is skipped.
    changed = [*overrides, "cache.dtype=fp16"]
    rerun = full_pipeline("tiny", changed, force=["ingest"])
    assert ran(rerun) == ["ingest", "cache_latents", "train_flow", "evaluate"]
    new_paths = outputs(changed)
    assert [new_paths[s] == paths[s] for s in stages.STAGES] == [True, True, False, False, False]
    assert rerun["ingest"]["output"] == paths["ingest"] and is_complete(paths["ingest"])


def ui_of(flow_run_id) -> tuple[list, list[str], dict[str, str]]:
    """What the Prefect UI shows of a flow run: its artifacts, its log lines, its task runs' state names."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # log lines reach the server in batches
    runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(flow_run_filter=runs)
        only = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        logs, page = [], None
        while page is None or len(page) == 200:  # the server's largest page
            page = client.read_logs(only, limit=200, offset=len(logs))
            logs += page
        tasks = {t.name: t.state.name for t in client.read_task_runs(flow_run_filter=runs)}
    return artifacts, [log.message for log in logs], tasks


def check_ui_of_a_run(flow_run_id, paths: dict[str, str]) -> None:
    """The resumed run's page: headline numbers in tables, outputs as text (no link: moto's S3 has no console),
    the report with every figure inline and small enough, training steps in the log, ingest marked skipped."""
    import base64
    import json
    import re

    from pipelines.publish import INLINE_MAX_BYTES

    artifacts, logs, tasks = ui_of(flow_run_id)
    assert tasks == {"ingest": "Skipped", **{s: "Completed" for s in stages.STAGES[1:]}}
    keyed = {a.key: a for a in artifacts if a.key}
    assert not any(a.type == "link" for a in artifacts)
    [skipped] = [a for a in artifacts if not a.key]
    assert skipped.data.startswith("## ingest: skipped") and paths["ingest"] in skipped.data
    train = {row["name"]: row["value"] for row in json.loads(keyed["vitok-train-ae"].data)}
    assert train["final step"] == "6" and float(train["loss"]) > 0 and float(train["tokens/s"]) > 0
    evaluate = json.loads(keyed["vitok-evaluate"].data)
    assert {(r["setting"], r["model"]) for r in evaluate} >= {("64p", "ae"), ("64p", "bicubic")}
    assert all(float(r[m]) > 0 for r in evaluate if r["model"] != "generated samples" for m in ("PSNR (dB)", "SSIM"))
    assert [r["model"] for r in evaluate if r["gFID"] != "n/a"] == ["generated samples"]
    for stage in stages.STAGES[1:]:
        assert f"`{paths[stage]}`" in keyed[f"{artifact_key(stage)}-output"].data
    report = keyed["vitok-evaluate-report"].data
    images = re.findall(r"!\[[^\]]*\]\(([^)]*)\)", report)
    assert len(images) >= 4 and all(uri.startswith("data:image/png;base64,") for uri in images)
    assert all(len(base64.b64decode(uri.split(",", 1)[1])) <= INLINE_MAX_BYTES for uri in images)
    assert any(line.startswith("train_ae: step 6/6, loss ") and "ETA" in line for line in logs), logs
    assert any(line.startswith("train_flow: step 4/4, loss ") for line in logs), logs
    assert any(line.startswith("evaluate done: ") for line in logs), logs  # a stage driver's own log line


def test_bad_config_fails_before_any_ray_work(prefect_harness, photos, tmp_path):
    import ray

    was_running = ray.is_initialized()
    with pytest.raises(ConfigError, match=r"train\.stepz"):
        full_pipeline("tiny", ["train.stepz=3"])
    with pytest.raises(ConfigError, match=r"train\.steps"):
        full_pipeline("tiny", ["train.steps=many"])
    with pytest.raises(FileNotFoundError, match=r"ingest\.source"):
        full_pipeline("tiny", [f"ingest.source={tmp_path / 'nowhere'}"])
    with pytest.raises(FileNotFoundError):  # evaluate alone, with no ingest output to evaluate on
        run_stage("evaluate", "tiny", args_for(photos, str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="unknown stage"):
        full_pipeline("tiny", stages=["ingest", "trian_ae"])
    assert ray.is_initialized() == was_running
    assert not (tmp_path / "empty").exists()


def test_run_form_refuses_bad_parameters_before_any_flow_code(prefect_harness):
    """A deployment run (what the UI's run form creates) with a preset, stage or override that does not fit the
    form is refused by the server when it is created: no flow run exists, so nothing, Ray least of all, starts."""
    import ray
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import PrefectHTTPStatusError

    was_running = ray.is_initialized()
    deployment_id = full_pipeline.to_deployment(name=f"form-{uuid.uuid4().hex[:8]}").apply()
    with get_client(sync_client=True) as client:
        name = f"vitok-pipeline/{client.read_deployment(deployment_id).name}"
        bad = [{"preset": "tinyy"}, {"stages": ["ingest", "trian_ae"]}, {"force": ["all"]},
               {"overrides": ["train.steps 3"]}, {"overrides": "train.steps=3"}]  # fmt: skip
        for parameters in bad:
            with pytest.raises(PrefectHTTPStatusError, match="Validation failed"):
                run_deployment(name, parameters=parameters, timeout=0)
        assert client.read_flow_runs(deployment_filter=_deployment(deployment_id)) == []
        # A good form is accepted (nothing serves this deployment: the run stays scheduled and is removed).
        good = {"preset": "tiny", "stages": ["evaluate"], "overrides": FAST}
        run = run_deployment(name, parameters=good, timeout=0)
        assert run.parameters["overrides"] == FAST
        client.delete_flow_run(run.id)
    assert ray.is_initialized() == was_running


def _deployment(deployment_id):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A real Ray cluster head on 127.0.0.1 (its own process group, stopped by its process id), shared by this
    module's cluster tests: it takes ~15 s to start."""
    port, dashboard = _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` of a job = this venv's
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2", f"--temp-dir={temp}",
         # ports of its own: the session's local Ray already holds the defaults (its dashboard agent's)
         *(f"--{name}={_free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                    "metrics-export-port", "runtime-env-agent-port"))],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + 120
    while True:
        try:
            JobSubmissionClient(address).list_jobs()
            break
        except Exception:
            assert time.time() < deadline and head.poll() is None, "the Ray head did not come up"
            time.sleep(2)
    yield address
    os.killpg(head.pid, signal.SIGKILL)  # the head's whole process group (raylet, GCS, workers): only ours
    head.wait()
    shutil.rmtree(temp, ignore_errors=True)


def test_cluster_mode_submits_attaches_and_stops_on_cancel(prefect_harness, ray_head, photos, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelling
    from ray.job_submission import JobSubmissionClient

    cluster = ["orchestrate.mode=cluster", f"orchestrate.address={ray_head}", f"orchestrate.working_dir={REPO}"]
    overrides = args_for(photos, str(tmp_path / "runs"), *cluster)
    manifest = run_stage("ingest", "tiny", overrides)
    key = manifest["key"]
    assert is_complete(manifest["output"]) and manifest["counts"]["accepted"] == 16
    client = JobSubmissionClient(ray_head)
    jobs = [j for j in client.list_jobs() if (j.submission_id or "").startswith("vitok-ingest-")]
    assert [j.submission_id for j in jobs] == [f"vitok-ingest-{key}-0"]
    assert str(jobs[0].status.value) == "SUCCEEDED"
    assert run_stage("ingest", "tiny", overrides)["skipped"]  # done: no second job
    assert len([j for j in client.list_jobs() if (j.submission_id or "").startswith("vitok-ingest-")]) == 1

    # A long train_ae job, and the flow run cancelled while it runs: the Ray job is stopped.
    long = [*overrides, "train.steps=2000", "train.checkpoint_every=1000"]
    state, name = {}, f"cancel-me-{uuid.uuid4().hex[:8]}"  # other tests' crashed flow runs may still read RUNNING

    def run_flow() -> None:
        try:
            run_stage.with_options(flow_run_name=name)("train_ae", "tiny", long)
        except BaseException as err:  # the cancelled flow ends with an error: what matters is the Ray job
            state["error"] = err

    thread = threading.Thread(target=run_flow, daemon=True)
    thread.start()
    deadline, job = time.time() + 300, None
    while time.time() < deadline and job is None:
        running = [j for j in client.list_jobs() if (j.submission_id or "").startswith("vitok-train_ae-")]
        job = next((j for j in running if str(j.status.value) == "RUNNING"), None)
        time.sleep(1)
    assert job is not None, "the train_ae job did not start"
    with get_client(sync_client=True) as prefect:
        runs = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
        flow_run = next(r for r in runs if r.state and r.state.type == StateType.RUNNING)
        prefect.set_flow_run_state(flow_run.id, Cancelling(), force=True)
    deadline = time.time() + 120
    while time.time() < deadline and str(client.get_job_status(job.submission_id).value) not in ("STOPPED",):
        time.sleep(1)
    assert str(client.get_job_status(job.submission_id).value) == "STOPPED"
    thread.join(timeout=120)
    assert "error" in state


# ------------------------------------------------------------------------------------------------
# The vitok command against the cluster and the Prefect harness, as a user runs it (a subprocess)
# ------------------------------------------------------------------------------------------------
VITOK = str(Path(sys.executable).parent / "vitok")  # the installed console script
# The jobs import the project installed in this venv (as a cluster image has it) instead of an uploaded
# working_dir: no upload to wait for, and no upload log lines on the command's stderr.
CLUSTER_JOB = ["orchestrate.working_dir=''", "orchestrate.poll_s=0.5"]


def vitok_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "PREFECT_HOME": str(tmp_path / "prefect-home"), **extra}


def submit(address: str, stage: str, *overrides: str, debug: bool = False) -> list[str]:
    return [VITOK, "submit", stage, "--address", address, *(["--debug"] if debug else []), "--preset", "tiny",
            *overrides]  # fmt: skip


@pytest.fixture
def no_images(tmp_path) -> Path:
    """A source that exists (so the preflight passes) and holds no image: the ingest job itself fails."""
    folder = tmp_path / "no-images"
    folder.mkdir()
    (folder / "README.txt").write_text("not an image\n")
    return folder


def test_submit_runs_a_stage_and_sigterm_stops_its_ray_job(ray_head, photos, tmp_path):
    from ray.job_submission import JobSubmissionClient

    # files_per_task=4 gives these photos an ingest key (and so job ids) of their own: no other test's job
    # of the same key is attached to.
    overrides = [*args_for(photos, str(tmp_path / "runs")), "ingest.files_per_task=4", *CLUSTER_JOB]
    env = vitok_env(tmp_path)
    done = subprocess.run(submit(ray_head, "ingest", *overrides), cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "submitted Ray job vitok-ingest-" in done.stdout
    assert is_complete(stages.planned_output("ingest", load_config("tiny", overrides)))

    # A long train_ae job, and SIGTERM to the command waiting on it: the job is stopped, the command says so
    # in one line and exits 128 + 15.
    long = [*overrides, "train.steps=2000", "train.checkpoint_every=1000"]
    command = subprocess.Popen(submit(ray_head, "train_ae", *long), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    line = ""
    while not line.startswith("submitted Ray job"):
        line = command.stdout.readline()
        assert line, f"vitok submit ended before submitting: {command.communicate()[1]}"
    job_id = line.split()[3].rstrip(":")
    client = JobSubmissionClient(ray_head)
    deadline = time.time() + 60
    while str(client.get_job_status(job_id).value) != "RUNNING":
        assert time.time() < deadline, f"{job_id} did not start"
        time.sleep(0.5)
    command.send_signal(signal.SIGTERM)
    out, err = command.communicate(timeout=60)
    assert command.returncode == 143 and err.splitlines() == ["vitok submit: terminated (SIGTERM)"], err
    assert f"stopped Ray job {job_id}" in out
    deadline = time.time() + 60
    while str(client.get_job_status(job_id).value) != "STOPPED" and time.time() < deadline:
        time.sleep(0.5)
    assert str(client.get_job_status(job_id).value) == "STOPPED"


@pytest.fixture
def workdir(tmp_path, photos) -> Path:
    """A directory to run `vitok` from, holding the photos at the relative path `photos` (the roots stay at the
    default, the relative `runs`). It is what Ray uploads as the job's working directory: nothing else is in it."""
    work = tmp_path / "work"
    shutil.copytree(photos, work / "photos")
    return work


def relative(*extra: str) -> list[str]:
    """Relative paths only, and the default working_dir: Ray's copy of the working directory is where a
    relative `runs` would land if it were submitted as it is."""
    return ["ingest.source=photos", "ingest.label_from=folder", *FAST, "orchestrate.poll_s=0.5", *extra]


def assert_ingest_output(out: str, work: Path) -> None:
    assert out.startswith(f"{work}/runs/ingest/"), out
    assert is_complete(out)
    manifest = read_json(join(out, "manifest.json"))
    assert manifest["output"] == out and manifest["counts"]["accepted"] == 16


def test_submit_with_relative_paths_writes_where_it_says(ray_head, workdir):
    done = subprocess.run(submit(ray_head, "ingest", *relative()), cwd=workdir, env=vitok_env(workdir.parent),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "its nodes (127.0.0.1) are all on this machine" in done.stdout  # orchestrate.shared_filesystem=auto
    submitted = next(line for line in done.stdout.splitlines() if line.startswith("submitted Ray job"))
    command = shlex.split(submitted.split(": ", 1)[1])
    assert f"ingest.root={workdir}/runs" in command and f"ingest.source={workdir}/photos" in command
    last = done.stdout.splitlines()[-1]
    assert last.startswith("ingest: "), done.stdout
    assert_ingest_output(last.removeprefix("ingest: "), workdir)


def test_run_in_cluster_mode_with_relative_paths_uses_the_real_output(ray_head, prefect_harness, workdir):
    """The DAG's flow (what the Prefect UI starts) in cluster mode: before, the job succeeded and the flow
    then failed on a manifest.json that was in Ray's copy of the working directory."""
    cluster = ["orchestrate.mode=cluster", f"orchestrate.address={ray_head}"]
    env = vitok_env(workdir.parent, PREFECT_API_URL=prefect.settings.PREFECT_API_URL.value())
    done = subprocess.run([VITOK, "run", "--stages", "ingest", "--preset", "tiny", *relative(*cluster)],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    stage, ran_, out = done.stdout.splitlines()[-1].split()
    assert (stage, ran_) == ("ingest", "ran"), done.stdout
    assert_ingest_output(out, workdir)


def test_submit_of_a_failing_ray_job_ends_in_one_line(ray_head, no_images, tmp_path):
    overrides = [f"ingest.source={no_images}", f"ingest.root={tmp_path / 'runs'}", *CLUSTER_JOB]
    for debug in (False, True):
        done = subprocess.run(submit(ray_head, "ingest", *overrides, debug=debug), cwd=tmp_path,
                              env=vitok_env(tmp_path), capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 1, done.stderr
        line = done.stderr.splitlines()[-1]
        assert line.startswith("vitok submit: JobFailed: Ray job vitok-ingest-") and " ended FAILED: " in line
        assert "ray job logs vitok-ingest-" in line
        assert "no files input under ingest.source" in done.stdout  # the job's own error, from its streamed log
        if debug:
            assert "Traceback (most recent call last)" in done.stderr
        else:
            assert done.stderr.splitlines() == [line]


def test_run_failing_inside_its_flow_ends_in_one_line(prefect_harness, no_images, tmp_path):
    """The preflight passes (the source exists), the ingest stage fails inside the Prefect flow: Prefect's
    log lines stay but lose their tracebacks, and the command's last line is its one-line error."""
    argv = [VITOK, "run", "--stages", "ingest", f"ingest.source={no_images}", f"ingest.root={tmp_path / 'runs'}"]
    line = f"vitok run: FileNotFoundError: no files input under ingest.source='{no_images}'"
    # No PREFECT_API_URL: Prefect's temporary server, which must be stopped (and its logs sent) before that line.
    done = subprocess.run(argv, cwd=tmp_path, env=vitok_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stderr.splitlines()[-1] == line, done.stderr
    assert "Traceback" not in done.stderr and "Error logging to API" not in done.stderr
    harness = vitok_env(tmp_path, PREFECT_API_URL=prefect.settings.PREFECT_API_URL.value())
    done = subprocess.run([*argv, "--debug"], cwd=tmp_path, env=harness, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stderr.splitlines()[-1] == line, done.stderr
    assert "Traceback (most recent call last)" in done.stderr
