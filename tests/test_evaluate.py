"""The evaluate stage on a real local Ray: a tiny autoencoder on real photos from a local folder, with a
corrupt file, a crash and a rerun. (On S3 it runs inside the pipeline test, tests/test_pipelines.py.)"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs.evaluate import models_of
from jobs.evaluate import run as run_evaluate
from tests.ingest_samples import make_training_folder
from vitok_core.artifacts import is_complete, join, read_json
from vitok_core.checkpoint import save_published
from vitok_core.config import ConfigError, load_config
from vitok_core.demo import load_demo_images
from vitok_core.images import to_uint8
from vitok_core.model import build_autoencoder

pytestmark = pytest.mark.slow
VARIANT = "Tid2-Tid4/1x16x16"
SETTINGS = (
    "evaluate.settings=[{name: 64p, size: 64, mode: center_crop}, {name: 128n, size: 128, mode: native}, "
    "{name: 96l, size: 96, mode: longest_side}]"
)
N_PHOTOS = 8


def png_ok(data: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.verify()
    return image.size


@pytest.fixture(scope="module")
def setup(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    make_training_folder(root / "photos", n=N_PHOTOS)
    (root / "photos" / "rocket" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    for name, seed in (("export", 3), ("other", 4)):
        torch.manual_seed(seed)
        save_published(build_autoencoder(VARIANT), str(root / name), metadata={"variant": VARIANT, "step": 0})
    samples = np.stack([to_uint8(p[:, :64, :64]) for p in load_demo_images()] * 2)  # jobs.sample's layout
    np.savez(root / "samples.npz", images=samples, labels=np.arange(len(samples)), classes=np.array(["a"]))
    return root


def overrides(data: str, ae: str, out: str, *extra: str) -> list[str]:
    return [
        f"evaluate.data={data}",
        f"evaluate.autoencoder={ae}",
        f"evaluate.root={out}",
        SETTINGS,
        "evaluate.generation_setting=64p",
        "evaluate.images_per_task=3",
        "evaluate.keep=3",
        *extra,
    ]


def test_baselines_are_named_after_their_run_or_by_the_user():
    runs = "s3://b/runs/train_ae"
    cfg = load_config(
        "tiny",
        ["evaluate.autoencoder=/ae", f"evaluate.baselines=[{runs}/k1/export,naflex@500={runs}/k2/exports/step-500]"],
    )
    assert models_of(cfg) == {
        "ae": "/ae",
        "baseline:k1": f"{runs}/k1/export",
        "baseline:naflex@500": f"{runs}/k2/exports/step-500",
    }
    twice = load_config("tiny", ["evaluate.autoencoder=/ae", "evaluate.baselines=[/a/step-1,/b/step-1]"])
    with pytest.raises(ConfigError, match="two baselines are named 'step-1'; name them"):
        models_of(twice)


def test_local_run_with_crash_rerun_and_skip(ray_local, setup, tmp_path):
    extra = [
        f"evaluate.baselines=[{setup / 'other'}]",
        f"evaluate.samples={setup / 'samples.npz'}",
        "evaluate.features=[inception,dinov2]",
        "evaluate.dinov2_model=vit_small_patch14_dinov2",
        "evaluate.dinov2_weights=''",
        "evaluate.dinov2_size=56",
    ]
    args = overrides(str(setup / "photos"), str(setup / "export"), str(tmp_path), *extra)
    # The crashing run is its own driver process on the session's Ray, as a crashed Ray job would be.
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    crashed = subprocess.run(
        [sys.executable, "-m", "jobs.evaluate", "--config", "tiny", *args, "evaluate.fail_at_task=1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert crashed.returncode != 0 and "injected fault" in crashed.stderr + crashed.stdout
    manifest = run_evaluate(load_config("tiny", [*args, "evaluate.fail_at_task=1"]))  # the fault fires once
    out = manifest["output"]
    assert is_complete(out) and manifest["images"] == N_PHOTOS + 1 and manifest["rejected"] == 1

    metrics = read_json(join(out, "metrics.json"))
    assert metrics["eval_set"]["scored"] == N_PHOTOS
    assert [s["budget"] for s in metrics["settings"]] == [16, 64, 36]
    # Every setting names its mode and how its reference images were made; so does every result row.
    assert [s["mode"] for s in metrics["settings"]] == ["center_crop", "native", "longest_side"]
    assert "Lanczos" in metrics["settings"][2]["description"] and "bicubic" in metrics["settings"][1]["description"]
    rows = {(r["setting"], r["model"]): r for r in metrics["results"]}
    assert set(rows) == {(s, m) for s in ("64p", "128n", "96l") for m in ("ae", "baseline:other", "bicubic")}
    assert {r["mode"] for r in metrics["results"] if r["setting"] == "96l"} == {"longest_side"}
    for row in rows.values():
        assert row["images"] == N_PHOTOS and row["compression"] == 48
        assert np.isfinite([row["psnr"], row["ssim"], row["rfid"], row["rfdd_dinov2"]]).all()
    # An untrained autoencoder is far worse than bicubic at the same compression; two different random
    # autoencoders give different numbers.
    assert rows[("64p", "bicubic")]["psnr"] > rows[("64p", "ae")]["psnr"] + 3
    assert rows[("64p", "ae")]["psnr"] != rows[("64p", "baseline:other")]["psnr"]
    assert metrics["extractors"]["dinov2"]["random_init"] and not metrics["extractors"]["inception"]["random_init"]
    [generation] = metrics["generation"]
    assert generation["images"] == 8 and np.isfinite(generation["gfid"]) and generation["reference_setting"] == "64p"

    # Per-image scores: one row per image, setting and model, no duplicates after the crash; means agree.
    with fsspec.open(join(out, "per_image.parquet"), "rb") as f:
        table = pq.read_table(f).to_pylist()
    assert len(table) == N_PHOTOS * 3 * 3 == len({(r["setting"], r["model"], r["id"]) for r in table})
    ae64 = [r["psnr"] for r in table if r["setting"] == "64p" and r["model"] == "ae"]
    assert np.mean(ae64) == pytest.approx(rows[("64p", "ae")]["psnr"])
    assert all(r["height"] == r["width"] == 64 for r in table if r["setting"] == "64p")
    assert all(max(r["height"], r["width"]) == 96 for r in table if r["setting"] == "96l")
    rejected = read_json(join(out, "rejected.json"))["rejected"]
    assert len(rejected) == 1 and rejected[0]["id"].endswith("broken.jpg")

    # Every output: the report with its tables and warnings, valid PNGs, reusable reference statistics.
    text = Path(out, "report.md").read_text()
    assert "### 64p (center_crop, 64px, budget 16 tokens)" in text and "| bicubic |" in text
    assert "### 96l (longest_side, 96px, budget 36 tokens)\n\nReference images: aspect ratio kept, longest" in text
    assert "randomly initialised" in text and "## Generation" in text
    for name, rel in metrics["figures"].items():
        width, height = png_ok(Path(out, rel).read_bytes())
        assert width > 200 and height > 100, name
        assert f"]({rel})" in text
    assert {"metric_vs_resolution", "pareto", "recon_64p", "recon_128n", "recon_96l"} <= set(metrics["figures"])
    stats = np.load(join(out, "reference_stats", "64p.npz"))
    assert stats["inception_mu"].shape == (2048,) and stats["dinov2_sigma"].shape == (384, 384)

    started = time.time()
    assert run_evaluate(load_config("tiny", args)) == manifest  # complete: skipped
    assert time.time() - started < 15
