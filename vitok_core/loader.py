"""NaFlex training batches from an ingest output: one bucket per batch, disjoint shards, exact resume.

    index = ShardIndex.build("runs/ingest/<key>", budget=256, rank=0, world=8)   # the index's footer only
    loader = BucketLoader(index, micro_batch=32, seed=0, patch_size=16, augment=cfg.data.augment)
    for batch in loader.batches(start=position):   # a Position (0 at first); after it: Position.after(batch)
        ...

Why a torch DataLoader over the Parquet files and not Ray Data's `iter_torch_batches`: every batch must
hold images of one bucket (dense, no padding), and a resumed run must continue at exactly the batch where
the checkpoint was taken. Here the order of batches is a pure function of (seed, rank, world, budget) and of
the output's row-group index (`index.parquet`, vitok_core/row_index.py), computed without reading any image;
decode and augmentation run in DataLoader processes, in order, each given only the (file, row group, row) of
its batch's images.

Start-up does not grow with the output: a rank reads the index's footer (its layout: row groups per index
row group, rows per bucket), then one index row group (a *block*, ~65k runs: ~3.5k data files, ~7M images
at ingest's sizes) when its plan reaches it. The index lists files in hash order, so a block holds every
bucket in proportion. A position is (epoch, block, batch in the block, batch number), so a resume reads the
one block it is in; a count of batches (`start=N`) still works, by replaying the plan block by block.

Sharding: the unit is a Parquet row group (~256 images of one first-budget bucket). Units are dealt
round-robin to ranks by their number in the index, so ranks read disjoint data and differ by at most one unit.

Shuffling: each epoch visits the blocks in a random order (the same on every rank) and permutes this rank's
units of a block; units are taken `window` at a time, their rows grouped by bucket at the current budget,
shuffled, cut into micro-batches, and the window's batches shuffled. A bucket's rows that do not fill a batch
carry over to the next window; those left at a block's end (fewer than micro_batch per bucket) wait for the
next epoch, whose order differs. Buckets are thus drawn in proportion to their size. Each DataLoader process
keeps the row groups of the current window in a small cache; with P processes a row group is read up to P
times (bytes are cheap next to decoding them).

Augmentation (method.md section 3): with probability rrc_prob a *batch* is a random-resized-crop batch
(every image cropped to rrc_size^2), else native; the choice is per batch so that a batch stays in one
bucket. Horizontal flips are per image. All randomness of batch k comes from (seed, rank, budget, k).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, astuple, dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from vitok_core.images import decode_image, to_tensor
from vitok_core.io_retry import retry_call
from vitok_core.naflex import PatchDict, collate, patchify, random_augment, resize_to_budget
from vitok_core.row_index import IndexLayout

__all__ = ["BucketLoader", "LatentLoader", "Position", "Shard", "ShardIndex"]

log = logging.getLogger("vitok.loader")


@dataclass
class Shard:
    """One rank's rows in some of an output's index row groups: where each row is and which bucket it is in."""

    files: list[str]  # data files, on the index's filesystem
    units: np.ndarray  # [U, 2] int: (file index, row group) of this rank's units
    unit_start: np.ndarray  # [U + 1] int: rows of unit u are unit_start[u]:unit_start[u + 1]
    bucket_codes: np.ndarray  # [R] int: each row's bucket, an index into `buckets`
    buckets: list[str]  # "RxC" grids at the budget

    @classmethod
    def from_table(
        cls, root: str, table: pa.Table, column: str, rank: int, world: int, first_unit: np.ndarray | int = 0
    ) -> Shard:
        """From index runs (file relative to `root`, row_group, start, rows, `column`) in index order. Row group
        u of the table (counted from 0) is the output's unit number u + first_unit (per run, or one number for
        all), and is this rank's when that number % world == rank: the units are dealt round-robin."""
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
        mine = (unit_of_run + first_unit) % world == rank
        local = np.cumsum(mine & new_unit)[mine] - 1  # this rank's unit number of each of its runs
        unit_rows = np.bincount(local, weights=rows[mine]).astype(np.int64) if len(local) else np.zeros(0, np.int64)
        first = mine & new_unit
        buckets = table.column(column).combine_chunks().filter(pa.array(mine)).dictionary_encode()
        codes = buckets.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        return cls(
            files=[f"{root}/{name}" for name in files.dictionary.to_pylist()],
            units=np.stack([file_codes[first], groups[first]], axis=1).reshape(-1, 2),
            unit_start=np.concatenate([[0], np.cumsum(unit_rows)]).astype(np.int64),
            bucket_codes=np.repeat(codes, rows[mine]),
            buckets=buckets.dictionary.to_pylist(),
        )

    @classmethod
    def from_files(cls, filesystem: pafs.FileSystem, files: list[str], column: str, rank: int, world: int) -> Shard:
        """Read the footers of every file and the bucket column of this rank's row groups: a request per file
        and per row group, which at scale takes hours (docs/scaling.md section 3). The readers use the index;
        this stays as the reference it is checked against (every row group of the output, in `files` order)."""
        all_units = []
        for f, path in enumerate(files):
            meta = pq.ParquetFile(path, filesystem=filesystem).metadata
            all_units += [(f, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
        mine = all_units[rank::world]
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
            files=files,
            units=np.array([(f, g) for f, g, _ in mine], dtype=np.int64).reshape(-1, 2),
            unit_start=np.array(starts, dtype=np.int64),
            bucket_codes=np.array(codes, dtype=np.int64),
            buckets=list(names),
        )

    @property
    def rows(self) -> int:
        return int(self.unit_start[-1])

    def bucket_sizes(self) -> dict[str, int]:
        counts = np.bincount(self.bucket_codes, minlength=len(self.buckets))
        return {b: int(n) for b, n in zip(self.buckets, counts, strict=True)}

    def row_refs(self, rows: np.ndarray) -> tuple[list[tuple[str, int]], list[int]]:
        """(file, row group) and the row within it, of each row number: what a DataLoader process reads."""
        units = np.searchsorted(self.unit_start, rows, side="right") - 1
        refs = [(self.files[f], int(g)) for f, g in self.units[units].tolist()]
        return refs, (rows - self.unit_start[units]).tolist()


@dataclass
class ShardIndex:
    """One rank's view of an output at one budget, from its row-group index (vitok_core/row_index.py): the
    index's layout from its footer at once, then its rows an index row group (a block) at a time, when the
    plan reaches it. Start-up reads the footer and the first block, whatever the output's size."""

    filesystem: pafs.FileSystem
    root: str  # the output, on `filesystem`
    column: str  # the bucket column the plan groups rows by
    budget: int
    rank: int
    world: int
    layout: IndexLayout

    @classmethod
    def build(
        cls, uri: str, budget: int, rank: int = 0, world: int = 1, filesystem: pafs.FileSystem | None = None
    ) -> ShardIndex:
        """This rank's view of a completed ingest output at `budget`, from its index.parquet alone (no data
        file is opened). `filesystem`: one holding the output's paths, instead of Arrow's for `uri`."""
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
        """The view of the output at `uri` (ingest, or cache_latents with column "bucket"): its index's footer
        only (one or two requests)."""
        from vitok_core.row_index import read_layout, resolve

        filesystem, root = resolve(uri, filesystem)
        layout = read_layout(uri, filesystem, stage)
        if column not in layout.bucket_rows:
            raise KeyError(f"the index of {uri} has no column {column}; it has {sorted(layout.bucket_rows)}")
        units = sum(layout.group_units)
        if rank >= units:
            raise ValueError(f"{units} row groups in the output at {uri}, fewer than the {world} ranks")
        return cls(filesystem, root, column, budget, rank, world, layout)

    @property
    def blocks(self) -> int:
        """Index row groups: the plan's blocks."""
        return len(self.layout.group_runs)

    @property
    def rows(self) -> int:
        """Rows of the whole output (all ranks)."""
        return sum(self.layout.bucket_rows[self.column].values())

    def bucket_sizes(self) -> dict[str, int]:
        """Rows per bucket of the whole output (all ranks)."""
        return dict(self.layout.bucket_rows[self.column])

    def shard(self, blocks: Sequence[int], retry: Any = None) -> Shard:
        """This rank's rows in index row groups `blocks`: reads only those (`retry`: the io config section,
        vitok_core/io_retry.py; None = its defaults)."""
        from vitok_core.row_index import INDEX

        blocks = sorted(int(b) for b in blocks)
        columns = ["file", "row_group", "start", "rows", self.column]

        def read() -> pa.Table:
            with self.filesystem.open_input_file(f"{self.root}/{INDEX}") as f:
                return pq.ParquetFile(f).read_row_groups(blocks, columns=columns)

        table = retry_call(read, retry, f"{self.root}/{INDEX} row groups {blocks[:4]}")
        before = np.concatenate([[0], np.cumsum(self.layout.group_units)])
        runs = np.asarray(self.layout.group_runs, dtype=np.int64)[blocks]
        read_before = np.concatenate([[0], np.cumsum(np.asarray(self.layout.group_units)[blocks])])[:-1]
        first_unit = np.repeat(before[blocks] - read_before, runs)  # table unit number -> the output's
        return Shard.from_table(self.root, table, self.column, self.rank, self.world, first_unit)

    def whole(self) -> Shard:
        """This rank's rows in the whole output (every block): for checks, not for training at scale."""
        return self.shard(range(self.blocks))


@dataclass(frozen=True)
class Position:
    """Where a rank is in its endless plan: batch `offset` of block `block` (in the epoch's order) of
    `epoch`, the rank's batch `number` overall. A resume reads that one block, not the ones before it."""

    epoch: int = 0
    block: int = 0
    offset: int = 0
    number: int = 0

    def next(self) -> Position:
        return replace(self, offset=self.offset + 1, number=self.number + 1)

    def state(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def after(cls, batch: Mapping[str, Any]) -> Position:
        """The position following a batch the loader gave (its "position" entry)."""
        return cls(*(int(v) for v in batch["position"].tolist())).next()


def _block_batches(shard: Shard, micro_batch: int, window: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """One block's micro-batches (row numbers of `shard`), shuffled: units a window at a time, their rows
    grouped by bucket and shuffled, cut into batches; rows that do not fill a batch carry to the next window
    and, at the block's end, wait for the next epoch."""
    order = rng.permutation(len(shard.units))
    carry = np.empty(0, dtype=np.int64)
    for w in range(0, len(order), window):
        rows = [np.arange(shard.unit_start[u], shard.unit_start[u + 1]) for u in order[w : w + window]]
        rows = np.concatenate([carry, *rows])
        codes = shard.bucket_codes[rows]
        batches, leftover = [], []
        for code in np.unique(codes):
            members = rng.permutation(rows[codes == code])
            full = len(members) // micro_batch * micro_batch
            batches += np.split(members[:full], full // micro_batch) if full else []
            leftover.append(members[full:])
        carry = np.concatenate(leftover) if leftover else np.empty(0, dtype=np.int64)
        for b in rng.permutation(len(batches)):
            yield batches[b]


def batch_plan(
    index: ShardIndex, micro_batch: int, seed: int, window: int, start: Position | None = None, retry: Any = None
) -> Iterator[tuple[Position, Shard, np.ndarray]]:
    """The endless, deterministic sequence of this rank's micro-batches from `start`: (position, the block's
    shard, row numbers in it). Each epoch visits the blocks in a random order (the same on every rank) and
    shuffles within each block (`_block_batches`)."""
    start = start or Position()
    largest = max(index.bucket_sizes().values(), default=0)
    if largest < micro_batch * index.world:
        raise ValueError(
            f"rank {index.rank}: no bucket at budget {index.budget} holds micro_batch={micro_batch} images per "
            f"rank (largest {largest} over {index.world} ranks); lower train.micro_batch_size or add data"
        )
    number = start.number
    for epoch in itertools.count(start.epoch):
        order = np.random.default_rng([seed, index.world, index.budget, epoch]).permutation(index.blocks)
        first = start.block if epoch == start.epoch else 0
        yielded = False
        for block in range(first, index.blocks):
            shard = index.shard([order[block]], retry)
            rng = np.random.default_rng([seed, index.rank, index.world, index.budget, epoch, block])
            skip = start.offset if (epoch, block) == (start.epoch, start.block) else 0
            for offset, rows in enumerate(_block_batches(shard, micro_batch, window, rng)):
                yielded = True
                if offset >= skip:
                    yield Position(epoch, block, offset, number), shard, rows
                    number += 1
        if first == 0 and not yielded:
            raise ValueError(
                f"rank {index.rank}: a whole epoch at budget {index.budget} gave no batch of {micro_batch} "
                f"images of one bucket; lower train.micro_batch_size or add data"
            )


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
    """Item (position, (file, row group) and row within it of each image) -> one batch, reading row groups
    through a small LRU cache. Runs in DataLoader processes, which get this small object and never the index;
    subclasses say which columns they need and how rows become a batch."""

    columns: tuple[str, ...] = ()
    retry: Any = None  # the io config section for reading row groups (vitok_core/io_retry.py); None = defaults

    def __init__(self, index: ShardIndex, cache: int) -> None:
        self.filesystem, self.column, self.rank, self.budget = index.filesystem, index.column, index.rank, index.budget
        self.cache_size = cache
        self._cache: OrderedDict[tuple[str, int], pa.Table] = OrderedDict()

    def __len__(self) -> int:  # items come from the sampler; the length is not used
        return 0

    def _unit(self, ref: tuple[str, int]) -> pa.Table:
        if ref in self._cache:
            self._cache.move_to_end(ref)
            return self._cache[ref]
        path, group = ref

        def read() -> pa.Table:  # transient errors retried; one that outlives its retries fails the run's step
            parquet = pq.ParquetFile(path, filesystem=self.filesystem)
            return parquet.read_row_group(group, columns=[*self.columns, self.column])

        table = retry_call(read, self.retry, f"{path} row group {group}")
        self._cache[ref] = table
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return table

    def rows(self, refs: list[tuple[str, int]], within: list[int]) -> Iterator[tuple[pa.Table, int]]:
        """(row group table, row within it) for each image, in order."""
        for ref, row in zip(refs, within, strict=True):
            yield self._unit(ref), row


_Item = tuple[tuple[int, int, int, int], list[tuple[str, int]], list[int]]  # position, refs, rows within


class _Batches(_RowGroups):
    """Images: decode, augment, budget resize, patchify, collate."""

    columns = ("bytes",)

    def __init__(self, index: ShardIndex, patch_size: int, seed: int, augment: Augment, cache: int) -> None:
        super().__init__(index, cache)
        self.patch_size, self.seed, self.augment = patch_size, seed, augment

    def __getitem__(self, item: _Item) -> PatchDict:
        position, refs, within = item
        number = position[3]
        generator = torch.Generator().manual_seed(
            int(np.random.default_rng([self.seed, self.rank, self.budget, number]).integers(2**62))
        )
        aug = self.augment
        rrc = float(torch.rand((), generator=generator)) < aug.rrc_prob
        samples, buckets = [], set()
        for table, i in self.rows(refs, within):
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
            samples.append(patchify(resize_to_budget(image, self.patch_size, self.budget), self.patch_size))
        grids = {tuple(s["grid"].tolist()) for s in samples}
        if len(buckets) != 1 or len(grids) != 1:  # the plan groups by bucket: this is a bug, never data
            raise RuntimeError(f"batch {number} mixes buckets {sorted(buckets)} / grids {sorted(grids)}")
        batch = collate(samples)
        batch["number"] = torch.tensor(number)
        batch["position"] = torch.tensor(position)
        batch["rrc"] = torch.tensor(rrc)
        return batch


class _PlanSampler(torch.utils.data.Sampler):
    def __init__(self, plan: Iterator[tuple[Position, Shard, np.ndarray]], skip: int) -> None:
        self.plan, self.skip = plan, skip

    def __iter__(self) -> Iterator[_Item]:
        for position, shard, rows in itertools.islice(self.plan, self.skip, None):
            refs, within = shard.row_refs(rows)
            yield astuple(position), refs, within


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
        self.retry: Any = None  # the io config section for the plan's and the dataset's reads (io_retry.py)

    def plan(self, start: Position | None = None) -> Iterator[tuple[Position, Shard, np.ndarray]]:
        return batch_plan(self.index, self.micro_batch, self.seed, self.window, start, self.retry)

    def dataset(self) -> _RowGroups:
        dataset = _Batches(self.index, self.patch_size, self.seed, self.augment, cache=self.window)
        dataset.retry = self.retry
        return dataset

    def batches(self, start: Position | Mapping[str, int] | int = 0) -> Iterator[PatchDict]:
        """The batches from `start` on (forever): a Position (or its `state()`), where a resume reads only
        the block it is in; or a count of batches from the beginning, replayed block by block. Each batch
        carries its `number` and `position` (`Position.after(batch)` is where to resume after it)."""
        if isinstance(start, int):
            begin, skip = Position(), start
        else:
            begin, skip = (start if isinstance(start, Position) else Position(**start)), 0
        dataset = self.dataset()
        loader = torch.utils.data.DataLoader(
            dataset,
            sampler=_PlanSampler(self.plan(begin), skip),
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

    def __getitem__(self, item: _Item) -> dict[str, torch.Tensor]:
        from vitok_core.latents import from_bytes, grid_positions

        position, refs, within = item
        number = position[3]
        xs, labels, grids = [], [], set()
        for table, i in self.rows(refs, within):
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
        batch["position"] = torch.tensor(position)
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
