"""The five stages as the orchestration layer sees them, free of Prefect: where each stage's artifact is for a
config, whether it is done, how to run it in this process, the command that runs it as a Ray job, and what
is done under a run root.

A stage's artifact URI comes from the job's own `planned_output(cfg)`: the same content key the job
computes, from the config and the upstream artifacts' markers. The `_SUCCESS` markers are the only source
of truth; a pipeline restarted after a crash asks them again and reruns what is not done.
"""

from __future__ import annotations

import importlib
import json
import shlex
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import fsspec
from omegaconf import OmegaConf

from vitok_core.artifacts import MANIFEST, SUCCESS, absolute, is_complete, join, read_json, remove
from vitok_core.config import ConfigError, VitokConfig, load_config
from vitok_core.fingerprint import STALE, compare, fingerprint

STAGES = ("ingest", "train_ae", "cache_latents", "train_flow", "evaluate")
# Where each stage writes ({root}/{stage}/{key}/): the config key of its root.
ROOTS = {
    "ingest": "ingest.root",
    "train_ae": "train.root",
    "cache_latents": "cache.root",
    "train_flow": "flow.root",
    "evaluate": "evaluate.root",
}
# The stages whose key follows another stage's output by that stage's key, not by its content: a forced rerun
# of the stage keeps its key, so these must be forced with it to see the new output. (The others follow the
# content: cache_latents and evaluate hash the autoencoder's weights, evaluate hashes the samples, and the
# samples live inside train_flow's output.)
FOLLOWS_BY_KEY = {"ingest": ("train_ae",), "cache_latents": ("train_flow",)}


def check_stages(names: Sequence[str], what: str = "stages") -> list[str]:
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise ValueError(f"{what}: unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
    return [s for s in STAGES if s in names]  # pipeline order


def job(stage: str) -> Any:
    return importlib.import_module(f"jobs.{stage}")


def resolve_overrides(preset: str, overrides: Sequence[str]) -> list[str]:
    """The overrides a run actually uses: an empty ingest.source becomes the demo photo folder (written
    once, from the photos of installed packages) when the preset says so (orchestrate.demo_photos, on in
    tiny only: a real preset without a source must stop, not quietly train on 48 crops)."""
    cfg = load_config(preset, overrides)
    resolved = list(overrides)
    if not cfg.ingest.source and cfg.orchestrate.demo_photos:
        from vitok_core.demo import write_demo_folder

        folder = Path(absolute(".data/demo_photos"))
        write_demo_folder(folder)
        resolved += [f"ingest.source={folder}", "ingest.label_from=folder"]  # the photo name is the class
    return resolved


def check_source(cfg: VitokConfig) -> None:
    """ConfigError when ingest.source is empty, FileNotFoundError when it names nothing."""
    if not cfg.ingest.source:
        raise ConfigError(
            "ingest.source is empty: set ingest.source=DIR or s3://BUCKET/PREFIX (only presets with "
            "orchestrate.demo_photos=true, such as tiny, fall back to the demo photos)"
        )
    fs, path = fsspec.core.url_to_fs(cfg.ingest.source)
    if not fs.exists(path):
        raise FileNotFoundError(f"ingest.source={cfg.ingest.source!r} does not exist")


def preflight(preset: str, overrides: Sequence[str], selected: Sequence[str]) -> VitokConfig:
    """Everything that can be checked before any Ray or Prefect work: the config (unknown keys, types,
    values: a ConfigError naming the key), the ingest source, and the inputs of the first selected stage."""
    cfg = load_config(preset, overrides)
    first = selected[0]
    if first == "ingest":
        check_source(cfg)
    else:
        planned_output(first, cfg)  # FileNotFoundError names the missing upstream artifact
    return cfg


def with_samples(cfg: VitokConfig, overrides: Sequence[str]) -> list[str]:
    """The DAG's evaluate gets the samples of the DAG's flow model, when they exist and none are set."""
    if cfg.evaluate.samples:
        return list(overrides)
    try:
        samples = job("sample").planned_output(cfg)
    except FileNotFoundError:
        return list(overrides)
    fs, path = fsspec.core.url_to_fs(join(samples, "samples.npz"))
    return [*overrides, f"evaluate.samples={samples}"] if fs.exists(path) else list(overrides)


def planned_output(stage: str, cfg: VitokConfig) -> str:
    """The artifact URI of `stage` for this config; raises FileNotFoundError naming the missing input when
    an upstream artifact does not exist yet."""
    return job(stage).planned_output(cfg)


def is_done(stage: str, cfg: VitokConfig) -> bool:
    try:
        return is_complete(planned_output(stage, cfg))
    except FileNotFoundError:
        return False


def manifest_of(uri: str) -> dict[str, Any]:
    return read_json(join(uri, MANIFEST))


def force_rerun(stage: str, cfg: VitokConfig) -> str | None:
    """Delete the stage's artifact (checkpoints included), so that the next run starts it afresh."""
    try:
        out = planned_output(stage, cfg)
    except FileNotFoundError:
        return None
    remove(out)
    return out


def run_local(stage: str, cfg: VitokConfig) -> dict[str, Any]:
    """Run (or skip) the stage in this process against a local Ray (started on demand); train_flow also
    samples from its model, which is what the evaluate stage scores."""
    manifest = job(stage).run(cfg)
    if stage == "train_flow" and manifest.get("status", "complete") == "complete":
        manifest["samples"] = job("sample").run(cfg)["output"]
    return manifest


def rerun_command(stage: str, preset: str | None = None, overrides: Sequence[str] = ()) -> str:
    """The command that reruns a done stage with the current code: `vitok run --force` of the stage and of
    the stages that follow it by key (FOLLOWS_BY_KEY); the rest of the DAG is skipped where done. Without a
    preset (`vitok status` does not know which config made an output) it ends with a placeholder."""
    forced = [stage, *FOLLOWS_BY_KEY.get(stage, ())]
    if not preset:
        return shlex.join(["vitok", "run", "--force", *forced]) + " [--preset P | --config F] [key=value ...]"
    option = "--config" if Path(preset).suffix in (".yaml", ".yml") else "--preset"
    return shlex.join(["vitok", "run", option, preset, "--force", *forced, *overrides])


def entrypoint(stage: str, preset: str, overrides: Sequence[str]) -> str:
    """The shell command of the stage as a Ray job: `python -m jobs.<stage> --config P k=v ...`."""
    args = ["python", "-m", f"jobs.{stage}", "--config", preset, *overrides]
    command = shlex.join(args)
    if stage == "train_flow":
        command += " && " + shlex.join(["python", "-m", "jobs.sample", "--config", preset, *overrides])
    return command


# ------------------------------------------------------------------------------------------------
# vitok status
# ------------------------------------------------------------------------------------------------
def _counts(stage: str, manifest: dict[str, Any]) -> str:
    if stage == "ingest":
        c = manifest.get("counts", {})
        return f"read {c.get('read')}, accepted {c.get('accepted')}, rejected {c.get('rejected')}"
    if stage in ("train_ae", "train_flow"):
        loss = manifest.get("final", {}).get("loss")
        return f"step {manifest.get('step')}" + (f", loss {loss:.4g}" if isinstance(loss, float) else "")
    if stage == "cache_latents":
        return f"rows {manifest.get('rows')}, classes {manifest.get('classes')}"
    head = manifest.get("headline") or []
    return "; ".join(
        f"{r['setting']}: PSNR {r['psnr']:.2f}" + (f" rFID {r['rfid']:.2f}" if r.get("rfid") is not None else "")
        for r in head
        if r.get("psnr") is not None
    )


def _config_summary(stage: str, manifest: dict[str, Any], config: dict[str, Any]) -> str:
    """What the output was made with: the training runs' config.yaml (written when they start, so an
    unfinished run has it too), else the settings in the manifest."""
    settings = manifest.get("settings") or {}
    if stage == "train_ae" and config:
        return f"{config['name']}, {config['model']['variant']}, {config['train']['steps']} steps"
    if stage == "train_flow" and config:
        return f"{config['name']}, flow {config['flow']['size']}, {config['flow']['steps']} steps"
    if stage == "ingest" and settings:
        return f"source {settings.get('source')}, budgets {settings.get('budgets')}"
    if stage == "cache_latents" and settings:
        return f"{settings.get('variant')}, budget {settings.get('budget')}, {settings.get('dtype')}"
    if stage == "evaluate" and manifest:
        return f"{manifest.get('images')} images"
    return ""


def _progress(stage: str, uri: str, config: dict[str, Any]) -> str:
    """How far an unfinished training run got: its last logged step (metric lines are written at
    checkpoints, so this is also the step a rerun resumes from)."""
    if stage not in ("train_ae", "train_flow"):
        return ""
    from jobs.train_common import read_metrics  # imports torch: only for unfinished training runs

    metrics = read_metrics(uri)
    section = "train" if stage == "train_ae" else "flow"
    total = f" of {config[section]['steps']}" if config else ""
    return f"step {metrics[-1]['step']}{total} (last logged)" if metrics else "no step logged yet"


def _modified(fs: Any, paths: Sequence[str]) -> datetime | None:
    """The newest modification time among `paths` that exist (object stores have no directory times)."""
    times = []
    for path in paths:
        try:
            times.append(fs.modified(path))
        except (FileNotFoundError, NotImplementedError, OSError, KeyError):  # KeyError: an S3 "directory"
            continue
    return max(times) if times else None


def _yaml(f: Any) -> Any:
    return OmegaConf.to_container(OmegaConf.load(f))


def _read(fs: Any, path: str, load: Callable[[Any], Any]) -> dict[str, Any]:
    if not fs.exists(path):
        return {}
    with fs.open(path, "r") as f:
        return load(f) or {}


def code_state(stage: str, manifest: dict[str, Any], now: dict[str, Any] | None = None) -> dict[str, Any]:
    """The output's recorded code fingerprint against this checkout's (vitok_core.fingerprint.compare), with
    the rerun command when they differ."""
    found = compare(stage, manifest, now)
    return {**found, "rerun": rerun_command(stage) if found["state"] == STALE else None}


def _row(fs: Any, stage: str, path: str, uri: str, now: dict[str, Any]) -> dict[str, Any]:
    done = fs.exists(f"{path}/{SUCCESS}")
    manifest = _read(fs, f"{path}/{MANIFEST}", json.load)
    config = _read(fs, f"{path}/config.yaml", _yaml)
    if done:  # the manifest is written just before _SUCCESS: its time is when the stage finished
        written = _modified(fs, [f"{path}/{MANIFEST}"]) or _modified(fs, [f"{path}/{SUCCESS}"])
    else:
        written = _modified(fs, [*fs.glob(f"{path}/metrics/*.jsonl"), f"{path}/config.yaml", path])
    return {
        "stage": stage,
        "key": path.rstrip("/").rsplit("/", 1)[-1],
        "done": done,
        "written": written.astimezone().strftime("%Y-%m-%d %H:%M") if written else "",
        "config": _config_summary(stage, manifest, config),
        "summary": _counts(stage, manifest) if done else _progress(stage, uri, config),
        "code": code_state(stage, manifest, now) if done else None,  # an unfinished run has no manifest yet
    }


def status(root: str) -> list[dict[str, Any]]:
    """Every stage directory under a run root: stage, key, done (has _SUCCESS), when it was last written
    (local time), what config made it, its counts (done) or its last logged step (unfinished training), and
    for a done stage whether the code that made it is this checkout's (`code`: see code_state)."""
    fs, base = fsspec.core.url_to_fs(absolute(root))
    rows = []
    for stage in STAGES:
        stage_dir = f"{base.rstrip('/')}/{stage}"
        if not fs.isdir(stage_dir):
            continue
        now = fingerprint(stage)
        for path in sorted(fs.ls(stage_dir, detail=False)):
            key = path.rstrip("/").rsplit("/", 1)[-1]
            rows.append(_row(fs, stage, path, join(absolute(root), stage, key), now))
    return rows
