"""Stage artifacts on any fsspec URI: content keys, `_SUCCESS` markers, JSON manifests.

A stage writes under `{root}/{stage}/{key}/`. `key` hashes the stage's resolved settings, its input keys
and a code version, so the same inputs give the same directory; a directory is complete only when
its `_SUCCESS` exists, and `_SUCCESS` is written last.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec

SUCCESS = "_SUCCESS"
MANIFEST = "manifest.json"


def stage_key(stage: str, settings: Mapping[str, Any], input_keys: Sequence[str] = (), code_version: str = "1") -> str:
    """16 hex characters of SHA-256 over the stage name, its settings (sorted keys), inputs and code version."""
    payload = {"stage": stage, "settings": settings, "inputs": list(input_keys), "code": code_version}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def absolute(uri: str) -> str:
    """Local paths become absolute (Ray workers may run in another working directory); URIs stay."""
    return uri if "://" in uri else os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def is_complete(uri: str) -> bool:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.exists(join(path, SUCCESS))


def write_json(uri: str, data: Mapping[str, Any]) -> None:
    with fsspec.open(uri, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)


def read_json(uri: str) -> dict[str, Any]:
    with fsspec.open(uri, "r") as f:
        return json.load(f)


def mark_success(uri: str) -> None:
    with fsspec.open(join(uri, SUCCESS), "w") as f:
        f.write("")


def remove(uri: str) -> None:
    """Delete a directory tree if it exists (staging areas, half-written outputs)."""
    fs, path = fsspec.core.url_to_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)
