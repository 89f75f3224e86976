"""The CPU study's data (photo discovery, the held-out split, training crops) and results (rows, table,
verdicts, curves figure, results.md). The study itself trains for an hour and is not run here."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.study import ARMS
from vitok_core import report, study
from vitok_core.config import load_config
from vitok_core.demo import DEMO_ASPECTS, crop_box

MATE = ["Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm",
        "TwoWings", "Wood", "YellowFlower"]  # fmt: skip
TUXPAINT = [f"t{i:02d}" for i in range(16)] + ["lighthouse", "rocks", "sheep"]


def _jpeg(path: Path, size: tuple[int, int], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size[0])[None, :, None] * np.ones((size[1], 1, 3))
    pixels = (ramp * 0.7 + rng.integers(0, 70, (size[1], size[0], 3))).astype(np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", quality=90)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The Debian folders and scikit-learn's photos as the study finds them, with stand-in pictures of the
    real names and sizes (the packages are downloaded by `vitok study`, not by the tests)."""
    root = tmp_path_factory.mktemp("study_sources")
    for i, name in enumerate(MATE):
        _jpeg(root / "debian" / study.MATE_DIR / f"{name}.jpg", (1280, 1024) if i % 2 else (1600, 1000), i)
    for i, name in enumerate(TUXPAINT):
        _jpeg(root / "debian" / study.TUXPAINT_DIR / f"{name}.jpg", (960, 638) if i % 3 else (604, 453), 50 + i)
    for i, name in enumerate(study.SKLEARN_PHOTOS):
        _jpeg(root / "sklearn" / name, (640, 427), 90 + i)
    return root


def test_photos_are_found_and_split_by_name(sources, tmp_path):
    photos = study.find_photos(sources / "debian", sources / "sklearn")
    assert len(photos) == 37 and {p.source for p in photos} == set(study.EXPECTED)
    train, held_out = study.split(photos)
    assert [(p.source, p.name) for p in held_out] == list(study.HELD_OUT)
    assert len(train) == 29 and not {p.path for p in train} & {p.path for p in held_out}
    copies = study.write_heldout(held_out, tmp_path / "heldout")
    assert [c.name for c in copies][:2] == ["skimage-chelsea.png", "sklearn-china.jpg"]
    assert all(c.read_bytes() == p.path.read_bytes() for c, p in zip(copies, held_out, strict=True))

    (sources / "debian" / study.MATE_DIR / "Wood.jpg").rename(tmp_path / "Wood.jpg")  # one photo missing
    try:
        with pytest.raises(FileNotFoundError, match=r"'mate': 11.*apt-get download mate-backgrounds"):
            study.find_photos(sources / "debian", sources / "sklearn")
    finally:
        (tmp_path / "Wood.jpg").rename(sources / "debian" / study.MATE_DIR / "Wood.jpg")


def test_training_crops_are_deterministic_multiscale_and_never_upscaled(sources, tmp_path):
    train, _ = study.split(study.find_photos(sources / "debian", sources / "sklearn"))
    few = train[:3]
    paths = study.write_training_crops(few, tmp_path / "a", per_photo=12, seed=3)
    again = study.write_training_crops(few, tmp_path / "b", per_photo=12, seed=3)
    assert len(paths) == 36 and [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    sizes = [Image.open(p).size for p in paths]
    assert all(min(s) >= 64 for s in sizes)  # none rejected by ingest as too small
    assert len({round(w / h, 1) for w, h in sizes}) >= 5  # the six aspect ratios (give or take rounding)
    assert max(min(s) for s in sizes) > 2 * min(min(s) for s in sizes)  # several scales
    photo_short = min(Image.open(few[0].path).size)
    assert all(min(s) <= photo_short for s in sizes[:12])
    (tmp_path / "a" / few[0].label / f"{few[0].label}_000.jpg").unlink()
    assert len(study.write_training_crops(few, tmp_path / "a", per_photo=12, seed=3)) == 35  # complete: kept


def test_crop_box_keeps_its_aspect_and_a_minimum_side():
    rng = np.random.default_rng(0)
    for aspect in DEMO_ASPECTS:
        for _ in range(50):
            left, top, w, h = crop_box(640, 427, aspect, rng, (0.2, 1.0))
            assert left >= 0 and left + w <= 640 and top >= 0 and top + h <= 427
            assert min(w, h) >= 96 and abs(w / h - aspect) < 0.05


def _metrics() -> dict:
    results = []
    values = {"ae": 24.0, "baseline:naflex@100": 20.0, "baseline:square@100": 19.0, "baseline:square@200": 22.5}
    for k, setting in enumerate(("256p", "1024p")):
        for model, psnr in {**values, "bicubic": 23.0 + 2 * k, "baseline:other": 1.0}.items():
            results.append(
                {"setting": setting, "model": model, "psnr": psnr + k, "ssim": psnr / 40, "rfid": 100 - psnr}
            )
    settings = [{"name": "256p", "description": "centre crop"}, {"name": "1024p", "description": "native"}]
    return {"results": results, "settings": settings, "eval_set": {"scored": 8}}


MODELS = {
    "ae": ("naflex", 200),
    "baseline:naflex@100": ("naflex", 100),
    "baseline:square@100": ("square", 100),
    "baseline:square@200": ("square", 200),
}


def test_rows_table_and_verdicts_come_from_the_metrics():
    rows = study.curve_rows(_metrics(), MODELS)
    assert len(rows) == 10 and not any(r["arm"] == "other" for r in rows)  # unknown models are left out
    assert [(r["arm"], r["step"]) for r in rows][:2] == [("bicubic", 0), ("bicubic", 0)]
    table = study.final_table(rows, ["naflex", "square"])
    assert table["256p"]["naflex"]["psnr"] == 24.0 and table["256p"]["square"]["psnr"] == 22.5  # last steps
    lines = study.verdicts(table, ["naflex", "square"])
    assert "- 256p: naflex beats bicubic PSNR (24.00 vs 23.00 dB, +1.00 dB)." in lines
    assert "- 1024p: naflex does not beat bicubic PSNR (25.00 vs 26.00 dB, -1.00 dB)." in lines
    assert any(line.startswith("- 256p, naflex minus square: PSNR +1.50 (naflex better)") for line in lines)
    assert any("rFID -1.5 (naflex better)" in line for line in lines)


def test_learning_curves_figure_and_results_markdown():
    rows = study.curve_rows(_metrics(), MODELS)
    png = report.learning_curves_png(rows)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and min(image.size) > 200
    assert b"PNG" in report.learning_curves_png([])[:8]  # a message image, not an exception

    cfg = load_config("cpu_study")
    info = {
        "command": "vitok study",
        "date": "2026-11-30 22:31 UTC",
        "commit": "abc1234",
        "machine": "2 CPUs",
        "wall_s": 600.0,
        "timings": {"data": 6.0},
        "parameters": {"total": 3.0e6},
        "crops": 1392,
        "train_photos": [("mate", "Aqua.jpg")],
        "heldout_photos": list(study.HELD_OUT),
        "arms": ARMS,
        "grids": ["256p"],
        "runs": {"naflex": "runs/train_ae/a", "square": "runs/train_ae/b"},
        "evaluations": {"curves": "runs/evaluate/c"},
    }
    text = study.render_results(cfg, info, rows, _metrics())
    assert "| 256p | 24.00 | 0.6000 | 76.0 | 22.50 | 0.5625 | 77.5 | 23.00 | 0.5750 | 77.0 |" in text
    assert "| square | 100 | 19.00 |" in text and "![256p](results/recon_256p.png)" in text
    assert "`data.augment.rrc_prob=1.0`" in text and "sklearn/china.jpg" in text


def test_the_preset_and_its_square_arm_are_valid_configs():
    naflex = load_config("cpu_study")
    square = load_config("cpu_study", ARMS["square"])
    assert naflex.train.export_every and naflex.train.steps % naflex.train.export_every == 0
    assert naflex.model.variant.endswith("x64")  # the paper's compression, r = 12
    assert square.data.augment.rrc_prob == 1.0 and list(square.data.augment.rrc_ratio) == [1.0, 1.0]
    assert list(naflex.data.budgets) == list(square.data.budgets) and naflex.train.steps == square.train.steps


def test_the_gap_to_bicubic_is_extrapolated_from_the_late_exports():
    # PSNR = 10 + 2 ln(step): 2 ln 2 = 1.386 dB per doubling; 24 dB is reached at exp(7) = 1097 steps.
    rows = [{"arm": "a", "step": s, "setting": "256p", "psnr": 10 + 2 * np.log(s)} for s in (50, 100, 200, 300, 400)]
    fit = study.steps_to_reach(rows, "a", "256p", 24.0)
    assert fit["points"] == 3 and abs(fit["slope_db_per_doubling"] - 2 * np.log(2)) < 1e-9
    assert abs(fit["steps"] - np.exp(7)) < 1e-6
    assert study.steps_to_reach(rows[:2], "a", "256p", 24.0) is None  # too few late points
    flat = [{**r, "psnr": 20.0 - r["step"] / 1000} for r in rows]
    assert study.steps_to_reach(flat, "a", "256p", 24.0)["steps"] is None
    table = {"256p": {"a": {"psnr": rows[-1]["psnr"]}, "bicubic": {"psnr": 24.0}}}
    [line] = study.gap_lines(rows, table, "a")
    assert "+1.39 dB per doubling" in line and "~1,097 steps" in line


def test_a_large_png_is_shrunk_to_its_byte_budget():
    rng = np.random.default_rng(0)
    noisy = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (600, 900, 3), dtype=np.uint8)).save(noisy, "PNG")
    small = report.shrink_png(noisy.getvalue(), 200_000)
    assert len(noisy.getvalue()) > 1_000_000 and len(small) <= 200_000
    width, height = Image.open(io.BytesIO(small)).size
    assert abs(width / height - 1.5) < 0.02  # aspect kept
    assert report.shrink_png(small, 200_000) is small  # within budget: unchanged


def test_per_image_lines_name_the_image_that_moves_the_mean():
    scores = [
        {"setting": "1024p", "arm": m, "id": f"/h/{i}.jpg", "psnr": p}
        for i, (a, b) in enumerate([(30.0, 29.5), (31.0, 31.2), (35.0, 20.0), (28.0, 27.0)])
        for m, p in (("naflex", a), ("square", b))
    ]
    [line] = study.per_image_lines(scores, ["naflex", "square"], ["1024p"])
    assert line == (
        "- 1024p: naflex higher on 3 of 4 images; median +0.75 dB; the largest, 2.jpg, +15.00 dB; "
        "mean without it +0.43 dB."
    )
