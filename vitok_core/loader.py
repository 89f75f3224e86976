"""NaFlex training batches from an ingest output: one bucket per batch, disjoint shards, exact resume.

    index = ShardIndex.build("runs/ingest/<key>", budget=256, rank=0, world=8)
    loader = BucketLoader(index, micro_batch=32, seed=0, patch_size=16, augment=cfg.data.augment)
    for batch in loader.batches(start=position):   # position = batches this rank already consumed
        ...

Why a torch DataLoader over the Parquet files and not Ray Data's `iter_torch_batches`: every batch must
hold images of one bucket (dense, no padding), and a resumed run must continue at exactly the batch where
the checkpoint was taken. Here the order of batches is a pure function of (seed, rank, budget, epoch) and
of the bucket column alone, computed without reading any image, so a resume skips N batches in
milliseconds; decode and augmentation run in DataLoader processes, in order. The bucket of every row comes
from the output's row-group index (`index.parquet`, vitok_core/row_index.py), so building a rank's index
reads that one file and opens no data file.

Sharding: the unit is a Parquet row group (~256 images of one first-budget bucket). Units are dealt
round-robin to ranks, so ranks read disjoint data and differ by at most one unit.

Shuffling: each epoch permutes this rank's units; units are taken `window` at a time, their rows grouped
by bucket at the current budget, shuffled, cut into micro-batches, and the window's batches shuffled.
A bucket's rows that do not fill a batch carry over to the next window, so no image waits more than an
epoch. Buckets are thus drawn in proportion to their size. Each DataLoader process keeps the row groups of
the current window in a small cache; with P processes a row group is read up to P times (bytes are cheap
next to decoding them).

Augmentation (method.md section 3): with probability rrc_prob a *batch* is a random-resized-crop batch
(every image cropped to rrc_size^2), else native; the choice is per batch so that a batch stays in one
bucket. Horizontal flips are per image. All randomness of batch k comes from (seed, rank, budget, k).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from vitok_core.images import decode_image, to_tensor
from vitok_core.io_retry import retry_call
from vitok_core.naflex import PatchDict, collate, patchify, random_augment, resize_to_budget

__all__ = ["BucketLoader", "LatentLoader", "ShardIndex"]

log = logging.getLogger("vitok.loader")


@dataclass
class ShardIndex:
    """One rank's rows of an ingest output at one budget: where each row is and which bucket it is in."""

    filesystem: pafs.FileSystem
    files: list[str]  # data files, on `filesystem`
    column: str  # the bucket column the index groups rows by
    units: np.ndarray  # [U, 2] int: (file index, row group) of this rank's units
    unit_start: np.ndarray  # [U + 1] int: rows of unit u are unit_start[u]:unit_start[u + 1]
    bucket_codes: np.ndarray  # [R] int: each row's bucket, an index into `buckets`
    buckets: list[str]  # "RxC" grids at `budget`
    budget: int
    rank: int
    world: int

    @classmethod
    def build(
        cls, uri: str, budget: int, rank: int = 0, world: int = 1, filesystem: pafs.FileSystem | None = None
    ) -> ShardIndex:
        """This rank's rows of a completed ingest output, by bucket at `budget`, from its index.parquet alone
        (no data file is opened). `filesystem`: one holding the output's paths, instead of Arrow's for `uri`."""
        from vitok_core.ingest_output import IngestOutput  # the reader checks _SUCCESS and the budgets

        output = IngestOutput(uri)
        if budget not in output.budgets:
            raise KeyError(f"budget {budget} was not ingested in {uri}; budgets: {output.budgets}")
        return cls.from_index(output.uri, f"bucket_{budget}", budget, rank, world, filesystem=filesystem)

    @classmethod
    def from_index(
        cls,
        uri: str,
        column: str,
        budget: int,
        rank: int,
        world: int,
        filesystem: pafs.FileSystem | None = None,
        stage: str = "ingest",
    ) -> ShardIndex:
        """This rank's rows of the output at `uri` (ingest, or cache_latents with column "bucket") from its
        row-group index (vitok_core.row_index): one file, only the columns this budget needs. The same units,
        rows and bucket codes as `from_files` over the output's data files."""
        from vitok_core.row_index import read_index, resolve

        filesystem, root = resolve(uri, filesystem)
        table = read_index(uri, ["file", "row_group", "start", "rows", column], filesystem, stage)
        return cls.from_table(filesystem, root, table, column, budget, rank, world)

    @classmethod
    def from_table(
        cls,
        filesystem: pafs.FileSystem,
        root: str,
        table: pa.Table,
        column: str,
        budget: int,
        rank: int,
        world: int,
    ) -> ShardIndex:
        """From an index table (file relative to `root`, row_group, start, rows, `column`), sorted by file,
        row group and start. Units are the row groups in that order, dealt round-robin as in `from_files`."""
        n = table.num_rows
        files = table.column("file").combine_chunks().dictionary_encode()
        file_codes = files.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        groups, starts, rows = (table.column(c).to_numpy().astype(np.int64) for c in ("row_group", "start", "rows"))
        new_unit = np.ones(n, dtype=bool)
        new_unit[1:] = (file_codes[1:] != file_codes[:-1]) | (groups[1:] != groups[:-1])
        expected_start = np.zeros(n, dtype=np.int64)  # a row group's runs are contiguous and start at row 0
        expected_start[1:] = starts[:-1] + rows[:-1]
        expected_start[new_unit] = 0
        if n and (np.any(starts != expected_start) or np.any(rows < 1) or np.any(np.diff(file_codes) < 0)):
            raise ValueError(f"the row-group index under {root} is not sorted or not contiguous")
        unit_of_run = np.cumsum(new_unit) - 1
        n_units = int(unit_of_run[-1]) + 1 if n else 0
        if rank >= n_units:
            raise ValueError(f"{n_units} row groups in {len(files.dictionary)} files, fewer than the {world} ranks")
        mine = unit_of_run % world == rank
        local = (unit_of_run[mine] - rank) // world  # this rank's unit number of each of its runs
        unit_rows = np.bincount(local, weights=rows[mine]).astype(np.int64)
        first = mine & new_unit
        buckets = table.column(column).combine_chunks().filter(pa.array(mine)).dictionary_encode()
        codes = buckets.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        return cls(
            filesystem=filesystem,
            files=[f"{root}/{name}" for name in files.dictionary.to_pylist()],
            column=column,
            units=np.stack([file_codes[first], groups[first]], axis=1).reshape(-1, 2),
            unit_start=np.concatenate([[0], np.cumsum(unit_rows)]).astype(np.int64),
            bucket_codes=np.repeat(codes, rows[mine]),
            buckets=buckets.dictionary.to_pylist(),
            budget=budget,
            rank=rank,
            world=world,
        )

    @classmethod
    def from_files(
        cls, filesystem: pafs.FileSystem, files: list[str], column: str, budget: int, rank: int, world: int
    ) -> ShardIndex:
        """Read the footers of every file and the bucket column of this rank's row groups: a request per file
        and per row group, which at scale takes hours (docs/scaling.md section 3). The readers use
        `from_index`; this stays as the reference the index is checked against."""
        all_units = []
        for f, path in enumerate(files):
            meta = pq.ParquetFile(path, filesystem=filesystem).metadata
            all_units += [(f, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
        mine = all_units[rank::world]
        if not mine:
            raise ValueError(f"{len(all_units)} row groups in {len(files)} files, fewer than the {world} ranks")
        names: dict[str, int] = {}
        codes, starts = [], [0]
        opened: dict[int, pq.ParquetFile] = {}
        for f, g, rows in mine:
            parquet = opened.setdefault(f, pq.ParquetFile(files[f], filesystem=filesystem))
            values = parquet.read_row_group(g, columns=[column]).column(0).to_pylist()
            assert len(values) == rows, (files[f], g)
            codes += [names.setdefault(b, len(names)) for b in values]
            starts.append(starts[-1] + rows)
        return cls(
            filesystem=filesystem,
            files=files,
            column=column,
            units=np.array([(f, g) for f, g, _ in mine], dtype=np.int64).reshape(-1, 2),
            unit_start=np.array(starts, dtype=np.int64),
            bucket_codes=np.array(codes, dtype=np.int64),
            buckets=list(names),
            budget=budget,
            rank=rank,
            world=world,
        )

    @property
    def rows(self) -> int:
        return int(self.unit_start[-1])

    def bucket_sizes(self) -> dict[str, int]:
        counts = np.bincount(self.bucket_codes, minlength=len(self.buckets))
        return {b: int(n) for b, n in zip(self.buckets, counts, strict=True)}


def batch_plan(index: ShardIndex, micro_batch: int, seed: int, window: int) -> Iterator[np.ndarray]:
    """The endless, deterministic sequence of this rank's micro-batches (arrays of row numbers)."""
    if max(index.bucket_sizes().values()) < micro_batch:
        raise ValueError(
            f"rank {index.rank}: no bucket at budget {index.budget} holds micro_batch={micro_batch} images "
            f"(largest {max(index.bucket_sizes().values())}); lower train.micro_batch_size or add data"
        )
    n_units = len(index.units)
    for epoch in itertools.count():
        rng = np.random.default_rng([seed, index.rank, index.world, index.budget, epoch])
        order = rng.permutation(n_units)
        carry = np.empty(0, dtype=np.int64)
        for w in range(0, n_units, window):
            rows = [np.arange(index.unit_start[u], index.unit_start[u + 1]) for u in order[w : w + window]]
            rows = np.concatenate([carry, *rows])
            codes = index.bucket_codes[rows]
            batches, leftover = [], []
            for code in np.unique(codes):
                members = rng.permutation(rows[codes == code])
                full = len(members) // micro_batch * micro_batch
                batches += np.split(members[:full], full // micro_batch) if full else []
                leftover.append(members[full:])
            carry = np.concatenate(leftover) if leftover else np.empty(0, dtype=np.int64)
            for b in rng.permutation(len(batches)):
                yield batches[b]


@dataclass(frozen=True)
class Augment:
    rrc_prob: float = 0.25
    rrc_size: int = 256
    rrc_scale: tuple[float, float] = (0.8, 1.0)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5

    @classmethod
    def from_config(cls, augment: Any) -> Augment:
        return cls(
            rrc_prob=float(augment.rrc_prob),
            rrc_size=int(augment.rrc_size),
            rrc_scale=tuple(augment.rrc_scale),
            rrc_ratio=tuple(augment.rrc_ratio),
            flip_prob=float(augment.flip_prob),
        )


class _RowGroups(torch.utils.data.Dataset):
    """Item (batch number, row numbers) -> one batch, reading row groups through a small LRU cache.
    Runs in DataLoader processes; subclasses say which columns they need and how rows become a batch."""

    columns: tuple[str, ...] = ()
    retry: Any = None  # the io config section for reading row groups (vitok_core/io_retry.py); None = defaults

    def __init__(self, index: ShardIndex, cache: int) -> None:
        self.index, self.cache_size = index, cache
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()

    def __len__(self) -> int:  # items come from the sampler; the length is not used
        return 0

    def _unit(self, unit: int) -> pa.Table:
        if unit in self._cache:
            self._cache.move_to_end(unit)
            return self._cache[unit]
        f, g = self.index.units[unit]

        def read() -> pa.Table:  # transient errors retried; one that outlives its retries fails the run's step
            parquet = pq.ParquetFile(self.index.files[f], filesystem=self.index.filesystem)
            return parquet.read_row_group(int(g), columns=[*self.columns, self.index.column])

        table = retry_call(read, self.retry, f"{self.index.files[f]} row group {g}")
        self._cache[unit] = table
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return table

    def rows(self, rows: np.ndarray) -> Iterator[tuple[pa.Table, int]]:
        """(row group table, row within it) for each row number, in order."""
        units = np.searchsorted(self.index.unit_start, rows, side="right") - 1
        for row, unit in zip(rows.tolist(), units.tolist(), strict=True):
            yield self._unit(unit), row - int(self.index.unit_start[unit])


class _Batches(_RowGroups):
    """Images: decode, augment, budget resize, patchify, collate."""

    columns = ("bytes",)

    def __init__(self, index: ShardIndex, patch_size: int, seed: int, augment: Augment, cache: int) -> None:
        super().__init__(index, cache)
        self.patch_size, self.seed, self.augment = patch_size, seed, augment

    def __getitem__(self, item: tuple[int, np.ndarray]) -> PatchDict:
        number, rows = item
        index = self.index
        generator = torch.Generator().manual_seed(
            int(np.random.default_rng([self.seed, index.rank, index.budget, number]).integers(2**62))
        )
        aug = self.augment
        rrc = float(torch.rand((), generator=generator)) < aug.rrc_prob
        samples, buckets = [], set()
        for table, i in self.rows(rows):
            buckets.add(table.column(1)[i].as_py())
            image = to_tensor(decode_image(table.column(0)[i].as_py()))
            image = random_augment(
                image,
                generator,
                rrc_prob=1.0 if rrc else 0.0,
                rrc_size=aug.rrc_size,
                rrc_scale=aug.rrc_scale,
                rrc_ratio=aug.rrc_ratio,
                flip_prob=aug.flip_prob,
            )
            samples.append(patchify(resize_to_budget(image, self.patch_size, index.budget), self.patch_size))
        grids = {tuple(s["grid"].tolist()) for s in samples}
        if len(buckets) != 1 or len(grids) != 1:  # the plan groups by bucket: this is a bug, never data
            raise RuntimeError(f"batch {number} mixes buckets {sorted(buckets)} / grids {sorted(grids)}")
        batch = collate(samples)
        batch["number"] = torch.tensor(number)
        batch["rrc"] = torch.tensor(rrc)
        return batch


class _PlanSampler(torch.utils.data.Sampler):
    def __init__(self, plan: Iterator[np.ndarray], start: int) -> None:
        self.plan, self.start = plan, start

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        yield from enumerate(itertools.islice(self.plan, self.start, None), start=self.start)


class BucketLoader:
    """Micro-batches of one rank at one budget, in plan order, decoded by `workers` processes."""

    def __init__(
        self,
        index: ShardIndex,
        micro_batch: int,
        seed: int,
        patch_size: int,
        augment: Augment | None = None,
        window: int = 16,
        workers: int = 2,
        prefetch: int = 2,
        pin_memory: bool = False,
    ) -> None:
        self.index, self.micro_batch, self.seed, self.patch_size = index, micro_batch, seed, patch_size
        self.pin_memory = pin_memory  # page-locked batches: host-to-GPU copies that do not block the host
        self.augment = augment or Augment()
        self.window, self.workers, self.prefetch = window, workers, prefetch
        self.retry: Any = None  # the io config section, handed to the dataset (vitok_core/io_retry.py)

    def plan(self) -> Iterator[np.ndarray]:
        return batch_plan(self.index, self.micro_batch, self.seed, self.window)

    def dataset(self) -> _RowGroups:
        dataset = _Batches(self.index, self.patch_size, self.seed, self.augment, cache=self.window)
        dataset.retry = self.retry
        return dataset

    def batches(self, start: int = 0) -> Iterator[PatchDict]:
        """Batches number `start`, `start + 1`, ... (forever). Each carries its `number`."""
        dataset = self.dataset()
        loader = torch.utils.data.DataLoader(
            dataset,
            sampler=_PlanSampler(self.plan(), start),
            batch_size=None,
            num_workers=self.workers,
            prefetch_factor=self.prefetch if self.workers else None,
            persistent_workers=False,
            pin_memory=self.pin_memory,
            multiprocessing_context="spawn" if self.workers and os.name != "nt" else None,
        )
        iterator = iter(loader)
        try:
            yield from iterator
        finally:  # shut the worker processes down now, not whenever the generator is collected
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                try:
                    shutdown()
                except RuntimeError as err:
                    # A spawned worker that imported pyarrow sometimes aborts in its own interpreter exit,
                    # after its last batch; the batches are already delivered, so this is not a data error
                    # (a worker dying while batches are being read still raises in the loop above).
                    log.debug("DataLoader shutdown: %s", err)


def grid_of(batch: PatchDict) -> tuple[int, int]:
    """The one (rows, cols) grid of a bucket batch."""
    grids = {tuple(g) for g in batch["grid"].tolist()}
    if len(grids) != 1:
        raise ValueError(f"batch mixes grids {sorted(grids)}")
    return next(iter(grids))


def valid_tokens(batch: PatchDict) -> int:
    return int(batch["patch_mask"].sum())


def describe_buckets(sizes: dict[str, int], top: int = 5) -> str:
    ranked: Sequence[tuple[str, int]] = sorted(sizes.items(), key=lambda kv: -kv[1])
    shown = ", ".join(f"{b}:{n}" for b, n in ranked[:top])
    return f"{len(sizes)} buckets ({shown}{', ...' if len(ranked) > top else ''})"


class _LatentBatches(_RowGroups):
    """Cached latents (jobs/cache_latents.py rows): standardised tokens, class indices, grid positions."""

    columns = ("latent", "label", "rows", "cols", "channels", "dtype")

    def __init__(
        self, index: ShardIndex, classes: Sequence[str], mean: Sequence[float], std: Sequence[float], cache: int
    ) -> None:
        super().__init__(index, cache)
        self.class_index = {name: i for i, name in enumerate(classes)}
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)

    def __getitem__(self, item: tuple[int, np.ndarray]) -> dict[str, torch.Tensor]:
        from vitok_core.latents import from_bytes, grid_positions

        number, rows = item
        xs, labels, grids = [], [], set()
        for table, i in self.rows(rows):
            r, c, ch = (int(table.column(k)[i].as_py()) for k in ("rows", "cols", "channels"))
            z = from_bytes(table.column("latent")[i].as_py(), r * c, ch, table.column("dtype")[i].as_py())
            xs.append((z - self.mean) / self.std)
            labels.append(self.class_index[table.column("label")[i].as_py()])
            grids.add((r, c))
        if len(grids) != 1:  # the plan groups by bucket (= grid): this is a bug, never data
            raise RuntimeError(f"latent batch {number} mixes grids {sorted(grids)}")
        positions = grid_positions(*grids.pop())
        batch = {k: v[None].expand(len(xs), *v.shape).clone() for k, v in positions.items()}
        batch.update(x=torch.stack(xs), labels=torch.tensor(labels), number=torch.tensor(number))
        return batch


class LatentLoader(BucketLoader):
    """Micro-batches of cached latents of one grid, standardised with the cache's stats.json."""

    def __init__(
        self,
        index: ShardIndex,
        micro_batch: int,
        seed: int,
        classes: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        window: int = 16,
        workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(index, micro_batch, seed, patch_size=1, window=window, workers=workers, pin_memory=pin_memory)
        self.classes, self.mean, self.std = list(classes), list(mean), list(std)

    def dataset(self) -> _RowGroups:
        return _LatentBatches(self.index, self.classes, self.mean, self.std, cache=self.window)
