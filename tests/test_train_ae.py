"""The train_ae stage for real: Ray Train with 2 workers, DeepSpeed ZeRO-3 on CPU (gloo), the tiny model
on a small ingest of real-photo crops. One uninterrupted run is the reference for a paused-and-resumed
run and for a run whose worker crashes; a run on S3 (moto) also takes non-finite steps."""

from __future__ import annotations

import math
import sys

import fsspec
import pytest
import torch

from jobs.ingest import run as run_ingest
from jobs.train_ae import deepspeed_config, output_uri, train_settings
from jobs.train_ae import run as run_train
from jobs.train_common import import_deepspeed, read_metrics
from tests.ingest_samples import make_training_folder
from tests.training_faults import assert_recovered, run_drill
from vitok_core.artifacts import is_complete, join
from vitok_core.checkpoint import load_published, read_export_info
from vitok_core.config import ConfigError, load_config
from vitok_core.ingest_output import IngestOutput
from vitok_core.model import build_autoencoder
from vitok_core.naflex import collate, preprocess

STEPS = 12


def config(photos, root, *overrides):
    return load_config("tiny", overrides_for(photos, root, *overrides))


def overrides_for(photos, root, *overrides) -> list[str]:
    """The test runs' settings as `key=value` overrides of the tiny preset (what a job's command line takes)."""
    return [
        f"ingest.source={photos}",
        f"ingest.root={root}/ingest-root",
        "ingest.files_per_task=16",
        f"train.root={root}",
        f"train.steps={STEPS}",
        "train.batch_size=8",
        "train.micro_batch_size=2",  # 2 workers x 2 images x 2 accumulation steps
        "train.workers=2",
        "train.checkpoint_every=3",
        "train.log_every=1",
        "train.loader_workers=0",
        "train.shuffle_window=2",
        "data.budget_switch=[0.75]",  # 64 tokens for steps 1-9, 256 for 10-12
        "optim.warmup_steps=2",
        "optim.lr=3e-3",
        *overrides,
    ]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_photos")
    make_training_folder(root, n=48)
    return root


def test_settings_key_and_deepspeed_config(photos, tmp_path):
    cfg = config(photos, tmp_path)
    ds = deepspeed_config(cfg)
    assert ds["train_batch_size"] == 8 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is False
    paused = config(
        photos, tmp_path, "train.stop_at_step=4", "train.log_every=5", "train.loader_workers=2", "train.export_every=2"
    )
    assert train_settings(cfg, "k") == train_settings(paused, "k")  # neither changes the weights
    assert train_settings(cfg, "k") != train_settings(config(photos, tmp_path, "train.seed=1"), "k")
    with pytest.raises(ConfigError, match=r"train\.batch_size=6"):
        config(photos, tmp_path, "train.batch_size=6")


@pytest.mark.slow
def test_needs_a_complete_ingest_before_any_cluster_work(tmp_path):
    cfg = config(tmp_path / "nothing", tmp_path, f"train.ingest={tmp_path / 'no-ingest'}")
    with pytest.raises(FileNotFoundError, match="not a completed ingest output"):
        run_train(cfg)


@pytest.fixture(scope="module")
def reference(ray_local, photos, tmp_path_factory):
    root = tmp_path_factory.mktemp("train_reference")
    cfg = config(photos, root, "train.export_every=6")  # not in the key: the drills' runs equal this one
    run_ingest(cfg)
    return cfg, run_train(cfg)


def _losses(out: str) -> list[float]:
    return [m["loss"] for m in read_metrics(out)]


@pytest.mark.slow
def test_trains_switches_budget_and_exports(reference):
    cfg, manifest = reference
    assert manifest["status"] == "complete" and is_complete(manifest["output"])
    metrics = read_metrics(manifest["output"])
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert [m["budget"] for m in metrics] == [64] * 9 + [256] * 3  # the switch is exact
    assert all(m["tokens"] <= 8 * 64 for m in metrics[:9]) and all(8 * 64 < m["tokens"] <= 8 * 256 for m in metrics[9:])
    assert all(m["skipped_steps"] == 0 and math.isfinite(m["grad_norm"]) for m in metrics)
    first, last = sum(_losses(manifest["output"])[:3]) / 3, sum(_losses(manifest["output"])[6:9]) / 3
    assert last < 0.8 * first, (first, last)  # it learns
    assert {"charbonnier", "ssim", "lr", "tokens_per_s", "data_wait_s"} <= set(metrics[-1])

    # The export loads strictly into a fresh model and reproduces the final checkpoint's weights, which
    # DeepSpeed's own consolidation reads from the ZeRO-3 shards.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    exported = build_autoencoder(cfg.model.variant)
    load_published(exported, join(manifest["output"], "export"))
    consolidated = build_autoencoder(cfg.model.variant)
    state = get_fp32_state_dict_from_zero_checkpoint(join(manifest["output"], f"step-{STEPS:08d}"), tag="zero")
    consolidated.load_state_dict(state, strict=True)
    image = torch.rand(3, 150, 220) * 2 - 1
    batch = collate([preprocess(image, 16, 64)])
    with torch.no_grad():
        assert torch.equal(exported.eval()(batch)["patches"], consolidated.eval()(batch)["patches"])

    # train.export_every=6: step 6's weights in the same layout, equal to its checkpoint; the last step's
    # export is export/ only.
    assert manifest["exports"] == [join(manifest["output"], "exports/step-00000006")]
    middle = build_autoencoder(cfg.model.variant)
    load_published(middle, manifest["exports"][0])
    state = get_fp32_state_dict_from_zero_checkpoint(join(manifest["output"], "step-00000006"), tag="zero")
    assert all(torch.equal(middle.state_dict()[k], v) for k, v in state.items())
    assert read_export_info(manifest["exports"][0])["step"] == 6

    started = run_train(cfg)  # complete: skipped
    assert started == manifest


@pytest.mark.slow
def test_pause_resume_and_crash_equal_uninterrupted(reference, photos, tmp_path):
    _, manifest = reference
    ingest = f"train.ingest={manifest['ingest']}"
    paused = run_train(config(photos, tmp_path, ingest, "train.stop_at_step=6"))
    assert paused["status"] == "paused" and paused["step"] == 6 and not is_complete(paused["output"])
    # Resume; after 8 steps a worker raises, and Ray Train restarts the worker group from the checkpoint of
    # step 6 (the next one would be at 9).
    resumed = run_train(config(photos, tmp_path, ingest, "train.faults.fail_at_step=8", "train.max_failures=1"))
    assert resumed["output"] == paused["output"] and resumed["status"] == "complete"
    fs, path = fsspec.core.url_to_fs(join(resumed["output"], "faults", "fail_at_step-8"))
    assert fs.exists(path)  # the fault did fire
    got, want = read_metrics(resumed["output"]), read_metrics(manifest["output"])
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))  # steps 7-8 redone once, none twice
    # Same data order and weights: the data position, optimizer state and RNG are restored, and every
    # random choice is a function of (seed, rank, step). The losses agree to float rounding (gloo's
    # reductions are deterministic for a fixed world size, so they are in fact equal here).
    for a, b in zip(got, want, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
        assert a["budget"] == b["budget"] and a["tokens"] == b["tokens"]


@pytest.mark.slow
def test_non_finite_steps_on_s3(reference, s3_endpoint, photos):
    _, manifest = reference
    bucket = s3_endpoint("vitok-train")
    cfg = config(
        photos,
        f"s3://{bucket}/runs",
        f"train.ingest={manifest['ingest']}",
        "train.faults.nan_at_steps=[2,7,8,9]",  # one skipped step, then three in a row: restore step 6
        "train.max_bad_steps=3",
    )
    result = run_train(cfg)
    assert result["output"].startswith(f"s3://{bucket}/runs/train_ae/")
    assert result["status"] == "complete" and is_complete(result["output"])
    metrics = read_metrics(result["output"])
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert metrics[-1]["skipped_steps"] == 4 and metrics[-1]["restores"] == 1
    assert [math.isfinite(m["loss"]) for m in metrics] == [i not in (2, 7, 8, 9) for i in range(STEPS)]
    assert math.isfinite(metrics[-1]["loss"])
    model = build_autoencoder(cfg.model.variant)
    load_published(model, join(result["output"], "export"))  # strict
    assert output_uri(cfg, IngestOutput(manifest["ingest"])) == result["output"]


@pytest.mark.slow
def test_bf16_run_follows_fp32_and_exports_the_fp32_masters(reference, photos, tmp_path):
    """Mixed precision on CPU (DeepSpeed bf16 + ZeRO-3 over gloo, the GPU configuration): the loss curve
    stays close to the fp32 reference's, and the export holds the fp32 master weights (as DeepSpeed's own
    consolidation reads them from the last checkpoint), not the bf16 module copies."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    cfg, manifest = reference
    run = run_train(config(photos, tmp_path, f"train.ingest={manifest['ingest']}", "train.precision=bf16"))
    assert run["status"] == "complete" and run["output"] != manifest["output"]  # precision is in the key
    got, want = _losses(run["output"]), _losses(manifest["output"])
    assert max(abs(a - b) / b for a, b in zip(got, want, strict=True)) < 0.05, (got, want)

    masters = get_fp32_state_dict_from_zero_checkpoint(join(run["output"], f"step-{STEPS:08d}"), tag="zero")
    exported = build_autoencoder(cfg.model.variant)
    load_published(exported, join(run["output"], "export"))
    state = exported.state_dict()
    assert all(torch.equal(state[k], masters[k].float()) for k in masters)
    assert any(not torch.equal(v, v.bfloat16().float()) for v in masters.values())  # not bf16 values


def test_import_deepspeed_skips_compiling_muon_and_restores_torch_compile():
    compile_ = torch.compile
    deepspeed = import_deepspeed()
    assert torch.compile is compile_ and deepspeed.initialize
    assert "deepspeed.runtime.zero.muon.muon_optimizer" in sys.modules


# ------------------------------------------------------------------------------------------------
# Real faults on a multi-node cluster: a SIGKILLed worker, a lost node, a rank killed mid-checkpoint
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def drill(reference, training_cluster, photos, tmp_path_factory):
    _, manifest = reference
    root = tmp_path_factory.mktemp("train_faults")
    extra = [f"train.ingest={manifest['ingest']}", "train.max_failures=3", "train.faults.kill_in_checkpoint_at_step=12"]
    overrides = overrides_for(photos, root, *extra)
    out = output_uri(load_config("tiny", overrides), IngestOutput(manifest["ingest"]))
    # the worker dies past the checkpoint of step 3, the node past that of step 6, a rank in the last checkpoint
    return run_drill(
        training_cluster, "jobs.train_ae", overrides, out, root / "driver.log", kill_worker_past=3, kill_node_past=6
    )


@pytest.mark.slow
def test_sigkilled_worker_restarts_from_the_last_complete_checkpoint(drill):
    assert drill.returncode == 0, drill.log[-3000:]
    print(assert_recovered(drill, "worker SIGKILL"))


@pytest.mark.slow
def test_lost_node_restarts_on_the_nodes_left(drill):
    assert drill.returncode == 0, drill.log[-3000:]
    print(assert_recovered(drill, "node lost"))


@pytest.mark.slow
def test_rank_killed_mid_checkpoint_never_loads_the_partial_checkpoint(drill):
    assert drill.returncode == 0, drill.log[-3000:]
    recovery = assert_recovered(drill, "rank SIGKILL")  # restarted from before step 12: the cut-short one
    assert recovery["at_step"] == 12
    print(recovery)


@pytest.mark.slow
def test_faulted_run_equals_the_uninterrupted_one(reference, drill):
    _, manifest = reference
    assert is_complete(drill.output)
    got, want = read_metrics(drill.output), read_metrics(manifest["output"])
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))  # no step missing or logged twice
    for a, b in zip(got, want, strict=True):  # the data order continues exactly, weights and RNG restored
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
        assert a["budget"] == b["budget"] and a["tokens"] == b["tokens"]
    lost = drill.wall_s
    print(f"train_ae drill: {lost:.0f} s in all; faults {drill.faults}; starts {drill.starts}")
