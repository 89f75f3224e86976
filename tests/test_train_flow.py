"""train_flow on a real local Ray (Ray Train, 2 workers, DeepSpeed ZeRO-2 on CPU) over a real latent cache,
then jobs.sample decoding the samples with the autoencoder."""

from __future__ import annotations

import io

import fsspec
import numpy as np
import pytest
import torch
from safetensors.torch import load as load_bytes

from jobs.cache_latents import run as run_cache
from jobs.ingest import run as run_ingest
from jobs.sample import generate_in_task
from jobs.sample import run as run_sample
from jobs.train_common import read_metrics
from jobs.train_flow import output_uri
from jobs.train_flow import run as run_flow
from tests.ingest_samples import make_training_folder
from tests.training_faults import assert_recovered, run_drill
from vitok_core.artifacts import is_complete, join
from vitok_core.checkpoint import save_published
from vitok_core.config import load_config, to_dict
from vitok_core.model import build_autoencoder
from vitok_core.model.dit import build_dit

pytestmark = pytest.mark.slow
STEPS = 16


@pytest.fixture(scope="module")
def cache(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    make_training_folder(root / "photos", n=24)
    base = [
        f"ingest.source={root / 'photos'}",
        f"ingest.root={root / 'runs'}",
        "ingest.files_per_task=8",
        "ingest.label_from=folder",
    ]
    run_ingest(load_config("tiny", base))
    torch.manual_seed(3)
    save_published(build_autoencoder("Tid2-Tid4/1x16x16"), str(root / "export"), {"variant": "Tid2-Tid4/1x16x16"})
    cache_args = [*base, f"cache.root={root / 'runs'}", f"cache.encoder={root / 'export'}", "cache.budget=64"]
    manifest = run_cache(load_config("tiny", cache_args))
    return root, manifest


def config(cache, root, *overrides):
    return load_config("tiny", overrides_for(cache, root, *overrides))


def overrides_for(cache, root, *overrides) -> list[str]:
    """The test runs' settings as `key=value` overrides of the tiny preset (what a job's command line takes)."""
    return [
        f"flow.cache={cache[1]['output']}",
        f"flow.root={root}",
        "flow.size=tiny",
        f"flow.steps={STEPS}",
        "flow.batch_size=8",
        "flow.micro_batch_size=2",  # 2 workers x 2 x 2 accumulation
        "flow.workers=2",
        "flow.lr=3e-3",
        "flow.warmup_steps=2",
        "flow.ema_decay=0.9",
        "flow.checkpoint_every=4",
        "flow.log_every=1",
        "flow.shuffle_window=2",
        "flow.sample.per_class=2",
        "flow.sample.rows=6",
        "flow.sample.cols=9",
        "flow.sample.steps=4",
        "flow.sample.batch_size=3",
        *overrides,
    ]


@pytest.fixture(scope="module")
def trained(cache):
    return run_flow(config(cache, cache[0] / "flow-reference"))


def test_flow_trains_exports_ema_and_samples(cache, trained):
    assert trained["status"] == "complete" and is_complete(trained["output"])
    losses = [m["loss"] for m in read_metrics(trained["output"])]
    assert len(losses) == STEPS
    assert sum(losses[-4:]) / 4 < 0.85 * sum(losses[:4]) / 4, losses  # it learns (noisy by nature)

    weights = {}
    for name in ("dit", "dit_ema"):
        with fsspec.open(join(trained["export"], f"{name}.safetensors"), "rb") as f:
            weights[name] = load_bytes(f.read())
    torch.manual_seed(0)
    init = build_dit("tiny", 16, 4).state_dict()  # the same seed as the job: the initial weights
    moved = [k for k in init if not torch.equal(weights["dit"][k], init[k])]
    assert moved
    assert all(not torch.equal(weights["dit"][k], weights["dit_ema"][k]) for k in moved)
    # The EMA (decay 0.9) trails the raw weights: it has moved less far from the initial ones.
    assert sum(float(weights["dit_ema"][k].sub(init[k]).norm()) for k in moved) < sum(
        float(weights["dit"][k].sub(init[k]).norm()) for k in moved
    )

    samples = run_sample(config(cache, cache[0] / "flow-reference"))
    assert samples["images"] == 8 and samples["shape"] == [6 * 16, 9 * 16, 3]
    with fsspec.open(join(samples["output"], "samples.npz"), "rb") as f:
        npz = np.load(io.BytesIO(f.read()))
        images, labels = npz["images"], npz["labels"]
    assert images.shape == (8, 96, 144, 3) and images.dtype == np.uint8 and list(labels) == [0, 0, 1, 1, 2, 2, 3, 3]
    # The Ray-task path (taken with flow.use_gpu: a cluster's job driver holds no GPU) gives the same images.
    cfg = config(cache, cache[0] / "flow-reference")
    args = (trained["export"], cache[1]["encoder"], [int(x) for x in labels], to_dict(cfg.flow.sample))
    # Up to rounding: the task runs with one thread (Ray sets OMP_NUM_THREADS from num_cpus), this process with
    # torch's default, and float sums in another order can move a pixel across a uint8 step (seen: 1 in 331,776).
    diff = np.abs(np.stack(generate_in_task(args, gpus=0, cpus=1)).astype(np.int16) - images)
    assert diff.max() <= 1 and np.count_nonzero(diff) <= 1e-4 * diff.size, (diff.max(), np.count_nonzero(diff))
    again = run_sample(config(cache, cache[0] / "flow-reference", f"flow.sample.out={cache[0] / 'again'}"))
    with fsspec.open(join(again["output"], "samples.npz"), "rb") as f:
        assert np.array_equal(np.load(io.BytesIO(f.read()))["images"], images)  # same seed, same images


def test_flow_pause_and_resume_equals_uninterrupted(cache, trained, tmp_path):
    paused = run_flow(config(cache, tmp_path, "flow.stop_at_step=6"))
    assert paused["status"] == "paused" and paused["step"] == 6
    resumed = run_flow(config(cache, tmp_path))
    got, want = read_metrics(resumed["output"]), read_metrics(trained["output"])
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for a, b in zip(got, want, strict=True):  # data position, weights, optimizer, EMA and RNG restored
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)


def test_bf16_flow_keeps_an_fp32_ema_that_moves_and_exports_the_fp32_masters(cache, trained, tmp_path):
    """Mixed precision on CPU (DeepSpeed bf16, ZeRO-2, gloo) at the paper's EMA decay: the EMA is fp32 and
    moves, dit.safetensors holds the fp32 masters of the last checkpoint, and the loss follows fp32's."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run = run_flow(config(cache, tmp_path, "flow.precision=bf16", "flow.ema_decay=0.9999"))
    assert run["status"] == "complete"
    weights = {}
    for name in ("dit", "dit_ema"):
        with fsspec.open(join(run["export"], f"{name}.safetensors"), "rb") as f:
            weights[name] = load_bytes(f.read())
    masters = get_fp32_state_dict_from_zero_checkpoint(join(run["output"], f"step-{STEPS:08d}"), tag="zero")
    assert weights["dit"].keys() == masters.keys()
    assert all(torch.equal(weights["dit"][k], masters[k].float()) for k in masters)
    assert any(not torch.equal(v, v.bfloat16().float()) for v in masters.values())  # not the bf16 copies

    torch.manual_seed(0)
    init = build_dit("tiny", 16, 4).state_dict()
    assert all(v.dtype == torch.float32 for v in weights["dit_ema"].values())
    raw = sum(float(weights["dit"][k].sub(init[k]).norm()) for k in init)
    ema = sum(float(weights["dit_ema"][k].sub(init[k]).norm()) for k in init)
    # 16 steps at decay 0.9999 move the EMA by at most 1 - 0.9999**16 (0.16%) of the raw weights' path;
    # a bf16 EMA would not move at all (its 1e-4 increments round away).
    assert 0 < ema < (1 - 0.9999**STEPS) * raw * 1.01, (ema, raw)

    got = [m["loss"] for m in read_metrics(run["output"])]
    want = [m["loss"] for m in read_metrics(trained["output"])]
    assert len(got) == len(want) == STEPS
    assert max(abs(a - b) / b for a, b in zip(got, want, strict=True)) < 0.05, (got, want)


# ------------------------------------------------------------------------------------------------
# Real faults on a multi-node cluster: a SIGKILLed worker, a lost node, a rank killed mid-checkpoint
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def drill(cache, trained, training_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("flow_faults")
    overrides = overrides_for(cache, root, "flow.max_failures=3", "flow.kill_in_checkpoint_at_step=16")
    out = output_uri(load_config("tiny", overrides), cache[1]["key"])
    # the worker dies past the checkpoint of step 4, the node past that of step 8, a rank in the last checkpoint
    log = root / "driver.log"
    return run_drill(training_cluster, "jobs.train_flow", overrides, out, log, kill_worker_past=4, kill_node_past=8)


def test_sigkilled_worker_restarts_from_the_last_complete_checkpoint(drill):
    assert drill.returncode == 0, drill.log[-3000:]
    print(assert_recovered(drill, "worker SIGKILL"))


def test_lost_node_restarts_on_the_nodes_left(drill):
    assert drill.returncode == 0, drill.log[-3000:]
    print(assert_recovered(drill, "node lost"))


def test_rank_killed_mid_checkpoint_never_loads_the_partial_checkpoint(drill):
    assert drill.returncode == 0, drill.log[-3000:]
    recovery = assert_recovered(drill, "rank SIGKILL")  # restarted from before step 16: the cut-short one
    assert recovery["at_step"] == 16
    print(recovery)


def test_faulted_run_equals_the_uninterrupted_one(trained, drill):
    assert is_complete(drill.output)
    got, want = read_metrics(drill.output), read_metrics(trained["output"])
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))  # no step missing or logged twice
    for a, b in zip(got, want, strict=True):  # data position, weights, optimizer, EMA and RNG restored
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
    for name in ("dit", "dit_ema"):  # and so the exports, bit for bit
        with fsspec.open(join(drill.output, "export", f"{name}.safetensors"), "rb") as f:
            faulted = load_bytes(f.read())
        with fsspec.open(join(trained["export"], f"{name}.safetensors"), "rb") as f:
            uninterrupted = load_bytes(f.read())
        assert faulted.keys() == uninterrupted.keys()
        assert all(torch.equal(v, uninterrupted[k]) for k, v in faulted.items())
    print(f"train_flow drill: {drill.wall_s:.0f} s in all; faults {drill.faults}; starts {drill.starts}")
