"""The paths a stage's Ray job is given in cluster mode: every root and path-like input absolute, or a URI.

A Ray job runs in a working directory of its own (Ray's temporary copy of orchestrate.working_dir, or the job
agent's directory), so a relative `runs` there is not the submitter's `runs`: the job would write where nobody
looks, and the submitter would print (and wait for) an output that never appears. Before submission, relative
paths are made absolute against the submitting directory when the cluster shares this machine's filesystem,
and refused, naming their keys, when it does not.

Whether it does is orchestrate.shared_filesystem: `true` (every node mounts this machine's paths at the same
place, e.g. NFS), `false`, or `auto`: true exactly when every alive node of the cluster is this machine (its
node IP is a loopback address or one of this machine's), since one machine has one filesystem. A
multi-machine cluster with a shared mount needs `true`. Absolute paths and URIs are submitted as they are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import OmegaConf

from vitok_core.artifacts import absolute
from vitok_core.config import ConfigError, VitokConfig, load_config

# Config keys that hold a local path or a URI a job reads or writes ("" means "derived from other keys").
PATH_KEYS = (
    "ingest.root",
    "train.root",
    "cache.root",
    "flow.root",
    "evaluate.root",
    "ingest.source",
    "train.ingest",
    "cache.ingest",
    "cache.encoder",
    "flow.cache",
    "flow.sample.decoder",
    "flow.sample.out",
    "evaluate.data",
    "evaluate.autoencoder",
    "evaluate.samples",
    "evaluate.inception_weights",
    "evaluate.baselines",  # lists of paths
    "evaluate.compare",
)
# A file or a timm / Hugging Face hub name: a path only when it names a file.
WEIGHTS_KEYS = ("loss.dino_weights", "evaluate.dinov2_weights", "evaluate.dinov3_weights")
WEIGHTS_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def is_relative(path: str) -> bool:
    """A set local path that is not absolute (URIs, `s3://...` and `file:///...`, are never relative)."""
    return bool(path) and "://" not in path and not os.path.isabs(path)


def names_a_file(weights: str) -> bool:
    """Whether a weights setting names a file rather than a hub model: it has a path separator or a weights
    file's suffix, or a file by that name exists here (vitok_core.losses.load_dino's test), and it is not an
    `hf-hub:org/name`."""
    if weights.startswith("hf-hub:"):
        return False
    return os.sep in weights or weights.endswith(WEIGHTS_SUFFIXES) or os.path.exists(weights)


def relative_paths(cfg: VitokConfig) -> dict[str, Any]:
    """Key -> value (a string, or a list of them) of every path setting that is, or holds, a relative path."""
    found: dict[str, Any] = {}
    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key)
        values = list(value) if OmegaConf.is_list(value) else [value]
        if any(is_relative(v) for v in values):
            found[key] = values if OmegaConf.is_list(value) else value
    for key in WEIGHTS_KEYS:
        value = OmegaConf.select(cfg, key)
        if is_relative(value) and names_a_file(value):
            found[key] = value
    return found


def made_absolute(value: Any) -> Any:
    """A path (or each path of a list) absolute against this process's directory; URIs and absolute paths kept."""
    if isinstance(value, list):
        return [made_absolute(v) for v in value]
    return absolute(value) if is_relative(value) else value


def override(key: str, value: Any) -> str:
    """`key=value` that parses back to exactly `value`: quoted (JSON is YAML) where the override syntax would
    read it otherwise (a `#` starts a comment, `: ` a mapping); a list becomes a list of quoted strings."""
    if isinstance(value, list):
        return f"{key}=[{', '.join(json.dumps(v) for v in value)}]"
    try:
        plain = OmegaConf.from_dotlist([f"value={value}"]).value == value
    except Exception:  # the override syntax cannot read it unquoted at all
        plain = False
    return f"{key}={value if plain else json.dumps(value)}"


def shares_filesystem(cfg: VitokConfig) -> tuple[bool, str]:
    """(whether the cluster's nodes see this machine's paths, why: the setting, or what `auto` found)."""
    setting = cfg.orchestrate.shared_filesystem.lower()
    if setting != "auto":
        return setting == "true", f"orchestrate.shared_filesystem={setting}"
    from pipelines.cluster import cluster_is_here

    here, ips = cluster_is_here(cfg.orchestrate.address)
    nodes = ", ".join(ips) or "none alive"
    where = "all on this machine" if here else "not all on this machine"
    return here, f"orchestrate.shared_filesystem=auto: its nodes ({nodes}) are {where}"


def for_cluster(preset: str, overrides: Sequence[str], say: Callable[[str], None] = print) -> list[str]:
    """The overrides to submit: in cluster mode with relative paths, those paths made absolute against this
    directory (added as overrides, so the job writes where this process looks; `say` tells which) when the
    cluster shares this machine's filesystem, else a ConfigError naming every relative key. Otherwise the
    overrides unchanged.

    `say` is print by default: the `vitok` command's progress goes to stdout (stderr is kept for its one-line
    error), and a Prefect flow (log_prints) shows it in the run's log."""
    cfg = load_config(preset, overrides)
    found = relative_paths(cfg) if cfg.orchestrate.mode == "cluster" else {}
    if not found:
        return list(overrides)
    shared, why = shares_filesystem(cfg)
    shown = ", ".join(f"{key}={value!r}" for key, value in found.items())
    if not shared:
        them = "it" if len(found) == 1 else "them"
        raise ConfigError(
            f"{shown}: relative in cluster mode, and the cluster at {cfg.orchestrate.address} does not share this "
            f"machine's filesystem ({why}): a Ray job would resolve {them} in its own working directory. Use "
            "absolute paths that every node mounts, or s3:// URIs (or orchestrate.shared_filesystem=true if the "
            "nodes do mount this machine's paths)"
        )
    resolved = {key: made_absolute(value) for key, value in found.items()}
    say(f"cluster mode: {shown} made absolute against {os.getcwd()} ({why})")
    return [*overrides, *(override(key, value) for key, value in resolved.items())]
