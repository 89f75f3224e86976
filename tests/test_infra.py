"""infra/: every manifest parses, carries the fields its tool needs, and agrees with the code and with the other
manifests: one image (the one infra/docker builds), stage entrypoints the CLI accepts with presets and keys
that exist, one set of overrides for every stage, outputs on shared storage, and no credentials anywhere.

Fast and offline: YAML / JSON parsing, the config loader, and Ray's own cluster-config JSON schema read from
the installed package (Ray and Prefect themselves are not imported).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from jobs.common import parse_config
from vitok_core.config import VitokConfig, preset_names, to_dict

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"
LAUNCHER = INFRA / "launcher" / "aws-gpu.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
BASE_JOB_TEMPLATE = INFRA / "prefect" / "k8s-base-job-template.json"
PREFECT_YAML = INFRA / "prefect" / "prefect.yaml"
FLOWS = REPO / "pipelines" / "flows.py"
STAGES = ("ingest", "train_ae", "cache_latents", "train_flow", "evaluate")
GPU_STAGES = ("train_ae", "cache_latents", "train_flow", "evaluate")
FLOW_ENTRYPOINTS = {"pipelines/flows.py:full_pipeline", "pipelines/flows.py:run_stage"}

# A value for every substitution variable (infra/README.md); manifests are checked as they would be applied.
TEST_ENV = {
    "VITOK_REGISTRY": "123456789012.dkr.ecr.us-west-2.amazonaws.com",
    "VITOK_SOURCE": "s3://vitok-test/raw",
    "VITOK_RUNS": "s3://vitok-test/runs",
    "VITOK_EVAL_DATA": "s3://vitok-test/eval/imagenet-val",
    "VITOK_IRSA_ROLE_ARN": "arn:aws:iam::123456789012:role/vitok",
    "VITOK_AWS_REGION": "us-west-2",
    "VITOK_AMI": "ami-0123456789abcdef0",
    "VITOK_HEAD_INSTANCE_PROFILE_ARN": "arn:aws:iam::123456789012:instance-profile/vitok-head",
    "VITOK_WORKER_INSTANCE_PROFILE_ARN": "arn:aws:iam::123456789012:instance-profile/vitok-worker",
}


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def _render_module() -> Any:
    spec = importlib.util.spec_from_file_location("vitok_infra_render", INFRA / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RENDER = _render_module()


def prefect_env_to_placeholder(text: str) -> str:
    """Prefect's deploy-time `{{ $VITOK_X }}` is the same variable as `${VITOK_X}` elsewhere."""
    return re.sub(r"\{\{\s*\$(VITOK_[A-Z0-9_]+)\s*\}\}", r"${\1}", text)


def rendered(path: Path) -> str:
    return RENDER.render(prefect_env_to_placeholder(path.read_text()), TEST_ENV)


def infra_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


@functools.cache
def k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    """Every KubeRay / Kubernetes document, rendered and parsed once (callers do not modify them)."""
    return [(p, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in yaml.safe_load_all(rendered(p)) if d]


def rayjobs() -> dict[str, dict[str, Any]]:
    """RayJob by the stage its entrypoint runs."""
    jobs = {}
    for _, doc in k8s_docs():
        if doc["kind"] == "RayJob":
            stage = parse_entrypoint(doc["spec"]["entrypoint"])[0]
            assert stage not in jobs, f"two RayJobs run {stage}"
            jobs[stage] = doc
    return jobs


def raycluster() -> dict[str, Any]:
    (doc,) = [d for _, d in k8s_docs() if d["kind"] == "RayCluster"]
    return doc


def pin(name: str) -> str:
    """The version pyproject.toml pins `name` to (e.g. ray[train,data]==2.60.0 -> 2.60.0)."""
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(rf'^\s*"{re.escape(name)}(?:\[[^\]]*\])?==([^"]+)"', text, re.M)
    assert match, f"pyproject.toml does not pin {name}"
    return match.group(1)


def project_version() -> str:
    match = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert match
    return match.group(1)


def canonical_image() -> str:
    """What infra/docker/build.sh tags: ${VITOK_REGISTRY}/vitok:<project version>."""
    return f"{TEST_ENV['VITOK_REGISTRY']}/vitok:{project_version()}"


def parse_command(argv: list[str]) -> tuple[str, str, list[str]]:
    """`python -m jobs.<module> --config <preset> [key=value ...]` -> (module, preset, overrides)."""
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."), f"not python -m jobs.<stage>: {argv}"
    assert argv[3] == "--config" and len(argv) >= 5, f"no --config: {argv}"
    return argv[2].removeprefix("jobs."), argv[4], argv[5:]


def parse_entrypoint(command: str) -> tuple[str, str, list[str]]:
    """A stage's command line (commands chained with &&, as pipelines/stages.py makes them for train_flow) ->
    (stage, preset, overrides); every command of a chain must run with the same config."""
    argv, parts = shlex.split(command), [[]]
    for token in argv:
        parts.append([]) if token == "&&" else parts[-1].append(token)
    parsed = [parse_command(part) for part in parts]
    assert all(p[1:] == parsed[0][1:] for p in parsed), f"a chain with two configs: {command}"
    for module, preset, overrides in parsed:
        cli_config(module, preset, overrides)
    return parsed[0]


@functools.cache
def _parsed(preset: str, overrides: tuple[str, ...]) -> VitokConfig | None:
    """The jobs' command line (jobs.common.parse_config, the same for every stage) on these arguments."""
    try:
        return parse_config("vitok stage", ["--config", preset, *overrides])
    except SystemExit:
        return None


def cli_config(stage: str, preset: str, overrides: list[str]) -> VitokConfig:
    """What `python -m jobs.<stage>` (and `vitok stage|submit <stage>`) makes of these arguments."""
    assert (REPO / "jobs" / f"{stage}.py").is_file(), f"jobs/{stage}.py does not exist"
    assert preset in preset_names(), f"preset {preset!r} is not in configs/ ({preset_names()})"
    for item in overrides:
        assert re.fullmatch(r"[a-z_][a-z0-9_.]*=\S+", item), f"not key=value: {item!r}"
    cfg = _parsed(preset, tuple(overrides))
    assert cfg is not None, f"jobs.{stage} rejects --config {preset} {overrides} (the config error is printed above)"
    return cfg


def pod_specs(cluster_spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(group name, group spec, pod spec) for the head ("head") and every worker group."""
    yield "head", cluster_spec["headGroupSpec"], cluster_spec["headGroupSpec"]["template"]["spec"]
    for group in cluster_spec.get("workerGroupSpecs", []):
        yield group["groupName"], group, group["template"]["spec"]


def gpus(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def group_totals(cluster_spec: dict[str, Any]) -> dict[str, tuple[int, float]]:
    """Worker group -> (GPUs, CPUs) at its replica count."""
    totals = {}
    for name, group, pod in pod_specs(cluster_spec):
        if name != "head":
            container = pod["containers"][0]
            cpus = float(container["resources"]["limits"]["cpu"])
            totals[name] = (gpus(container) * group["replicas"], cpus * group["replicas"])
    return totals


def walk(node: Any, key: str) -> Iterator[Any]:
    """Every value stored under `key` anywhere in a parsed document."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v, key)


def readme_code() -> str:
    """The fenced code blocks of infra/README.md, placeholders filled, continuation lines joined."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", (INFRA / "README.md").read_text(), re.M | re.S)
    return RENDER.render("".join(blocks), TEST_ENV).replace("\\\n", " ")


def readme_overrides() -> list[str]:
    """The bash array `overrides=( ... )` that infra/README.md's commands use."""
    match = re.search(r"^overrides=\((.*?)^\)", readme_code(), re.M | re.S)
    assert match, "infra/README.md defines no overrides=( ... ) array"
    return shlex.split(match.group(1), comments=True)


@functools.cache
def vitok_parser() -> Any:
    """The `vitok` command's own argument parser (pipelines/cli.py), imported without keeping the environment
    defaults that module sets for its own runs."""
    saved = dict(os.environ)
    try:
        from pipelines.cli import build_parser
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return build_parser()


def readme_commands() -> list[tuple[str, str, list[str]]]:
    """Every stage command in infra/README.md's code: python -m jobs.X, vitok stage|submit X."""
    commands = []
    for line in readme_code().splitlines():
        line = line.split(" # ")[0].replace('"${overrides[@]}"', " ".join(readme_overrides()))
        if "python -m jobs." in line:
            commands.append(parse_entrypoint(line[line.index("python -m jobs.") :]))
        elif re.search(r"\bvitok (stage|submit) ", line):
            argv = shlex.split(line[re.search(r"\bvitok (stage|submit) ", line).start() :])
            try:
                args = vitok_parser().parse_args(argv[1:])
            except SystemExit:
                raise AssertionError(f"the vitok command rejects: {line}") from None
            assert args.command == "stage" or args.address.startswith("http"), f"no Jobs API address: {line}"
            commands.append((args.name, args.config or args.preset or "tiny", args.overrides))
    return commands


def root_keys() -> list[str]:
    """Every `<section>.root` of the config schema: where a stage writes."""
    sections = to_dict(VitokConfig()).items()
    return [f"{name}.root" for name, value in sections if isinstance(value, dict) and "root" in value]


# ------------------------------------------------------------------------------------------------
# Parsing, variables, credentials
# ------------------------------------------------------------------------------------------------
def test_every_manifest_parses_with_every_variable_documented():
    readme = (INFRA / "README.md").read_text()
    documented = set(re.findall(r"^\| `(VITOK_[A-Z0-9_]+)` \|", readme, re.M))
    assert documented == set(TEST_ENV), "infra/README.md's variable table and this test's TEST_ENV differ"
    used = set()
    for path in infra_files():
        text = prefect_env_to_placeholder(path.read_text())
        used |= RENDER.placeholders(text)
        if path.suffix in (".yaml", ".yml"):
            assert all(d is not None for d in yaml.safe_load_all(rendered(path))), path
        elif path.suffix == ".json":
            json.loads(rendered(path))
    assert used == documented, f"used but undocumented: {used - documented}; documented, unused: {documented - used}"
    with pytest.raises(KeyError, match="VITOK_RUNS"):
        RENDER.render("root=${VITOK_RUNS}", {})
    assert RENDER.render("a=${VITOK_RUNS} b=$RAY_HEAD_IP", TEST_ENV) == "a=s3://vitok-test/runs b=$RAY_HEAD_IP"


_CREDENTIAL_PATTERNS = (
    re.compile(r"\b(AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16}\b"),  # AWS access key ids
    re.compile(
        r"(?<![A-Za-z0-9/+=])(?=[A-Za-z0-9/+=]*[A-Z])(?=[A-Za-z0-9/+=]*[a-z])[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])"
    ),
    re.compile(r"(?i)aws_secret_access_key\s*[:=]"),
    re.compile(
        r"""(?i)\b(password|passwd|secret_?key|api_?key|auth_token|token)["']?\s*[:=]\s*["']?(?![\s"'{$<(])\S"""
    ),
)


def credential_findings(text: str) -> list[str]:
    return [m.group(0) for pattern in _CREDENTIAL_PATTERNS for m in pattern.finditer(text)]


def test_no_credentials_in_any_infra_file():
    samples = ["AKIAIOSFODNN7EXAMPLE", "aws_secret_access_key = x", "password: hunter2"]
    samples.append("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")  # AWS's documented example secret key
    assert all(credential_findings(s) for s in samples), "the detector misses a planted credential"
    for path in infra_files():
        assert not credential_findings(path.read_text()), f"{path}: {credential_findings(path.read_text())}"
    for path, doc in k8s_docs():
        assert doc["kind"] != "Secret", f"{path}: secrets are created out of band, never kept in a manifest"
    documents = [d for _, d in k8s_docs()] + [json.loads(rendered(BASE_JOB_TEMPLATE))]
    for env in (e for doc in documents for envs in walk(doc, "env") if isinstance(envs, list) for e in envs):
        if re.search(r"(?i)secret|password|token|access_key", env["name"]) and env["name"] != "RAY_AUTH_MODE":
            assert "value" not in env and "valueFrom" in env, f"{env['name']} must come from a secret reference"


# ------------------------------------------------------------------------------------------------
# The image
# ------------------------------------------------------------------------------------------------
def test_one_image_everywhere_built_by_infra_docker():
    build = (INFRA / "docker" / "build.sh").read_text()
    assert 'image="${VITOK_REGISTRY}/vitok:${version}"' in build and "pyproject.toml" in build
    assert "-f infra/docker/Dockerfile" in build
    images = []
    for _, doc in k8s_docs():
        images += list(walk(doc, "image"))
    images.append(yaml.safe_load(rendered(LAUNCHER))["docker"]["image"])
    template = json.loads(rendered(BASE_JOB_TEMPLATE))
    images.append(template["variables"]["properties"]["image"]["default"])
    for deployment in yaml.safe_load(rendered(PREFECT_YAML))["deployments"]:
        images.append(deployment["work_pool"]["job_variables"]["image"])
    assert len(images) >= 10
    assert set(images) == {canonical_image()}, set(images)


def test_dockerfile_has_the_ray_python_and_pins_of_the_project():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    assert base.startswith(f"rayproject/ray:{pin('ray')}-py311"), base
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert f"torch=={pin('torch')} torchvision=={pin('torchvision')}" in text
    assert "-c constraints.txt -e ." in text and "--no-deps -e ." in text
    for name in ("ray", "torch", "deepspeed", "prefect"):
        assert f"'{pin(name)}'" in text, f"the build-time version check does not assert {name}=={pin(name)}"
    constraints = (REPO / "constraints.txt").read_text()
    for name in ("ray", "torch", "torchvision", "deepspeed", "prefect"):
        assert re.search(rf"^{name}=={re.escape(pin(name))}$", constraints, re.M), f"constraints.txt: {name}"
    assert re.search(r"^WORKDIR /home/ray/vitok$", text, re.M)
    ignored = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".data", "runs", ".git"} <= set(ignored)


# ------------------------------------------------------------------------------------------------
# KubeRay
# ------------------------------------------------------------------------------------------------
def check_cluster_spec(spec: dict[str, Any], where: str) -> None:
    assert spec["rayVersion"] == pin("ray"), where
    assert spec["authOptions"]["mode"] == "token", f"{where}: Ray 2.60 clusters run with token auth"
    (account,) = [d for _, d in k8s_docs() if d["kind"] == "ServiceAccount"]
    for name, group, pod in pod_specs(spec):
        assert isinstance(group["rayStartParams"], dict), f"{where}/{name}: rayStartParams is required"
        assert pod["serviceAccountName"] == account["metadata"]["name"], f"{where}/{name}: not the IRSA account"
        container = pod["containers"][0]
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert requests == limits, f"{where}/{name}: requests != limits (Ray sizes itself from them)"
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", f"{where}/{name}: /dev/shm"
        if name != "head":
            assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], f"{where}/{name}"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in head["ports"]}["dashboard"] == 8265


def test_raycluster_has_a_cpu_group_and_a_gpu_group():
    cluster = raycluster()
    assert cluster["apiVersion"] == "ray.io/v1"
    check_cluster_spec(cluster["spec"], "raycluster")
    groups = {name: pod["containers"][0] for name, _, pod in pod_specs(cluster["spec"]) if name != "head"}
    assert [n for n, c in groups.items() if gpus(c) == 0], "no CPU worker group (ingest, caching)"
    gpu_groups = [c for c in groups.values() if gpus(c) > 0]
    assert gpu_groups, "no GPU worker group (training)"
    for resources in (c["resources"] for c in gpu_groups):
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    assert cluster["spec"]["authOptions"]["secretName"], "clients outside the cluster need a named token secret"


def test_one_rayjob_per_stage_that_ends_with_its_cluster():
    jobs = rayjobs()
    assert set(jobs) == set(STAGES)
    for stage, job in jobs.items():
        assert job["apiVersion"] == "ray.io/v1"
        assert job["metadata"]["name"] == "vitok-" + stage.replace("_", "-")
        assert (KUBERAY / f"rayjob-{stage}.yaml").is_file()
        spec = job["spec"]
        assert spec["shutdownAfterJobFinishes"] is True, stage
        assert "rayClusterSpec" in spec or "clusterSelector" in spec, stage
        check_cluster_spec(spec["rayClusterSpec"], f"rayjob {stage}")
        totals = group_totals(spec["rayClusterSpec"])
        if stage in GPU_STAGES:
            assert sum(g for g, _ in totals.values()) > 0, f"{stage} runs on GPUs but its cluster has none"
        else:
            assert sum(g for g, _ in totals.values()) == 0 and sum(c for _, c in totals.values()) >= 64, stage


def test_stage_entrypoints_are_cli_commands_with_one_shared_config():
    jobs = rayjobs()
    parsed = {stage: parse_entrypoint(job["spec"]["entrypoint"]) for stage, job in jobs.items()}
    (preset, overrides), *rest = {(p, tuple(o)) for _, p, o in parsed.values()}
    assert not rest, "the stages' RayJobs differ in preset or overrides: their keys would not chain"
    for stage in STAGES:
        cfg = cli_config(stage, preset, list(overrides))
    from pipelines.stages import entrypoint  # the command the Prefect flows and `vitok submit` send

    for stage, job in jobs.items():
        assert shlex.split(job["spec"]["entrypoint"]) == shlex.split(entrypoint(stage, preset, list(overrides))), (
            f"rayjob-{stage}.yaml runs another command than the pipeline's stage {stage}"
        )
    for key in root_keys():  # no stage writes to a pod's disk
        assert f"{key}={TEST_ENV['VITOK_RUNS']}" in overrides, f"{key}=${{VITOK_RUNS}} missing from the overrides"
    assert cfg.ingest.source == TEST_ENV["VITOK_SOURCE"]
    assert cfg.train.use_gpu and cfg.cache.use_gpu and cfg.flow.use_gpu
    # The Ray Train / actor counts fit the GPU and CPU groups of each stage's cluster.
    gpus_of = {stage: sum(g for g, _ in group_totals(jobs[stage]["spec"]["rayClusterSpec"]).values()) for stage in jobs}
    cpus_of = {stage: sum(c for _, c in group_totals(jobs[stage]["spec"]["rayClusterSpec"]).values()) for stage in jobs}
    assert cfg.train.workers == gpus_of["train_ae"], "one Ray Train worker per GPU"
    assert cfg.train.workers * cfg.train.cpus_per_worker <= cpus_of["train_ae"]
    assert cfg.flow.workers == gpus_of["train_flow"]
    assert (
        cfg.cache.actors <= gpus_of["cache_latents"]
        and cfg.cache.actors * cfg.cache.cpus_per_actor <= cpus_of["cache_latents"]
    )
    evaluate = getattr(cfg, "evaluate", None)
    if evaluate is not None and hasattr(evaluate, "actors"):
        assert evaluate.actors <= gpus_of["evaluate"] and evaluate.use_gpu


def test_infra_readme_commands_are_cli_commands():
    commands = readme_commands()
    assert {stage for stage, _, _ in commands} >= {"ingest", "train_ae"}, commands
    shared = parse_entrypoint(rayjobs()["ingest"]["spec"]["entrypoint"])[2]
    assert readme_overrides() == shared, "infra/README.md's overrides differ from the RayJobs'"
    for stage, preset, overrides in commands:
        cli_config(stage, preset, overrides)


# ------------------------------------------------------------------------------------------------
# Ray cluster launcher
# ------------------------------------------------------------------------------------------------
def test_launcher_config_is_valid_for_ray_and_installs_the_same_pins():
    spec = importlib.util.find_spec("ray")  # finds the package without importing it
    ray_dir = Path(next(iter(spec.submodule_search_locations)))
    schema = json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load(rendered(LAUNCHER))
    jsonschema.validate(config, schema)
    assert config["provider"]["type"] == "aws" and config["provider"]["region"] == TEST_ENV["VITOK_AWS_REGION"]
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    instance = {name: t["node_config"]["InstanceType"] for name, t in types.items()}
    workers = [n for n in types if n != config["head_node_type"]]
    assert any(re.match(r"^(p|g)\d", instance[n]) for n in workers), f"no GPU worker type: {instance}"
    assert any(re.match(r"^(c|m|r)\d", instance[n]) for n in workers), f"no CPU worker type: {instance}"
    assert sum(types[n]["max_workers"] for n in workers) <= config["max_workers"]
    assert config["docker"]["image"] == canonical_image()
    setup = "\n".join(config["setup_commands"])
    assert f"torch=={pin('torch')} torchvision=={pin('torchvision')}" in setup
    assert "-c ~/vitok/constraints.txt -e ~/vitok" in setup
    assert config["file_mounts"] == {"~/vitok": "."}, "the working tree must land where the image has the project"


# ------------------------------------------------------------------------------------------------
# Prefect
# ------------------------------------------------------------------------------------------------
def test_base_job_template_declares_and_uses_every_variable():
    template = json.loads(rendered(BASE_JOB_TEMPLATE))
    job, variables = template["job_configuration"], template["variables"]
    jsonschema.Draft7Validator.check_schema(variables)
    used = set(re.findall(r"\{\{\s*([a-z_]+)\s*\}\}", json.dumps(job)))
    declared = set(variables["properties"])
    assert used <= declared, f"placeholders without a variable (Prefect rejects the pool): {used - declared}"
    assert declared <= used, f"variables that change nothing: {declared - used}"
    for prop in variables["properties"].values():
        if "default" in prop:
            jsonschema.validate(prop["default"], prop)
    manifest = job["job_manifest"]
    assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "Job"
    pod = manifest["spec"]["template"]["spec"]  # the paths the Kubernetes worker requires
    assert pod["parallelism"] == 1 and pod["completions"] == 1 and pod["restartPolicy"] == "Never"
    assert pod["containers"][0]["name"] == "prefect-job"
    # Cross-references: namespace, service account, Ray head service and its token secret.
    cluster, defaults = raycluster(), {k: v.get("default") for k, v in variables["properties"].items()}
    assert defaults["namespace"] == cluster["metadata"]["namespace"]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    assert defaults["service_account_name"] == head["serviceAccountName"]
    assert defaults["ray_token_secret"] == cluster["spec"]["authOptions"]["secretName"]


def test_prefect_yaml_deploys_the_pipeline_and_every_stage_on_the_work_pool():
    config = yaml.safe_load(rendered(PREFECT_YAML))
    assert config["prefect-version"] == pin("prefect")
    assert config["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "/home/ray/vitok"}}]
    readme = (INFRA / "README.md").read_text()
    pool = re.search(r"prefect work-pool create (\S+) --type kubernetes", readme).group(1)
    assert "infra/prefect/k8s-base-job-template.json" in readme
    deployments = config["deployments"]
    assert len({d["name"] for d in deployments}) == len(deployments)
    preset, shared = parse_entrypoint(rayjobs()["ingest"]["spec"]["entrypoint"])[1:]
    cluster = raycluster()
    namespace, name = cluster["metadata"]["namespace"], cluster["metadata"]["name"]
    stages = []
    for deployment in deployments:
        assert deployment["entrypoint"] in FLOW_ENTRYPOINTS, deployment["entrypoint"]
        assert deployment["work_pool"]["name"] == pool
        params = deployment["parameters"]
        stage_keys = [o for o in params["overrides"] if not o.startswith("orchestrate.")]
        assert (params["preset"], stage_keys) == (preset, shared), f"{deployment['name']}: not the RayJobs' config"
        cfg = cli_config(params.get("stage", "ingest"), params["preset"], params["overrides"])
        assert cfg.orchestrate.mode == "cluster", "flow runs must send the stages to the Ray cluster"
        assert cfg.orchestrate.address == f"http://{name}-head-svc.{namespace}.svc.cluster.local:8265"
        if deployment["entrypoint"].endswith(":run_stage"):
            stages.append(params["stage"])
    assert sorted(stages) == sorted(STAGES), "one run_stage deployment per stage"
    assert sum(d["entrypoint"].endswith(":full_pipeline") for d in deployments) == 1


def test_prefect_entrypoints_name_flows_that_take_those_parameters():
    if not FLOWS.is_file():
        pytest.skip("pipelines/flows.py does not exist yet (the Prefect flows land with their own issue)")
    tree = ast.parse(FLOWS.read_text())
    functions = {n.name: n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    runnable = set()  # "<flow name>/<deployment name>", as `prefect deployment run` names a deployment
    for deployment in yaml.safe_load(rendered(PREFECT_YAML))["deployments"]:
        name = deployment["entrypoint"].split(":")[1]
        assert name in functions, f"pipelines/flows.py has no {name}"
        fn = functions[name]
        flows = [d for d in fn.decorator_list if ast.unparse(d.func if isinstance(d, ast.Call) else d).endswith("flow")]
        assert flows, f"{name} is not a Prefect flow"
        keywords = {k.arg: k.value for k in getattr(flows[0], "keywords", [])}
        flow_name = keywords["name"].value if "name" in keywords else name.replace("_", "-")
        runnable.add(f"{flow_name}/{deployment['name']}")
        args = {a.arg for a in [*fn.args.args, *fn.args.kwonlyargs]}
        assert set(deployment["parameters"]) <= args, f"{name} takes {sorted(args)}"
    for text in (readme_code(), PREFECT_YAML.read_text()):
        for target in re.findall(r"prefect deployment run '([^']+)'", text):
            assert target in runnable, f"`prefect deployment run '{target}'`: deployments are {sorted(runnable)}"
