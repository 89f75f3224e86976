"""The GPU path proven on CPU: collectives on the group's device, fp32 where bf16 loses (EMA, flow time,
RoPE), no device reads on the hot path, and the model built in shards under zero.Init.

The multi-rank cases run as real processes (gloo, DeepSpeed) from tests/distributed_cases.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jobs.train_common import StepStats
from tests.distributed_cases import run_ranks
from vitok_core.config import ConfigError, load_config
from vitok_core.flow import EMA, flow_loss
from vitok_core.model.layers import apply_rope, attention_mask, dense_hint, rope_2d
from vitok_core.naflex import collate, patchify, to_device


class _Stop(Exception):
    pass


def test_step_stats_reduces_one_tensor_on_the_device_it_is_given(monkeypatch):
    """NCCL has no CPU tensors: the step's collective must run on the given device, host numbers included."""
    seen = []

    def spy(tensor, op=None, **kwargs):
        seen.append((tensor.device, tensor.dtype, tuple(tensor.shape)))
        raise _Stop  # a meta tensor cannot be reduced; where it lives is what this test is about

    monkeypatch.setattr(torch.distributed, "all_reduce", spy)
    stats = StepStats(torch.device("meta"))
    stats.add("tokens", 128)
    stats.add("wait", 0.5)
    stats.add("loss", torch.ones((), device="meta"))
    stats.add("loss", torch.ones((), device="meta"))
    with pytest.raises(_Stop):
        stats.reduce_and_read()
    assert seen == [(torch.device("meta"), torch.float64, (3,))]


def test_step_stats_sums_across_micro_steps_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, op=None, **kw: None)  # world of one
    stats = StepStats(torch.device("cpu"))
    for value in (0.25, 0.5):
        stats.add("loss", torch.tensor(value, dtype=torch.bfloat16))
        stats.add("tokens", 64)
    assert stats.reduce_and_read() == {"tokens": 128.0, "loss": 0.75}
    assert stats.reduce_and_read() == {}  # read once: the next step starts empty


def test_rope_rotates_in_fp32_for_bf16_activations():
    row = torch.arange(0, 256, 4)[None]
    cos_sin = rope_2d(row, row.flip(-1), 64)
    x = torch.randn(1, 2, row.shape[1], 64).to(torch.bfloat16)
    got = apply_rope(x, cos_sin)
    want = apply_rope(x.float(), cos_sin).to(torch.bfloat16)  # one rounding, at the end
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    bf16_tables = tuple(t.to(torch.bfloat16) for t in cos_sin)
    old = torch.stack(  # what casting the tables to the activation dtype gave: visibly different
        [x[..., 0::2] * bf16_tables[0][:, None] - x[..., 1::2] * bf16_tables[1][:, None],
         x[..., 0::2] * bf16_tables[1][:, None] + x[..., 1::2] * bf16_tables[0][:, None]], dim=-1,
    ).flatten(-2)  # fmt: skip
    assert (old.float() - want.float()).abs().max() > 1e-2


def test_dense_hint_reads_only_the_host():
    batch = collate([patchify(torch.zeros(3, 64, 32), 16), patchify(torch.zeros(3, 32, 32), 16)])
    assert dense_hint(batch, 8) is False  # the second image is padded
    full = collate([patchify(torch.zeros(3, 64, 32), 16)] * 2)
    assert dense_hint(full, 8) is True
    on_device = to_device(full, "meta")
    assert on_device["grid"].device.type == "cpu" and on_device["patch_mask"].device.type == "meta"
    assert dense_hint(on_device, 8) is True  # from the host grid
    no_grid = {k: v for k, v in on_device.items() if k != "grid"}
    assert dense_hint(no_grid, 8) is None  # only the device could tell: do not read it
    mask = on_device["patch_mask"]
    assert attention_mask(mask, mask.long(), mask.long(), dense=None).shape == (2, 1, 1, 8)
    assert attention_mask(mask, mask.long(), mask.long(), dense=True) is None


def test_to_device_casts_pixels_and_keeps_shape_metadata_on_the_host():
    batch = collate([patchify(torch.rand(3, 32, 48), 16)])
    moved = to_device(batch, "meta", torch.bfloat16)
    assert moved["patches"].dtype == torch.bfloat16 and moved["patches"].device.type == "meta"
    assert moved["row_idx"].dtype == torch.long and moved["patch_mask"].dtype == torch.bool
    assert moved["grid"] is batch["grid"] and moved["orig_size"] is batch["orig_size"]


def test_ema_is_fp32_and_moves_at_decay_0_9999_behind_bf16_weights():
    torch.manual_seed(0)
    model = nn.Linear(64, 64)
    ema = EMA(model, 0.9999)  # built from the fp32 weights, as train_flow does before DeepSpeed casts
    start = ema.model.weight.detach().clone()
    model.bfloat16()
    with torch.no_grad():
        model.weight.add_(2.0)  # a gap of 2.0, as in the simulation
    for _ in range(100):
        ema.update(model)
    assert all(p.dtype == torch.float32 for p in ema.model.parameters())
    moved = (ema.model.weight - start).mean().item()
    gap = (model.weight.float() - start).mean().item()
    assert moved == pytest.approx(gap * (1 - 0.9999**100), rel=1e-3)  # ~0.02; a bf16 EMA stays at 0
    bf16 = EMA(model, 0.9999)
    bf16.model.bfloat16()  # what the old code held: increments of 2e-4 round away
    with pytest.raises(ValueError, match="fp32"):
        ema.load_state_dict(bf16.state_dict())


def test_flow_time_and_path_stay_fp32_for_a_bf16_model():
    seen = {}

    class Probe(nn.Module):
        null_class = 3

        def forward(self, x, t, labels, positions):
            seen.update(x=x.dtype, t=t.dtype)
            return x * 0

    x = torch.randn(2, 4, 8).to(torch.bfloat16)
    positions = {"patch_mask": torch.ones(2, 4, dtype=torch.bool)}
    loss = flow_loss(Probe(), x, torch.tensor([0, 1]), positions, torch.Generator().manual_seed(0))
    assert seen == {"x": torch.bfloat16, "t": torch.float32} and loss.dtype == torch.float32


def test_bf16_needs_a_zero_stage_with_fp32_masters():
    with pytest.raises(ConfigError, match=r"flow\.zero_stage"):
        load_config("tiny", ["flow.precision=bf16", "flow.zero_stage=0"])
    with pytest.raises(ConfigError, match=r"train\.precision"):
        load_config("tiny", ["train.precision=fp16"])
    assert load_config("tiny", ["train.use_gpu=true", "train.zero_stage=3"]).train.precision == "auto"


@pytest.mark.slow
def test_zero_init_gives_each_rank_its_shards_of_the_same_model(tmp_path):
    ranks = run_ranks("build", 2, tmp_path, "variant=Tid2-Tid4/1x16x16", "compare=true", "precision=bf16")
    total = ranks[0]["total_elements"]
    for rank in ranks:
        assert rank["mismatched"] == []  # gathered, the shards are the plain build's weights (bf16-rounded)
        assert rank["local_elements"] <= total / 2 + 64  # half each, up to partition padding


@pytest.mark.slow
def test_bf16_step_reads_the_device_once_and_keeps_the_non_finite_guard(tmp_path):
    """train_ae's step, bf16 ZeRO-3 on CPU: the scalar reads our code makes are host-metadata reads only
    (tile canvas size, dense hint from the host grid); the loss terms, the finiteness flag and the grad
    norm come back in StepStats' one read (a .tolist(), not a scalar read). A NaN step changes no weight."""
    (rank,) = run_ranks("host_reads", 1, tmp_path, "precision=bf16")
    host_metadata_readers = {"vitok_core/model/layers.py:dense_hint", "vitok_core/naflex.py:unpatchify_canvas"}
    for step in rank["steps"]:
        ours = {where for where in step["reads"] if where not in ("deepspeed", "other")}
        assert ours <= host_metadata_readers, step["reads"]
    assert rank["finite"] == [1.0, 1.0, 0.0, 1.0] and rank["loss_finite"] == [True, True, False, True]
    assert rank["steps"][2]["weights_unchanged"] is True
    assert rank["steps"][3]["read"]["loss"] < rank["steps"][0]["read"]["loss"]


def test_rank_state_loads_without_pickle_and_restores_every_rng(tmp_path):
    """The per-rank checkpoint state (step, data position, counters, RNG states, an fp32 EMA) is read back
    with torch.load(weights_only=True): loading a checkpoint runs no pickled code."""
    import random

    import numpy as np

    from jobs.train_common import rng_state, set_rng_state

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state
    state = {"step": 6, "position": {"64": 12}, "skipped_steps": 0, "ema": {"w": torch.ones(2)}, "rng": rng_state()}
    torch.save(state, tmp_path / "rank-00000.pt")
    want = (torch.rand(3), np.random.standard_normal(3), random.random())
    loaded = torch.load(tmp_path / "rank-00000.pt", weights_only=True)
    set_rng_state(loaded.pop("rng"))
    got = (torch.rand(3), np.random.standard_normal(3), random.random())
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]
    assert loaded["position"] == {"64": 12} and loaded["ema"]["w"].dtype == torch.float32
