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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fsspec

from vitok_core.artifacts import MANIFEST, SUCCESS, absolute, is_complete, join, read_json, remove
from vitok_core.config import VitokConfig, load_config

STAGES = ("ingest", "train_ae", "cache_latents", "train_flow", "evaluate")
# Where each stage writes ({root}/{stage}/{key}/): the config key of its root.
ROOTS = {
    "ingest": "ingest.root",
    "train_ae": "train.root",
    "cache_latents": "cache.root",
    "train_flow": "flow.root",
    "evaluate": "evaluate.root",
}


def check_stages(names: Sequence[str], what: str = "stages") -> list[str]:
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise ValueError(f"{what}: unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
    return [s for s in STAGES if s in names]  # pipeline order


def job(stage: str) -> Any:
    return importlib.import_module(f"jobs.{stage}")


def resolve_overrides(preset: str, overrides: Sequence[str]) -> list[str]:
    """The overrides a run actually uses: an empty ingest.source becomes the demo photo folder (written
    once, from the photos of installed packages) when orchestrate.demo_photos is on."""
    cfg = load_config(preset, overrides)
    resolved = list(overrides)
    if not cfg.ingest.source and cfg.orchestrate.demo_photos:
        from vitok_core.demo import write_demo_folder

        folder = Path(absolute(".data/demo_photos"))
        write_demo_folder(folder)
        resolved += [f"ingest.source={folder}", "ingest.label_from=folder"]  # the photo name is the class
    return resolved


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


def status(root: str) -> list[dict[str, Any]]:
    """Every stage directory under a run root: stage, key, done (has _SUCCESS), counts."""
    fs, base = fsspec.core.url_to_fs(absolute(root))
    rows = []
    for stage in STAGES:
        stage_dir = f"{base.rstrip('/')}/{stage}"
        if not fs.isdir(stage_dir):
            continue
        for path in sorted(fs.ls(stage_dir, detail=False)):
            key = path.rstrip("/").rsplit("/", 1)[-1]
            done = fs.exists(f"{path}/{SUCCESS}")
            manifest = {}
            if fs.exists(f"{path}/{MANIFEST}"):
                with fs.open(f"{path}/{MANIFEST}", "r") as f:
                    manifest = json.load(f)
            rows.append({"stage": stage, "key": key, "done": done, "summary": _counts(stage, manifest) if done else ""})
    return rows
