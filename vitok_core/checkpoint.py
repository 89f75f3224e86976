"""Weights in the published layout: `encoder.safetensors` + `decoder.safetensors` (+ a small JSON).

Paths go through fsspec, so a directory can be local or `s3://...`. Loading is strict: every key of
the part must be present with the right shape, and nothing else.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

import fsspec
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import Tensor, nn

from vitok_core.model.autoencoder import DECODER_PREFIXES, ENCODER_PREFIXES

PARTS = {"encoder": ENCODER_PREFIXES, "decoder": DECODER_PREFIXES}


def split_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """{'encoder': ..., 'decoder': ...} by published-layout prefix; unknown keys are an error."""
    parts: dict[str, dict[str, Tensor]] = {name: {} for name in PARTS}
    for key, value in state_dict.items():
        part = next((name for name, prefixes in PARTS.items() if key.startswith(prefixes)), None)
        if part is None:
            raise KeyError(
                f"parameter {key!r} belongs to neither encoder {ENCODER_PREFIXES} nor decoder {DECODER_PREFIXES}"
            )
        parts[part][key] = value
    return parts


def save_published(
    model_or_state: nn.Module | Mapping[str, Tensor], directory: str, metadata: Mapping[str, object] | None = None
) -> dict[str, str]:
    """Write encoder.safetensors, decoder.safetensors and (with `metadata`) export.json under `directory`."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    fs, root = fsspec.core.url_to_fs(directory)
    fs.makedirs(root, exist_ok=True)
    paths = {}
    for part, tensors in split_state_dict(state).items():
        contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        path = f"{root.rstrip('/')}/{part}.safetensors"
        with fs.open(path, "wb") as f:
            f.write(save_bytes(contiguous, metadata={"format": "pt"}))
        paths[part] = path
    if metadata is not None:
        with fs.open(f"{root.rstrip('/')}/export.json", "w") as f:
            json.dump(dict(metadata), f, indent=2, sort_keys=True)
    return paths


def read_part(directory: str, part: str) -> dict[str, Tensor]:
    """The tensors of `{directory}/{part}.safetensors`."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {sorted(PARTS)}, got {part!r}")
    with fsspec.open(f"{directory.rstrip('/')}/{part}.safetensors", "rb") as f:
        return load_bytes(f.read())


def load_published(model: nn.Module, directory: str, parts: Iterable[str] = ("encoder", "decoder")) -> None:
    """Load the given parts into `model` strictly (names and shapes must match exactly)."""
    own = model.state_dict()
    loaded: dict[str, Tensor] = {}
    for part in parts:
        tensors = read_part(directory, part)
        expected = {k for k in own if k.startswith(PARTS[part])}
        missing, unexpected = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
        if missing or unexpected:
            raise KeyError(
                f"{directory}/{part}.safetensors does not match the model: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for key, value in tensors.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(
                    f"{part}.safetensors: {key} has shape {tuple(value.shape)}, model has {tuple(own[key].shape)}"
                )
        loaded.update(tensors)
    with torch.no_grad():
        result = model.load_state_dict(loaded, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys


def read_export_info(directory: str) -> dict[str, object]:
    """export.json of a published directory (variant, config hash, step)."""
    with fsspec.open(f"{directory.rstrip('/')}/export.json", "r") as f:
        return json.load(f)


def load_part_model(directory: str, part: str, variant: str | None = None, device: str = "cpu") -> nn.Module:
    """An Autoencoder whose `part` ("encoder" or "decoder") holds the published weights and whose other part
    stays on the meta device (no memory): what a latent cache or a sampler needs from a 5B model."""
    from vitok_core.model.autoencoder import build_autoencoder

    variant = variant or str(read_export_info(directory)["variant"])
    with torch.device("meta"):
        model = build_autoencoder(variant)
    tensors = read_part(directory, part)
    expected = {k for k in model.state_dict() if k.startswith(PARTS[part])}
    if expected != set(tensors):
        missing, unexpected = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
        raise KeyError(
            f"{directory}/{part}.safetensors does not match {variant}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    model.load_state_dict({k: v.to(device) for k, v in tensors.items()}, strict=False, assign=True)
    return model.eval()


def file_sha256(uri: str) -> str:
    """SHA-256 of a file on any fsspec filesystem, read in 16 MB chunks."""
    digest = hashlib.sha256()
    with fsspec.open(uri, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def published_sha256(directory: str, parts: Iterable[str] = ("encoder", "decoder")) -> str:
    """One hash over the given parts' weight files: what a cache or an evaluation belongs to."""
    hashes = [file_sha256(f"{directory.rstrip('/')}/{part}.safetensors") for part in parts]
    return hashes[0] if len(hashes) == 1 else hashlib.sha256("".join(hashes).encode()).hexdigest()
