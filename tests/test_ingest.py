"""The ingest stage end to end on a real local Ray: local folders, S3 (moto), tar and Parquet sources,
and a driver killed mid-run then rerun."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.ingest import output_uri, run
from tests.ingest_samples import make_malformed, make_photo_folder, reference_resize
from tests.test_row_index import assert_index_matches_data
from vitok_core.artifacts import is_complete, join
from vitok_core.config import load_config
from vitok_core.images import decode_image
from vitok_core.ingest import REJECT_REASONS, content_id
from vitok_core.ingest_output import IngestOutput
from vitok_core.naflex import bucket_of

pytestmark = pytest.mark.slow
STORE_MAX = 500_000


def config(source, root, *overrides):
    base = [
        f"ingest.source={source}",
        f"ingest.root={root}",
        f"ingest.store_max_pixels={STORE_MAX}",
        "ingest.files_per_task=32",
        "ingest.label_from=folder",
        "data.budgets=[256,1024]",
    ]
    return load_config("tiny", [*base, *overrides])


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, dict[str, str], dict[str, str]]:
    src = tmp_path_factory.mktemp("photos")
    expected = make_photo_folder(src / "images", n=200, seed=0)
    malformed = make_malformed(src / "images" / "malformed")
    return src / "images", expected, malformed


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def all_rows(out: IngestOutput, columns=None) -> list[dict]:
    return [row for bucket in out.buckets() for row in out.iter_rows(bucket, columns=columns)]


@pytest.fixture(scope="module")
def local_run(ray_local, photos, tmp_path_factory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("runs")
    return run(config(photos[0], root)), root


def test_local_folder_end_to_end(local_run, photos):
    src, expected, malformed = photos
    manifest, root = local_run
    counts = manifest["counts"]
    assert counts["read"] == len(expected) + len(malformed)
    assert counts["accepted"] + counts["rejected"] == counts["read"]
    assert counts["rejected_by_reason"]["duplicate"] == 3
    assert set(counts["rejected_by_reason"]) <= set(REJECT_REASONS)

    out = IngestOutput(manifest["output"])
    rejects = {Path(r["source"]).name: r["reason"] for r in out.rejects().to_pylist()}
    rows = all_rows(out)
    accepted = {Path(r["source"]).name for r in rows}
    for name, want in malformed.items():  # every odd file lands where it should, with its reason
        assert (name in accepted) if want == "accepted" else rejects.get(name) == want, name
    assert len(rows) == counts["accepted"] == sum(out.buckets().values()) == sum(out.buckets(1024).values())
    assert len({r["id"] for r in rows}) == len(rows)  # no duplicate content

    for row in rows:
        assert row["bucket"] == "{}x{}".format(*bucket_of(row["height"], row["width"], 16, 256))
        assert row["bucket_1024"] == "{}x{}".format(*bucket_of(row["height"], row["width"], 16, 1024))
        assert row["width"] * row["height"] <= STORE_MAX
        stored = decode_image(row["bytes"])
        assert stored.size == (row["width"], row["height"])
        path = Path(row["source"])
        if path.parent.name != "malformed":
            assert row["label"] == expected[f"{path.parent.name}/{path.name}"] == path.parent.name
        assert _psnr(np.asarray(stored), np.asarray(reference_resize(path, STORE_MAX))) > 30, row["source"]
    assert any((r["orig_width"], r["orig_height"]) != (r["width"], r["height"]) for r in rows)  # some downscaled
    assert manifest["timing_s"]["total"] > 0 and manifest["versions"]["ray"]

    started = time.time()
    assert run(config(src, root)) == manifest  # complete: skipped, same answer
    assert time.time() - started < 5


def test_s3_source_and_output(ray_local, s3_endpoint, photos):
    import s3fs

    src, _, _ = photos
    bucket = s3_endpoint("vitok-ingest")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    names = sorted(p for p in src.rglob("*") if p.is_file())[:40]
    for path in names:
        fs.put_file(str(path), f"{bucket}/raw/{path.relative_to(src).as_posix()}")
    manifest = run(config(f"s3://{bucket}/raw", f"s3://{bucket}/runs"))
    assert manifest["output"].startswith(f"s3://{bucket}/runs/ingest/")
    assert is_complete(manifest["output"])
    counts = manifest["counts"]
    assert counts["read"] == len(names) and counts["accepted"] + counts["rejected"] == len(names)
    out = IngestOutput(manifest["output"])
    rows = all_rows(out, columns=["source", "bytes", "width", "height", "label"])
    assert len(rows) == counts["accepted"] > 0
    assert all(r["source"].startswith(f"s3://{bucket}/raw/") for r in rows)
    assert all(decode_image(r["bytes"]).size == (r["width"], r["height"]) for r in rows)
    assert_index_matches_data(manifest["output"], ["bucket_256", "bucket_1024"])  # written by publish, on S3


def _tar_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_tar_and_parquet_sources(ray_local, photos, tmp_path):
    src, expected, _ = photos
    files = sorted(expected)[:24]
    blobs = [(src / f).read_bytes() for f in files]
    labels = [expected[f] for f in files]
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):  # WebDataset layout: key.ext + key.cls
        members = []
        for i in range(s * 10, s * 10 + 10):
            members += [(f"{i:05d}.{files[i].rsplit('.', 1)[1]}", blobs[i]), (f"{i:05d}.cls", labels[i].encode())]
        _tar_shard(shards / f"shard-{s:03d}.tar", members)
    _tar_shard(shards / "shard-002.tar", [(f"{i:05d}.jpg", blobs[i]) for i in range(20, 24)])
    raw = (shards / "shard-002.tar").read_bytes()
    (shards / "shard-002.tar").write_bytes(raw[: len(raw) - len(blobs[23]) // 2 - 1024])  # corrupt last member

    tar_manifest = run(config(shards, tmp_path / "runs"))
    tar_out = IngestOutput(tar_manifest["output"])
    tar_rows = all_rows(tar_out, columns=["id", "source", "label"])
    assert {r["label"] for r in tar_rows if "shard-000" in r["source"]} <= set(labels[:10])
    assert "unreadable_source" in tar_manifest["counts"]["rejected_by_reason"]
    broken = [r for r in tar_out.rejects().to_pylist() if r["reason"] == "unreadable_source"]
    assert broken and "shard-002.tar" in broken[0]["source"]

    table = pa.table({"key": [str(i) for i in range(24)], "jpg": blobs, "cls": labels})
    pq.write_table(table, tmp_path / "img2dataset.parquet", row_group_size=7)  # 4 row groups = 4 tasks
    pq_manifest = run(config(tmp_path / "img2dataset.parquet", tmp_path / "runs", "ingest.parquet_label_column=cls"))
    pq_rows = all_rows(IngestOutput(pq_manifest["output"]), columns=["id", "source", "label"])
    assert pq_manifest["counts"]["read"] == 24
    by_id = {content_id(b): label for b, label in zip(blobs, labels, strict=True)}
    assert all(by_id[r["id"]] == r["label"] for r in pq_rows)
    with pytest.raises(ValueError, match=r"ingest\.parquet_image_column='image'"):  # before any Ray work
        run(config(tmp_path / "img2dataset.parquet", tmp_path / "runs", "ingest.parquet_image_column=image"))
    # The same images give the same ids whatever the container; the broken shard lost only its last image.
    assert {r["id"] for r in tar_rows} == {r["id"] for r in pq_rows} - {content_id(blobs[23])}


def test_killed_run_reruns_to_the_same_accepted_set(local_run, photos, tmp_path):
    src, _, _ = photos
    reference = local_run[0]  # an uninterrupted run (with larger tasks: task size must not matter)
    reference_ids = {r["id"] for r in all_rows(IngestOutput(reference["output"]), columns=["id"])}

    root = tmp_path / "killed"
    cfg = config(src, root, "ingest.files_per_task=4")
    staging = Path(join(output_uri(cfg), "_staging", "tasks"))
    args = [
        f"ingest.source={src}",
        f"ingest.root={root}",
        f"ingest.store_max_pixels={STORE_MAX}",
        "ingest.files_per_task=4",
        "ingest.label_from=folder",
        "data.budgets=[256,1024]",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the subprocess starts its own Ray
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.ingest", "--config", "tiny", *args],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if staging.exists() and len(list(staging.glob("task-*.parquet"))) >= 5:
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, mid-run
    proc.wait()
    done_before = len(list(staging.glob("task-*.parquet")))
    assert 5 <= done_before < 55, "the run must be interrupted part-way"
    assert not is_complete(output_uri(cfg))

    rerun = run(cfg)
    ids = [r["id"] for r in all_rows(IngestOutput(rerun["output"]), columns=["id"])]
    assert len(ids) == len(set(ids))  # no duplicates
    assert set(ids) == reference_ids  # nothing lost
    assert rerun["counts"] == reference["counts"]
