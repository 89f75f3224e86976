"""The training loader over a real ingest output: disjoint shards, one bucket per batch, exact resume."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from jobs.ingest import run as run_ingest
from tests.ingest_samples import make_training_folder
from vitok_core.config import load_config
from vitok_core.ingest_output import IngestOutput
from vitok_core.loader import Augment, BucketLoader, Position, ShardIndex, batch_plan, grid_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ingested(ray_local, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("loader")
    make_training_folder(root / "photos", n=60)
    cfg = load_config(
        "tiny",
        [f"ingest.source={root / 'photos'}", f"ingest.root={root / 'runs'}", "ingest.files_per_task=16"],
    )
    return run_ingest(cfg)["output"]


def test_shards_are_disjoint_and_cover_everything(ingested):
    out = IngestOutput(ingested)
    shards = [ShardIndex.build(ingested, budget=64, rank=r, world=2).whole() for r in range(2)]
    units = [{tuple(u) for u in s.units} for s in shards]
    assert not units[0] & units[1]
    assert sum(s.rows for s in shards) == out.counts["accepted"] == 60
    total = {}
    for s in shards:
        for b, n in s.bucket_sizes().items():
            total[b] = total.get(b, 0) + n
    assert total == out.buckets(64)
    with pytest.raises(KeyError, match="budget 1024"):
        ShardIndex.build(ingested, budget=1024)


def rows_of(plan, n):
    return [rows for _, _, rows in itertools.islice(plan, n)]


def test_plan_is_deterministic_single_bucket_and_proportional(ingested):
    view = ShardIndex.build(ingested, budget=256, rank=0, world=1)
    assert view.blocks == 1  # a small output: one block, the whole rank
    index = view.whole()
    first = rows_of(batch_plan(view, 4, seed=0, window=2), 40)
    again = rows_of(batch_plan(view, 4, seed=0, window=2), 40)
    other = rows_of(batch_plan(view, 4, seed=1, window=2), 40)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    for rows in first:
        assert len(rows) == 4 and len(set(index.bucket_codes[rows].tolist())) == 1
    # One epoch (15 batches of 4 from 3 buckets of 20) uses each image at most once; buckets by size.
    epoch = np.concatenate(first[:15])
    assert len(set(epoch.tolist())) == len(epoch) >= 48
    sizes = index.bucket_sizes()
    assert sizes == view.bucket_sizes()  # world 1: the rank's rows are the output's
    drawn = np.bincount(index.bucket_codes[epoch], minlength=len(sizes))
    assert all(abs(d - sizes[b]) < 4 for d, b in zip(drawn, index.buckets, strict=True))


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_resume_exactly(ingested, workers):
    index = ShardIndex.build(ingested, budget=64, rank=1, world=2)
    augment = Augment(rrc_prob=0.5, rrc_size=128)
    loader = BucketLoader(index, micro_batch=3, seed=0, patch_size=16, augment=augment, window=2, workers=workers)
    straight = list(itertools.islice(loader.batches(), 8))
    replayed = list(itertools.islice(loader.batches(start=5), 3))  # a count of batches (old checkpoints)
    resumed = list(itertools.islice(loader.batches(start=Position.after(straight[4]).state()), 3))
    assert [int(b["number"]) for b in straight] == list(range(8))
    for a, b, c in zip(straight[5:], replayed, resumed, strict=True):
        assert int(a["number"]) == int(b["number"]) == int(c["number"])
        assert torch.equal(a["patches"], b["patches"]) and torch.equal(a["patches"], c["patches"])
        assert torch.equal(a["position"], c["position"])
    for batch in straight:
        rows, cols = grid_of(batch)
        assert rows * cols <= 64 and bool(batch["patch_mask"].all())  # dense: no padding
        if bool(batch["rrc"]):
            assert (rows, cols) == (8, 8)  # a 128 x 128 crop at 64 tokens
    assert any(bool(b["rrc"]) for b in straight) and not all(bool(b["rrc"]) for b in straight)


def test_blocks_cover_each_image_once_an_epoch_and_resume_reads_one_block(ingested, tmp_path, monkeypatch):
    """An output whose index has many blocks (index row groups of a few runs): a rank's epoch takes each of
    its images at most once, all but fewer than a batch per bucket per block; a resume at a position reads
    only that position's block and continues the plan exactly."""
    import shutil

    import vitok_core.row_index as row_index
    from jobs.ingest import _write

    copy = str(tmp_path / "blocks")
    shutil.copytree(ingested, copy)
    for path in IngestOutput(copy).data_files()[1]:  # row groups of 4 images: 15 units
        _write(path, pq.read_table(path), rows_per_group=4)
    monkeypatch.setattr(row_index, "INDEX_ROWS_PER_GROUP", 3)
    row_index.index_output(copy)
    view = ShardIndex.build(copy, budget=64, rank=0, world=2)
    whole = view.whole()
    assert view.blocks >= 5
    read: list[list[int]] = []
    shard = view.shard
    monkeypatch.setattr(view, "shard", lambda blocks, retry=None: read.append(list(blocks)) or shard(blocks, retry))
    plan = list(itertools.islice(batch_plan(view, 3, seed=0, window=2), 60))
    epochs = {}
    for position, block_shard, rows in plan:
        refs = block_shard.row_refs(rows)[0]
        assert len(rows) == 3 and len(set(block_shard.bucket_codes[rows].tolist())) == 1
        epochs.setdefault(position.epoch, []).extend(zip(refs, block_shard.row_refs(rows)[1], strict=True))
    assert len(epochs) >= 3
    batched = sum(n // 3 * 3 for b in range(view.blocks) for n in shard([b]).bucket_sizes().values())
    assert whole.rows - batched < 3 * len(whole.buckets) * view.blocks  # left at each block's end: < a batch
    for epoch in sorted(epochs)[:-1]:  # complete epochs: every batched image once
        assert len(set(epochs[epoch])) == len(epochs[epoch]) == batched
    assert [p.number for p, _, _ in plan] == list(range(60))

    position = plan[37][0]
    read.clear()
    resumed = list(itertools.islice(batch_plan(view, 3, seed=0, window=2, start=position), 5))
    assert read[0] == [int(np.random.default_rng([0, 2, 64, position.epoch]).permutation(view.blocks)[position.block])]
    assert len(read) <= 5  # the position's block, then those that follow: none before it
    for (p, a, x), (q, b, y) in zip(plan[37:42], resumed, strict=True):
        assert p == q and a.row_refs(x) == b.row_refs(y)
