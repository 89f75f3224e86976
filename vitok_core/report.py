"""The evaluate stage's report: PNG figures (returned as bytes, so the caller can write them to any fsspec URI)
and the Markdown text of report.md, built from the metrics.json dict.

Figures are drawn on a bare `matplotlib.figure.Figure` with the Agg canvas: no pyplot state, no display, and a
fixed size and dpi so that the same input gives the same image size.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

DPI = 100
ERROR_CMAP = "inferno"
ERROR_MAX = 64.0  # |error| in 0..255 units at the top of the colour scale, shared by every model
GRID_CELL, GRID_TITLE, GRID_PAD = 2.6, 0.45, 0.1  # inches: image box, title room above it, gap between cells
GRID_ROW_PX = round((GRID_CELL + GRID_TITLE) * DPI)  # one grid row in pixels: where a grid can be cut (split_png)
SMALL_SET = 2048  # the usual minimum for FID statistics; fewer images bias FID-type metrics upward
LOSS_TERMS = ("charbonnier", "ssim_loss", "ssim", "dino", "perceptual")
EXTRACTOR_NAMES = {"inception": "Inception", "dinov2": "DINOv2", "dinov3": "DINOv3"}
METRIC_DECIMALS = {"psnr": 2, "ssim": 4}  # every FID-type metric gets 3


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def metric_title(name: str) -> str:
    """Display name of a metric key: psnr -> PSNR (dB), rfdd_dinov2 -> rFDD (DINOv2), gfid -> gFID."""
    fixed = {"psnr": "PSNR (dB)", "ssim": "SSIM", "rfid": "rFID", "gfid": "gFID"}
    if name in fixed:
        return fixed[name]
    for prefix, shown in (("rfdd_", "rFDD"), ("gfdd_", "gFDD")):
        if name.startswith(prefix):
            extractor = name[len(prefix) :]
            return f"{shown} ({EXTRACTOR_NAMES.get(extractor, extractor)})"
    return name


def _finite(value: Any) -> float | None:
    """The value as a float, or None when it was not computed (None) or is not a finite number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    with io.BytesIO() as buffer:
        # No "Software" entry: the bytes then do not depend on the matplotlib version.
        fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
        fig.clear()
        return buffer.getvalue()


def _message_png(text: str, size: tuple[float, float] = (6.0, 3.0)) -> bytes:
    fig = Figure(figsize=size)
    fig.text(0.5, 0.5, text, ha="center", va="center", fontsize=14)
    return _png(fig)


# ---------------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------------


def metric_vs_resolution_png(results: list[dict], metrics: Sequence[str] = ("psnr", "ssim", "rfid")) -> bytes:
    """One panel per metric that some row has: the metric against the setting's pixel size, a line per model."""
    present = [m for m in metrics if any(_finite(row.get(m)) is not None for row in results)]
    if not present:
        return _message_png("no results with the requested metrics")
    line_of = _line_labels(results)
    lines = list(dict.fromkeys(line_of(row) for row in results))
    sizes = sorted({int(row["size"]) for row in results})
    fig = Figure(figsize=(4.5 * len(present), 3.6), layout="constrained")
    axes = fig.subplots(1, len(present), squeeze=False)[0]
    for ax, metric in zip(axes, present, strict=True):
        for line in lines:
            points = [(int(r["size"]), _finite(r.get(metric))) for r in results if line_of(r) == line]
            points = sorted((s, v) for s, v in points if v is not None)
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], marker="o", label=line)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.minorticks_off()
        # A quarter octave of room either side keeps a single size from collapsing the axis.
        ax.set_xlim(sizes[0] / 2**0.25, sizes[-1] * 2**0.25)
        ax.set_title(metric_title(metric))
        ax.set_xlabel("size (px)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _png(fig)


def _line_labels(results: list[dict]) -> Callable[[Mapping[str, Any]], str]:
    """A line per model; per (model, mode) when two settings of one size differ in mode (native and
    longest_side 1024p, say), so that points of different protocols are never joined into one line."""
    modes_at: dict[int, set[str]] = {}
    for row in results:
        modes_at.setdefault(int(row["size"]), set()).add(str(row.get("mode")))
    if all(len(modes) == 1 for modes in modes_at.values()):
        return lambda row: str(row["model"])
    return lambda row: f"{row['model']} ({row.get('mode')})"


def pareto_front(points: Sequence[tuple[float, float]], higher_y_is_better: bool) -> list[tuple[float, float]]:
    """The points no other point dominates (lower x is better; y lower or higher), ordered by x."""
    sign = -1.0 if higher_y_is_better else 1.0
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], sign * p[1])):
        if not front or sign * y < sign * front[-1][1]:
            front.append((x, y))
    return front


def pareto_png(points: list[dict]) -> bytes:
    """rFID against gFID across runs (rFID against PSNR when no run has a gFID), with the Pareto front."""
    use_gfid = any(_finite(p.get("gfid")) is not None and _finite(p.get("rfid")) is not None for p in points)
    y_key = "gfid" if use_gfid else "psnr"
    plotted = [p for p in points if _finite(p.get("rfid")) is not None and _finite(p.get(y_key)) is not None]
    if not plotted:
        return _message_png("no runs with the needed metrics")
    xs = [_finite(p["rfid"]) for p in plotted]
    ys = [_finite(p[y_key]) for p in plotted]
    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.subplots()
    ax.scatter(xs, ys, zorder=3)
    for point, x, y in zip(plotted, xs, ys, strict=True):
        text = str(point.get("label", ""))
        compression = _finite(point.get("compression"))
        if compression is not None:
            text += f" x{compression:.0f}"
        ax.annotate(text, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=8)
    front = pareto_front(list(zip(xs, ys, strict=True)), higher_y_is_better=not use_gfid)
    ax.step(
        [x for x, _ in front], [y for _, y in front], where="post", color="tab:red", alpha=0.6, label="Pareto front"
    )
    ax.margins(0.15)
    ax.set_xlabel("rFID (lower is better)")
    if use_gfid:
        ax.set_ylabel("gFID (lower is better)")
        ax.set_title("Reconstruction vs generation")
    else:
        ax.set_ylabel("PSNR (dB, higher is better; no gFID yet)")
        ax.set_title("Reconstruction: rFID vs PSNR (no run has a gFID)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def budget_changes(lines: Sequence[Mapping[str, Any]]) -> list[tuple[int, Any]]:
    """(step, new budget) wherever the logged token budget differs from the previous line's."""
    changes, previous = [], None
    for line in lines:
        budget = line.get("budget")
        if budget is None or "step" not in line:
            continue
        if previous is not None and budget != previous:
            changes.append((line["step"], budget))
        previous = budget
    return changes


def _series(lines: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pairs = [(line["step"], _finite(line.get(key))) for line in lines if "step" in line]
    pairs = [(s, v) for s, v in pairs if v is not None]
    return [s for s, _ in pairs], [v for _, v in pairs]


def loss_curves_png(lines: list[dict]) -> bytes:
    """Training curves from train_ae's metrics lines: loss and its terms (left), learning rate (right), with a
    dotted line where the token budget changes."""
    if not any("step" in line for line in lines):
        return _message_png("no training metrics")
    fig = Figure(figsize=(11.0, 4.0), layout="constrained")
    loss_ax, lr_ax = fig.subplots(1, 2)
    positive = True
    for key in ("loss", *LOSS_TERMS):
        steps, values = _series(lines, key)
        if steps:
            loss_ax.plot(steps, values, label=key)
            positive = positive and min(values) > 0
    if loss_ax.lines and positive:
        loss_ax.set_yscale("log")
    steps, values = _series(lines, "lr")
    if steps:
        lr_ax.plot(steps, values, color="tab:green")
    for ax in (loss_ax, lr_ax):
        for step, budget in budget_changes(lines):
            ax.axvline(step, linestyle=":", color="grey")
            ax.text(
                step, 0.98, f"budget {budget}", transform=ax.get_xaxis_transform(), rotation=90, ha="right", va="top",
                fontsize=7, color="grey",
            )  # fmt: skip
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    loss_ax.set_title("loss and terms")
    if loss_ax.lines:
        loss_ax.legend(fontsize=8)
    lr_ax.set_title("learning rate")
    return _png(fig)


def learning_curves_png(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] = ("psnr", "ssim", "rfid")) -> bytes:
    """Metric against training step, one panel per (metric, setting), one line per arm; rows with arm "bicubic"
    (the baseline, no steps) are a dashed horizontal line. Rows: {arm, step, setting, <metric>: value}."""
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    shown = [m for m in metrics if any(_finite(r.get(m)) is not None for r in rows)]
    if not settings or not shown:
        return _message_png("no evaluated checkpoints")
    fig = Figure(figsize=(4.2 * len(settings), 3.2 * len(shown)), layout="constrained")
    axes = np.asarray(fig.subplots(len(shown), len(settings), squeeze=False))
    arms = [a for a in dict.fromkeys(r["arm"] for r in rows) if a != "bicubic"]
    for i, metric in enumerate(shown):
        for j, setting in enumerate(settings):
            ax = axes[i][j]
            for arm in arms:
                points = sorted(
                    (r["step"], _finite(r.get(metric))) for r in rows if r["arm"] == arm and r["setting"] == setting
                )
                points = [(s, v) for s, v in points if v is not None]
                if points:
                    ax.plot([s for s, _ in points], [v for _, v in points], marker="o", label=arm)
            for r in rows:
                value = _finite(r.get(metric))
                if r["arm"] == "bicubic" and r["setting"] == setting and value is not None:
                    ax.axhline(value, linestyle="--", color="grey", label="bicubic")
            ax.set_title(f"{metric_title(metric)}, {setting}", fontsize=10)
            ax.set_xlabel("training step")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    return _png(fig)


def image_psnr(reference: np.ndarray, reconstruction: np.ndarray) -> float:
    """PSNR in dB of two uint8 images: 10 log10(255^2 / MSE); inf when they are equal."""
    mse = float(np.mean((reference.astype(np.float64) - reconstruction.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def error_map(reference: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
    """Per-pixel mean absolute error over channels, float32 in 0..255 units."""
    return np.abs(reference.astype(np.float32) - reconstruction.astype(np.float32)).mean(axis=2)


def _display_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _shrink_rgb(image: np.ndarray, max_side: int) -> np.ndarray:
    size = _display_size(*image.shape[:2], max_side)
    if size == (image.shape[1], image.shape[0]):
        return image
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


def _shrink_error(error: np.ndarray, max_side: int) -> np.ndarray:
    size = _display_size(*error.shape, max_side)
    if size == (error.shape[1], error.shape[0]):
        return error
    # Lanczos rings below zero near edges; an absolute error cannot be negative.
    shrunk = Image.fromarray(np.ascontiguousarray(error, dtype=np.float32)).resize(size, Image.Resampling.LANCZOS)
    return np.clip(np.asarray(shrunk), 0, None)


def _check_grid(references: list[np.ndarray], reconstructions: dict[str, list[np.ndarray]]) -> None:
    for i, ref in enumerate(references):
        if ref.ndim != 3 or ref.shape[2] != 3 or ref.dtype != np.uint8:
            raise ValueError(f"recon grid: reference {i} must be uint8 HxWx3, got {ref.dtype} {ref.shape}")
    for model, images in reconstructions.items():
        if len(images) != len(references):
            raise ValueError(f"recon grid: {model!r} has {len(images)} images for {len(references)} references")
        for i, (ref, rec) in enumerate(zip(references, images, strict=True)):
            if rec.shape != ref.shape or rec.dtype != np.uint8:
                raise ValueError(
                    f"recon grid: {model!r} image {i} is {rec.dtype} {rec.shape}, reference is uint8 {ref.shape}"
                )


def _grid_axes(fig: Figure, rows: int, cols: int) -> list[list[Any]]:
    """Square image cells with room for a two-line title above each; placed in inches, because constrained layout
    costs seconds on a grid of many image axes."""
    width, height = fig.get_size_inches()
    cells = []
    for row in range(rows):
        bottom = height - (row + 1) * (GRID_CELL + GRID_TITLE)
        cells.append(
            [
                fig.add_axes(
                    (
                        (GRID_PAD + col * (GRID_CELL + GRID_PAD)) / width,
                        bottom / height,
                        GRID_CELL / width,
                        GRID_CELL / height,
                    )
                )
                for col in range(cols)
            ]
        )
    return cells


def recon_grid_png(
    references: list[np.ndarray], reconstructions: dict[str, list[np.ndarray]], max_side: int = 256
) -> bytes:
    """One row per image: the reference, then per model its reconstruction (PSNR in the title) and |error| map
    on a fixed [0, ERROR_MAX] scale. Images are downscaled for display only; PSNR uses the full arrays."""
    _check_grid(references, reconstructions)
    if not references:
        return _message_png("no images")
    cols = 1 + 2 * len(reconstructions)
    colorbar_room = 1.0 if reconstructions else 0.0
    width = GRID_PAD + cols * (GRID_CELL + GRID_PAD) + colorbar_room
    height = len(references) * (GRID_CELL + GRID_TITLE) + GRID_PAD
    fig = Figure(figsize=(width, height))
    axes = _grid_axes(fig, len(references), cols)
    error_image = None
    for row, ref in enumerate(references):
        axes[row][0].imshow(_shrink_rgb(ref, max_side))
        axes[row][0].set_title(f"reference\n{ref.shape[1]}x{ref.shape[0]}", fontsize=9)
        for index, (model, images) in enumerate(reconstructions.items()):
            rec = images[row]
            rec_ax, err_ax = axes[row][1 + 2 * index], axes[row][2 + 2 * index]
            rec_ax.imshow(_shrink_rgb(rec, max_side))
            rec_ax.set_title(f"{model}\nPSNR {image_psnr(ref, rec):.2f} dB", fontsize=9)
            error = _shrink_error(error_map(ref, rec), max_side)
            error_image = err_ax.imshow(error, cmap=ERROR_CMAP, vmin=0.0, vmax=ERROR_MAX, interpolation="nearest")
            err_ax.set_title(f"{model} |error|\n", fontsize=9)
    for ax in (ax for row_axes in axes for ax in row_axes):
        ax.set_axis_off()
    if error_image is not None:
        # Beside the first row only: a grid cut into parts of whole rows (split_png) keeps it whole in the first part.
        first_row = (height - GRID_CELL - GRID_TITLE) / height
        bar = fig.add_axes(((width - colorbar_room + 0.1) / width, first_row, 0.15 / width, GRID_CELL / height))
        fig.colorbar(error_image, cax=bar, label="mean |error| (0-255)")
    return _png(fig)


def _encode_png(image: Image.Image) -> bytes:
    with io.BytesIO() as buffer:
        image.save(buffer, format="PNG")  # zlib's default level, as matplotlib: optimize=True is slow for little
        return buffer.getvalue()


def _shrink_to_fit(image: Image.Image, max_bytes: int) -> bytes:
    """The image downscaled (Lanczos) until its PNG is at most `max_bytes`; PNG size scales about with the pixel
    count, so each try scales the sides by the square root of the size ratio, with 10% to spare."""
    data = _encode_png(image)
    while len(data) > max_bytes and min(image.size) > 16:
        scale = 0.9 * math.sqrt(max_bytes / len(data))
        image = image.resize(_display_size(image.height, image.width, round(max(image.size) * scale)),
                             Image.Resampling.LANCZOS)  # fmt: skip
        data = _encode_png(image)
    return data


def shrink_png(data: bytes, max_bytes: int) -> bytes:
    """A PNG downscaled (Lanczos) until it is at most `max_bytes`; unchanged when it already is."""
    if len(data) <= max_bytes:
        return data
    with Image.open(io.BytesIO(data)) as image:
        return _shrink_to_fit(image.convert("RGB"), max_bytes)


def split_png(data: bytes, max_bytes: int, band_px: int | None = None) -> list[bytes]:
    """The PNG as parts of at most `max_bytes` each, top to bottom, for places with a size limit. With `band_px`
    (a grid's row height, GRID_ROW_PX) the image is cut between rows only, as many whole rows per part as fit, so
    that every row keeps its full resolution; a row that alone is too large, or an image without `band_px`, is
    downscaled until it fits."""
    if len(data) <= max_bytes:
        return [data]
    with Image.open(io.BytesIO(data)) as opened:
        image = opened.convert("RGB")  # figures are opaque: RGBA's alpha only costs bytes
    rows = max(1, image.height // band_px) if band_px else 1
    cuts = [i * (band_px or 0) for i in range(rows)] + [image.height]  # the last row takes the bottom margin
    parts, first = [], 0
    while first < rows:
        last, best = first + 1, _encode_png(image.crop((0, cuts[first], image.width, cuts[first + 1])))
        while last < rows:
            wider = _encode_png(image.crop((0, cuts[first], image.width, cuts[last + 1])))
            if len(wider) > max_bytes:
                break
            last, best = last + 1, wider
        if len(best) > max_bytes:
            best = _shrink_to_fit(image.crop((0, cuts[first], image.width, cuts[last])), max_bytes)
        parts.append(best)
        first = last
    return parts


# ---------------------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------------------


def format_metric(name: str, value: Any) -> str:
    """PSNR with 2 decimals, SSIM with 4, FID-type metrics with 3; "-" when not computed."""
    if value is None or isinstance(value, bool):
        return "-"
    number = float(value)
    if math.isnan(number):
        return "-"
    return f"{number:.{METRIC_DECIMALS.get(name, 3)}f}"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _metric_columns(rows: Sequence[Mapping[str, Any]], fixed: Sequence[str], prefix: str) -> list[str]:
    """The fixed metric keys, then other `prefix*` keys in order of first appearance; only those some row has."""
    keys = list(fixed) + [k for row in rows for k in row if k.startswith(prefix) and k not in fixed]
    keys = list(dict.fromkeys(keys))
    return [k for k in keys if any(row.get(k) is not None for row in rows)]


def _extractor_metrics(name: str) -> str:
    if name == "inception":
        return "rFID, gFID"
    return f"{metric_title('rfdd_' + name)}, {metric_title('gfdd_' + name)}"


def _small_counts(metrics: Mapping[str, Any]) -> str:
    """Image counts below SMALL_SET, each with the settings it occurs in, then the generation counts."""
    by_count: dict[int, list[str]] = {}
    for row in metrics.get("results") or []:
        if row.get("images") is not None and row["images"] < SMALL_SET:
            by_count.setdefault(row["images"], []).append(str(row.get("setting")))
    parts = [f"{count} images in {', '.join(dict.fromkeys(names))}" for count, names in by_count.items()]
    samples = [row.get("images") for row in metrics.get("generation") or []]
    parts += [f"{n} generated samples" for n in dict.fromkeys(samples) if n is not None and n < SMALL_SET]
    return "; ".join(parts)


def _warnings(metrics: Mapping[str, Any]) -> list[str]:
    lines = []
    for name, extractor in (metrics.get("extractors") or {}).items():
        if extractor.get("random_init"):
            lines.append(
                f"{name} used randomly initialised weights: {_extractor_metrics(name)} are NOT comparable to "
                "published numbers"
            )
    counts = _small_counts(metrics)
    if counts:
        lines.append(
            f"FID-type metrics from fewer than {SMALL_SET} images are biased upward; compare only at equal counts "
            f"({counts})"
        )
    if not lines:
        return []
    return ["> **Warning**", ">", *(f"> - {line}" for line in lines), ""]


def _reconstruction(metrics: Mapping[str, Any]) -> list[str]:
    results = metrics.get("results") or []
    settings = list(metrics.get("settings") or [])
    listed = {s.get("name") for s in settings}
    # Results of a setting missing from "settings" still get a table rather than vanishing.
    settings += [{"name": n} for n in dict.fromkeys(r.get("setting") for r in results) if n not in listed]
    out = ["## Reconstruction", ""]
    if not results:
        return [*out, "No reconstruction results.", ""]
    for setting in settings:
        rows = [r for r in results if r.get("setting") == setting["name"]]
        if not rows:
            continue
        if "size" in setting:
            out.append(
                f"### {setting['name']} ({setting.get('mode', '?')}, {setting['size']}px, "
                f"budget {setting.get('budget', '?')} tokens)"
            )
        else:
            out.append(f"### {setting['name']}")
        if setting.get("description"):
            out += ["", f"Reference images: {setting['description']}."]
        keys = _metric_columns(rows, ("psnr", "ssim", "rfid", "rfdd_dinov2", "rfdd_dinov3"), "rfdd_")
        body = [
            [_cell(r.get("model")), _cell(r.get("compression")), _cell(r.get("images"))]
            + [format_metric(k, r.get(k)) for k in keys]
            for r in rows
        ]
        out += ["", *_table(["model", "compression", "images", *map(metric_title, keys)], body), ""]
    return out


def _generation(metrics: Mapping[str, Any]) -> list[str]:
    rows = metrics.get("generation") or []
    if not rows:
        return ["## Generation", "", "No samples were evaluated.", ""]
    keys = _metric_columns(rows, ("gfid", "gfdd_dinov2", "gfdd_dinov3"), "gfdd_")
    body = [
        [_cell(r.get("samples")), _cell(r.get("images")), _cell(r.get("reference_setting"))]
        + [format_metric(k, r.get(k)) for k in keys]
        for r in rows
    ]
    return [
        "## Generation",
        "",
        *_table(["samples", "images", "reference setting", *map(metric_title, keys)], body),
        "",
    ]


def figure_title(key: str) -> str:
    fixed = {
        "metric_vs_resolution": "Metrics vs resolution",
        "pareto": "Reconstruction vs generation",
        "loss_curves": "Training curves",
    }
    if key in fixed:
        return fixed[key]
    return f"Reconstructions, {key[len('recon_') :]}" if key.startswith("recon_") else key


def _definitions(metrics: Mapping[str, Any]) -> list[str]:
    out = ["## Definitions", ""]
    out += [f"- **{name}**: {text}" for name, text in (metrics.get("definitions") or {}).items()]
    for name, ex in (metrics.get("extractors") or {}).items():
        sha = str(ex.get("weights_sha256") or "-")[:16]
        line = (
            f"- **{name}**: {ex.get('definition', '-')}; resolution {ex.get('resolution', '-')}px; "
            f"weights `{ex.get('weights', '-')}`; sha256 `{sha}`"
        )
        out.append(line + (" (random init)" if ex.get("random_init") else ""))
    return [*out, ""]


def render_markdown(metrics: dict, figures: dict[str, str]) -> str:
    """report.md from the evaluate stage's metrics.json dict and the figure files (paths relative to the report)."""
    ae = metrics.get("autoencoder") or {}
    eval_set = metrics.get("eval_set") or {}
    compression = _finite(ae.get("compression"))
    lines = [
        "# ViTok evaluation report",
        "",
        f"Autoencoder `{ae.get('uri', '-')}` ({ae.get('variant', '-')}, compression "
        f"{'-' if compression is None else f'{compression:g}x'}); eval set `{eval_set.get('uri', '-')}` "
        f"({eval_set.get('images', '-')} images); created {metrics.get('created', '-')}.",
        "",
    ]
    lines += _warnings(metrics)
    lines += _reconstruction(metrics)
    lines += _generation(metrics)
    shown = [(key, file) for key, file in figures.items() if file]
    if shown:
        lines += ["## Figures", ""]
        for key, file in shown:
            lines += [f"![{figure_title(key)}]({file})", ""]
    lines += _definitions(metrics)
    return "\n".join(lines).rstrip("\n") + "\n"
