"""The stages on S3 through tests/s3_proxy.py failing ~10% of requests (503 SlowDown, 500, resets, stalls,
truncated bodies): ingest, train_ae (a few steps), cache_latents and evaluate complete, and ingest's accepted
ids and rejects, the latents' bytes and evaluate's metrics equal a fault-free run's. A transient error that
outlives its retries fails the ingest task (never a reject), and the rerun completes. A permanent one (the
proxy answers 403 for one object) is a reject with its reason, in both runs.

The stages run in a driver process with a Ray of its own (tests/stage_driver.py): the session's Ray workers
have the moto endpoint in their environment, these need the proxy's. The proxy lives in this process, so its
counters are read here and its faults switched between the fault-free and the faulty runs. The fault-free
run trains its own autoencoder (4 steps): its losses and exported weights equal the faulty run's.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter

import fsspec
import pyarrow.parquet as pq
import pytest

from jobs.train_common import read_metrics
from tests.ingest_samples import make_training_folder
from tests.s3_proxy import S3FaultProxy
from tests.stage_driver import StageDriver
from vitok_core.artifacts import is_complete, join, read_json
from vitok_core.ingest_output import IngestOutput

pytestmark = pytest.mark.slow
FAIL = 0.1
FAST = [
    "data.budgets=[64]",
    "data.budget_switch=[]",
    "ingest.label_from=folder",
    "ingest.files_per_task=6",
    "train.steps=4",
    "train.batch_size=4",
    "train.checkpoint_every=2",
    "train.log_every=2",
    "train.workers=1",
    "train.loader_workers=0",
    "cache.actors=1",
    "cache.batch_size=8",
    "evaluate.actors=1",
    "evaluate.settings=[{name: 64p, size: 64, mode: center_crop}]",
    "evaluate.generation_setting=64p",
    "evaluate.max_images=8",
    "evaluate.images_per_task=4",
    "evaluate.keep=0",
    # our retries: short waits (botocore's own attempts, with their backoff, come first on S3)
    "io.backoff_s=0.05",
    "io.max_backoff_s=0.5",
]


@pytest.fixture(scope="module")
def world(s3_endpoint, tmp_path_factory):
    """(bucket, proxy, driver): 16 photos + an undecodable file + one the proxy always refuses, on S3."""
    import s3fs

    bucket = s3_endpoint("vitok-s3-faults")
    local = tmp_path_factory.mktemp("s3faults")
    make_training_folder(local / "raw", n=16)
    (local / "raw" / "aaa_bad").mkdir()
    (local / "raw" / "aaa_bad" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (local / "raw" / "aaa_bad" / "denied.jpg").write_bytes(
        (local / "raw" / "rocket").glob("*.jpg").__next__().read_bytes()
    )
    s3fs.S3FileSystem(skip_instance_cache=True).put(f"{local / 'raw'}/", f"{bucket}/raw/", recursive=True)
    proxy = S3FaultProxy(
        os.environ["AWS_ENDPOINT_URL"],
        seed=0,
        stall_s=0.2,
        deny=[f"/{bucket}/raw/aaa_bad/denied.jpg"],
        max_requests=50_000,
        max_lifetime_s=1200,
    ).start()
    with StageDriver({"AWS_ENDPOINT_URL": proxy.url}, log=local / "driver.log") as driver:
        yield bucket, proxy, driver, local
    proxy.stop()


def overrides(bucket: str, run: str, *extra: str) -> list[str]:
    root = f"s3://{bucket}/{run}"
    roots = [f"{k}={root}" for k in ("ingest.root", "train.root", "cache.root", "evaluate.root")]
    return [f"ingest.source=s3://{bucket}/raw", f"evaluate.data=s3://{bucket}/raw", *roots, *FAST, *extra]


def run_stage(driver: StageDriver, proxy: S3FaultProxy, stage: str, args: list[str], log: dict) -> dict:
    before, started = proxy.stats(), time.monotonic()
    answer = driver.run(stage, args)
    after = proxy.stats()
    log[stage] = {
        "wall_s": round(time.monotonic() - started, 1),
        "requests": after["requests"] - before["requests"],
        "faults": after["faults_total"] - before["faults_total"],
    }
    assert answer["ok"], f"{stage}: " + "\n".join(answer.get("chain", []))
    return answer["manifest"]


def accepted_and_rejected(output: str) -> tuple[dict[str, str], dict[str, str]]:
    out = IngestOutput(output)
    rows = {r["id"]: r["source"] for b in out.buckets() for r in out.iter_rows(b, columns=["id", "source"])}
    rejects = {r["source"]: f"{r['reason']}: {r['detail']}" for r in out.rejects().to_pylist()}
    return rows, rejects


def file_bytes(uri: str) -> bytes:
    with fsspec.open(uri, "rb") as f:
        return f.read()


def latents(output: str) -> dict[tuple[str, bool], bytes]:
    fs, path = fsspec.core.url_to_fs(join(output, "data"))
    found = {}
    for name in sorted(fs.ls(path, detail=False)):
        with fs.open(name, "rb") as f:
            for row in pq.read_table(f, columns=["id", "flip", "latent"]).to_pylist():
                found[(row["id"], row["flip"])] = row["latent"]
    return found


def test_stages_through_a_failing_proxy_equal_a_fault_free_run(world):
    bucket, proxy, driver, local = world
    clean, faulty = {}, {}
    proxy.configure(fail_fraction=0.0)
    clean_ingest = run_stage(driver, proxy, "ingest", overrides(bucket, "clean"), clean)

    proxy.configure(fail_fraction=FAIL)
    start = proxy.stats()
    ingest = run_stage(driver, proxy, "ingest", overrides(bucket, "faulty"), faulty)
    train = run_stage(driver, proxy, "train_ae", overrides(bucket, "faulty"), faulty)
    cache = run_stage(driver, proxy, "cache_latents", overrides(bucket, "faulty"), faulty)
    evaluate = run_stage(driver, proxy, "evaluate", overrides(bucket, "faulty"), faulty)
    end = proxy.stats()

    proxy.configure(fail_fraction=0.0)
    clean_train = run_stage(driver, proxy, "train_ae", overrides(bucket, "clean"), clean)
    clean_cache = run_stage(driver, proxy, "cache_latents", overrides(bucket, "clean"), clean)
    clean_evaluate = run_stage(driver, proxy, "evaluate", overrides(bucket, "clean"), clean)

    # Every stage completed under faults, and its outputs equal the fault-free run's.
    assert train["status"] == "complete" and train["step"] == 4 and is_complete(train["output"])
    assert [m["loss"] for m in read_metrics(train["output"])] == [
        m["loss"] for m in read_metrics(clean_train["output"])
    ]
    for part in ("encoder", "decoder"):  # the same weights, byte for byte
        assert file_bytes(join(train["export"], f"{part}.safetensors")) == file_bytes(
            join(clean_train["export"], f"{part}.safetensors")
        )
    assert ingest["counts"] == clean_ingest["counts"]
    rows, rejects = accepted_and_rejected(ingest["output"])
    assert (rows, rejects) == accepted_and_rejected(clean_ingest["output"])
    assert len(rows) == 16 and ingest["counts"]["rejected_by_reason"] == {"undecodable": 1, "unreadable_source": 1}
    # The refused object is a reject with its reason (permanent); no image became one through an injected fault.
    denied = f"s3://{bucket}/raw/aaa_bad/denied.jpg"
    assert rejects[denied].startswith("unreadable_source: PermissionError") and len(rejects) == 2
    assert cache["rows"] == clean_cache["rows"] == 16
    got, want = latents(cache["output"]), latents(clean_cache["output"])
    assert len(got) == 16 and got == want
    metrics, clean_metrics = (read_json(join(m["output"], "metrics.json")) for m in (evaluate, clean_evaluate))
    assert metrics["results"] == clean_metrics["results"] and metrics["results"][0]["images"] == 6
    assert metrics["eval_set"]["rejected"] == clean_metrics["eval_set"]["rejected"] == 2
    assert read_json(join(evaluate["output"], "rejected.json")) == read_json(
        join(clean_evaluate["output"], "rejected.json")
    )

    # The faults happened, and most of them on the stages' reads (GETs of objects, not listings).
    faults = end["fault_log"][len(start["fault_log"]) :]
    assert end["faults_total"] - start["faults_total"] == len(faults) > 0
    by_method = Counter(m for m, _, _ in faults)
    bodies = Counter(what_is(p) for m, p, _ in faults if m == "GET" and "?" not in p)  # object GETs, by input
    report = {
        "fail_fraction": FAIL,
        "requests": end["requests"] - start["requests"],
        "requests_by_method": {m: n - start["by_method"].get(m, 0) for m, n in end["by_method"].items()},
        "faults": len(faults),
        "faults_by_kind": dict(Counter(k for _, _, k in faults)),
        "faults_by_method": dict(by_method),
        "object_get_faults_by_input": dict(bodies),
        "per_stage_faulty": faulty,
        "per_stage_clean": clean,
        "denied": end["denied"],
    }
    (local / "faults.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    assert 0.03 < len(faults) / report["requests"] < 0.2
    reads = by_method["GET"] + by_method["HEAD"]  # object reads, metadata and listings: what the stages read
    assert reads >= len(faults) / 2 and bodies["source image"] > 0 and bodies["ingest output"] > 0


def what_is(path: str) -> str:
    """Which input an object GET read, by its path."""
    for part, name in (("/raw/", "source image"), ("/export/", "autoencoder export"), ("/ingest/", "ingest output")):
        if part in path:
            return name
    if "/train_ae/" in path:
        return "train_ae checkpoint or metrics"
    return "stage outputs and markers" if path.endswith((".json", "_SUCCESS")) else "other"


def test_transient_error_past_retries_fails_the_task_and_a_rerun_completes(world):
    """One source object's GETs keep failing (truncated bodies): the ingest task that reads it raises a
    TransientIOError after io.retries, Ray Data retries it io.task_retries times, the stage fails without a
    reject for it; with the fault gone, the rerun completes and accepts the image."""
    bucket, proxy, driver, _ = world
    victim = f"/{bucket}/raw/astronaut/astronaut_0000.jpg"
    args = overrides(bucket, "retry", "io.retries=2", "io.task_retries=1", "io.backoff_s=0.01")
    proxy.configure(fail_fraction=0.0, fail_first=10**6, faults=["truncate"], only=victim, methods=["GET"])
    before = proxy.stats()["faults_total"]
    answer = driver.run("ingest", args)
    assert not answer["ok"] and any("transient I/O error reading s3://" in line for line in answer["chain"])
    assert proxy.stats()["faults_total"] - before == 3 * 2  # (1 + io.retries) attempts x (1 + io.task_retries)

    proxy.configure(fail_first=0, only="", methods=[])
    # The rerun with the default retries (io.* is not in the key: the same output, its staged tasks kept).
    answer = driver.run("ingest", overrides(bucket, "retry"))
    assert answer["ok"], "\n".join(answer.get("chain", []))  # a string: pytest shortens a list's repr
    manifest = answer["manifest"]
    rows, rejects = accepted_and_rejected(manifest["output"])
    assert f"s3:/{victim}" in rows.values() and f"s3:/{victim}" not in rejects
    assert manifest["counts"]["accepted"] == 16
