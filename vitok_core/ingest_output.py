"""Read an ingest output: its manifest, its buckets and their counts, and the rows of one bucket.

    out = IngestOutput("runs/ingest/<key>")          # or s3://bucket/runs/ingest/<key>
    out.buckets()                                    # {"13x19": 812, ...} at the first budget
    out.buckets(budget=1024)                         # the same images bucketed at 1024 tokens
    for row in out.iter_rows("13x19", columns=["id", "bytes", "label"]):
        ...

Only a directory with `_SUCCESS` is opened. Rows are streamed batch by batch from Parquet; nothing
reads a whole bucket into memory. `out.index()` is the row-group index (`index.parquet`,
vitok_core/row_index.py): every row group's file, rows and buckets, without opening a data file.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from vitok_core.artifacts import MANIFEST, SUCCESS, absolute, join, read_json


class IngestOutput:
    """A completed ingest artifact (local path or any fsspec URI)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")
        self._fs, self._path = fsspec.core.url_to_fs(self.uri)
        if not self._fs.exists(join(self._path, SUCCESS)):
            raise FileNotFoundError(f"{self.uri} is not a completed ingest output (no {SUCCESS})")
        self.manifest: dict[str, Any] = read_json(join(self.uri, MANIFEST))
        self.budgets: list[int] = list(self.manifest["settings"]["budgets"])

    @property
    def counts(self) -> dict[str, Any]:
        return self.manifest["counts"]

    def buckets(self, budget: int | None = None) -> dict[str, int]:
        """Bucket ("RxC", the patch grid) -> number of accepted images, at `budget` (default: the first)."""
        budget = self.budgets[0] if budget is None else budget
        if budget not in self.budgets:
            raise KeyError(f"budget {budget} was not ingested; budgets: {self.budgets}")
        return dict(self.counts["per_bucket"][str(budget)])

    def _dataset(self, table: str = "data") -> pads.Dataset:
        # Arrow's own filesystem for the URI: the one the writer used (it may leave directory markers on S3
        # that a generic handler mistakes for files).
        uri = join(absolute(self.uri), table)
        filesystem, path = pafs.FileSystem.from_uri(uri)
        partitioning = "hive" if table == "data" else None
        return pads.dataset(path, filesystem=filesystem, format="parquet", partitioning=partitioning)

    def data_files(self) -> tuple[pafs.FileSystem, list[str]]:
        """Arrow's filesystem and the sorted paths of every data file (all buckets), by listing data/ (the
        planning readers use the index instead: `index`, `data_uris`)."""
        dataset = self._dataset()
        return dataset.filesystem, sorted(dataset.files)

    def index(self, columns: Sequence[str] | None = None) -> pa.Table:
        """The output's row-group index (vitok_core.row_index: file, row_group, start, rows, bucket_<T> for
        every budget), or only `columns` of it: one file, no data file opened. MissingIndexError (naming the
        fix) for an output written before outputs had one."""
        from vitok_core.row_index import read_index

        return read_index(self.uri, columns)

    def iter_index(self, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
        """The index in record batches, read one index row group at a time (for a reader that may stop early)."""
        from vitok_core.row_index import iter_index

        return iter_index(self.uri, columns)

    def data_uris(self) -> list[str]:
        """The URI of every data file, sorted (the order of `data_files`), from the index: no listing."""
        from vitok_core.row_index import index_files

        return [join(absolute(self.uri), name) for name in index_files(self.uri)]

    def iter_batches(
        self, bucket: str, budget: int | None = None, columns: Sequence[str] | None = None, batch_size: int = 256
    ) -> Iterator[pa.RecordBatch]:
        """Stream the accepted rows of one bucket (at `budget`) as Arrow record batches."""
        budget = self.budgets[0] if budget is None else budget
        if bucket not in self.buckets(budget):
            raise KeyError(f"no bucket {bucket!r} at budget {budget}; buckets: {sorted(self.buckets(budget))}")
        column = "bucket" if budget == self.budgets[0] else f"bucket_{budget}"
        scanner = self._dataset().scanner(
            columns=list(columns) if columns else None, filter=pads.field(column) == bucket, batch_size=batch_size
        )
        yield from scanner.to_batches()

    def iter_rows(self, bucket: str, budget: int | None = None, columns: Sequence[str] | None = None) -> Iterator[dict]:
        """Stream the accepted rows of one bucket as dicts."""
        for batch in self.iter_batches(bucket, budget, columns):
            yield from batch.to_pylist()

    def rejects(self) -> pa.Table:
        """The rejects table (source, reason, detail, ...); small: it holds no image bytes."""
        if not self._fs.exists(join(self._path, "rejects")):  # nothing rejected: no file was written
            return pa.table({name: pa.array([], pa.string()) for name in ("id", "source", "label", "reason", "detail")})
        return self._dataset("rejects").to_table()
