"""`vitok study`: the CPU training study (configs/cpu_study.yaml) end to end through the pipeline, and its
report (docs/results.md). Not part of CI: it trains for about an hour.

    vitok study [--preset cpu_study | --config F] [--out docs] [--data .data/study] [key=value ...]

1. Photos (vitok_core/study.py): scikit-image's from the installed wheel; scikit-learn's two and the Debian
   packages mate-backgrounds and tuxpaint-data downloaded once into --data (`pip download`, `apt-get
   download` + `dpkg -x`; never installed).
2. Data: the 29 training photos cut into multi-scale crops (--data/train), the 8 held-out photos copied
   as they are (--data/heldout).
3. Training: per arm (ARMS), the vitok-pipeline flow with stages ingest and train_ae: the arms share one
   ingest output (same key); train.export_every leaves the intermediate exports the curves are made of.
4. Evaluation: the vitok-stage flow of evaluate on the held-out photos twice: every export of both arms and
   the bicubic baseline (the learning curves), then the two final models alone (reconstruction grids).
5. Report: {out}/results.md and {out}/results/*.png (figures from vitok_core.report).

Every stage skips when its output is complete, so a study that stopped is rerun with the same command.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from prefect import flow

from pipelines.flows import _value, full_pipeline, run_stage
from pipelines.form import Overrides, Preset
from vitok_core import report, study
from vitok_core.artifacts import join, read_json
from vitok_core.config import apply_overrides, config_hash, load_config
from vitok_core.model import build_autoencoder, count_parameters

# The ablation (issue 17): the same steps on square crops at one grid. rrc_ratio [1, 1] keeps crops square
# without squashing; rrc_scale [0.5, 1] lets them move over the image (80-100% of a square crop of a 3:2
# image would always be near its centre).
ARMS: dict[str, list[str]] = {
    "naflex": [],
    "square": ["data.augment.rrc_prob=1.0", "data.augment.rrc_scale=[0.5,1.0]", "data.augment.rrc_ratio=[1.0,1.0]"],
}
DEBIAN_PACKAGES = ("mate-backgrounds", "tuxpaint-data")
SKLEARN_WHEEL = "scikit-learn==1.9.1"  # any release ships the same two photos
GRID_BYTES = 1_000_000  # each reconstruction grid copied into the report (the evaluate output keeps full size)


def _download_debian(root: Path, say: Callable[[str], None]) -> None:
    if all((root / d).is_dir() for d in (study.MATE_DIR, study.TUXPAINT_DIR)):
        return
    say(f"study: downloading {', '.join(DEBIAN_PACKAGES)} (apt-get download, ~55 MB) into {root}")
    root.mkdir(parents=True, exist_ok=True)  # dpkg -x does not create it
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(["apt-get", "download", *DEBIAN_PACKAGES], cwd=tmp, check=True, capture_output=True)
            for deb in sorted(Path(tmp).glob("*.deb")):
                subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as err:
            detail = getattr(err, "stderr", b"") or b""
            raise FileNotFoundError(
                f"study photos: could not download and unpack {' '.join(DEBIAN_PACKAGES)} ({err}; "
                f"{detail.decode(errors='replace').strip()[-300:]}). On a machine without apt, unpack the two "
                f".deb files from a Debian mirror into {root} (their usr/share/... folders)"
            ) from err


def _download_sklearn_photos(folder: Path, say: Callable[[str], None]) -> None:
    if all((folder / n).is_file() for n in study.SKLEARN_PHOTOS):
        return
    say(f"study: taking scikit-learn's photos out of its wheel ({SKLEARN_WHEEL}) into {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", tmp]
        subprocess.run([*pip, SKLEARN_WHEEL], check=True)
        [wheel] = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as z:
            for name in study.SKLEARN_PHOTOS:
                (folder / name).write_bytes(z.read(f"sklearn/datasets/images/{name}"))


def prepare_data(data: Path, crops_per_photo: int, say: Callable[[str], None] = print) -> dict[str, Any]:
    """The study's two folders under `data` (downloads the photos it lacks): training crops, held-out photos."""
    _download_debian(data / "debian", say)
    _download_sklearn_photos(data / "sklearn", say)
    train, held_out = study.split(study.find_photos(data / "debian", data / "sklearn"))
    crops = study.write_training_crops(train, data / "train", crops_per_photo)
    study.write_heldout(held_out, data / "heldout")
    return {
        "train_dir": str((data / "train").resolve()),
        "heldout_dir": str((data / "heldout").resolve()),
        "train_photos": [(p.source, p.name) for p in train],
        "heldout_photos": [(p.source, p.name) for p in held_out],
        "crops": len(crops),
    }


def _machine() -> str:
    model = ""
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPUs ({model or platform.machine()}), {memory:.0f} GiB RAM, no GPU"


def _commit() -> str:
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=True)
        return done.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@flow(name="vitok-study", log_prints=True)
def study_flow(
    preset: Preset = "cpu_study", overrides: Overrides = (), out: str = "docs", data: str = ".data/study"
) -> dict[str, Any]:
    """The CPU training study (about 90 minutes on 2 cores): data, both arms' ingest + train_ae, evaluate
    twice, the report.

    Args:
        out: Where results.md and results/*.png are written.
        data: Where the photos, the training crops and the held-out set go (downloaded once).
    """
    overrides = list(overrides or [])
    base = load_config(preset, overrides)
    # A rerun skips what is done and re-renders the report: timings, date and commit of the phases it skips
    # come from the run that did them (the record), not from the skip.
    record_path = Path(data) / "study-record.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if record.get("key") != config_hash(base):
        record = {"key": config_hash(base), "timings": {}}
    timings: dict[str, float] = record["timings"]
    started, commit = time.time(), _commit()  # the code that trains, not the code at the end
    prepared = prepare_data(Path(data), crops_per_photo=48)
    timings.setdefault("data", time.time() - started)

    def timed(phase: str, began: float, skipped: bool) -> None:
        if not skipped or phase not in timings:
            timings[phase] = time.time() - began
        if not skipped and phase.startswith("ingest+train_ae"):
            record.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(began)), commit=commit)
        record_path.write_text(json.dumps(record, indent=1))

    common = [*overrides, f"ingest.source={prepared['train_dir']}"]

    runs: dict[str, dict[str, Any]] = {}
    for arm, arm_overrides in ARMS.items():
        began = time.time()
        results = _value(full_pipeline(preset, [*common, *arm_overrides], ["ingest", "train_ae"]))
        runs[arm] = results["train_ae"]
        timed(f"ingest+train_ae {arm}", began, runs[arm]["skipped"])
        print(f"study: {arm} trained at {runs[arm]['output']}")

    # Learning curves: every export of both arms in one evaluate run (the same images and bicubic baseline).
    models: dict[str, tuple[str, int]] = {"ae": ("naflex", base.train.steps)}
    baselines = []
    for arm, run in runs.items():
        for uri in run.get("exports") or []:
            step = int(uri.rstrip("/").rsplit("-", 1)[-1])
            models[f"baseline:{arm}@{step}"] = (arm, step)
            baselines.append(f"{arm}@{step}={uri}")
        if arm != "naflex":
            models[f"baseline:{arm}@{base.train.steps}"] = (arm, base.train.steps)
            baselines.append(f"{arm}@{base.train.steps}={join(run['output'], 'export')}")
    evaluate_common = [*common, f"evaluate.data={prepared['heldout_dir']}"]
    began = time.time()
    curves = _value(
        run_stage(
            "evaluate",
            preset,
            [
                *evaluate_common,
                f"evaluate.autoencoder={join(runs['naflex']['output'], 'export')}",
                f"evaluate.baselines=[{','.join(baselines)}]",
                "evaluate.keep=0",
            ],
        )
    )
    timed("evaluate (curves)", began, curves["skipped"])
    # The final models side by side: the first arm is the autoencoder, the others baselines named after their arm.
    first, *others = runs
    final_models = {"ae": first, **{f"baseline:{arm}": arm for arm in others}}
    final_baselines = [f"{arm}={join(runs[arm]['output'], 'export')}" for arm in others]
    began = time.time()
    final = _value(
        run_stage(
            "evaluate",
            preset,
            [
                *evaluate_common,
                f"evaluate.autoencoder={join(runs[first]['output'], 'export')}",
                f"evaluate.baselines=[{','.join(final_baselines)}]",
            ],
        )
    )
    timed("evaluate (final, grids)", began, final["skipped"])

    curve_metrics = read_json(join(curves["output"], "metrics.json"))
    rows = study.curve_rows(curve_metrics, models)
    figures = Path(out) / "results"
    figures.mkdir(parents=True, exist_ok=True)
    (figures / "learning_curves.png").write_bytes(report.learning_curves_png(rows))
    for arm, run in runs.items():
        from jobs.train_common import read_metrics

        (figures / f"loss_{arm}.png").write_bytes(report.loss_curves_png(read_metrics(run["output"])))
    grids = []
    for setting in base.evaluate.settings:
        source = join(final["output"], "figures", f"recon_{setting.name}.png")
        if os.path.isfile(source):  # downscaled for the docs: the full-size grid stays in the evaluate output
            grid = report.shrink_png(Path(source).read_bytes(), GRID_BYTES)
            (figures / f"recon_{setting.name}.png").write_bytes(grid)
            grids.append(setting.name)
    cfg = apply_overrides(base, [f"ingest.source={prepared['train_dir']}"])
    info = {
        "date": record.get("date", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))),
        "commit": record.get("commit", commit),
        "machine": _machine(),
        "command": " ".join(["vitok", "study", *sys.argv[2:]]) if sys.argv[1:2] == ["study"] else "vitok study",
        "timings": timings,
        "wall_s": sum(timings.values()),
        "parameters": count_parameters(build_autoencoder(cfg.model.variant)),
        "runs": {arm: run["output"] for arm, run in runs.items()},
        "arms": ARMS,
        "evaluations": {"curves": curves["output"], "final": final["output"]},
        "grids": grids,
        **prepared,
    }
    scores = pq.read_table(join(final["output"], "per_image.parquet"), columns=["setting", "model", "id", "psnr"])
    per_image = [{**r, "arm": final_models[r["model"]]} for r in scores.to_pylist() if r["model"] in final_models]
    text = study.render_results(cfg, info, rows, curve_metrics, per_image)
    (Path(out) / "results.md").write_text(text)
    print(f"study: report at {Path(out) / 'results.md'}")
    return {"report": str(Path(out) / "results.md"), "rows": rows, "info": info}
