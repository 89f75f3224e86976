"""The vitok command and the orchestration helpers that need no cluster: config show, status, entrypoints,
stage names, deployments."""

from __future__ import annotations

import shlex

import pytest

from pipelines import stages
from pipelines.cli import build_parser, main
from vitok_core.artifacts import join, mark_success, write_json


def test_config_show_and_errors(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["config", "show", "--preset", "tiny", "evaluate.keep=2"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "keep: 2" in out and "# hash:" in out and "# parameters:" in out
    with pytest.raises(SystemExit) as exit_:
        main(["config", "show", "--preset", "tiny", "train.stepz=2"])
    assert "train.stepz" in str(exit_.value.code)
    with pytest.raises(SystemExit) as exit_:
        main(["stage", "trian_ae"])
    assert "unknown stage" in str(exit_.value.code)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--preset", "tiny", "--config", "x.yaml"])  # one or the other
    with pytest.raises(SystemExit) as exit_:  # overrides after the options are overrides too
        main(["config", "show", "evaluate.keep=3", "--preset", "tiny", "train.steps=9"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "keep: 3" in out and "steps: 9" in out


def test_status_lists_stage_outputs(tmp_path, capsys):
    done = join(str(tmp_path), "ingest", "abc")
    write_json(join(done, "manifest.json"), {"counts": {"read": 5, "accepted": 4, "rejected": 1}})
    mark_success(done)
    (tmp_path / "train_ae" / "def" / "metrics").mkdir(parents=True)
    rows = stages.status(str(tmp_path))
    assert [(r["stage"], r["key"], r["done"]) for r in rows] == [("ingest", "abc", True), ("train_ae", "def", False)]
    assert rows[0]["summary"] == "read 5, accepted 4, rejected 1"
    with pytest.raises(SystemExit):
        main(["status", str(tmp_path)])
    out = capsys.readouterr().out
    assert "ingest" in out and "incomplete" in out


def test_entrypoints_are_the_job_modules():
    command = stages.entrypoint("train_ae", "tiny", ["train.steps=3", "ingest.source=/a b/c"])
    assert shlex.split(command) == ["python", "-m", "jobs.train_ae", "--config", "tiny", "train.steps=3",
                                    "ingest.source=/a b/c"]  # fmt: skip
    flow = stages.entrypoint("train_flow", "tiny", [])
    assert flow == "python -m jobs.train_flow --config tiny && python -m jobs.sample --config tiny"
    assert stages.check_stages(["evaluate", "ingest"]) == ["ingest", "evaluate"]  # pipeline order
    with pytest.raises(ValueError, match="unknown stage"):
        stages.check_stages(["ingest", "cache"])


def test_deployments_cover_the_dag_and_every_stage():
    from pipelines.deploy import deployments

    found = deployments()
    assert [d.name for d in found] == ["pipeline", *stages.STAGES]
    assert [d.parameters.get("stage") for d in found[1:]] == list(stages.STAGES)
    from prefect.utilities.callables import parameter_schema

    from pipelines.flows import full_pipeline

    assert found[0].entrypoint.endswith("pipelines/flows.py:full_pipeline")  # what infra/prefect/prefect.yaml names
    typed = parameter_schema(full_pipeline.fn).model_dump()["properties"]  # what the UI form shows
    assert set(typed) == {"preset", "overrides", "stages", "force"} and typed["preset"]["default"] == "tiny"
