"""The training loader over a real ingest output: disjoint shards, one bucket per batch, exact resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from jobs.ingest import run as run_ingest
from tests.ingest_samples import make_training_folder
from vitok_core.config import load_config
from vitok_core.ingest_output import IngestOutput
from vitok_core.loader import Augment, BucketLoader, ShardIndex, batch_plan, grid_of

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
    shards = [ShardIndex.build(ingested, budget=64, rank=r, world=2) for r in range(2)]
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


def test_plan_is_deterministic_single_bucket_and_proportional(ingested):
    index = ShardIndex.build(ingested, budget=256, rank=0, world=1)
    first = list(itertools.islice(batch_plan(index, 4, seed=0, window=2), 40))
    again = list(itertools.islice(batch_plan(index, 4, seed=0, window=2), 40))
    other = list(itertools.islice(batch_plan(index, 4, seed=1, window=2), 40))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    for rows in first:
        assert len(rows) == 4 and len(set(index.bucket_codes[rows].tolist())) == 1
    # One epoch (15 batches of 4 from 3 buckets of 20) uses each image at most once; buckets by size.
    epoch = np.concatenate(first[:15])
    assert len(set(epoch.tolist())) == len(epoch) >= 48
    sizes = index.bucket_sizes()
    drawn = np.bincount(index.bucket_codes[epoch], minlength=len(sizes))
    assert all(abs(d - sizes[b]) < 4 for d, b in zip(drawn, index.buckets, strict=True))


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_resume_exactly(ingested, workers):
    index = ShardIndex.build(ingested, budget=64, rank=1, world=2)
    augment = Augment(rrc_prob=0.5, rrc_size=128)
    loader = BucketLoader(index, micro_batch=3, seed=0, patch_size=16, augment=augment, window=2, workers=workers)
    straight = list(itertools.islice(loader.batches(), 8))
    resumed = list(itertools.islice(loader.batches(start=5), 3))
    assert [int(b["number"]) for b in straight] == list(range(8))
    for a, b in zip(straight[5:], resumed, strict=True):
        assert int(a["number"]) == int(b["number"])
        assert torch.equal(a["patches"], b["patches"])
    for batch in straight:
        rows, cols = grid_of(batch)
        assert rows * cols <= 64 and bool(batch["patch_mask"].all())  # dense: no padding
        if bool(batch["rrc"]):
            assert (rows, cols) == (8, 8)  # a 128 x 128 crop at 64 tokens
    assert any(bool(b["rrc"]) for b in straight) and not all(bool(b["rrc"]) for b in straight)
