"""What the Prefect UI is given, built without Prefect: headline rows, output locations (text, and a link only where
a browser can open one), a training run's progress lines from its progress.json, and the stage drivers' log
records copied to a run logger. Prefect itself (artifacts on the server, state names, run logs) is checked on the
real pipeline in test_pipelines.py."""

from __future__ import annotations

import logging
import time

import pytest

from jobs.train_common import PROGRESS, Progress
from pipelines import progress
from pipelines.publish import console_url, headline_rows, summary_markdown
from pipelines.stages import code_state, rerun_command
from vitok_core.artifacts import join, write_json
from vitok_core.fingerprint import manifest_fields

INGEST = {"counts": {"read": 20, "accepted": 16, "rejected": 4, "rejected_by_reason": {"corrupt": 1, "too_small": 3}}}
TRAIN = {"status": "complete", "step": 6, "final": {"loss": 0.123456, "tokens_per_s": 1234.5}, "wall_s_this_run": 42.0,
         "export": "s3://b/runs/train_ae/K/export", "checkpoint": "s3://b/runs/train_ae/K/step-00000006"}  # fmt: skip


def test_headline_rows_of_ingest_and_training():
    ingest = {r["name"]: r["value"] for r in headline_rows("ingest", INGEST, "/runs/ingest/K")}
    assert ingest == {"read": "20", "accepted": "16", "rejected": "4", "rejected: corrupt": "1",
                      "rejected: too_small": "3"}  # fmt: skip
    train = {r["name"]: r["value"] for r in headline_rows("train_ae", TRAIN, "s3://b/runs/train_ae/K")}
    assert train["final step"] == "6" and train["loss"] == "0.1235" and train["tokens/s"] == "1234"
    assert headline_rows("train_flow", {"final": {}}, "x")[2] == {"name": "loss", "value": "n/a"}  # not logged


def test_console_links_only_where_a_browser_can_open_them(monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert console_url("s3://bucket/runs/train_ae/K") == (
        "https://s3.console.aws.amazon.com/s3/buckets/bucket?prefix=runs/train_ae/K/&region=eu-west-1"
    )
    assert console_url("gs://bucket/runs/x").startswith("https://console.cloud.google.com/storage/browser/bucket/")
    assert console_url("https://host/report") == "https://host/report"
    assert console_url("/work/runs/ingest/K") is None and console_url("file:///work/runs") is None
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")  # MinIO or moto: no console shows it
    assert console_url("s3://bucket/runs") is None
    text = summary_markdown("train_ae", TRAIN, "s3://b/runs/train_ae/K", [], skipped=True)
    assert text.startswith("## train_ae: skipped\n") and "- **export**: `s3://b/runs/train_ae/K/export`" in text
    assert "](" not in text  # the paths as text, no link


def test_the_code_state_is_in_the_table_and_the_note():
    """current, STALE with the rerun command (the run's preset and overrides), or unknown for an older manifest."""
    current = code_state("train_ae", {**TRAIN, **manifest_fields("train_ae")})
    rows = {r["name"]: r["value"] for r in headline_rows("train_ae", TRAIN, "/runs/train_ae/K", current)}
    assert rows["code"] == f"current ({current['recorded']})"
    text = summary_markdown("train_ae", TRAIN, "/runs/train_ae/K", [], skipped=True, code=current)
    assert f"- **code**: current ({current['recorded']})" in text and "Stale" not in text

    stale = code_state("train_ae", {**TRAIN, "code_fingerprint": "0123456789abcdef"})
    stale["rerun"] = rerun_command("train_ae", "tiny", ["train.steps=6"])
    rows = {r["name"]: r["value"] for r in headline_rows("train_ae", TRAIN, "/runs/train_ae/K", stale)}
    assert rows["code"].startswith("STALE: made by code 0123456789abcdef, this code is ")
    text = summary_markdown("train_ae", TRAIN, "/runs/train_ae/K", [], skipped=True, code=stale)
    assert "**Stale code**: made by code 0123456789abcdef" in text
    assert "Rerun: `vitok run --preset tiny --force train_ae train.steps=6`" in text

    unknown = code_state("ingest", INGEST)
    assert headline_rows("ingest", INGEST, "/runs/ingest/K", unknown)[-1] == {
        "name": "code", "value": "unknown (the manifest predates code fingerprints)"}  # fmt: skip


def test_watch_logs_each_new_step_and_the_last_one(tmp_path):
    """The real writer (rank 0's Progress) and the watcher: a file left by an earlier session is not news, each new
    step is logged once, and the last one is logged when the stage ends however soon after it was written."""
    out = str(tmp_path / "run")
    earlier = Progress(out, "train_ae", first_step=0, stop=6, total=6)
    earlier.update({"step": 2, "loss": 0.5, "tokens_per_s": 800.0})
    lines: list[str] = []
    with progress.watch(out, lines.append, every_s=0.05):
        session = Progress(out, "train_ae", first_step=2, stop=6, total=6)
        time.sleep(0.3)
        session.update({"step": 4, "loss": 0.25, "tokens_per_s": 900.0})
        time.sleep(0.3)
        session.update({"step": 6, "loss": 0.125, "tokens_per_s": 1000.0})
    assert [line.split(", ETA")[0] for line in lines] == [
        "train_ae: step 4/6, loss 0.25, 900 tok/s",
        "train_ae: step 6/6, loss 0.125, 1000 tok/s",
    ]
    assert lines[-1].endswith("ETA 0s") and PROGRESS == progress.PROGRESS
    # about 0.3 s for 2 steps: ~0.3 s left for the other 2
    assert lines[0].endswith(("ETA 0s", "ETA 1s"))
    assert progress.progress_line({"stage": "train_flow", "step": 10, "stop": 10, "total": 40, "eta_s": 3725}) == (
        "train_flow: step 10/10 (of 40), ETA 1h02m"
    )


def test_watch_survives_a_partial_file(tmp_path):
    out = str(tmp_path)
    with open(join(out, PROGRESS), "w") as f:
        f.write('{"stage": "train_ae", "st')  # a rewrite caught half way
    lines: list[str] = []
    with progress.watch(out, lines.append, every_s=0.05):
        time.sleep(0.2)
        write_json(join(out, PROGRESS), {"stage": "train_ae", "step": 2, "stop": 2, "total": 2, "time": 1.0})
    assert lines == ["train_ae: step 2/2, ETA ?"]


@pytest.mark.parametrize("configured", [logging.NOTSET, logging.WARNING])
def test_forward_hands_driver_records_at_info(configured):
    """The stage drivers log INFO under vitok.*, which an unconfigured process drops (root is WARNING)."""
    seen: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: seen.append(f"{record.name}: {record.getMessage()}")
    source = logging.getLogger("vitok")
    source.setLevel(configured)
    try:
        with progress.forward(handler):
            logging.getLogger("vitok.ingest").info("ingest done: %d read", 20)
        logging.getLogger("vitok.ingest").warning("after the stage")
        assert source.level == configured  # restored
    finally:
        source.setLevel(logging.NOTSET)
    assert seen == ["vitok.ingest: ingest done: 20 read"]
