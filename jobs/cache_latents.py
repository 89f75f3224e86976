"""Stage cache_latents: encode an ingest output once with a trained encoder, with Ray Data batch inference.

    python -m jobs.cache_latents --config tiny ingest.source=DIR [cache.encoder=EXPORT_DIR] [key=value ...]
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.cache_latents --config 5b \\
        cache.ingest=s3://bucket/runs/ingest/KEY cache.encoder=s3://bucket/runs/train_ae/KEY/export \\
        cache.root=s3://bucket/runs cache.use_gpu=true cache.actors=8

Output under {cache.root}/cache_latents/{key}/ (key = cache settings + the encoder's variant and weights
hash + the ingest key + code version):
    data/part-NNNNN.parquet   one row per image (and per flipped copy): id, source, label, flip, bucket
                              ("RxC" token grid), rows, cols, channels, dtype, latent (raw [rows*cols,
                              channels] bf16/fp16 bytes in raster order); file N encodes ingest file N
    stats.json                per-channel mean / std over every cached token (exact, float64), the
                              sorted class labels, counts
    index.parquet             the row-group index (vitok_core/row_index.py, column `bucket`): train_flow's
                              loader plans from it without opening a data file
    manifest.json, _SUCCESS   written last

How it runs: the ingest's data files are the tasks. A pool of encoder actors (Ray Data map_batches with
an ActorPoolStrategy; one GPU per actor when cache.use_gpu) takes one file at a time: it decodes the
images, resizes them deterministically to the budget (no augmentation), encodes them in batches of one
grid, and writes its output file whole (temporary name, then rename) plus a small stats file; the stats
file marks the task done. A rerun skips done files, so a killed run loses only the files in flight and
never writes a row twice. The driver merges the per-file (count, mean, M2) with Chan's formula.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import defaultdict
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from jobs.common import fail_once, init_ray, map_with_actors, parse_config, retry_transient_tasks, setup_logging
from vitok_core import __version__, io_retry
from vitok_core.artifacts import absolute, is_complete, join, mark_success, read_json, stage_key, write_json
from vitok_core.checkpoint import load_part_model, published_sha256, read_export_info
from vitok_core.config import VitokConfig, to_dict
from vitok_core.fingerprint import manifest_fields
from vitok_core.images import decode_image, to_tensor
from vitok_core.ingest_output import IngestOutput
from vitok_core.latents import ChannelStats, from_bytes, to_bytes
from vitok_core.naflex import collate, preprocess, to_device
from vitok_core.row_index import IndexBuilder, file_runs, group_sizes, resolve, runs_from_footer, write_index

log = logging.getLogger("vitok.cache_latents")

# 2: RoPE in fp32 under bf16 autocast; 3: the NaFlex budget resize no longer clamps to [-1, 1] (as the reference
# preprocessing), which changes the encoder's input, hence the latents, of every resized image
CODE_VERSION = "cache_latents-4"
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("label", pa.string()),
        ("flip", pa.bool_()),
        ("bucket", pa.string()),
        ("rows", pa.int16()),
        ("cols", pa.int16()),
        ("channels", pa.int16()),
        ("dtype", pa.string()),
        ("latent", pa.binary()),
    ]
)
ROWS_PER_GROUP = 1024  # a 256-token f16x64 latent in bf16 is 32 KB: ~32 MB per row group


# ------------------------------------------------------------------------------------------------
# Settings, key and layout
# ------------------------------------------------------------------------------------------------
def encoder_uri(cfg: VitokConfig, ingest: IngestOutput) -> str:
    if cfg.cache.encoder:
        return cfg.cache.encoder
    from jobs.train_ae import output_uri as train_output_uri

    return join(train_output_uri(cfg, ingest), "export")


def cache_settings(cfg: VitokConfig, encoder: str) -> dict[str, Any]:
    keep = ("budget", "flip", "dtype")
    info = read_export_info(encoder)
    settings = {k: v for k, v in to_dict(cfg.cache).items() if k in keep}
    return {**settings, "variant": info["variant"], "encoder_sha256": published_sha256(encoder, ["encoder"])}


def output_uri(cfg: VitokConfig, ingest: IngestOutput, settings: dict[str, Any]) -> str:
    key = stage_key("cache_latents", settings, [ingest.manifest["key"]], CODE_VERSION)
    return join(absolute(cfg.cache.root), "cache_latents", key)


def part_file(out: str, index: int) -> str:
    return join(out, "data", f"part-{index:05d}.parquet")


def stats_file(out: str, index: int) -> str:
    return join(out, "_staging", "stats", f"part-{index:05d}.json")


# ------------------------------------------------------------------------------------------------
# The encoder actor
# ------------------------------------------------------------------------------------------------
class EncodeFiles:
    """Ray Data actor: holds one encoder, turns one ingest file into one latent file per call."""

    def __init__(
        self, encoder: str, settings: dict[str, Any], out: str, batch_size: int, fail_at: int, retry: Any = None
    ) -> None:
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_part_model(encoder, "encoder", settings["variant"], self.device)
        self.spec = self.model.spec
        self.settings, self.out, self.batch_size, self.fail_at = settings, out, batch_size, fail_at
        self.retry = retry  # the io section: reading the ingest files, vitok_core/io_retry.py

    def _maybe_fail(self, index: int) -> None:
        if index == self.fail_at:
            fail_once(self.out, f"fail_at_file-{index}", f"injected fault on ingest file {index} (cache.fail_at_file)")

    @torch.no_grad()
    def encode(self, images: list[torch.Tensor]) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """Images -> ([N, C] latent, (rows, cols) grid) each; images of one grid are encoded together."""
        samples = [preprocess(img, self.spec.patch_size, self.settings["budget"]) for img in images]
        by_grid: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, sample in enumerate(samples):
            by_grid[tuple(sample["grid"].tolist())].append(i)
        out: list[Any] = [None] * len(samples)
        for grid, members in by_grid.items():
            batch = to_device(collate([samples[i] for i in members]), self.device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device == "cuda"):
                z = self.model.encode(batch)["z"]
            for j, i in enumerate(members):
                out[i] = (z[j].float().cpu(), grid)
        return out

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        index, path = int(batch["index"][0]), str(batch["path"][0])
        self._maybe_fail(index)
        # an artifact: an error that remains after the retries fails the task (Ray Data retries a transient one)
        table = io_retry.retry_call(lambda: _read_ingest_file(path), self.retry, path)
        dtype, stats, records = self.settings["dtype"], ChannelStats(self.spec.channels), []
        for start in range(0, table.num_rows, self.batch_size):
            chunk = table.slice(start, self.batch_size).to_pylist()
            images = [to_tensor(decode_image(row["bytes"])) for row in chunk]
            copies = [(row, img, False) for row, img in zip(chunk, images, strict=True)]
            if self.settings["flip"]:
                copies += [(row, img.flip(-1), True) for row, img in zip(chunk, images, strict=True)]
            latents = self.encode([img for _, img, _ in copies])
            for (row, _, flipped), (z, (rows, cols)) in zip(copies, latents, strict=True):
                data = to_bytes(z, dtype)
                stats.update(from_bytes(data, rows * cols, self.spec.channels, dtype).numpy())  # as stored
                records.append(
                    {
                        "id": row["id"],
                        "source": row["source"],
                        "label": row["label"],
                        "flip": flipped,
                        "bucket": f"{rows}x{cols}",
                        "rows": rows,
                        "cols": cols,
                        "channels": self.spec.channels,
                        "dtype": dtype,
                        "latent": data,
                    }
                )
        labels = sorted({r["label"] for r in records})
        _write_atomically(part_file(self.out, index), pa.Table.from_pylist(records, schema=SCHEMA))
        summary = {"index": index, "rows": len(records), "stats": stats.to_json(), "labels": labels}
        sizes = group_sizes(len(records), ROWS_PER_GROUP)
        summary["runs"] = file_runs({"bucket": [r["bucket"] for r in records]}, sizes)  # for index.parquet
        with fsspec.open(stats_file(self.out, index), "w") as f:  # the task's completion marker
            json.dump(summary, f)
        return {"summary": [json.dumps(summary)]}


def _read_ingest_file(uri: str) -> pa.Table:
    fs, path = io_retry.url_to_fs(uri)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=["id", "source", "label", "bytes"])


def _write_atomically(uri: str, table: pa.Table) -> None:
    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f, row_group_size=ROWS_PER_GROUP, compression={"latent": "NONE", "id": "SNAPPY"})
    fs.mv(tmp, path)


def remove_temporary_files(data: str) -> list[str]:
    """Delete what writers that died mid-write left in data/ (an actor on a lost node, a killed run): their
    `.tmp-` files, which a reader of the directory (pyarrow, Ray Data) would take for corrupt Parquet files.
    Called after every task has returned, when no writer of this run is left."""
    fs, path = fsspec.core.url_to_fs(data)
    stale = [p for p in fs.ls(path, detail=False) if ".parquet.tmp-" in os.path.basename(p)] if fs.exists(path) else []
    for p in stale:
        fs.rm(p)
    if stale:
        log.info("removed %d temporary files of interrupted writers from %s", len(stale), data)
    return stale


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------
def done_files(out: str) -> dict[int, dict[str, Any]]:
    fs, path = fsspec.core.url_to_fs(join(out, "_staging", "stats"))
    if not fs.exists(path):
        return {}
    done = {}
    for name in fs.ls(path, detail=False):
        if name.endswith(".json"):
            with fs.open(name, "r") as f:
                summary = json.load(f)
            done[summary["index"]] = summary
    return done


def cache_index(out: str, summaries: dict[int, dict[str, Any]]) -> pa.Table:
    """The cache's row-group index, from the runs each task returned with its summary (a file written by a
    version of this stage that returned none is read from its footer instead)."""
    index = IndexBuilder(["bucket"])
    filesystem, root = resolve(out, None)
    for i in sorted(summaries):
        name = f"data/part-{i:05d}.parquet"
        runs = summaries[i].get("runs") or runs_from_footer(filesystem, f"{root}/{name}", ["bucket"])
        index.add(name, runs)
    return index.table()


def plan(cfg: VitokConfig) -> tuple[IngestOutput, str, dict[str, Any], str]:
    """(ingest output, encoder directory, settings, output URI); reads only the inputs' markers and weights."""
    ingest = IngestOutput(cfg.cache.ingest or _ingest_uri(cfg))
    encoder = encoder_uri(cfg, ingest)
    settings = cache_settings(cfg, encoder)
    return ingest, encoder, settings, output_uri(cfg, ingest, settings)


def planned_output(cfg: VitokConfig) -> str:
    return plan(cfg)[3]


def run(cfg: VitokConfig) -> dict[str, Any]:
    """Cache latents (or skip when complete); returns the manifest."""
    ingest, encoder, settings, out = plan(cfg)  # before any cluster work
    if is_complete(out):
        log.info("cache_latents %s is complete; skipped", out)
        return read_json(join(out, "manifest.json"))
    start = time.time()
    uris = ingest.data_uris()  # from the ingest output's index: no listing, no footers
    done = done_files(out)
    todo = [{"index": i, "path": uri} for i, uri in enumerate(uris) if i not in done]
    log.info("cache_latents %s: %d ingest files (%d already done), encoder %s", out, len(uris), len(done), encoder)

    init_ray()
    retry_transient_tasks(cfg.io)
    rows = map_with_actors(
        todo,
        EncodeFiles,
        {
            "encoder": encoder,
            "settings": settings,
            "out": out,
            "batch_size": cfg.cache.batch_size,
            "fail_at": cfg.cache.fail_at_file,
            "retry": to_dict(cfg.io),
        },
        actors=cfg.cache.actors,
        cpus_per_actor=cfg.cache.cpus_per_actor,
        use_gpu=cfg.cache.use_gpu,
        desc="cache_latents",
        total=len(uris),
        done=len(done),
    )
    summaries = dict(done)
    for row in rows:
        summary = json.loads(row["summary"])
        summaries[summary["index"]] = summary
    remove_temporary_files(join(out, "data"))
    import ray

    stats = ChannelStats(int(next(iter(summaries.values()))["stats"]["channels"]))
    labels: set[str] = set()
    for index in sorted(summaries):
        stats.merge(ChannelStats.from_json(summaries[index]["stats"]))
        labels.update(summaries[index]["labels"])
    rows = sum(s["rows"] for s in summaries.values())
    expected = ingest.counts["accepted"] * (2 if cfg.cache.flip else 1)
    if rows != expected:
        raise RuntimeError(f"cache_latents wrote {rows} rows, expected {expected} from the ingest output")
    stats_json = {
        "mean": stats.mean.tolist(),
        "std": stats.std.tolist(),
        "tokens": stats.count,
        "rows": rows,
        "channels": stats.channels,
        "classes": sorted(labels),
        "definition": "population mean/std per channel over every stored (rounded) latent token, float64",
    }
    write_json(join(out, "stats.json"), stats_json)
    write_index(out, cache_index(out, summaries))
    manifest = {
        "stage": "cache_latents",
        "key": out.rstrip("/").rsplit("/", 1)[-1],
        "output": out,
        "ingest": ingest.uri,
        "encoder": encoder,
        "settings": settings,
        "rows": rows,
        "files": len(uris),
        "classes": len(labels),
        "wall_s": time.time() - start,
        "versions": {"vitok": __version__, "ray": ray.__version__, "torch": torch.__version__},
        "code_version": CODE_VERSION,
        **manifest_fields("cache_latents"),
    }
    write_json(join(out, "manifest.json"), manifest)
    mark_success(out)
    log.info("cache_latents done: %d rows from %d files, %d classes", rows, len(uris), len(labels))
    return manifest


def _ingest_uri(cfg: VitokConfig) -> str:
    from jobs.ingest import output_uri as ingest_output_uri

    return ingest_output_uri(cfg)


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = parse_config(__doc__.splitlines()[0], argv)
    manifest = run(cfg)
    print(f"cache_latents output: {manifest['output']} ({manifest['rows']} rows)")


if __name__ == "__main__":
    main()
