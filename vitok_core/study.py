"""The CPU training study (configs/cpu_study.yaml, `vitok study`, docs/results.md): which real photos it uses,
how they are split, the training crops made from them, and its results table and text.

Photos (../shared/docs/data.md): the scikit-image and scikit-learn wheels, and two Debian packages unpacked
under a folder (`debian_root`; `pipelines/study.py` downloads them). Eight photos are held out, by name, for
evaluation (HELD_OUT: every source and every aspect family among them, five large enough for 1024p native);
the other 29 are the training photos, which are cut into multi-scale crops (`write_training_crops`) because
29 images at one scale would be learnt by heart.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vitok_core.demo import DEMO_ASPECTS, crop_box
from vitok_core.variants import parse_variant

SKIMAGE_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
MATE_DIR = "usr/share/backgrounds/mate/nature"
TUXPAINT_DIR = "usr/share/tuxpaint/templates"
EXPECTED = {"skimage": 4, "sklearn": 2, "mate": 12, "tuxpaint": 19}
HELD_OUT = (
    ("skimage", "chelsea.png"),
    ("sklearn", "china.jpg"),
    ("mate", "FreshFlower.jpg"),
    ("mate", "Storm.jpg"),
    ("mate", "Wood.jpg"),
    ("tuxpaint", "lighthouse.jpg"),
    ("tuxpaint", "rocks.jpg"),
    ("tuxpaint", "sheep.jpg"),
)


@dataclass(frozen=True)
class Photo:
    source: str  # skimage | sklearn | mate | tuxpaint
    name: str  # file name in its source
    path: Path

    @property
    def label(self) -> str:
        return f"{self.source}-{Path(self.name).stem}"


def _package_dir(module: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{module} is not installed; its wheel ships study photos")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def find_photos(debian_root: Path, sklearn_dir: Path) -> list[Photo]:
    """Every study photo, sorted by source and name; FileNotFoundError naming what is missing. `sklearn_dir`
    holds scikit-learn's two photos (copied out of its wheel: the package itself is not a dependency)."""
    photos = [Photo("skimage", n, _package_dir("skimage", "data", n)) for n in SKIMAGE_PHOTOS]
    photos += [Photo("sklearn", n, sklearn_dir / n) for n in SKLEARN_PHOTOS]
    for source, folder in (("mate", MATE_DIR), ("tuxpaint", TUXPAINT_DIR)):
        photos += [Photo(source, p.name, p) for p in sorted((debian_root / folder).glob("*.jpg"))]
    counts = {source: sum(p.source == source for p in photos) for source in EXPECTED}
    missing = [p.path for p in photos if not p.path.is_file()]
    if missing or counts != EXPECTED:
        raise FileNotFoundError(
            f"study photos: found {counts}, expected {EXPECTED}; missing files {missing[:3]}. The Debian ones come "
            f"from `apt-get download mate-backgrounds tuxpaint-data` unpacked with `dpkg -x DEB {debian_root}`; "
            f"scikit-learn's from its wheel's sklearn/datasets/images/ into {sklearn_dir}"
        )
    return sorted(photos, key=lambda p: (p.source, p.name))


def split(photos: Sequence[Photo]) -> tuple[list[Photo], list[Photo]]:
    """(training photos, held-out photos): HELD_OUT by source and name, the rest for training."""
    held = {(p.source, p.name): p for p in photos if (p.source, p.name) in HELD_OUT}
    if len(held) != len(HELD_OUT):
        raise FileNotFoundError(f"held-out photos missing: {sorted(set(HELD_OUT) - set(held))}")
    return [p for p in photos if (p.source, p.name) not in held], [held[k] for k in HELD_OUT]


def write_heldout(photos: Sequence[Photo], root: Path) -> list[Path]:
    """The held-out photos, byte for byte, as root/<source>-<name> (the evaluate stage's eval set)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for photo in photos:
        paths.append(root / f"{photo.source}-{photo.name}")
        if not paths[-1].is_file():
            shutil.copyfile(photo.path, paths[-1])
    return paths


def write_training_crops(
    photos: Sequence[Photo],
    root: Path,
    per_photo: int,
    seed: int = 0,
    scale: tuple[float, float] = (0.2, 1.0),
    short_side: tuple[int, int] = (192, 448),
) -> list[Path]:
    """`per_photo` crops of each training photo as JPEGs (quality 95) under root/<source>-<stem>/: aspect
    ratios cycled through DEMO_ASPECTS, box sides 20-100% of the largest box, short side drawn in
    `short_side` but never upscaled (a small box keeps its pixels: fine detail at its own scale). Written
    once, deterministic in `seed`; a complete folder (marker `_COMPLETE`) is kept as it is, so its ingest
    key stays the same."""
    from PIL import Image

    done = root / "_COMPLETE"
    if done.is_file():
        return sorted(root.glob("*/*.jpg"))
    rng = np.random.default_rng(seed)
    paths = []
    for photo in photos:
        with Image.open(photo.path) as img:
            rgb = img.convert("RGB")
        (root / photo.label).mkdir(parents=True, exist_ok=True)
        for i in range(per_photo):
            aspect = DEMO_ASPECTS[i % len(DEMO_ASPECTS)]
            left, top, box_w, box_h = crop_box(rgb.width, rgb.height, aspect, rng, scale)
            short = min(int(rng.integers(short_side[0], short_side[1] + 1)), min(box_w, box_h))
            size = (round(short * box_w / box_h), short) if box_w >= box_h else (short, round(short * box_h / box_w))
            crop = rgb.crop((left, top, left + box_w, top + box_h)).resize(size, Image.Resampling.LANCZOS)
            paths.append(root / photo.label / f"{photo.label}_{i:03d}.jpg")
            crop.save(paths[-1], "JPEG", quality=95)
    done.write_text("")
    return paths


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------
def curve_rows(metrics: Mapping[str, Any], models: Mapping[str, tuple[str, int]]) -> list[dict[str, Any]]:
    """The evaluate stage's result rows of the study's models as (arm, step, setting, psnr, ssim, rfid), sorted;
    `models` maps an evaluate model name ("ae", "baseline:naflex@500") to (arm, step). The bicubic rows come
    with arm "bicubic" and step 0."""
    rows = []
    for row in metrics["results"]:
        if row["model"] == "bicubic":
            arm, step = "bicubic", 0
        elif row["model"] in models:
            arm, step = models[row["model"]]
        else:
            continue
        rows.append({"arm": arm, "step": step, **{k: row.get(k) for k in ("setting", "psnr", "ssim", "rfid")}})
    order = {s["name"]: i for i, s in enumerate(metrics["settings"])}
    return sorted(rows, key=lambda r: (r["arm"], r["step"], order[r["setting"]]))


def final_table(rows: Sequence[Mapping[str, Any]], arms: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """{setting: {arm or "bicubic": row}} at each arm's last evaluated step."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for arm in (*arms, "bicubic"):
        mine = [r for r in rows if r["arm"] == arm]
        last = max((r["step"] for r in mine), default=None)
        for r in mine:
            if r["step"] == last:
                table.setdefault(r["setting"], {})[arm] = dict(r)
    return table


def _fmt(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _metric_table(table: Mapping[str, Mapping[str, Mapping[str, Any]]], columns: Sequence[str]) -> list[str]:
    lines = [
        "| setting | " + " | ".join(f"{c} PSNR | {c} SSIM | {c} rFID" for c in columns) + " |",
        "|---|" + "---|" * (3 * len(columns)),
    ]
    for setting, by_arm in table.items():
        cells = []
        for c in columns:
            r = by_arm.get(c, {})
            cells += [_fmt(r.get("psnr"), 2), _fmt(r.get("ssim"), 4), _fmt(r.get("rfid"), 1)]
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return lines


def verdicts(table: Mapping[str, Mapping[str, Mapping[str, Any]]], arms: Sequence[str]) -> list[str]:
    """Sentences computed from the final table: does the first arm beat bicubic PSNR per setting, and the
    first arm minus each other arm per setting and metric."""
    main, lines = arms[0], []
    for setting, by_arm in table.items():
        ours, bicubic = by_arm.get(main, {}).get("psnr"), by_arm.get("bicubic", {}).get("psnr")
        if ours is not None and bicubic is not None:
            word = "beats" if ours > bicubic else "does not beat"
            lines.append(
                f"- {setting}: {main} {word} bicubic PSNR ({ours:.2f} vs {bicubic:.2f} dB, {ours - bicubic:+.2f} dB)."
            )
    for other in arms[1:]:
        for setting, by_arm in table.items():
            a, b = by_arm.get(main, {}), by_arm.get(other, {})
            parts = []
            for metric, digits, better in (("psnr", 2, 1), ("ssim", 4, 1), ("rfid", 1, -1)):
                if a.get(metric) is not None and b.get(metric) is not None:
                    diff = a[metric] - b[metric]
                    side = "a tie" if round(diff, digits) == 0 else main if diff * better > 0 else other
                    side = side if side == "a tie" else f"{side} better"
                    parts.append(f"{metric.upper() if metric != 'rfid' else 'rFID'} {diff:+.{digits}f} ({side})")
            if parts:
                lines.append(f"- {setting}, {main} minus {other}: " + ", ".join(parts) + ".")
    return lines


def steps_to_reach(rows: Sequence[Mapping[str, Any]], arm: str, setting: str, target: float) -> dict[str, Any] | None:
    """Where `arm`'s PSNR at `setting` would reach `target` if it kept rising as it did over the second half of
    training: a least-squares fit of PSNR = a + b ln(step) over the exports at or after half the last step.
    None with fewer than 3 such points; "steps" None when the fit does not rise."""
    points = sorted((r["step"], r["psnr"]) for r in rows if r["arm"] == arm and r["setting"] == setting and r["psnr"])
    if not points:
        return None
    late = [(s, v) for s, v in points if s >= points[-1][0] / 2]
    if len(late) < 3:
        return None
    slope, intercept = np.polyfit(np.log([s for s, _ in late]), [v for _, v in late], 1)
    steps = float(np.exp((target - intercept) / slope)) if slope > 0 else None
    return {"slope_db_per_doubling": float(slope * np.log(2)), "steps": steps, "points": len(late)}


def gap_lines(
    rows: Sequence[Mapping[str, Any]], table: Mapping[str, Mapping[str, Mapping[str, Any]]], arm: str
) -> list[str]:
    """Per setting where `arm` is below bicubic PSNR: its gain per doubling of steps late in training and the
    steps at which that pace would reach bicubic."""
    lines = []
    for setting, by_arm in table.items():
        ours, bicubic = by_arm.get(arm, {}).get("psnr"), by_arm.get("bicubic", {}).get("psnr")
        if ours is None or bicubic is None or ours > bicubic:
            continue
        fit = steps_to_reach(rows, arm, setting, bicubic)
        if fit is None:
            continue
        pace = (
            f"{fit['slope_db_per_doubling']:+.2f} dB per doubling of steps (fit over the last {fit['points']} exports)"
        )
        reach = f"reaching bicubic's {bicubic:.2f} dB at ~{fit['steps']:,.0f} steps" if fit["steps"] else "not rising"
        lines.append(
            f"- {setting}: {arm} gains {pace}: {reach} if that pace held (an extrapolation within one cosine "
            "schedule, whose last steps run at a falling learning rate; a longer run is a new schedule, not this "
            "one continued: not a measurement)."
        )
    return lines


def per_image_lines(scores: Sequence[Mapping[str, Any]], arms: Sequence[str], settings: Sequence[str]) -> list[str]:
    """arms[0] minus arms[1], image by image: how many images the first wins, the median difference, and the
    image that moves the mean most. `scores`: per-image rows {setting, arm, id, psnr}."""
    arm_a, arm_b = arms[:2]
    lines = []
    for setting in settings:
        psnr = {(r["arm"], r["id"]): r["psnr"] for r in scores if r["setting"] == setting}
        ids = sorted({i for a, i in psnr if a == arm_a} & {i for a, i in psnr if a == arm_b})
        if not ids:
            continue
        diffs = {i: psnr[(arm_a, i)] - psnr[(arm_b, i)] for i in ids}
        top = max(ids, key=lambda i: abs(diffs[i]))
        rest = [diffs[i] for i in ids if i != top]
        lines.append(
            f"- {setting}: {arm_a} higher on {sum(d > 0 for d in diffs.values())} of {len(ids)} images; median "
            f"{float(np.median(list(diffs.values()))):+.2f} dB; the largest, {str(top).rsplit('/', 1)[-1]}, "
            f"{diffs[top]:+.2f} dB; mean without it {float(np.mean(rest)) if rest else float('nan'):+.2f} dB."
        )
    return lines


def render_results(
    cfg: Any,
    info: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    curve_metrics: Mapping[str, Any],
    per_image: Sequence[Mapping[str, Any]] = (),
) -> str:
    """docs/results.md: setup, the final table against bicubic, the verdicts, the learning curves, figures."""
    arms = list(info["arms"])
    table = final_table(rows, arms)
    settings = {s["name"]: s for s in curve_metrics["settings"]}
    gaps = gap_lines(rows, table, arms[0])
    t, o = cfg.train, cfg.optim
    minutes = {k: f"{v / 60:.1f} min" for k, v in info["timings"].items()}
    out = [
        "# Results: the recipe on CPU, against bicubic, and the NaFlex ablation",
        "",
        f"Made by `{info['command']}` (pipelines/study.py, preset `configs/{cfg.name}.yaml`) on {info['date']}, "
        f"commit `{info['commit']}`, on {info['machine']}. Wall time {info['wall_s'] / 60:.1f} min: "
        + ", ".join(f"{k} {v}" for k, v in minutes.items())
        + ". Every number below is read from the evaluate stage's metrics.json of this run.",
        "",
        "## Setup",
        "",
        f"- Model: `{cfg.model.variant}` ({info['parameters']['total'] / 1e6:.1f}M parameters), compression "
        f"r = {parse_variant(cfg.model.variant).compression_ratio:g}, trained from scratch.",
        f"- Training: {t.steps} steps of {t.batch_size} images, {t.workers} Ray Train workers "
        f"(DeepSpeed ZeRO-{t.zero_stage}, fp32, gloo), AdamW lr {o.lr:g} (warm-up {o.warmup_steps}, cosine to "
        f"{o.min_lr:g}), loss Charbonnier + {cfg.loss.ssim_weight:g} x (1 - SSIM) on {cfg.loss.tile_size}px tiles; "
        "DINO off (no weights offline). "
        f"Budget {list(cfg.data.budgets)} tokens.",
        f"- Training data: {info['crops']} crops (multi-scale, six aspect ratios, short side 192-448 px, never "
        f"upscaled) of {len(info['train_photos'])} photos: "
        + ", ".join(f"{s}/{n}" for s, n in info["train_photos"])
        + ".",
        "- Held-out photos (never trained on, evaluated whole): "
        + ", ".join(f"{s}/{n}" for s, n in info["heldout_photos"])
        + " (sources: scikit-image and scikit-learn wheels, Debian mate-backgrounds nature/ and tuxpaint-data "
        "templates/).",
        "- Arms: "
        + "; ".join(f"`{arm}`: " + (" ".join(f"`{x}`" for x in ov) or "the preset") for arm, ov in info["arms"].items())
        + ".",
        "- Evaluation settings: "
        + "; ".join(f"{n}: {s['description']}" for n, s in settings.items() if "description" in s)
        + ". rFID is over "
        + f"{curve_metrics['eval_set']['scored']} images: far below the ~2048 FID needs, so it ranks models only "
        "roughly.",
        "",
        "## Final checkpoints against bicubic at the same compression",
        "",
        *_metric_table(table, [*arms, "bicubic"]),
        "",
        *verdicts(table, arms),
        "",
        *(
            ["Image by image (final checkpoints, PSNR):", "", *per_image_lines(per_image, arms, list(settings)), ""]
            if per_image and len(arms) > 1
            else []
        ),
        *(["How the gap to bicubic closes with steps:", "", *gaps, ""] if gaps else []),
        "## Learning curves",
        "",
        "Every export (`train.export_every`) of both arms, evaluated on the held-out photos; the dashed line is "
        "bicubic.",
        "",
        "![learning curves](results/learning_curves.png)",
        "",
        "| arm | step | " + " | ".join(f"{s} PSNR | {s} SSIM | {s} rFID" for s in settings) + " |",
        "|---|---|" + "---|" * (3 * len(settings)),
    ]
    by_point: dict[tuple[str, int], dict[str, Mapping[str, Any]]] = {}
    for r in rows:
        by_point.setdefault((r["arm"], r["step"]), {})[r["setting"]] = r
    for (arm, step), cells in sorted(by_point.items(), key=lambda kv: (kv[0][0] == "bicubic", kv[0])):
        values = []
        for s in settings:
            r = cells.get(s, {})
            values += [_fmt(r.get("psnr"), 2), _fmt(r.get("ssim"), 4), _fmt(r.get("rfid"), 1)]
        out.append(f"| {arm} | {step if arm != 'bicubic' else '-'} | " + " | ".join(values) + " |")
    out += [
        "",
        "## What this does not show",
        "",
        "- One seed per arm and eight held-out photos: how far another seed or another split would move these "
        "numbers was not measured. rFID over eight images ranks models only roughly.",
        "- No DINO perceptual term (no weights offline), no GAN (as the paper): PSNR and SSIM are what the loss "
        "optimises; rFID is not.",
        "- Wall times are those of this machine during the run, with whatever else ran on it; the training "
        "stages' own metrics (tokens/s, step_s) are in their runs' metrics JSONL.",
    ]
    out += ["", "## Training loss", ""]
    out += [f"![{arm} loss](results/loss_{arm}.png)" for arm in arms]
    out += ["", "## Reconstructions of the held-out photos (final checkpoints)", ""]
    out += [f"![{g}](results/recon_{g}.png)" for g in info["grids"]]
    out += [
        "",
        "## Outputs of this run",
        "",
        *[f"- train_ae {arm}: `{uri}`" for arm, uri in info["runs"].items()],
        *[f"- evaluate ({name}): `{uri}`" for name, uri in info["evaluations"].items()],
        "",
    ]
    return "\n".join(out)
