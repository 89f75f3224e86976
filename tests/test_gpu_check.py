"""benchmarks/gpu_check.py, the GPU acceptance check, run as CI can: `--cpu-smoke` (the same sections on the CPU,
tiny preset, a few steps), in a subprocess as on the GPU machine, with ray and prefect made unimportable there."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
SECTIONS = ("learns", "train_flow", "cache_latents", "evaluate", "train_ae")


def load_gpu_check():
    """The script as a module (its path set-up undone afterwards), for the tests of its train_ae bookkeeping."""
    saved = list(sys.path)
    spec = importlib.util.spec_from_file_location("vitok_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


def run_check(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.is_file(), f"no report written (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc, json.loads(out.read_text())


def failed_checks(report: dict) -> list[str]:
    return [
        f"{name}: {check['name']}: {check['detail'][-1500:]}"
        for name, section in report["sections"].items()
        for check in section["checks"]
        if not check["passed"]
    ]


@pytest.mark.slow
def test_cpu_smoke_passes_every_section(tmp_path):
    proc, report = run_check(tmp_path / "gpu_check.json")
    assert proc.returncode == 0, "\n".join(failed_checks(report)) or proc.stderr[-3000:]
    assert report["passed"] is True
    assert report["mode"] == "cpu-smoke"
    assert report["deepspeed"][0].isdigit(), report["deepspeed"]  # a version, not "not importable: ..."
    assert tuple(report["sections"]) == SECTIONS
    for name, section in report["sections"].items():
        assert section["passed"], name
        assert section["rows"], name
        assert len(section["checks"]) >= 2, f"{name} checks nothing beyond finishing"
        assert all(check["passed"] for check in section["checks"]), name
    measured = {
        (r["tokens"], r["checkpointing"]) for r in report["sections"]["train_ae"]["rows"] if r["status"] == "ok"
    }
    assert measured == {(64, True), (256, True), (64, False), (256, False)}
    for row in report["sections"]["train_ae"]["rows"]:
        assert row["bf16"] and row["loss_finite"] and row["step_s"] > 0 and row["tokens_per_s"] > 0
    flow = report["sections"]["train_flow"]["rows"][0]
    assert flow["ema_dtype"] == "torch.float32" and flow["ema_relative_move"] > 0
    assert report["sections"]["cache_latents"]["rows"][0]["images_per_s"] > 0
    assert report["sections"]["evaluate"]["rows"][-1]["images_per_s"] > 0
    # the table and the per-section elapsed time are printed
    assert "== train_ae: passed in" in proc.stdout and "PASSED" in proc.stdout


@pytest.mark.slow
def test_a_failing_section_fails_the_run_and_the_others_still_run(tmp_path):
    proc, report = run_check(
        tmp_path / "gpu_check.json", "--sections", "train_flow", "cache_latents", "--fail-section", "train_flow"
    )
    assert proc.returncode == 1
    assert report["passed"] is False
    flow, cache = report["sections"]["train_flow"], report["sections"]["cache_latents"]
    assert not flow["passed"]
    (failed,) = [c for c in flow["checks"] if not c["passed"]]
    assert failed["name"] == "section completed"
    assert "Traceback" in failed["detail"] and "--fail-section train_flow" in failed["detail"]
    assert cache["passed"] and cache["rows"], "the section after the failed one did not run"
    assert "FAILED" in proc.stdout


def fake_engines(monkeypatch, gpu_check, out_of_memory=lambda preset, ckpt, batch: False):
    """build_engine and measure replaced by stand-ins that record their calls; measure raises CUDA's OOM error
    where `out_of_memory` says, as a configuration too large for the device would."""
    calls = {"builds": [], "measures": []}

    def build_engine(cfg, device):
        calls["builds"].append(cfg.name)
        return object(), cfg.name

    def measure(ctx, engine, preset, spec, n_params, budget, ckpt, batch):
        calls["measures"].append((preset, budget, ckpt, batch))
        if out_of_memory(preset, ckpt, batch):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        row = {"tokens": budget, "batch": batch, "checkpointing": ckpt, "status": "ok"}
        return {**row, "bf16": True, "loss_finite": True, "loss_last": 0.5}

    monkeypatch.setattr(gpu_check, "build_engine", build_engine)
    monkeypatch.setattr(gpu_check, "measure", measure)
    monkeypatch.setattr(gpu_check, "release", lambda *engines: None)
    return calls


def test_out_of_memory_is_retried_at_half_the_batch_on_a_fresh_engine(monkeypatch, tmp_path):
    gpu_check = load_gpu_check()
    calls = fake_engines(monkeypatch, gpu_check, lambda preset, ckpt, batch: not ckpt and batch > 1)
    ctx = gpu_check.Context(gpu_check.SMOKE_PLAN, torch.device("cpu"), tmp_path, lambda: None)
    sec = gpu_check.Section("train_ae")
    gpu_check.measure_preset(ctx, sec, "tiny", gpu_check.Pace())
    # the smoke plan's 512-token cap: batch 8 at 64 tokens, 2 at 256; checkpointing on first
    assert [(r["tokens"], r["checkpointing"], r["batch"], r["status"]) for r in sec.rows] == [
        (64, True, 8, "ok"),
        (256, True, 2, "ok"),
        (64, False, 8, "out of memory"),
        (64, False, 4, "out of memory"),
        (64, False, 2, "out of memory"),
        (64, False, 1, "ok"),
        (256, False, 2, "out of memory"),
        (256, False, 1, "ok"),
    ]
    assert len(calls["builds"]) == 5, "an engine stopped by an OOM must be rebuilt, not reused"
    assert all(c["passed"] for c in sec.checks) and len(sec.checks) == 4  # one finite-loss check per measured row


def test_what_does_not_fit_the_time_left_is_skipped_and_a_crash_spares_the_next_preset(monkeypatch, tmp_path):
    gpu_check = load_gpu_check()

    def crash_on_tiny(preset, ckpt, batch):
        if preset == "tiny":
            raise RuntimeError("a crash in tiny")
        return False

    calls = fake_engines(monkeypatch, gpu_check, crash_on_tiny)
    plan = replace(gpu_check.SMOKE_PLAN, presets=("tiny", "dec_B"))
    ctx = gpu_check.Context(plan, torch.device("cpu"), tmp_path, lambda: None)
    sec = gpu_check.Section("train_ae")
    gpu_check.section_train_ae(ctx, sec)
    (crash,) = [c for c in sec.checks if not c["passed"]]
    assert crash["name"] == "tiny: measured without a crash" and "a crash in tiny" in crash["detail"]
    assert {r["preset"] for r in sec.rows} == {"dec_B"} and len(sec.rows) == 4
    assert calls["builds"] == ["tiny", "dec_B"]

    ctx.deadline = time.perf_counter() - 1  # no time left: nothing is built, every configuration is listed
    sec = gpu_check.Section("train_ae")
    gpu_check.measure_preset(ctx, sec, "dec_B", gpu_check.Pace())
    assert [r["status"] for r in sec.rows] == ["skipped: time"] * 4
    assert calls["builds"] == ["tiny", "dec_B"]
