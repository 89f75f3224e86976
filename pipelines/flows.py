"""Prefect flows: the whole DAG (ingest -> train_ae -> cache_latents -> train_flow -> evaluate) and one stage.

Prefect is the control plane only. Each stage task plans the stage's artifact from the config and the
upstream markers, returns the existing artifact when its `_SUCCESS` exists (unless forced), and otherwise
runs the stage: in this process against a local Ray (orchestrate.mode=local) or as a Ray job through the
Jobs API (orchestrate.mode=cluster). Prefect's own caching is off: the markers are the source of truth,
so a flow run restarted after a crash reconciles from them, and a changed stage config (a new key) reruns
that stage and, through the keys, everything downstream.

What the Prefect UI shows: each stage's artifacts (pipelines/publish.py), a local stage's training steps in the
run log (pipelines/progress.py), "Skipped" as the state name of a stage that was already done and of a flow run
where nothing ran, and the run form's typed parameters (pipelines/form.py).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from pipelines import progress
from pipelines import stages as dag
from pipelines.form import Overrides, Preset, Stage, Stages
from pipelines.paths import for_cluster
from pipelines.publish import publish
from vitok_core.artifacts import is_complete
from vitok_core.config import load_config


def _cancelled() -> bool:
    """Whether this flow run has been asked to cancel (checked while a Ray job runs)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.runtime import flow_run

    if not flow_run.id:
        return False
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run.id).state
    return state is not None and state.type in (StateType.CANCELLING, StateType.CANCELLED)


@task(name="stage", task_run_name="{stage}", cache_policy=NO_CACHE, persist_result=False)
def stage_task(stage: str, preset: str, overrides: list[str], force: bool = False) -> dict[str, Any] | State:
    logger = get_run_logger()
    rerun = dag.rerun_command(stage, preset, overrides)  # shown when the output's code is stale
    if stage == "evaluate":
        overrides = dag.with_samples(load_config(preset, overrides), overrides)
    cfg = load_config(preset, overrides)
    if force:
        removed = dag.force_rerun(stage, cfg)
        logger.info("%s: forced; removed %s", stage, removed)
    out = dag.planned_output(stage, cfg)
    if is_complete(out):
        logger.info("%s: done at %s; skipped", stage, out)
        manifest = dag.manifest_of(out)
        if publish(stage, manifest, out, skipped=True, rerun=rerun)["state"] == "stale":
            logger.warning("%s: %s was made by other code than this; to rerun it: %s", stage, out, rerun)
        # A state of its own name: the UI shows the task run as "Skipped", not as a run that did the work.
        return Completed(name="Skipped", message=f"already complete at {out}", data={**manifest, "skipped": True})
    if cfg.orchestrate.mode == "cluster":
        from pipelines.cluster import run_on_cluster

        key = out.rstrip("/").rsplit("/", 1)[-1]
        run_on_cluster(stage, key, dag.entrypoint(stage, preset, overrides), cfg, logger.info, _cancelled)
        manifest = dag.manifest_of(out)
    else:
        # The stage runs in this process: its driver's log records and its training steps (logged by Ray Train
        # workers, which Prefect does not see) reach this run's log through the logger and the progress file.
        with progress.forward(progress.run_log_handler()), progress.watch(out, logger.info):
            manifest = dag.run_local(stage, cfg)
    if not is_complete(out):
        raise RuntimeError(f"{stage} ended without completing {out} (status {manifest.get('status')})")
    publish(stage, manifest, out, rerun=rerun)
    logger.info("%s: done at %s", stage, out)
    return {**manifest, "skipped": False}


def _value(returned: dict[str, Any] | State) -> dict[str, Any]:
    """A task that returns a State (Skipped) hands that State to its caller: its data is the manifest."""
    return returned.result() if isinstance(returned, State) else returned


def _skipped_or(data: Any, skipped: bool) -> Any:
    """`data`, as a Completed state named "Skipped" when nothing ran: such a flow run must not look like one
    that trained and evaluated (a direct call still returns `data`)."""
    return Completed(name="Skipped", message="already complete: nothing ran", data=data) if skipped else data


@flow(name="vitok-pipeline", log_prints=True)
def full_pipeline(
    preset: Preset = "tiny",
    overrides: Overrides = (),
    stages: Stages = dag.STAGES,
    force: Stages = (),
) -> dict[str, dict[str, Any]] | State:
    """The DAG in order (ingest -> train_ae -> cache_latents -> train_flow -> evaluate); stages already done for
    this config are skipped.

    Args:
        stages: The stages to run, in pipeline order whatever the order given (default: all five). The first
            one's inputs must exist.
        force: Stages to rerun even when done: their output is deleted first (checkpoints included).
    """
    selected = dag.check_stages(stages or dag.STAGES)
    forced = dag.check_stages(force or [], "force")
    resolved = dag.resolve_overrides(preset, overrides or [])
    dag.preflight(preset, resolved, selected)
    resolved = for_cluster(preset, resolved)  # cluster mode: the job's outputs land where this run looks
    results = {}
    for stage in selected:
        results[stage] = _value(stage_task(stage, preset, resolved, stage in forced))
    return _skipped_or(results, all(manifest["skipped"] for manifest in results.values()))


@flow(name="vitok-stage", log_prints=True)
def run_stage(stage: Stage, preset: Preset = "tiny", overrides: Overrides = (), force: bool = False) -> dict | State:
    """One stage; its inputs (the upstream stages' outputs for this config) must exist.

    Args:
        stage: The stage to run.
        force: Rerun the stage even when done: its output is deleted first (checkpoints included).
    """
    dag.check_stages([stage], "stage")
    resolved = dag.resolve_overrides(preset, overrides or [])
    dag.preflight(preset, resolved, [stage])
    result = _value(stage_task(stage, preset, for_cluster(preset, resolved), force))
    return _skipped_or(result, result["skipped"])
