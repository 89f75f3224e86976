"""Stage evaluate: PSNR, SSIM, rFID and rFDD at several resolutions, gFID / gFDD, plots and a report.

    python -m jobs.evaluate --config tiny [evaluate.data=INGEST_OR_FOLDER] [evaluate.autoencoder=EXPORT_DIR] \\
        [evaluate.samples=SAMPLES_DIR] [key=value ...]
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.evaluate --config 5b \\
        evaluate.data=s3://bucket/runs/ingest/KEY evaluate.autoencoder=s3://bucket/runs/train_ae/KEY/export \\
        evaluate.root=s3://bucket/runs evaluate.use_gpu=true evaluate.actors=8

Output under {evaluate.root}/evaluate/{key}/ (key = the evaluate settings + the SHA-256 of every evaluated
autoencoder's weights + the eval set's identity + the samples' hash + code version):
    metrics.json          every number with its definition, image count, resolution, extractor and weights hash
    report.md             tables per setting, generation metrics, figures, definitions, warnings
    figures/*.png         metric vs resolution, reconstruction-generation Pareto, train loss curves,
                          side-by-side reconstructions with error maps per setting
    per_image.parquet     setting, model, id, height, width, psnr, ssim of every scored image
    reference_stats/*.npz mean and covariance of the reference features per setting and extractor (float64),
                          reusable as FID statistics of this set
    manifest.json, _SUCCESS   written last

How it runs: the eval set (an ingest output, or a folder / s3:// prefix of images; corrupt files are
counted as rejected, with the reason) and the generated samples are cut into tasks of a few images. A pool
of actors (Ray Data map_batches with an ActorPoolStrategy; one GPU each with evaluate.use_gpu) holds the
autoencoders and feature extractors; per task and setting it makes the reference images, reconstructs
them with every autoencoder and the bicubic baseline, scores each image and extracts features, and writes
one staging file. The driver merges the staging files in task order (so the numbers do not depend on
which actor finished first) into float64 streaming statistics. A rerun skips tasks already staged.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import time
import uuid
from collections import defaultdict
from datetime import datetime, timezone
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from jobs.common import fail_once, init_ray, map_with_actors, parse_config, retry_transient_tasks, setup_logging
from vitok_core import __version__, io_retry, report
from vitok_core.artifacts import absolute, is_complete, join, mark_success, read_json, remove, stage_key, write_json
from vitok_core.checkpoint import file_sha256, load_published, published_sha256, read_export_info
from vitok_core.config import ConfigError, VitokConfig, config_from_dict, to_dict
from vitok_core.evaluation import (
    Accumulator,
    bicubic_down_up,
    compression_ratio,
    describe_setting,
    reconstruct,
    reference_image,
    scores,
    setting_budget,
)
from vitok_core.features import build_extractor
from vitok_core.fingerprint import manifest_fields
from vitok_core.images import decode_image, to_tensor, to_uint8
from vitok_core.ingest_output import IngestOutput
from vitok_core.model import build_autoencoder, parse_variant
from vitok_core.row_index import row_groups

log = logging.getLogger("vitok.evaluate")

# 2: SSIM rewrite, RoPE in fp32 under bf16 autocast; 3: native-mode reference images (the AE's input) are no
# longer clamped to [-1, 1] after the bicubic resize (naflex.resize_to_budget), so their scores change slightly
CODE_VERSION = "evaluate-3"
REFERENCE = "reference"
SAMPLES = "samples"
# Settings that change how the job runs, not its numbers: not part of the key. `keep` (how many images per
# setting go into the reconstruction grids) changes the figures, never a metric: a changed keep on a done
# evaluation is skipped with the old grids (--force evaluate redraws them).
_NOT_IN_KEY = ("root", "data", "autoencoder", "baselines", "samples", "actors", "cpus_per_actor", "batch_size")
_NOT_IN_KEY += ("images_per_task", "fail_at_task", "keep")

DEFINITIONS = {
    "psnr": "PSNR in dB per image at the setting's (unpadded) size, data range [-1, 1] (prediction clipped), "
    "averaged over images",
    "ssim": "SSIM per image (Gaussian window 11, sigma 1.5, k1 0.01, k2 0.03, data range 2), averaged over images",
    "rfid": "Frechet distance between Inception features of the reference images and of the reconstructions "
    "(float64 streaming mean/covariance; sqrtm, or the exact low-rank form when a set is smaller than the "
    "feature dimension)",
    "rfdd": "Frechet distance in DINO feature space (rfdd_dinov2: dgm-eval's ViT-L/14 at 224; rfdd_dinov3: the "
    "reference code's ViT-B/16 at 512)",
    "gfid": "Frechet distance between Inception features of generated samples and of the reference images of "
    "evaluate.generation_setting",
    "gfdd": "as gfid in DINO feature space",
    "bicubic": "baseline: bicubic (antialiased) down by sqrt(compression) per side and back up, unquantised, at "
    "the autoencoder's compression 3 p^2 / c",
}


# ------------------------------------------------------------------------------------------------
# Inputs: the autoencoders, the eval set, the samples
# ------------------------------------------------------------------------------------------------
def autoencoder_uri(cfg: VitokConfig) -> str:
    if cfg.evaluate.autoencoder:
        return cfg.evaluate.autoencoder
    from jobs.ingest import output_uri as ingest_output_uri
    from jobs.train_ae import output_uri as train_output_uri

    return join(train_output_uri(cfg, IngestOutput(ingest_output_uri(cfg))), "export")


_NAMED = re.compile(r"^([A-Za-z0-9_.@+-]+)=(.+)$")


def models_of(cfg: VitokConfig) -> dict[str, str]:
    """Model name -> published directory: "ae" first, then "baseline:<name>" per configured baseline. A
    baseline is `DIR` (named after DIR, or its parent when DIR ends in export/) or `NAME=DIR`."""
    models = {"ae": autoencoder_uri(cfg)}
    for item in cfg.evaluate.baselines:
        named = _NAMED.match(item)
        if named:
            name, uri = named.groups()
        else:
            uri, parts = item, item.rstrip("/").split("/")
            name = parts[-2] if parts[-1] == "export" and len(parts) > 1 else parts[-1]
        if f"baseline:{name}" in models:
            raise ConfigError(f"evaluate.baselines: two baselines are named {name!r}; name them: NAME=DIR")
        models[f"baseline:{name}"] = uri
    return models


def _with_protocol(uri: str, path: str) -> str:
    return f"{uri.split('://', 1)[0]}://{path}" if "://" in uri else path


def list_images(cfg: VitokConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(eval set description with its identity, image tasks), in a fixed order."""
    e = cfg.evaluate
    data = e.data
    if not data:
        from jobs.ingest import output_uri as ingest_output_uri

        data = ingest_output_uri(cfg)
    per, limit = e.images_per_task, e.max_images or None
    fs, root = fsspec.core.url_to_fs(data)
    if not fs.exists(root):
        raise FileNotFoundError(f"evaluate.data={data!r} does not exist")
    tasks: list[dict[str, Any]] = []
    if fs.exists(join(root, "manifest.json")):
        ingest = IngestOutput(data)
        seen = 0
        # The row groups in file order from the ingest output's index (no data file opened), only as far
        # as evaluate.max_images reaches.
        for file, group, rows in row_groups(ingest.iter_index(["file", "row_group", "rows"])):
            if limit and seen >= limit:
                break
            for start in range(0, rows, per):
                count = min(per, rows - start, (limit - seen) if limit else per)
                if count <= 0:
                    break
                tasks.append({"kind": "ingest", "uri": join(absolute(data), file), "group": group, "start": start})
                tasks[-1].update(count=count, first=seen)
                seen += count
        described = {"uri": data, "kind": "ingest", "identity": ingest.manifest["key"]}
    else:
        wanted = {f".{x.lower().lstrip('.')}" for x in cfg.ingest.extensions}
        found = fs.find(root, detail=True)
        paths = sorted(p for p in found if os.path.splitext(p)[1].lower() in wanted)[:limit]
        listing = json.dumps([[p[len(root) :], found[p].get("size")] for p in paths])
        for start in range(0, len(paths), per):
            uris = [_with_protocol(data, p) for p in paths[start : start + per]]
            tasks.append({"kind": "files", "uris": uris, "count": len(uris), "first": start})
        described = {"uri": data, "kind": "folder", "identity": hashlib.sha256(listing.encode()).hexdigest()[:16]}
    if not tasks:
        raise FileNotFoundError(f"evaluate.data={data!r} holds no images")
    described["images"] = sum(t["count"] for t in tasks)
    return described, tasks


def samples_uri(cfg: VitokConfig) -> str:
    uri = cfg.evaluate.samples
    return uri if not uri or uri.endswith(".npz") else join(uri, "samples.npz")


def list_samples(uri: str, per: int) -> list[dict[str, Any]]:
    with fsspec.open(uri, "rb") as f:
        count = len(np.load(io.BytesIO(f.read()), allow_pickle=False)["images"])
    return [{"kind": SAMPLES, "uri": uri, "start": s, "count": min(per, count - s)} for s in range(0, count, per)]


def evaluate_settings(cfg: VitokConfig) -> dict[str, Any]:
    return {k: v for k, v in to_dict(cfg.evaluate).items() if k not in _NOT_IN_KEY}


def output_uri(cfg: VitokConfig, inputs: list[str]) -> str:
    key = stage_key("evaluate", evaluate_settings(cfg), inputs, CODE_VERSION)
    return join(absolute(cfg.evaluate.root), "evaluate", key)


def task_file(out: str, index: int) -> str:
    return join(out, "_staging", "tasks", f"task-{index:05d}.npz")


# ------------------------------------------------------------------------------------------------
# The evaluation actor
# ------------------------------------------------------------------------------------------------
class EvaluateTasks:
    """Ray Data actor: holds the autoencoders and feature extractors, turns one task into one staging file."""

    def __init__(self, config: dict[str, Any], models: dict[str, str], out: str) -> None:
        cfg = config_from_dict(config)
        self.e, self.out = cfg.evaluate, out
        self.retry = cfg.io  # reading the eval set: vitok_core/io_retry.py
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.models: dict[str, torch.nn.Module] = {}
        for name, uri in models.items():
            model = build_autoencoder(str(read_export_info(uri)["variant"]))
            load_published(model, uri)
            self.models[name] = model.to(self.device).eval()
        spec = self.models["ae"].spec
        self.patch_size, self.ratio = spec.patch_size, compression_ratio(spec.patch_size, spec.channels)
        self.extractors = {name: build_extractor(name, self.e).to(self.device) for name in self.e.features}
        self.settings = [to_dict(s) for s in self.e.settings]
        described = {name: x.describe() for name, x in self.extractors.items()}
        write_json(join(out, "_staging", "extractors.json"), described)  # the same from every actor

    def _maybe_fail(self, index: int) -> None:
        if index == self.e.fail_at_task:
            fail_once(
                self.out, f"fail_at_task-{index}", f"injected fault on evaluate task {index} (evaluate.fail_at_task)"
            )

    def _load(self, task: dict[str, Any]) -> tuple[list[str], list[torch.Tensor], list[tuple[str, str]]]:
        """(ids, images [3, h, w] in [-1, 1], rejected (id, reason))."""
        ids, images, rejected = [], [], []
        if task["kind"] == "ingest":  # an artifact: any error that remains after the retries fails the task
            what = f"{task['uri']} row group {task['group']}"
            table = io_retry.retry_call(lambda: _read_row_group(task["uri"], task["group"]), self.retry, what)
            rows = table.slice(task["start"], task["count"]).to_pylist()
            items = [(row["id"], lambda row=row: row["bytes"]) for row in rows]
        else:
            items = [(uri, lambda uri=uri: io_retry.read_bytes(uri, self.retry)) for uri in task["uris"]]
        for ident, read in items:
            try:
                data = read()
            except Exception as err:
                if io_retry.classify(err) != io_retry.PERMANENT:
                    raise  # transient past its retries (or a bug): the task fails (Ray Data retries it), never a reject
                rejected.append((ident, io_retry.describe(err)))  # not found, access denied: counted, not fatal
                continue
            try:
                images.append(to_tensor(decode_image(data)))
                ids.append(ident)
            except Exception as err:  # undecodable: counted, not fatal
                rejected.append((ident, f"{type(err).__name__}: {err}"[:300]))
        return ids, images, rejected

    def _features(self, arrays: dict[str, np.ndarray], prefix: str, images: list[np.ndarray]) -> None:
        for name, extractor in self.extractors.items():
            feats = [extractor(images[i : i + self.e.batch_size]) for i in range(0, len(images), self.e.batch_size)]
            arrays[f"features/{prefix}/{name}"] = torch.cat(feats).numpy().astype(np.float32)

    @torch.no_grad()
    def run_task(self, task: dict[str, Any]) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        if task["kind"] == SAMPLES:
            data = io_retry.read_bytes(task["uri"], self.retry)
            images = np.load(io.BytesIO(data), allow_pickle=False)["images"]
            chunk = list(images[task["start"] : task["start"] + task["count"]])
            self._features(arrays, f"{SAMPLES}/{SAMPLES}", chunk)
            return arrays
        ids, images, rejected = self._load(task)
        arrays["ids"] = np.array(ids, dtype=str)
        arrays["rejected_ids"] = np.array([r[0] for r in rejected], dtype=str)
        arrays["rejected_reasons"] = np.array([r[1] for r in rejected], dtype=str)
        keep = [i for i in range(len(ids)) if task["first"] + i < self.e.keep]
        for setting in self.settings:
            name = setting["name"]
            refs = [reference_image(image, setting, self.patch_size) for image in images]
            arrays[f"sizes/{name}"] = np.array([r.shape[-2:] for r in refs], dtype=np.int32).reshape(-1, 2)
            outputs = {REFERENCE: refs}
            for model_name, model in self.models.items():
                outputs[model_name] = reconstruct(model, refs, self.e.batch_size, self.device)
            if self.e.bicubic_baseline:
                outputs["bicubic"] = [bicubic_down_up(r, self.ratio) for r in refs]
            for model_name, recons in outputs.items():
                as_uint8 = [to_uint8(r) for r in recons]
                self._features(arrays, f"{name}/{model_name}", as_uint8)
                if model_name != REFERENCE:
                    for metric, values in scores(recons, refs).items():
                        arrays[f"scores/{name}/{model_name}/{metric}"] = np.array(values, dtype=np.float64)
                for i in keep:
                    arrays[f"keep/{name}/{model_name}/{task['first'] + i}"] = as_uint8[i]
        return arrays

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        task = json.loads(str(batch["task"][0]))
        self._maybe_fail(task["index"])
        arrays = self.run_task(task)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        fs, path = fsspec.core.url_to_fs(task_file(self.out, task["index"]))
        fs.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with fs.open(tmp, "wb") as f:
            f.write(buffer.getvalue())
        fs.mv(tmp, path)  # the staging file is the task's completion marker
        return {"index": [task["index"]]}


def _read_row_group(uri: str, group: int) -> pa.Table:
    fs, path = io_retry.url_to_fs(uri)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).read_row_group(group, columns=["id", "bytes"])


# ------------------------------------------------------------------------------------------------
# The driver: merge, score, write
# ------------------------------------------------------------------------------------------------
def _staged(out: str) -> set[int]:
    fs, path = fsspec.core.url_to_fs(join(out, "_staging", "tasks"))
    if not fs.exists(path):
        return set()
    return {int(os.path.basename(p)[5:10]) for p in fs.ls(path, detail=False) if p.endswith(".npz")}


def merge(out: str, tasks: list[dict[str, Any]]) -> tuple[Accumulator, list[dict], dict[str, dict], list]:
    """(feature statistics and scores, per-image rows, kept images {setting: {model: {index: array}}},
    rejected (id, reason)) from the staging files, in task order."""
    acc, per_image, rejected = Accumulator(), [], []
    kept: dict[str, dict[str, dict[int, np.ndarray]]] = defaultdict(lambda: defaultdict(dict))
    for task in tasks:
        with fsspec.open(task_file(out, task["index"]), "rb") as f:
            arrays = dict(np.load(io.BytesIO(f.read()), allow_pickle=False))
        for key, value in arrays.items():
            parts = key.split("/")
            if parts[0] == "features":
                acc.add_features(parts[1], parts[2], parts[3], value)
            elif parts[0] == "keep":
                kept[parts[1]][parts[2]][int(parts[3])] = value
        rejected += list(zip(arrays.get("rejected_ids", []), arrays.get("rejected_reasons", []), strict=True))
        for key in sorted(k for k in arrays if k.startswith("scores/") and k.endswith("/psnr")):
            _, setting, model, _ = key.split("/")
            values = {m: arrays[f"scores/{setting}/{model}/{m}"] for m in ("psnr", "ssim")}
            acc.add_scores(setting, model, values)
            for i, ident in enumerate(arrays["ids"]):
                h, w = arrays[f"sizes/{setting}"][i]
                row = {"setting": setting, "model": model, "id": str(ident), "height": int(h), "width": int(w)}
                per_image.append({**row, "psnr": float(values["psnr"][i]), "ssim": float(values["ssim"][i])})
    return acc, per_image, kept, rejected


def _metric_key(extractor: str, generation: bool = False) -> str:
    if extractor == "inception":
        return "gfid" if generation else "rfid"
    return f"{'gfdd' if generation else 'rfdd'}_{extractor}"


def build_metrics(
    cfg: VitokConfig,
    acc: Accumulator,
    models: dict[str, str],
    ratios: dict[str, float],
    extractors: dict[str, dict],
    samples: str,
) -> tuple[list[dict], list[dict]]:
    """(reconstruction rows, generation rows) of metrics.json."""
    e = cfg.evaluate
    names = [*models, *(["bicubic"] if e.bicubic_baseline else [])]
    results = []
    for setting in e.settings:
        for model in names:
            series = acc.scores.get((setting.name, model), {}).get("psnr", [])
            row = {
                "setting": setting.name,
                "size": setting.size,
                "mode": setting.mode,
                "model": model,
                "kind": "bicubic" if model == "bicubic" else "autoencoder",
                "compression": ratios["ae" if model == "bicubic" else model],
                "images": len(series),
                "psnr": acc.mean_score(setting.name, model, "psnr"),
                "ssim": acc.mean_score(setting.name, model, "ssim"),
            }
            for extractor in extractors:
                row[_metric_key(extractor)] = acc.distance((setting.name, REFERENCE), (setting.name, model), extractor)
            results.append(row)
    generation = []
    if samples:
        row: dict[str, Any] = {"samples": samples, "reference_setting": e.generation_setting}
        first = next(iter(extractors), None)
        row["images"] = acc.stats[(SAMPLES, SAMPLES, first)].count if first else 0
        for extractor in extractors:
            reference = (e.generation_setting, REFERENCE)
            row[_metric_key(extractor, True)] = acc.distance(reference, (SAMPLES, SAMPLES), extractor)
        generation.append(row)
    return results, generation


def _png(out: str, name: str, data: bytes) -> str:
    with fsspec.open(join(out, "figures", name), "wb") as f:
        f.write(data)
    return f"figures/{name}"


def write_figures(
    out: str, metrics: dict[str, Any], kept: dict, train_lines: list[dict], compare: list[dict]
) -> dict[str, str]:
    e_settings = [s["name"] for s in metrics["settings"]]
    figures = {"metric_vs_resolution": _png(out, "metric_vs_resolution.png", report.metric_vs_resolution_png(
        metrics["results"], [m for m in ("psnr", "ssim", "rfid", "rfdd_dinov2", "rfdd_dinov3")
                             if any(r.get(m) is not None for r in metrics["results"])]))}  # fmt: skip
    points = pareto_points(metrics) + [p for other in compare for p in pareto_points(other)]
    figures["pareto"] = _png(out, "pareto.png", report.pareto_png(points))
    if train_lines:
        figures["loss_curves"] = _png(out, "loss_curves.png", report.loss_curves_png(train_lines))
    for setting in e_settings:
        by_model = kept.get(setting, {})
        if REFERENCE not in by_model:
            continue
        order = sorted(by_model[REFERENCE])
        recons = {m: [by_model[m][i] for i in order] for m in by_model if m != REFERENCE}
        grid = report.recon_grid_png([by_model[REFERENCE][i] for i in order], recons)
        figures[f"recon_{setting}"] = _png(out, f"recon_{setting}.png", grid)
    return figures


def pareto_points(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per autoencoder of a run at its generation setting (rFID vs gFID, or vs PSNR)."""
    setting = next((g["reference_setting"] for g in metrics.get("generation") or []), metrics["settings"][0]["name"])
    gfid = next((g.get("gfid") for g in metrics.get("generation") or []), None)
    variant = metrics["autoencoder"]["variant"]
    points = []
    for row in metrics["results"]:
        if row["setting"] != setting or row["kind"] != "autoencoder":
            continue
        label = variant if row["model"] == "ae" else row["model"]
        points.append(
            {
                "label": label,
                "rfid": row.get("rfid"),
                "gfid": gfid if row["model"] == "ae" else None,
                "psnr": row.get("psnr"),
                "compression": row["compression"],
            }
        )
    return points


def train_metrics(autoencoder: str) -> list[dict]:
    """The train_ae metric lines of the run that exported `autoencoder` ({run}/export), if it has them."""
    from jobs.train_common import read_metrics

    parts = autoencoder.rstrip("/").rsplit("/", 1)
    return read_metrics(parts[0]) if len(parts) == 2 and parts[1] == "export" else []


def plan(cfg: VitokConfig) -> dict[str, Any]:
    """Everything run() needs before cluster work: models, their export info, the eval set and its tasks,
    the samples, the compared runs, the key's inputs and the output URI. Checks every input exists."""
    e = cfg.evaluate
    models = models_of(cfg)
    infos = {name: read_export_info(uri) for name, uri in models.items()}
    specs = {name: parse_variant(str(info["variant"])) for name, info in infos.items()}
    eval_set, image_tasks = list_images(cfg)
    samples = samples_uri(cfg)
    inputs = [f"{name}:{published_sha256(uri)}" for name, uri in models.items()]
    inputs += [f"data:{eval_set['identity']}", f"samples:{file_sha256(samples) if samples else ''}"]
    return {
        "models": models,
        "infos": infos,
        "ratios": {name: compression_ratio(spec.patch_size, spec.channels) for name, spec in specs.items()},
        "patch": specs["ae"].patch_size,
        "eval_set": eval_set,
        "image_tasks": image_tasks,
        "samples": samples,
        "sample_tasks": list_samples(samples, e.images_per_task) if samples else [],
        "compare": [read_json(join(uri, "metrics.json")) for uri in e.compare],
        "inputs": inputs,
        "out": output_uri(cfg, inputs),
    }


def planned_output(cfg: VitokConfig) -> str:
    return plan(cfg)["out"]


def run(cfg: VitokConfig) -> dict[str, Any]:
    """Evaluate (or skip when complete); returns the manifest."""
    e = cfg.evaluate
    p = plan(cfg)  # every input is checked before any cluster work
    models, infos, ratios, eval_set, samples = p["models"], p["infos"], p["ratios"], p["eval_set"], p["samples"]
    sample_tasks, inputs, out = p["sample_tasks"], p["inputs"], p["out"]
    if is_complete(out):
        log.info("evaluate %s is complete; skipped", out)
        return read_json(join(out, "manifest.json"))
    start = time.time()
    tasks = [{**t, "index": i} for i, t in enumerate(p["image_tasks"] + sample_tasks)]
    done = _staged(out)
    todo = [{"task": json.dumps(t)} for t in tasks if t["index"] not in done]
    log.info("evaluate %s: %d images, %d samples tasks, %d of %d tasks staged", out, eval_set["images"],
             len(sample_tasks), len(done), len(tasks))  # fmt: skip

    init_ray()
    retry_transient_tasks(cfg.io)
    map_with_actors(
        todo,
        EvaluateTasks,
        {"config": to_dict(cfg), "models": models, "out": out},
        actors=e.actors,
        cpus_per_actor=e.cpus_per_actor,
        use_gpu=e.use_gpu,
        desc="evaluate",
        total=len(tasks),
        done=len(done),
    )
    acc, per_image, kept, rejected = merge(out, tasks)
    extractors = read_json(join(out, "_staging", "extractors.json")) if tasks else {}
    results, generation = build_metrics(cfg, acc, models, ratios, extractors, samples)
    for setting in e.settings:  # reusable FID statistics of this set
        buffer = io.BytesIO()
        stats = {n: acc.stats[(setting.name, REFERENCE, n)] for n in e.features}
        np.savez(buffer, **{f"{n}_mu": s.mean for n, s in stats.items()}, **{f"{n}_sigma": s.cov for n, s in
                 stats.items() if s.count > 1})  # fmt: skip
        with fsspec.open(join(out, "reference_stats", f"{setting.name}.npz"), "wb") as f:
            f.write(buffer.getvalue())
    import ray

    metrics = {
        "stage": "evaluate",
        "key": out.rstrip("/").rsplit("/", 1)[-1],
        "output": out,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "autoencoder": {"uri": models["ae"], "variant": infos["ae"]["variant"], "compression": ratios["ae"]},
        "baselines": {n: {"uri": u, "variant": infos[n]["variant"]} for n, u in models.items() if n != "ae"},
        "eval_set": {**eval_set, "rejected": len(rejected), "scored": len({r["id"] for r in per_image})},
        "settings": [settings_entry(to_dict(s), p["patch"]) for s in e.settings],
        "extractors": extractors,
        "results": results,
        "generation": generation,
        "definitions": DEFINITIONS,
        "versions": {"vitok": __version__, "ray": ray.__version__, "torch": torch.__version__},
    }
    figures = write_figures(out, metrics, kept, train_metrics(models["ae"]), p["compare"])
    metrics["figures"] = figures
    write_json(join(out, "metrics.json"), metrics)
    with fsspec.open(join(out, "report.md"), "w") as f:
        f.write(report.render_markdown(metrics, figures))
    table = pa.Table.from_pylist(per_image) if per_image else pa.table({"setting": pa.array([], pa.string())})
    with fsspec.open(join(out, "per_image.parquet"), "wb") as f:
        pq.write_table(table, f)
    if rejected:
        write_json(join(out, "rejected.json"), {"rejected": [{"id": i, "reason": r} for i, r in rejected]})
    manifest = {
        "stage": "evaluate",
        "key": metrics["key"],
        "output": out,
        "report": join(out, "report.md"),
        "inputs": inputs,
        "images": eval_set["images"],
        "rejected": len(rejected),
        "headline": headline(metrics),
        "wall_s": time.time() - start,
        "code_version": CODE_VERSION,
        **manifest_fields("evaluate"),
    }
    write_json(join(out, "manifest.json"), manifest)
    remove(join(out, "_staging"))
    mark_success(out)
    log.info("evaluate done: %s", manifest["report"])
    return manifest


def settings_entry(setting: dict[str, Any], patch: int) -> dict[str, Any]:
    """A setting as metrics.json records it: its config (mode included), resolved budget and a description of
    how its reference images are made, so that a number says which protocol it came from."""
    return {**setting, "budget": setting_budget(setting, patch), "description": describe_setting(setting, patch)}


def headline(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The autoencoder's numbers per setting (what the CLI prints)."""
    keys = ("setting", "mode", "images", "psnr", "ssim", "rfid")
    return [{k: row.get(k) for k in keys} for row in metrics["results"] if row["model"] == "ae"]


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = parse_config(__doc__.splitlines()[0], argv)
    manifest = run(cfg)
    print(f"evaluate report: {manifest['report']}")
    for row in manifest["headline"]:
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
        print(f"  {shown}")


if __name__ == "__main__":
    main()
