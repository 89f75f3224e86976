"""Prefect flows: the whole DAG (ingest -> train_ae -> cache_latents -> train_flow -> evaluate) and one stage.

Prefect is the control plane only. Each stage task plans the stage's artifact from the config and the
upstream markers, returns the existing artifact when its `_SUCCESS` exists (unless forced), and otherwise
runs the stage: in this process against a local Ray (orchestrate.mode=local) or as a Ray job through the
Jobs API (orchestrate.mode=cluster). Prefect's own caching is off: the markers are the source of truth,
so a flow run restarted after a crash reconciles from them, and a changed stage config (a new key) reruns
that stage and, through the keys, everything downstream.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipelines import stages as dag
from vitok_core.artifacts import is_complete, join, read_json
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


def _publish(stage: str, manifest: dict[str, Any], out: str) -> None:
    """UI artifacts: the manifest's headline numbers, a link to the output, the evaluation report."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    key = f"vitok-{stage.replace('_', '-')}"
    flat = {k: v for k, v in manifest.items() if isinstance(v, (str, int, float, bool)) or v is None}
    for name, value in (manifest.get("counts") or {}).items():
        if isinstance(value, (int, float)):
            flat[f"counts.{name}"] = value
    create_table_artifact([{"field": k, "value": str(v)} for k, v in flat.items()], key=key)
    create_link_artifact(out if "://" in out else f"file://{out}", link_text=f"{stage} output", key=f"{key}-output")
    if stage == "evaluate":
        create_markdown_artifact(_report_with_plots(out), key="vitok-evaluate-report", description="evaluation report")


def _report_with_plots(out: str, max_bytes: int = 400_000) -> str:
    """report.md with its figures inlined as data URIs (the UI cannot follow paths relative to the report);
    figures larger than `max_bytes` become links to the file."""
    import base64

    import fsspec

    with fsspec.open(join(out, "report.md"), "r") as f:
        text = f.read()
    for rel in read_json(join(out, "metrics.json")).get("figures", {}).values():
        with fsspec.open(join(out, rel), "rb") as f:
            data = f.read()
        uri = join(out, rel)
        inline = f"data:image/png;base64,{base64.b64encode(data).decode()}" if len(data) <= max_bytes else uri
        text = text.replace(f"]({rel})", f"]({inline})")
    return text


@task(name="stage", task_run_name="{stage}", cache_policy=NO_CACHE, persist_result=False)
def stage_task(stage: str, preset: str, overrides: list[str], force: bool = False) -> dict[str, Any]:
    logger = get_run_logger()
    if stage == "evaluate":
        overrides = dag.with_samples(load_config(preset, overrides), overrides)
    cfg = load_config(preset, overrides)
    if force:
        removed = dag.force_rerun(stage, cfg)
        logger.info("%s: forced; removed %s", stage, removed)
    out = dag.planned_output(stage, cfg)
    if is_complete(out):
        logger.info("%s: done at %s; skipped", stage, out)
        return {**dag.manifest_of(out), "skipped": True}
    if cfg.orchestrate.mode == "cluster":
        from pipelines.cluster import run_on_cluster

        key = out.rstrip("/").rsplit("/", 1)[-1]
        run_on_cluster(stage, key, dag.entrypoint(stage, preset, overrides), cfg, logger.info, _cancelled)
        manifest = dag.manifest_of(out)
    else:
        manifest = dag.run_local(stage, cfg)
    if not is_complete(out):
        raise RuntimeError(f"{stage} ended without completing {out} (status {manifest.get('status')})")
    _publish(stage, manifest, out)
    logger.info("%s: done at %s", stage, out)
    return {**manifest, "skipped": False}


@flow(name="vitok-pipeline", log_prints=True)
def full_pipeline(
    preset: str = "tiny",
    overrides: list[str] | None = None,
    stages: list[str] | None = None,
    force: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """The DAG in order; `stages` picks a subset (default all), `force` reruns chosen stages."""
    selected = dag.check_stages(stages or list(dag.STAGES))
    forced = dag.check_stages(force or [], "force")
    resolved = dag.resolve_overrides(preset, overrides or [])
    dag.preflight(preset, resolved, selected)
    results = {}
    for stage in selected:
        results[stage] = stage_task(stage, preset, resolved, stage in forced)
    return results


@flow(name="vitok-stage", log_prints=True)
def run_stage(stage: str, preset: str = "tiny", overrides: list[str] | None = None, force: bool = False) -> dict:
    """One stage (its inputs must exist)."""
    dag.check_stages([stage], "stage")
    resolved = dag.resolve_overrides(preset, overrides or [])
    dag.preflight(preset, resolved, [stage])
    return stage_task(stage, preset, resolved, force)
