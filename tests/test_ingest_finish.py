"""Ingest's step 3 (finish_plan, finish_task): a run of small buckets deduplicated and published by one task
writes the same files, rows and order as the two-step path (dedup_shard per bucket, then publish_part per
output file), and returns the same duplicates and index runs; whatever the CPU count, and for buckets too
large for one task. In-process, no Ray: the staging files come from process_task itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

import jobs.ingest as ingest
from tests.ingest_samples import make_malformed, make_photo_folder
from vitok_core.config import load_config


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """40 photos (3 exact duplicates, one in another task and class folder) and the odd files of
    make_malformed."""
    root = tmp_path_factory.mktemp("finish")
    make_photo_folder(root / "images", n=40, seed=3)
    make_malformed(root / "images" / "malformed")
    return root / "images"


@pytest.fixture(scope="module", params=[("[256,1024]", "[0.9]"), ("[256]", "[]")], ids=["2-budgets", "1-budget"])
def staged(images, request, tmp_path_factory) -> dict[str, Any]:
    """Staging files of `images`, 8 files a task, at two budgets (a data file's rows sorted by the second
    one's bucket, then id) or one (rows in task order)."""
    root = tmp_path_factory.mktemp("staged")
    budgets, switch = request.param
    overrides = [f"ingest.source={images}", "ingest.files_per_task=8", "ingest.label_from=folder"]
    overrides += ["ingest.store_max_pixels=300000", f"data.budgets={budgets}", f"data.budget_switch={switch}"]
    cfg = load_config("tiny", overrides)
    settings = ingest.ingest_settings(cfg)
    staging = str(root / "staging")
    _, tasks = ingest.list_tasks(settings)
    summaries = {t["task"]: ingest.process_task(t, settings, staging) for t in tasks}
    tally = ingest.Tally.of(summaries, settings["budgets"])
    return {"root": root, "settings": settings, "staging": staging, "summaries": summaries, "tally": tally}


def _row(job: dict) -> dict:
    return {"job": json.dumps(job)}


def two_steps(staged: dict, out: str, rows_per_file: int) -> tuple[list[dict], list[dict]]:
    """The reference: every bucket deduplicated alone, then published one output file a task."""
    tally, staging, budgets = staged["tally"], staged["staging"], staged["settings"]["budgets"]
    dups = [
        json.loads(ingest.dedup_shard(_row(j), staging, out, budgets)["result"])
        for j in ingest.dedup_plan(tally, budgets)
    ]
    jobs = [*ingest.publish_plan(tally, dups, budgets, rows_per_file), *ingest.rejects_plan(tally)]
    return dups, [ingest.publish_part(_row(j), staging, out, budgets, rows_per_file) for j in jobs]


def one_step(staged: dict, out: str, rows_per_file: int, cpus: int) -> tuple[list[dict], list[dict], list[dict]]:
    """What run() does: finish_plan's jobs, then publish_part for the buckets it leaves to step 4."""
    tally, staging, budgets = staged["tally"], staged["staging"], staged["settings"]["budgets"]
    plan, large = ingest.finish_plan(tally, budgets, rows_per_file, cpus)
    finished = [json.loads(ingest.finish_task(_row(j), staging, out, budgets, rows_per_file)["result"]) for j in plan]
    dups = [d for r in finished for d in r["duplicates"]]
    later = ingest.publish_plan(tally, dups, budgets, rows_per_file, large)
    written = [*finished, *(ingest.publish_part(_row(j), staging, out, budgets, rows_per_file) for j in later)]
    return plan, dups, written


def files(out: str) -> dict[str, list[dict]]:
    """Every Parquet file of an output (relative path -> its rows in file order) and its schema."""
    return {
        str(p.relative_to(out)): [*pq.read_table(p).to_pylist(), {"schema": str(pq.read_schema(p))}]
        for p in sorted(Path(out).rglob("*.parquet"))
    }


def runs(written: list[dict]) -> dict[str, Any]:
    return {name: r for w in written for name, r in json.loads(w["index"] or "{}").items()}


@pytest.mark.parametrize("rows_per_file", [2048, 2])
@pytest.mark.parametrize("cpus", [1, 3])
def test_one_task_per_run_of_buckets_writes_what_two_steps_write(staged, tmp_path, rows_per_file, cpus):
    ref_dups, ref_written = two_steps(staged, str(tmp_path / "ref"), rows_per_file)
    plan, dups, written = one_step(staged, str(tmp_path / "new"), rows_per_file, cpus)

    kinds = [j["kind"] for j in plan]
    assert "buckets" in kinds and "rejects" in kinds
    if rows_per_file == 2:  # some buckets too large for one task: deduplicated in step 3, published in step 4
        assert "dedup" in kinds
    else:
        assert "dedup" not in kinds and (cpus > 1 or kinds.count("buckets") == 1)

    reference = files(str(tmp_path / "ref"))
    assert any(name.startswith("rejects/duplicates-") for name in reference)  # the duplicates are found
    assert files(str(tmp_path / "new")) == reference  # same files, rows, order and schemas
    assert runs(written) == runs(ref_written)
    found = {d["bucket"]: d for d in dups if d["duplicates"]}
    expected = {d["bucket"]: d for d in ref_dups if d["duplicates"]}
    assert {b: {**d, "file": Path(d["file"]).name} for b, d in found.items()} == {
        b: {**d, "file": Path(d["file"]).name} for b, d in expected.items()
    }
    rows = sum(w["rows"] for w in written if w["kind"] == "data")
    assert rows == sum(w["rows"] for w in ref_written if w["kind"] == "data")
    budgets = staged["settings"]["budgets"]
    assert ingest.count(staged["tally"], dups, budgets) == ingest.count(staged["tally"], ref_dups, budgets)


def test_finish_plan_groups_small_buckets_by_rows(staged):
    summaries = staged["summaries"]
    totals: dict[str, int] = {}
    for s in summaries.values():
        for bucket, n in s["per_bucket"]["256"].items():
            totals[bucket] = totals.get(bucket, 0) + n
    budgets = staged["settings"]["budgets"]
    for cpus in (1, 2, 5):
        plan, large = ingest.finish_plan(staged["tally"], budgets, 2048, cpus)
        groups = [j["buckets"] for j in plan if j["kind"] == "buckets"]
        assert not large and sorted(b for g in groups for b in g) == sorted(totals)
        limit = -(-sum(totals.values()) // cpus)
        assert all(len(g) == 1 or sum(totals[b] for b in g) <= limit for g in groups)
        assert len(groups) >= -(-sum(totals.values()) // limit) and (cpus > 1 or len(groups) == 1)
    plan, large = ingest.finish_plan(staged["tally"], budgets, 3, 1)
    assert large == {b for b, n in totals.items() if n > 3}
    assert {j["bucket"] for j in plan if j["kind"] == "dedup"} == large


def test_tally_keeps_what_the_plans_need_in_any_order(staged):
    """The driver's Tally of the summaries gives each bucket's (task, rows) in task order, the rejected rows
    and the manifest counts as the summaries themselves say, whatever order the tasks returned in."""
    summaries, budgets = staged["summaries"], staged["settings"]["budgets"]
    first = str(budgets[0])
    expected: dict[str, list[tuple[int, int]]] = {}
    for task in sorted(summaries):
        for bucket, n in summaries[task]["per_bucket"][first].items():
            expected.setdefault(bucket, []).append((task, n))
    tally = staged["tally"]
    got = {b: list(zip(t.tolist(), r.tolist(), strict=True)) for b, (t, r) in tally.by_bucket().items()}
    assert got == dict(sorted(expected.items())) and list(got) == sorted(expected)
    rejected = [(t, s["read"] - s["accepted"]) for t, s in sorted(summaries.items()) if s["read"] > s["accepted"]]
    assert list(zip(*(a.tolist() for a in tally.rejected()), strict=True)) == rejected
    counts = ingest.count(tally, [], budgets)
    assert counts["read"] == sum(s["read"] for s in summaries.values())
    assert counts["accepted"] == sum(s["accepted"] for s in summaries.values())
    for t in map(str, budgets):
        per_bucket: dict[str, int] = {}
        for s in summaries.values():
            for bucket, n in s["per_bucket"][t].items():
                per_bucket[bucket] = per_bucket.get(bucket, 0) + n
        assert counts["per_bucket"][t] == dict(sorted(per_bucket.items()))

    backwards = ingest.Tally.of(dict(sorted(summaries.items(), reverse=True)), budgets)
    assert ingest.count(backwards, [], budgets) == counts
    assert ingest.finish_plan(backwards, budgets, 3, 2) == ingest.finish_plan(tally, budgets, 3, 2)
    assert list(ingest.publish_plan(backwards, [], budgets, 3)) == list(ingest.publish_plan(tally, [], budgets, 3))
    assert ingest.rejects_plan(backwards) == ingest.rejects_plan(tally)


class _Result(dict):
    """A task's result that counts how many of its kind are alive."""

    alive = 0

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        _Result.alive += 1

    def __del__(self) -> None:
        _Result.alive -= 1


def test_driver_keeps_no_task_result(staged, tmp_path):
    """run() counts step 2's results and indexes steps 3-4's as they arrive: never more than one result is
    held (before, every summary and every file's runs were held to the end, as JSON and as dicts)."""
    summaries, staging, budgets = staged["summaries"], staged["staging"], staged["settings"]["budgets"]
    most = []

    def stream(results):
        for result in results:
            most.append(_Result.alive)
            yield _Result(result)

    process = ({"task": t, "done": False, "summary": json.dumps(s)} for t, s in summaries.items())
    tally = ingest.tally_results(stream(process), budgets)
    assert ingest.count(tally, [], budgets) == ingest.count(staged["tally"], [], budgets)
    out = str(tmp_path / "out")
    plan, large = ingest.finish_plan(tally, budgets, 2, 1)
    finished = (ingest.finish_task(_row(j), staging, out, budgets, 2) for j in plan)
    index = ingest.IndexBuilder([f"bucket_{t}" for t in budgets])
    rows, dups = ingest.absorb_written(stream(finished), index)
    later = (
        ingest.publish_part(_row(j), staging, out, budgets, 2)
        for j in ingest.publish_plan(tally, dups, budgets, 2, large)
    )
    rows += ingest.absorb_written(stream(later), index)[0]
    assert len(most) > len(summaries) and max(most) <= 1
    assert rows == ingest.count(tally, dups, budgets)["accepted"] == index.table()["rows"].to_numpy().sum()
    _, _, written = one_step(staged, str(tmp_path / "ref"), 2, 1)
    assert {name for name in index.table()["file"].to_pylist()} == set(runs(written))
