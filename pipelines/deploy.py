"""Prefect deployments: the whole DAG and each stage, served from this process to a Prefect server so that
a user starts them from the UI with typed parameters (preset, overrides, stages, force): the run form shows each
one's description, offers the presets and stages as choices, and the server refuses a run whose parameters do
not fit (pipelines/form.py) before any flow code runs.

    prefect server start --host 127.0.0.1        # the UI on http://127.0.0.1:4200
    PREFECT_API_URL=http://127.0.0.1:4200/api vitok serve
    prefect deployment run 'vitok-pipeline/pipeline' -p preset=tiny

For work pools (Kubernetes or process workers) see infra/prefect/prefect.yaml: the same two entrypoints.
"""

from __future__ import annotations

from typing import Any

from prefect.utilities.annotations import freeze

from pipelines.flows import full_pipeline, run_stage
from pipelines.stages import STAGES


def deployments() -> list[Any]:
    """`vitok-pipeline/pipeline` (the DAG), `vitok-stage/<stage>` for each stage, `vitok-study/study`."""
    from pipelines.study import study_flow

    dag = "ingest -> train_ae -> cache_latents -> train_flow -> evaluate; done stages are skipped"
    found = [full_pipeline.to_deployment(name="pipeline", description=dag, tags=["vitok"])]
    for stage in STAGES:
        found.append(
            run_stage.to_deployment(
                name=stage,
                parameters={"stage": freeze(stage)},  # shown in the form, read-only
                description=f"the {stage} stage alone (its inputs must exist)",
                tags=["vitok", stage],
            )
        )
    found.append(
        study_flow.to_deployment(
            name="study",
            description="the CPU training study (configs/cpu_study.yaml, ~90 min): both arms, evaluation, results.md",
            tags=["vitok", "study"],
        )
    )
    return found


def serve() -> None:
    from prefect import serve as prefect_serve

    prefect_serve(*deployments())
