"""The cache_latents stage on a real local Ray: an actor pool of tiny encoders over a real ingest output."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from jobs.cache_latents import run as run_cache
from jobs.ingest import run as run_ingest
from tests.ingest_samples import make_training_folder
from tests.test_row_index import assert_index_matches_data
from vitok_core.artifacts import is_complete, join, read_json
from vitok_core.checkpoint import save_published
from vitok_core.config import load_config
from vitok_core.images import decode_image, to_tensor
from vitok_core.ingest_output import IngestOutput
from vitok_core.latents import from_bytes
from vitok_core.model import build_autoencoder
from vitok_core.naflex import collate, preprocess

pytestmark = pytest.mark.slow
VARIANT = "Tid2-Tid4/1x16x16"


@pytest.fixture(scope="module")
def setup(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    make_training_folder(root / "photos", n=24)
    base = [f"ingest.source={root / 'photos'}", f"ingest.root={root / 'runs'}", "ingest.files_per_task=8"]
    base.append("ingest.label_from=folder")
    ingest = run_ingest(load_config("tiny", base))
    torch.manual_seed(3)
    model = build_autoencoder(VARIANT)
    save_published(model, str(root / "export"), metadata={"variant": VARIANT, "step": 0})
    return root, base, ingest, model.eval()


def config(setup, root, *overrides):
    folder, base, ingest, _ = setup
    return load_config(
        "tiny",
        [
            *base,
            f"cache.root={root}",
            f"cache.ingest={ingest['output']}",
            f"cache.encoder={folder / 'export'}",
            "cache.budget=64",
            "cache.flip=true",
            "cache.batch_size=4",
            *overrides,
        ],
    )


def read_cache(out: str) -> list[dict]:
    fs, path = fsspec.core.url_to_fs(join(out, "data"))
    rows = []
    for name in sorted(fs.ls(path, detail=False)):
        with fs.open(name, "rb") as f:
            rows += pq.read_table(f).to_pylist()
    return rows


@pytest.fixture(scope="module")
def cached(setup):
    folder = setup[0]
    return run_cache(config(setup, folder / "cache"))


def test_cache_counts_latents_and_stats(setup, cached):
    _, _, ingest, model = setup
    assert is_complete(cached["output"]) and cached["rows"] == 2 * ingest["counts"]["accepted"] == 48
    rows = read_cache(cached["output"])
    assert len(rows) == 48 and len({(r["id"], r["flip"]) for r in rows}) == 48
    ids = {
        r["id"]
        for b in IngestOutput(ingest["output"]).buckets()
        for r in IngestOutput(ingest["output"]).iter_rows(b, columns=["id"])
    }
    assert {r["id"] for r in rows} == ids

    # A stored latent equals a direct encode of the same image (up to the bf16 rounding of the cache).
    out = IngestOutput(ingest["output"])
    by_id = {r["id"]: r for b in out.buckets() for r in out.iter_rows(b, columns=["id", "bytes"])}
    for row in rows[:6]:
        image = to_tensor(decode_image(by_id[row["id"]]["bytes"]))
        if row["flip"]:
            image = image.flip(-1)
        batch = collate([preprocess(image, 16, 64)])
        with torch.no_grad():
            want = model.encode(batch)["z"][0]
        got = from_bytes(row["latent"], row["rows"] * row["cols"], row["channels"], row["dtype"])
        assert got.shape == want.shape == (row["rows"] * row["cols"], 16)
        assert f"{row['rows']}x{row['cols']}" == row["bucket"]
        torch.testing.assert_close(got, want, rtol=1e-2, atol=2e-2)

    # stats.json equals a float64 numpy computation over every cached token.
    everything = np.concatenate(
        [from_bytes(r["latent"], r["rows"] * r["cols"], r["channels"], r["dtype"]).double().numpy() for r in rows]
    )
    stats = read_json(join(cached["output"], "stats.json"))
    np.testing.assert_allclose(stats["mean"], everything.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats["std"], everything.std(0), rtol=1e-12)
    assert stats["tokens"] == len(everything) and stats["classes"] == ["astronaut", "chelsea", "coffee", "rocket"]

    # index.parquet: what train_flow's loader plans from, equal to the files' footers and bucket column.
    assert_index_matches_data(cached["output"], ["bucket"])

    started = time.time()
    assert run_cache(config(setup, setup[0] / "cache")) == cached  # complete: skipped
    assert time.time() - started < 10


def test_crashed_run_reruns_without_duplicates(ray_local, setup, cached, tmp_path):
    # The crashing run is its own driver process on the session's Ray, as a crashed Ray job would be.
    folder, base, ingest, _ = setup
    args = [
        *base,
        f"cache.root={tmp_path}",
        f"cache.ingest={ingest['output']}",
        f"cache.encoder={folder / 'export'}",
        "cache.budget=64",
        "cache.flip=true",
        "cache.batch_size=4",
        "cache.fail_at_file=1",
    ]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    crashed = subprocess.run(
        [sys.executable, "-m", "jobs.cache_latents", "--config", "tiny", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert crashed.returncode != 0 and "injected fault" in crashed.stderr + crashed.stdout
    rerun = run_cache(config(setup, tmp_path, "cache.fail_at_file=1"))  # the fault fires once: a marker
    rows, want = read_cache(rerun["output"]), read_cache(cached["output"])
    key = lambda r: (r["id"], r["flip"])  # noqa: E731
    assert len(rows) == len({key(r) for r in rows}) == 48
    assert sorted(map(key, rows)) == sorted(map(key, want))
    stats = read_json(join(rerun["output"], "stats.json"))
    assert stats["tokens"] == read_json(join(cached["output"], "stats.json"))["tokens"]
    assert_index_matches_data(rerun["output"], ["bucket"])  # runs of the files done before the crash too
