"""The vitok command and the orchestration helpers that need no cluster: config show, status, entrypoints,
stage names, deployments, and how every command ends an expected error (one line, --debug for the traceback,
SIGTERM and Ctrl-C included)."""

from __future__ import annotations

import json
import os
import re
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
    code, err = run_main(["study", "--out", "/nonexistent", "train.stepz=2"], capsys)  # before downloads or Prefect
    assert code == 1 and "train.stepz" in err
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
    # a cluster that does not see this machine's files and the default relative roots: refused before any
    # request to the cluster (the address is dead: contacting it would end in a connection error instead)
    ("relative root, non-shared cluster", ["submit", "ingest", "--address", "{dead}", "ingest.source={tmp}",
     "orchestrate.shared_filesystem=false"], "config error: ingest.root='runs'", "no Ray Jobs API"),
    ("run: relative root, non-shared cluster", ["run", "--stages", "ingest", "ingest.source={tmp}",
     "orchestrate.mode=cluster", "orchestrate.address={dead}", "orchestrate.shared_filesystem=false"],
     "Use absolute paths that every node mounts, or s3:// URIs", "no Ray Jobs API"),
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
    assert out[0].split() == ["ingest", "abc", "done", "code:unknown", "2026-03-04", "05:06", "source",
                              "/photos,", "budgets", "[64,", "256]", "|", "read", "5,", "accepted", "4,", "rejected",
                              "1"]  # fmt: skip
    assert "incomplete" in out[1] and "tiny, Tid2-Tid4/1x16x16, 50 steps | step 4 of 50 (last logged)" in out[1]
    assert "code:-" in out[1]  # an unfinished run has no manifest yet


def test_status_flags_outputs_made_by_other_code(tmp_path, capsys):
    """A manifest's code fingerprint against this checkout's: current, stale (with what changed and the command
    that reruns it: the stage, and the stages that follow it by key), or unknown when it has none."""
    from vitok_core.fingerprint import manifest_fields

    now = manifest_fields("train_ae")
    old = {"code_fingerprint": "0123456789abcdef", "code_files": {**now["code_files"], "vitok_core/losses.py": "0"}}
    for key, code in (("current", now), ("stale", old), ("unknown", {})):
        write_json(join(str(tmp_path), "train_ae", key, "manifest.json"), {"step": 3, **code})
        mark_success(join(str(tmp_path), "train_ae", key))
    write_json(join(str(tmp_path), "ingest", "old", "manifest.json"), {"code_fingerprint": "0" * 16})
    mark_success(join(str(tmp_path), "ingest", "old"))
    rows = {r["key"]: r["code"] for r in stages.status(str(tmp_path))}
    assert {key: code["state"] for key, code in rows.items()} == {
        "old": "stale", "current": "current", "stale": "stale", "unknown": "unknown"}  # fmt: skip
    assert rows["stale"]["changed"] == ["vitok_core/losses.py"] and rows["unknown"]["rerun"] is None
    assert rows["old"]["changed"] == []  # files not recorded

    with pytest.raises(SystemExit) as exit_:
        main(["status", str(tmp_path)])
    assert exit_.value.code == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[:4] for line in out if not line.startswith(" ")] == [
        ["ingest", "old", "done", "code:STALE"],
        ["train_ae", "current", "done", "code:current"],
        ["train_ae", "stale", "done", "code:STALE"],
        ["train_ae", "unknown", "done", "code:unknown"],
    ]
    ingest_now = stages.fingerprint("ingest")["fingerprint"]
    assert out[1] == f"  stale: made by code {'0' * 16}, this checkout is {ingest_now}; changed: files not recorded"
    assert out[2].endswith(": vitok run --force ingest train_ae [--preset P | --config F] [key=value ...]")
    stale = out.index(next(line for line in out if line.startswith("train_ae       stale")))
    assert out[stale + 1].startswith("  stale: made by code 0123456789abcdef, this checkout is ")
    assert out[stale + 1].endswith("; changed: vitok_core/losses.py")
    assert out[stale + 2] == (
        "  rerun, with the preset and key=value overrides that made it: "
        "vitok run --force train_ae [--preset P | --config F] [key=value ...]"
    )
    # with the run's own preset and overrides (what the Prefect artifacts show), the command is complete
    command = stages.rerun_command("cache_latents", "350m", ["ingest.source=/a b"])
    assert shlex.split(command) == ["vitok", "run", "--preset", "350m", "--force", "cache_latents", "train_flow",
                                    "ingest.source=/a b"]  # fmt: skip
    assert stages.rerun_command("evaluate", "my.yaml", []) == "vitok run --config my.yaml --force evaluate"


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
    assert [d.name for d in found] == ["pipeline", *stages.STAGES, "study"]
    assert [d.parameters.get("stage") for d in found[1:-1]] == list(stages.STAGES)
    from prefect.utilities.callables import parameter_schema

    from pipelines.flows import full_pipeline

    assert found[0].entrypoint.endswith("pipelines/flows.py:full_pipeline")  # what infra/prefect/prefect.yaml names
    typed = parameter_schema(full_pipeline.fn).model_dump()["properties"]  # what the UI form shows
    assert set(typed) == {"preset", "overrides", "stages", "force"} and typed["preset"]["default"] == "tiny"


def test_run_form_schema_has_descriptions_choices_and_a_string_list():
    """The deployments' parameter schema (what Prefect's run form renders and its server validates against):
    every parameter described, presets and stages as choices, overrides an array of key=value strings."""
    from pipelines.deploy import deployments
    from pipelines.form import OVERRIDE_PATTERN
    from vitok_core.config import preset_names

    pipeline, *per_stage, study = deployments()
    schema = pipeline._parameter_openapi_schema.model_dump_for_openapi()
    props = schema["properties"]
    assert schema.get("required", []) == []  # every parameter has a default: the form runs as it opens
    assert all(props[name].get("description") for name in ("preset", "overrides", "stages", "force"))
    assert props["preset"]["enum"] == preset_names() and "tiny" in props["preset"]["enum"]
    for name in ("stages", "force"):
        assert props[name]["type"] == "array" and props[name]["items"]["enum"] == list(stages.STAGES)
    assert props["stages"]["default"] == list(stages.STAGES) and props["force"]["default"] == []
    overrides = props["overrides"]
    assert overrides["type"] == "array" and overrides["items"] == {"type": "string", "pattern": OVERRIDE_PATTERN}
    assert overrides["default"] == [] and "key=value" in overrides["description"]
    assert all(re.match(OVERRIDE_PATTERN, item) for item in overrides["examples"][0])
    assert not any("anyOf" in prop or prop.get("type") == "null" for prop in props.values())  # no "None" type
    for deployment, stage in zip(per_stage, stages.STAGES, strict=True):
        stage_props = deployment._parameter_openapi_schema.model_dump_for_openapi()["properties"]
        assert stage_props["stage"]["readOnly"] and stage_props["stage"]["enum"] == [stage]
        assert all(stage_props[name].get("description") for name in ("stage", "preset", "overrides", "force"))
    study_props = study._parameter_openapi_schema.model_dump_for_openapi()["properties"]
    assert study_props["preset"]["default"] == "cpu_study" and study_props["preset"]["enum"] == preset_names()
    assert all(study_props[name].get("description") for name in ("preset", "overrides", "out", "data"))


# ------------------------------------------------------------------------------------------------
# Cluster mode: relative paths made absolute against the submitting directory, or refused
# ------------------------------------------------------------------------------------------------
CLUSTER = ["orchestrate.mode=cluster", "orchestrate.address=http://10.255.0.1:8265"]  # never contacted here


def test_cluster_paths_are_made_absolute_against_this_directory(tmp_path, monkeypatch, capsys):
    from pipelines.paths import for_cluster

    monkeypatch.chdir(tmp_path)
    here = os.getcwd()
    given = [*CLUSTER, "orchestrate.shared_filesystem=true", "ingest.source=photos", "train.ingest=s3://b/ingest/k",
             "evaluate.root=/abs/eval", "evaluate.baselines=[/abs/a, base/b, s3://c/d]",
             "loss.dino_weights=weights/dino.safetensors",
             "evaluate.dinov2_weights=vit_large_patch14_dinov2.lvd142m"]  # fmt: skip
    resolved = for_cluster("tiny", given)
    assert resolved[: len(given)] == given  # added as later overrides: what the job is given, and what wins
    said = capsys.readouterr().out
    assert said.startswith("cluster mode: ingest.root='runs', ") and f"absolute against {here} (" in said
    cfg = load_config("tiny", resolved)
    for key in ("ingest.root", "train.root", "cache.root", "flow.root"):
        assert OmegaConf.select(cfg, key) == f"{here}/runs"
    assert cfg.ingest.source == f"{here}/photos" and cfg.loss.dino_weights == f"{here}/weights/dino.safetensors"
    assert cfg.train.ingest == "s3://b/ingest/k" and cfg.evaluate.root == "/abs/eval"  # URIs, absolute paths kept
    assert list(cfg.evaluate.baselines) == ["/abs/a", f"{here}/base/b", "s3://c/d"]
    assert cfg.evaluate.dinov2_weights == "vit_large_patch14_dinov2.lvd142m"  # a hub name, not a path
    assert stages.planned_output("ingest", cfg).startswith(f"{here}/runs/ingest/")
    assert for_cluster("tiny", resolved) == resolved  # nothing relative is left
    assert for_cluster("tiny", ["ingest.root=runs"]) == ["ingest.root=runs"]  # local mode: the jobs run here


def test_cluster_paths_are_refused_when_the_cluster_does_not_share_them():
    from pipelines.paths import for_cluster
    from vitok_core.config import ConfigError

    with pytest.raises(ConfigError) as err:
        for_cluster("tiny", [*CLUSTER, "orchestrate.shared_filesystem=false", "ingest.root=/abs", "flow.root=runs"])
    message = str(err.value)
    assert message.startswith("train.root='runs', cache.root='runs', flow.root='runs', evaluate.root='runs': ")
    assert "ingest.root" not in message and "s3://" in message and "\n" not in message
    absolute = [*CLUSTER, "orchestrate.shared_filesystem=false", *(f"{k}=s3://b/runs" for k in stages.ROOTS.values())]
    assert for_cluster("tiny", absolute) == absolute  # URIs need no shared filesystem
    with pytest.raises(ConfigError, match=r"orchestrate\.shared_filesystem='maybe'"):
        load_config("tiny", ["orchestrate.shared_filesystem=maybe"])


def test_path_keys_cover_every_root_and_overrides_parse_back():
    from pipelines.paths import PATH_KEYS, override
    from vitok_core.config import VitokConfig, to_dict

    def keys(tree: dict, prefix: str = "") -> list[str]:
        return [k for name, v in tree.items() for k in (keys(v, f"{prefix}{name}.") if isinstance(v, dict)
                                                       else [f"{prefix}{name}"])]  # fmt: skip

    roots = {k for k in keys(to_dict(VitokConfig())) if k.endswith(".root")}
    assert roots == set(stages.ROOTS.values()) and roots <= set(PATH_KEYS)
    for value in ["/a/b", "/odd #dir: x/[1]", ["/a b", "s3://c/d"]]:
        assert OmegaConf.to_container(OmegaConf.from_dotlist([override("k", value)]))["k"] == value
    assert override("k", "/a/b") == "k=/a/b"  # quoted only where it must be


def test_node_ips_of_this_machine():
    from pipelines.cluster import is_this_machine, this_machine

    here = this_machine()
    assert is_this_machine("127.0.0.1", set()) and is_this_machine("::1", set())
    assert not is_this_machine("10.255.0.1", {"10.255.0.2"}) and is_this_machine("10.255.0.2", {"10.255.0.2"})
    assert not is_this_machine("head-node", here)
    assert all(is_this_machine(ip, here) for ip in here)
