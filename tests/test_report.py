"""The evaluate report: every figure is a valid PNG for ordinary and degenerate input, the error maps sit on a
fixed colour scale, and report.md carries the numbers, warnings and links it should."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio

from vitok_core.report import (
    ERROR_CMAP,
    GRID_ROW_PX,
    budget_changes,
    image_psnr,
    loss_curves_png,
    metric_vs_resolution_png,
    pareto_front,
    pareto_png,
    recon_grid_png,
    render_markdown,
    split_png,
)


def png_size(data: bytes) -> tuple[int, int]:
    assert isinstance(data, bytes)
    Image.open(io.BytesIO(data)).verify()
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        assert 200 <= image.width <= 4000 and 150 <= image.height <= 4000, image.size
        return image.size


def png_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def result(setting, size, model, **values):
    row = {"setting": setting, "size": size, "model": model, "kind": model, "compression": 48.0, "images": 12}
    return row | {"psnr": None, "ssim": None, "rfid": None, "rfdd_dinov2": None, "rfdd_dinov3": None} | values


RESULTS = [
    result("256p", 256, "ae", psnr=21.3, ssim=0.61, rfid=150.2, rfdd_dinov2=12.5),
    result("256p", 256, "bicubic", psnr=20.1, ssim=0.55, rfid=180.0, rfdd_dinov2=20.1),
    result("512p", 512, "ae", psnr=23.0, ssim=0.7, rfid=float("nan"), rfdd_dinov2=9.0),
    result("1024p", 1024, "ae", psnr=24.5, ssim=None, rfid=90.0, rfdd_dinov2=5.5),
    result("1024p", 1024, "baseline:sdvae", psnr=25.0, ssim=0.8, rfid=None),
]


def test_metric_vs_resolution_skips_metrics_no_row_has():
    three = png_size(metric_vs_resolution_png(RESULTS))
    with_absent = png_size(metric_vs_resolution_png(RESULTS, ("psnr", "ssim", "rfid", "rfdd_dinov3")))
    one = png_size(metric_vs_resolution_png(RESULTS[:1], ("psnr",)))
    assert with_absent == three  # rfdd_dinov3 is None in every row: no panel for it
    assert one[0] < three[0] and one[1] == three[1]
    png_size(metric_vs_resolution_png(RESULTS, ("rfdd_dinov3",)))  # nothing to plot still renders
    png_size(metric_vs_resolution_png([]))


def test_metric_vs_resolution_splits_lines_by_mode_only_when_modes_share_a_size():
    from vitok_core.report import _line_labels

    rows = [r | {"mode": "center_crop" if r["size"] < 1024 else "native"} for r in RESULTS]
    assert {_line_labels(rows)(r) for r in rows} == {"ae", "bicubic", "baseline:sdvae"}
    both = [*rows, result("1024l", 1024, "ae", psnr=26.0) | {"mode": "longest_side"}]
    labels = {_line_labels(both)(r) for r in both}
    assert {"ae (center_crop)", "ae (native)", "ae (longest_side)"} <= labels
    png_size(metric_vs_resolution_png(both))


def test_pareto_front_directions():
    points = [(1.0, 5.0), (2.0, 3.0), (3.0, 4.0), (4.0, 1.0), (2.0, 6.0)]
    assert pareto_front(points, higher_y_is_better=False) == [(1.0, 5.0), (2.0, 3.0), (4.0, 1.0)]
    assert pareto_front(points, higher_y_is_better=True) == [(1.0, 5.0), (2.0, 6.0)]
    assert pareto_front([(1.0, 1.0)], higher_y_is_better=False) == [(1.0, 1.0)]


@pytest.mark.parametrize(
    "points",
    [
        [
            {"label": "f16x64", "rfid": 0.7, "gfid": 3.1, "psnr": 34.2, "compression": 12.0},
            {"label": "f16x16", "rfid": 1.5, "gfid": 2.4, "psnr": 28.5, "compression": 48.0},
            {"label": "f16x32", "rfid": 1.3, "gfid": 3.5, "psnr": 31.2, "compression": None},
            {"label": "no-gen", "rfid": 0.9, "gfid": None, "psnr": 30.0, "compression": 24.0},
        ],
        [  # no gFID anywhere: rFID vs PSNR
            {"label": "a", "rfid": 0.7, "gfid": None, "psnr": 34.2, "compression": 12.0},
            {"label": "b", "rfid": 1.5, "gfid": None, "psnr": None, "compression": 48.0},
        ],
        [{"label": "only", "rfid": 2.0, "gfid": 5.0, "psnr": None, "compression": None}],
        [{"label": "nothing", "rfid": None, "gfid": None, "psnr": None, "compression": None}],
        [],
    ],
    ids=["gfid", "psnr-fallback", "single", "unplottable", "empty"],
)
def test_pareto_png_renders(points):
    data = pareto_png(points)
    png_size(data)
    assert pareto_png(copy.deepcopy(points)) == data  # same input, same bytes


def train_lines():
    lines = []
    for step in range(10, 310, 10):
        budget = 64 if step <= 100 else 256 if step <= 200 else 1024
        lines.append(
            {"step": step, "loss": 1.0 / step, "charbonnier": 0.5 / step, "ssim": 0.5 + step / 1000, "dino": 1e-3,
             "lr": 1e-3 * min(1.0, step / 50), "budget": budget, "tokens_per_s": 1e5}
        )  # fmt: skip
    return lines


def test_budget_changes_mark_each_new_budget():
    assert budget_changes(train_lines()) == [(110, 256), (210, 1024)]
    assert budget_changes([{"step": 1, "budget": 64}, {"step": 2}, {"step": 3, "budget": 64}]) == []


def test_loss_curves_png_renders_ordinary_and_degenerate_lines():
    png_size(loss_curves_png(train_lines()))
    png_size(loss_curves_png([]))
    png_size(loss_curves_png([{"step": 1, "loss": 0.0, "lr": None}, {"step": 2, "loss": -0.1}]))  # no log y
    png_size(loss_curves_png([{"step": 5, "lr": 1e-4}]))  # no loss keys at all


def photo(h: int, w: int, seed: int) -> np.ndarray:
    # Mid-range values keep the reference away from the error colormap's dark end.
    return np.random.default_rng(seed).integers(60, 190, size=(h, w, 3), dtype=np.uint8)


def test_image_psnr_matches_scikit_image():
    ref, rec = photo(37, 53, 0), photo(37, 53, 1)
    assert image_psnr(ref, rec) == pytest.approx(peak_signal_noise_ratio(ref, rec, data_range=255))
    assert image_psnr(ref, ref) == math.inf


def test_recon_grid_rows_of_different_aspect_ratios():
    refs = [photo(300, 500, 0), photo(512, 128, 1), photo(64, 64, 2)]
    recs = {"ae": [photo(*r.shape[:2], 10 + i) for i, r in enumerate(refs)], "bicubic": [r.copy() for r in refs]}
    wide = png_size(recon_grid_png(refs, recs, max_side=128))
    alone = png_size(recon_grid_png(refs, {}))
    assert wide[0] > alone[0] and wide[1] == alone[1]


def test_recon_grid_rejects_mismatches():
    refs = [photo(32, 48, 0), photo(40, 40, 1)]
    with pytest.raises(ValueError, match="'ae' has 1 images for 2 references"):
        recon_grid_png(refs, {"ae": [refs[0]]})
    with pytest.raises(ValueError, match="'ae' image 1"):
        recon_grid_png(refs, {"ae": [refs[0], photo(40, 41, 1)]})
    with pytest.raises(ValueError, match="reference 0"):
        recon_grid_png([refs[0][..., 0]], {})


def test_split_png_cuts_a_grid_between_rows_and_fits_every_part():
    """A grid over the limit becomes parts of whole rows at full resolution (stacked, they are the grid); a limit
    below one row downscales that row; a figure under the limit stays as it is."""
    refs = [photo(256, 256, i) for i in range(4)]
    grid = recon_grid_png(refs, {"ae": [photo(256, 256, 10 + i) for i in range(4)]})  # noise: PNG barely shrinks it
    width = png_size(grid)[0]
    assert split_png(grid, len(grid)) == [grid]
    limit = len(grid) // 3
    parts = split_png(grid, limit, GRID_ROW_PX)
    sizes = [Image.open(io.BytesIO(part)).size for part in parts]
    assert len(parts) >= 3 and all(len(part) <= limit for part in parts)
    assert all(w == width for w, _ in sizes) and all(h % GRID_ROW_PX == 0 for _, h in sizes[:-1])
    assert (np.concatenate([png_rgb(part) for part in parts]) == png_rgb(grid)).all()
    small = split_png(grid, 40_000, GRID_ROW_PX)
    assert len(small) == 4 and all(len(part) <= 40_000 for part in small)  # one row each, downscaled
    assert all(Image.open(io.BytesIO(part)).width < width for part in small)


def colour_pixels(rgb: np.ndarray, fraction: float) -> np.ndarray:
    """Mask of pixels within 2 levels (Agg rounding) of the colormap's colour at `fraction` of its scale."""
    colour = np.round(np.asarray(colormaps[ERROR_CMAP](fraction)[:3]) * 255)
    return (np.abs(rgb - colour) <= 2).all(axis=2)


def test_recon_grid_error_maps_use_a_fixed_scale():
    ref = photo(200, 300, 0)
    shifted = ref.copy()
    shifted[:, :150] += 16  # |error| 16 on the left half, 48 on the right: a quarter and three quarters of [0, 64]
    shifted[:, 150:] += 48
    rgb = png_rgb(recon_grid_png([ref], {"same": [ref.copy()], "shifted": [shifted]}))
    zero, low, high = (colour_pixels(rgb, fraction) for fraction in (0.0, 16 / 64, 48 / 64))
    # Each flat region covers >100x100 screen pixels. An autoscaled map would paint 16 and 48 with the
    # colormap's ends; a swapped column order or a mirrored map would move the regions.
    assert zero.sum() > 10_000 and low.sum() > 5_000 and high.sum() > 5_000
    zero_x, low_x, high_x = (np.median(np.nonzero(mask)[1]) for mask in (zero, low, high))
    assert rgb.shape[1] / 3 < zero_x < low_x < high_x


def extractor(definition: str, resolution: int, weights: str, random_init: bool) -> dict:
    return {"definition": definition, "resolution": resolution, "weights": weights,
            "weights_sha256": "0123456789abcdef" * 4, "random_init": random_init}  # fmt: skip


def metrics_json(random_init: bool = True, images: int = 12) -> dict:
    """A metrics.json dict as the evaluate stage writes it (rFDD DINOv3 configured but never computed)."""
    results = [
        result("256p", 256, "ae", psnr=21.3, ssim=0.61, rfid=150.2, rfdd_dinov2=12.5),
        result("256p", 256, "bicubic", psnr=20.1, ssim=0.55, rfid=180.0, rfdd_dinov2=20.1),
        result("1024p", 1024, "ae", psnr=24.56789, ssim=0.712345),
        result("1024l", 1024, "ae", psnr=25.1, ssim=0.73),
    ]
    sample = {"samples": "runs/train_flow/K3/samples/K4/samples.npz", "images": 8, "reference_setting": "256p"}
    return {
        "stage": "evaluate",
        "key": "ab12",
        "output": "runs/evaluate/ab12",
        "created": "2026-11-29T17:30:00Z",
        "autoencoder": {"uri": "runs/train_ae/K/export", "variant": "Tid2-Tid4/1x16x16", "compression": 48.0},
        "eval_set": {"uri": "runs/ingest/K2", "images": images},
        "settings": [
            {"name": "256p", "size": 256, "mode": "center_crop", "budget": 256},
            {"name": "1024p", "size": 1024, "mode": "native", "budget": 4096},
            {
                "name": "1024l",
                "size": 1024,
                "mode": "longest_side",
                "budget": 4096,
                "description": "longest side resized down to 1024px with PIL Lanczos",
            },
        ],
        "extractors": {
            "inception": extractor("FID Inception-v3", 299, "default_1.pt", False),
            "dinov2": extractor("DINOv2 ViT-L/14 CLS", 224, "vit_large_patch14_dinov2.lvd142m", random_init),
        },
        "results": [row | {"images": images} for row in results],
        "generation": [sample | {"gfid": 300.1, "gfdd_dinov2": 40.2}],
        "definitions": {"psnr": "per image, [-1, 1]", "rfid": "Frechet distance of Inception pool3"},
    }


FIGURES = {
    "metric_vs_resolution": "metric_vs_resolution.png",
    "pareto": "pareto.png",
    "loss_curves": "loss_curves.png",
    "recon_256p": "recon_256p.png",
}


def test_render_markdown_tables_and_links():
    text = render_markdown(metrics_json(), FIGURES)
    assert text.startswith("# ViTok evaluation report\n")
    assert "`runs/train_ae/K/export` (Tid2-Tid4/1x16x16, compression 48x)" in text
    assert "`runs/ingest/K2` (12 images)" in text and "2026-11-29T17:30:00Z" in text
    assert "### 256p (center_crop, 256px, budget 256 tokens)" in text
    assert "### 1024p (native, 1024px, budget 4096 tokens)" in text
    longest = "### 1024l (longest_side, 1024px, budget 4096 tokens)\n\n"
    assert longest + "Reference images: longest side resized down to 1024px with PIL Lanczos.\n" in text
    header = "| model | compression | images | PSNR (dB) | SSIM | rFID | rFDD (DINOv2) |"
    assert text.count(header) == 1  # 256p; rFDD (DINOv3) is None everywhere, so no such column
    assert "| ae | 48 | 12 | 21.30 | 0.6100 | 150.200 | 12.500 |" in text
    assert "| bicubic | 48 | 12 | 20.10 | 0.5500 | 180.000 | 20.100 |" in text
    # 1024p has neither rFID nor rFDD: its table stops at SSIM.
    assert (
        "| model | compression | images | PSNR (dB) | SSIM |\n|---|---|---|---|---|\n| ae | 48 | 12 | 24.57 | 0.7123 |"
        in text
    )
    assert "rFDD (DINOv3)" not in text
    assert "| samples | images | reference setting | gFID | gFDD (DINOv2) |" in text
    assert "| runs/train_flow/K3/samples/K4/samples.npz | 8 | 256p | 300.100 | 40.200 |" in text
    for key, file in FIGURES.items():
        assert f"]({file})" in text, key
    assert "![Reconstructions, 256p](recon_256p.png)" in text
    assert text.index("## Reconstruction") < text.index("## Generation") < text.index("## Figures")
    assert text.index("## Figures") < text.index("## Definitions")
    assert "- **psnr**: per image, [-1, 1]" in text
    assert "sha256 `0123456789abcdef`" in text and "0123456789abcdef0" not in text
    assert "- **dinov2**: DINOv2 ViT-L/14 CLS; resolution 224px" in text and text.count("(random init)") == 1


def test_render_markdown_warnings():
    noisy = render_markdown(metrics_json(random_init=True, images=12), FIGURES)
    assert "> **Warning**" in noisy
    assert "> - dinov2 used randomly initialised weights: rFDD (DINOv2), gFDD (DINOv2) are NOT comparable" in noisy
    assert "fewer than 2048 images" in noisy and "12 images in 256p, 1024p, 1024l; 8 generated samples" in noisy
    small_only = render_markdown(metrics_json(random_init=False, images=12), FIGURES)
    assert "> **Warning**" in small_only and "randomly initialised" not in small_only
    clean_metrics = metrics_json(random_init=False, images=50_000)
    clean_metrics["generation"][0]["images"] = 50_000
    clean = render_markdown(clean_metrics, FIGURES)
    assert "**Warning**" not in clean and "randomly initialised" not in clean and "(random init)" not in clean


def test_render_markdown_degenerate_input_and_determinism():
    metrics = metrics_json()
    assert render_markdown(metrics, FIGURES) == render_markdown(copy.deepcopy(metrics), dict(FIGURES))
    metrics["generation"] = None
    del metrics["extractors"]["inception"]
    for row in metrics["results"]:
        del row["rfid"]
    text = render_markdown(metrics, {})
    assert "No samples were evaluated." in text and "rFID" not in text and "## Figures" not in text
    assert "| ae | 48 | 12 | 21.30 | 0.6100 | 12.500 |" in text
