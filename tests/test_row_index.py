"""The row-group index (vitok_core/row_index.py): ingest's publish step writes it, it equals what the data
files' footers say, a rank's ShardIndex reads it and no data file (counted with a real pyarrow filesystem that
counts what is opened and read), cache_latents and evaluate plan from it, an output without it fails with the
fix, and `vitok index` writes it for such an output, locally and on S3 (moto)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from jobs.ingest import _write
from jobs.ingest import run as run_ingest
from pipelines.cli import main as vitok
from tests.ingest_samples import make_training_folder
from vitok_core.config import load_config
from vitok_core.ingest_output import IngestOutput
from vitok_core.loader import Shard, ShardIndex
from vitok_core.row_index import (
    INDEX,
    IndexBuilder,
    MissingIndexError,
    file_runs,
    group_sizes,
    in_index_order,
    index_from_files,
    list_data_files,
    read_index,
    resolve,
)

# Sizes whose buckets at 64 tokens hold several buckets at 256 (6x9: 8x12, 8x11, 10x15; 8x8: 10x10, 11x11, 9x9),
# so that row groups of one first-budget bucket mix buckets at the second budget.
SIZES = ((192, 128), (176, 128), (240, 160), (160, 160), (176, 176), (144, 144), (128, 192))
FIELDS = ("units", "unit_start", "bucket_codes", "buckets")


# ------------------------------------------------------------------------------------------------
# Helpers (also used by tests/test_ingest.py and tests/test_cache_latents.py)
# ------------------------------------------------------------------------------------------------
class _CountingReader:
    """A file object that counts its read calls (each one a ranged request on an object store)."""

    def __init__(self, raw: Any, handler: CountingHandler) -> None:
        self._raw, self._handler = raw, handler

    def read(self, *args: Any) -> bytes:
        self._handler.reads += 1
        return self._raw.read(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class CountingHandler(pafs.FSSpecHandler):
    """A real pyarrow filesystem handler over an fsspec filesystem (local or s3fs) that records every file
    opened and counts the read calls made on them."""

    def __init__(self, fs: fsspec.AbstractFileSystem) -> None:
        super().__init__(fs)
        self.opened: list[str] = []
        self.reads = 0

    def open_input_file(self, path: str) -> pa.PythonFile:
        self.opened.append(path)
        return pa.PythonFile(_CountingReader(self.fs.open(path, mode="rb"), self), mode="r")

    def open_input_stream(self, path: str) -> pa.PythonFile:
        return self.open_input_file(path)


def counting(fs: fsspec.AbstractFileSystem) -> tuple[pafs.PyFileSystem, CountingHandler]:
    handler = CountingHandler(fs)
    return pafs.PyFileSystem(handler), handler


def assert_index_matches_data(uri: str, columns: list[str]) -> pa.Table:
    """The output's index.parquet equals the index built from its data files' footers and bucket columns."""
    filesystem, root = resolve(uri, None)
    want = index_from_files(filesystem, root, list_data_files(filesystem, root), columns)
    got = read_index(uri)
    assert got.schema.names == ["file", "row_group", "start", "rows", *columns]
    assert got.equals(want), (got.slice(0, 20).to_pylist(), want.slice(0, 20).to_pylist())
    return got


def assert_same_shard(a: Shard, b: Shard) -> None:
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and np.array_equal(x, y), name
        else:
            assert x == y, name


def _random_runs(rng: np.random.Generator, files: int) -> list[tuple[str, dict]]:
    """(file, runs) of `files` files named as publish names them, in a random order, runs as file_runs gives."""
    added = []
    for f in rng.permutation(files).tolist():
        n = int(rng.integers(1, 40))
        first = [f"{rng.integers(1, 30)}x{rng.integers(1, 30)}"] * n
        second = np.sort(rng.choice(["8x12", "8x11", "10x15", "9x9"], size=n)).tolist()
        name = f"data/bucket={first[0]}/part-{f % 7:05d}-{f // 7:03d}.parquet"  # names not in file order
        added.append((name, file_runs({"bucket_64": first, "bucket_256": second}, group_sizes(n, 8))))
    return added


def test_builder_sorts_and_writes_as_one_table_sort(tmp_path, monkeypatch):
    """IndexBuilder holds runs as codes and writes index.parquet a slice at a time: the same rows, order and
    row groups (the same bytes) as sorting the table of every run and writing it whole (what it did before)."""
    import vitok_core.row_index as row_index

    rng = np.random.default_rng(5)
    added = _random_runs(rng, 300)
    added += [added[3], added[3], added[40]]  # files added again: their runs again, as a table of every run has
    reverse = {name: runs[::-1] for name, runs in added[7][1].items()}
    added.append((added[7][0].replace("part-", "part-9"), reverse))  # a file's runs out of order
    columns = ["bucket_64", "bucket_256"]
    builder = IndexBuilder(columns, flush=50)  # many chunks
    rows: dict[str, list] = {name: [] for name in row_index.schema(columns).names}
    for name, runs in added:
        builder.add(name, runs)
        rows["file"] += [name] * len(runs["rows"])
        for column in rows.keys() - {"file"}:
            rows[column] += runs[column]
    reference = row_index.sort(pa.table(rows, schema=row_index.schema(columns)))
    assert builder.table().equals(reference)
    assert builder.runs == reference.num_rows and builder.row_groups == row_index.count_row_groups(reference)
    for size in (1, 7, 97, reference.num_rows, 10 * reference.num_rows):
        sliced = list(builder.batches(rows_per_batch=size))
        assert {b.num_rows for b in sliced[:-1]} <= {size} and pa.Table.from_batches(sliced).equals(reference)

    monkeypatch.setattr(row_index, "INDEX_ROWS_PER_GROUP", 1000)  # several row groups in the index file
    row_index.write_index(str(tmp_path / "whole"), reference)
    builder.write(str(tmp_path / "streamed"))
    whole, streamed = (tmp_path / "whole" / INDEX, tmp_path / "streamed" / INDEX)
    footer = pq.ParquetFile(streamed).metadata
    assert footer.num_row_groups >= -(-reference.num_rows // 1000) > 1
    for g in range(footer.num_row_groups):  # at most 1000 runs, never splitting a data row group's runs
        group = pq.ParquetFile(streamed).read_row_group(g)
        assert group.num_rows <= 1000 and group["start"][0].as_py() == 0
    assert streamed.read_bytes() == whole.read_bytes()

    empty = IndexBuilder(columns)
    assert empty.table().equals(row_index.schema(columns).empty_table())
    empty.write(str(tmp_path / "empty"))
    row_index.write_index(str(tmp_path / "empty-ref"), row_index.schema(columns).empty_table())
    assert (tmp_path / "empty" / INDEX).read_bytes() == (tmp_path / "empty-ref" / INDEX).read_bytes()


# ------------------------------------------------------------------------------------------------
# Fast: runs of files written as the publish step writes them, with several row groups each
# ------------------------------------------------------------------------------------------------
def test_runs_equal_the_footers_and_shard_index_equals_from_files(tmp_path, monkeypatch):
    import vitok_core.row_index as row_index

    rng = np.random.default_rng(0)
    root = tmp_path / "out"
    builder = IndexBuilder(["bucket_64", "bucket_256"])
    paths = []
    for f, (n, sort) in enumerate([(37, True), (20, False), (8, True), (1, False)]):
        first = ["6x9"] * n
        second = rng.choice(["8x12", "8x11", "10x15"], size=n).tolist()
        table = pa.table({"id": [f"{f}-{i:03d}" for i in range(n)], "bucket_64": first, "bucket_256": second})
        if sort:  # as publish sorts: later budgets' buckets, then id
            table = table.sort_by([("bucket_256", "ascending"), ("id", "ascending")])
        name = f"data/bucket=6x9/part-{f:05d}-000.parquet"
        _write(str(root / name), table, rows_per_group=8)  # the publish step's own writer
        runs = file_runs({c: table[c] for c in ("bucket_64", "bucket_256")}, group_sizes(n, 8))
        builder.add(name, runs)
        paths.append(str(root / name))
    index = builder.table()
    local = pafs.LocalFileSystem()
    assert index.equals(index_from_files(local, str(root), paths, ["bucket_64", "bucket_256"]))
    assert pc.sum(index["rows"]).as_py() == 66 and index["row_group"].to_pylist().count(0) >= 4
    assert pq.ParquetFile(paths[0]).metadata.num_row_groups == 5  # 37 rows in groups of 8
    # Sorted files need at most (row groups + bucket combinations - 1) runs; the unsorted one needs more.
    names, counts = np.unique(index["file"].to_numpy(zero_copy_only=False), return_counts=True)
    per_file = dict(zip(names.tolist(), counts.tolist(), strict=True))
    assert per_file["data/bucket=6x9/part-00000-000.parquet"] <= 5 + 3 - 1
    for column in ("bucket_64", "bucket_256"):
        for world in (1, 2, 3, 7):
            for rank in range(world):
                got = Shard.from_table(str(root), index, column, rank, world)
                assert_same_shard(got, Shard.from_files(local, in_index_order(paths, str(root)), column, rank, world))
    with pytest.raises(ValueError, match="not sorted or not contiguous"):
        Shard.from_table(str(root), index.take([1, 0, *range(2, index.num_rows)]), "bucket_64", 0, 1)

    # The index file in several row groups (blocks): each starts at a data row group, the footer carries the
    # layout, and a rank's blocks together deal the same units as the footers.
    monkeypatch.setattr(row_index, "INDEX_ROWS_PER_GROUP", 4)
    builder.write(str(root))
    for world in (1, 2, 3):
        for rank in range(world):
            view = ShardIndex.from_index(str(root), "bucket_256", 256, rank, world, filesystem=local)
            assert view.blocks > 4 and sum(view.layout.group_units) == index["start"].to_pylist().count(0)
            assert view.rows == 66 and sum(view.bucket_sizes().values()) == 66
            want = Shard.from_files(local, in_index_order(paths, str(root)), "bucket_256", rank, world)
            assert_same_shard(view.whole(), want)
            assert sum(view.shard([b]).rows for b in range(view.blocks)) == want.rows
    # An index from before footers carried the layout: one row group is read whole; more need `vitok index`.
    pq.write_table(index, root / INDEX, row_group_size=index.num_rows)
    old = ShardIndex.from_index(str(root), "bucket_64", 64, 0, 2, filesystem=local)
    assert_same_shard(old.whole(), Shard.from_files(local, in_index_order(paths, str(root)), "bucket_64", 0, 2))
    pq.write_table(index, root / INDEX, row_group_size=10)
    with pytest.raises(MissingIndexError, match=rf"written before indexes carried their layout.*vitok index {root}"):
        ShardIndex.from_index(str(root), "bucket_64", 64, 0, 2, filesystem=local)


# ------------------------------------------------------------------------------------------------
# A real ingest output
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ingested(ray_local, tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("row_index")
    make_training_folder(root / "photos", n=28, sizes=SIZES)
    overrides = [f"ingest.source={root / 'photos'}", f"ingest.root={root / 'runs'}", "ingest.files_per_task=6"]
    cfg = load_config("tiny", [*overrides, "ingest.rows_per_file=5", "ingest.label_from=folder"])
    return run_ingest(cfg)


@pytest.mark.slow
def test_ingest_writes_an_index_matching_its_data_files(ingested):
    out = IngestOutput(ingested["output"])
    index = assert_index_matches_data(out.uri, ["bucket_64", "bucket_256"])
    assert ingested["code_version"] == "ingest-4"
    assert ingested["index"] == {"file": INDEX, "row_groups": len(out.data_files()[1]), "runs": index.num_rows}
    assert pc.sum(index["rows"]).as_py() == out.counts["accepted"] == 28
    for budget in (64, 256):
        sizes: dict[str, int] = {}
        for bucket, rows in zip(index[f"bucket_{budget}"].to_pylist(), index["rows"].to_pylist(), strict=True):
            sizes[bucket] = sizes.get(bucket, 0) + rows
        assert sizes == out.buckets(budget)
    assert len(out.buckets(256)) > len(out.buckets(64))  # the second budget splits first-budget buckets
    assert out.data_uris() == out.data_files()[1]  # local: Arrow's paths are the URIs
    for path in out.data_files()[1]:  # each file sorted by its bucket at the later budget, then id
        rows = pq.read_table(path, columns=["id", "bucket_256"]).to_pylist()
        assert rows == sorted(rows, key=lambda r: (r["bucket_256"], r["id"]))


@pytest.mark.slow
def test_shard_index_reads_only_the_index_and_equals_the_footers(ingested):
    uri = ingested["output"]
    local_fs, files = IngestOutput(uri).data_files()
    for budget in (64, 256):
        for world in (1, 2, 3):
            for rank in range(world):
                got = ShardIndex.build(uri, budget, rank, world).whole()
                want = Shard.from_files(local_fs, in_index_order(files, uri), f"bucket_{budget}", rank, world)
                assert_same_shard(got, want)
                assert got.files == in_index_order(files, uri)
    with pytest.raises(ValueError, match=r"row groups in the output at .*, fewer than the 99 ranks"):
        ShardIndex.build(uri, 64, rank=98, world=99)

    filesystem, handler = counting(fsspec.filesystem("file"))
    index = ShardIndex.build(uri, 256, rank=1, world=2, filesystem=filesystem)
    started = (len(handler.opened), handler.reads)
    assert handler.opened == [f"{uri}/{INDEX}"] and handler.reads <= 3, (handler.opened, handler.reads)
    index.whole()
    after = (len(handler.opened), handler.reads)
    assert set(handler.opened) == {f"{uri}/{INDEX}"}, handler.opened  # no data file
    filesystem, handler = counting(fsspec.filesystem("file"))
    Shard.from_files(filesystem, files, "bucket_256", rank=1, world=2)
    before = (len(handler.opened), handler.reads)
    assert before[0] >= len(files) and before[1] > len(files) > 1  # a footer per file, a read per row group
    print(f"\nplanning one rank (1 of 2), {len(files)} files: opens, reads before {before}, after {after}")
    print(f"start-up (the index's footer only): {started}")


@pytest.mark.slow
def test_evaluate_and_cache_latents_plan_from_the_index(ingested, tmp_path):
    from jobs.evaluate import list_images

    uri = ingested["output"]
    files = IngestOutput(uri).data_files()[1]
    want = []  # the plan as evaluate made it from the footers: row groups in file order, 2 images a task, 7
    for path in in_index_order(files, uri):  # the index lists files in hash order
        for group in range(pq.ParquetFile(path).metadata.num_row_groups):
            rows = pq.ParquetFile(path).metadata.row_group(group).num_rows
            for start in range(0, rows, 2):
                count = min(2, rows - start, 7 - sum(t["count"] for t in want))
                if count > 0:
                    want.append({"kind": "ingest", "uri": path, "group": group, "start": start, "count": count})
    for t, first in zip(want, np.cumsum([0] + [t["count"] for t in want]), strict=False):
        t["first"] = int(first)
    cfg = load_config("tiny", [f"evaluate.data={uri}", "evaluate.images_per_task=2", "evaluate.max_images=7"])
    described, tasks = list_images(cfg)
    assert tasks == want and described["images"] == 7


@pytest.mark.slow
def test_old_output_fails_with_the_fix_and_vitok_index_repairs_it(ingested, tmp_path, capsys):
    from jobs.evaluate import list_images

    original = ingested["output"]
    old = str(tmp_path / "old")
    shutil.copytree(original, old)
    Path(old, INDEX).unlink()
    # An ingest-2 layout: rows of a file in any order at the later budget (here reversed); the repair must
    # index it as it is.
    for path in IngestOutput(old).data_files()[1]:
        table = pq.read_table(path)
        _write(path, table.take(list(range(table.num_rows))[::-1]), rows_per_group=5)

    for fails in (
        lambda: ShardIndex.build(old, 64),
        lambda: IngestOutput(old).data_uris(),
        lambda: list_images(load_config("tiny", [f"evaluate.data={old}"])),
    ):
        with pytest.raises(MissingIndexError, match=rf"no index\.parquet.*rerun ingest.*`vitok index {old}`"):
            fails()

    with pytest.raises(SystemExit) as done:
        vitok(["index", old])
    assert done.value.code == 0 and f"wrote {old}/{INDEX}: ingest output" in capsys.readouterr().out
    repaired = assert_index_matches_data(old, ["bucket_64", "bucket_256"])
    assert repaired.num_rows >= read_index(original).num_rows
    local_fs, files = IngestOutput(old).data_files()
    for budget in (64, 256):
        for rank in range(2):
            got = ShardIndex.build(old, budget, rank, 2).whole()
            assert_same_shard(got, Shard.from_files(local_fs, in_index_order(files, old), f"bucket_{budget}", rank, 2))

    Path(old, "_SUCCESS").unlink()  # an unfinished output: refused in one line, nothing written
    with pytest.raises(SystemExit) as done:
        vitok(["index", old])
    assert done.value.code == 1 and "is not a completed output" in capsys.readouterr().err


@pytest.mark.slow
def test_index_on_s3(ingested, s3_endpoint):
    import s3fs

    bucket = s3_endpoint("vitok-row-index")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    local = ingested["output"]
    uri = f"s3://{bucket}/runs/ingest/{Path(local).name}"
    fs.put(local, uri.removeprefix("s3://"), recursive=True)
    fs.invalidate_cache()

    filesystem, handler = counting(fs)
    got = ShardIndex.build(uri, 256, rank=0, world=2, filesystem=filesystem).whole()
    assert set(handler.opened) == {f"{uri.removeprefix('s3://')}/{INDEX}"} and handler.reads <= 6
    assert_same_shard(got, ShardIndex.build(local, 256, rank=0, world=2).whole())
    assert got.files == [
        f"{uri.removeprefix('s3://')}/{p.removeprefix(local + '/')}" for p in ShardIndex.build(local, 256).whole().files
    ]
    assert IngestOutput(uri).data_uris() == [
        f"{uri}/{p.removeprefix(local + '/')}" for p in IngestOutput(local).data_files()[1]
    ]

    fs.rm(f"{uri.removeprefix('s3://')}/{INDEX}")
    fs.invalidate_cache()
    with pytest.raises(MissingIndexError, match=f"`vitok index {uri}`"):
        ShardIndex.build(uri, 256)
    with pytest.raises(SystemExit) as done:
        vitok(["index", uri])
    assert done.value.code == 0
    assert read_index(uri).equals(read_index(local))
    assert_same_shard(
        ShardIndex.build(uri, 64, rank=1, world=3).whole(), ShardIndex.build(local, 64, rank=1, world=3).whole()
    )
