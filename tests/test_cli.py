"""The vitok command and the orchestration helpers that need no cluster: config show, status, entrypoints,
stage names, deployments, and how every command ends an expected error (one line, --debug for the traceback,
SIGTERM and Ctrl-C included)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipelines import stages
from pipelines.cli import build_parser, main
from vitok_core.artifacts import join, mark_success, write_json
from vitok_core.config import load_config

VITOK = str(Path(sys.executable).parent / "vitok")  # the installed console script: the real entry point


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of `vitok ARGV` run in this process."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    return exit_.value.code, capsys.readouterr().err


def test_config_show_and_errors(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["config", "show", "--preset", "tiny", "evaluate.keep=2"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "keep: 2" in out and "# hash:" in out and "# parameters:" in out
    code, err = run_main(["config", "show", "--preset", "tiny", "train.stepz=2"], capsys)
    assert code == 1 and "train.stepz" in err
    code, err = run_main(["stage", "trian_ae"], capsys)
    assert code == 1 and "unknown stage" in err
    code, err = run_main(["run", "--stages", "trian_ae", "train.steps=3"], capsys)  # k=v after --stages: overrides
    assert code == 1 and "unknown stage(s) ['trian_ae']" in err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--preset", "tiny", "--config", "x.yaml"])  # one or the other
    with pytest.raises(SystemExit) as exit_:  # overrides after the options are overrides too
        main(["config", "show", "evaluate.keep=3", "--preset", "tiny", "train.steps=9"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "keep: 3" in out and "steps: 9" in out


def _roots(root: Path) -> list[str]:
    return [f"{key}={root}" for key in stages.ROOTS.values()]


# (name, argv, what the one line must say, what it must not say); {tmp} is the test's directory, {dead} an
# address nobody listens on.
ERRORS = [
    ("config", ["config", "show", "--preset", "tiny", "train.stepz=2"], "config error: ", "Traceback"),
    ("missing source", ["run", "--preset", "tiny", "ingest.source={tmp}/nowhere"], "ingest.source=", "Traceback"),
    ("missing input", ["stage", "evaluate", "--preset", "tiny", "ingest.source={tmp}", "ROOTS"], "FileNotFoundError: ",
     "Traceback"),
    # submit's preflight, before any cluster is contacted: the message is the preflight's, not a connection error
    ("submit preflight", ["submit", "ingest", "--address", "{dead}", "ingest.source={tmp}/nowhere"], "ingest.source=",
     "connect"),
    ("unreachable", ["submit", "ingest", "--address", "{dead}", "ingest.source={tmp}"], "no Ray Jobs API answers at",
     "Traceback"),
    # only presets that say so (tiny) fall back to the demo photos
    ("5b without source", ["run", "--preset", "5b"], "ingest.source is empty", "Traceback"),
]  # fmt: skip


@pytest.mark.parametrize("argv, says, not_says", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_expected_errors_end_in_one_line_and_debug_adds_the_traceback(
    argv, says, not_says, tmp_path, capsys, monkeypatch
):
    import ray

    was_running = ray.is_initialized()  # a session-wide local Ray of other tests may be up already
    monkeypatch.chdir(tmp_path)  # runs/ and .data/demo_photos would be written here
    dead = f"http://127.0.0.1:{_free_port()}"
    argv = [a.format(tmp=tmp_path, dead=dead) for a in argv]
    argv = [x for a in argv for x in (_roots(tmp_path / "runs") if a == "ROOTS" else [a])]
    code, err = run_main(argv, capsys)
    assert code == 1
    [line] = err.splitlines()
    assert line.startswith(f"vitok {argv[0]}: ") and says in line and not_says not in line
    code, err = run_main(["--debug", *argv], capsys)
    assert code == 1 and "Traceback (most recent call last)" in err and err.splitlines()[-1] == line
    assert ray.is_initialized() == was_running  # no Ray work, no demo photos, no stage output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sigterm_and_ctrl_c_end_in_one_line(tmp_path):
    """`vitok submit` against an address that accepts connections and never answers: the command waits, is
    signalled, and ends in one line (exit 128 + signal); --debug adds the traceback."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(120)
        address = f"http://127.0.0.1:{server.getsockname()[1]}"
        for signum, debug, line, code in [
            (signal.SIGTERM, [], "vitok submit: terminated (SIGTERM)", 143),
            (signal.SIGINT, ["--debug"], "vitok submit: interrupted (Ctrl-C)", 130),
        ]:
            argv = [VITOK, "submit", "ingest", "--address", address, *debug, f"ingest.source={tmp_path}"]
            proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            connection, _ = server.accept()  # the command is past its preflight and waits for an answer
            proc.send_signal(signum)
            _, err = proc.communicate(timeout=60)
            connection.close()
            assert proc.returncode == code, err
            if debug:
                assert "Traceback (most recent call last)" in err and err.splitlines()[-1] == line
            else:
                assert err.splitlines() == [line]


def test_status_lists_stage_outputs(tmp_path, capsys):
    done = join(str(tmp_path), "ingest", "abc")
    settings = {"source": "/photos", "budgets": [64, 256]}
    write_json(join(done, "manifest.json"), {"counts": {"read": 5, "accepted": 4, "rejected": 1}, "settings": settings})
    mark_success(done)
    finished = datetime(2026, 3, 4, 5, 6).timestamp()
    os.utime(join(done, "manifest.json"), (finished, finished))
    # An unfinished train_ae run: its config.yaml (written at start) and the metric lines of two checkpoints.
    run = tmp_path / "train_ae" / "def"
    (run / "metrics").mkdir(parents=True)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(load_config("tiny", ["train.steps=50"])))
    for step in (2, 4):
        lines = [{"step": s, "loss": 0.5} for s in (step - 1, step)]
        (run / "metrics" / f"step-{step:08d}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "train_flow" / "ghi").mkdir(parents=True)  # started, nothing written yet

    rows = stages.status(str(tmp_path))
    assert [(r["stage"], r["key"], r["done"]) for r in rows] == [
        ("ingest", "abc", True),
        ("train_ae", "def", False),
        ("train_flow", "ghi", False),
    ]
    ingest, train, flow = rows
    assert ingest["summary"] == "read 5, accepted 4, rejected 1"
    assert ingest["config"] == "source /photos, budgets [64, 256]"
    assert ingest["written"] == "2026-03-04 05:06"  # the manifest's time, in local time
    assert train["config"] == "tiny, Tid2-Tid4/1x16x16, 50 steps"
    assert train["summary"] == "step 4 of 50 (last logged)"
    newest = datetime.fromtimestamp((run / "metrics" / "step-00000004.jsonl").stat().st_mtime)
    assert train["written"] == newest.strftime("%Y-%m-%d %H:%M")
    assert flow["summary"] == "no step logged yet" and flow["config"] == ""
    with pytest.raises(SystemExit) as exit_:
        main(["status", str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    assert exit_.value.code == 0
    assert out[0].split() == ["ingest", "abc", "done", "2026-03-04", "05:06", "source", "/photos,", "budgets", "[64,",
                              "256]", "|", "read", "5,", "accepted", "4,", "rejected", "1"]  # fmt: skip
    assert "incomplete" in out[1] and "tiny, Tid2-Tid4/1x16x16, 50 steps | step 4 of 50 (last logged)" in out[1]


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
