"""Configs: presets, overrides, validation errors that name the key, stable content hash."""

from __future__ import annotations

import pytest
import torch

from vitok_core.config import CONFIG_DIR, ConfigError, config_hash, describe, load_config, preset_names
from vitok_core.model import build_autoencoder, count_parameters

EXPECTED_PRESETS = {
    "tiny": "Tid2-Tid4/1x16x16",
    "350m": "Ld4-Ld24/1x16x64",
    "5b": "Td4-T/1x16x64",
    "dec_B": "Ld4-B/1x16x64",
    "dec_L": "Ld4-L/1x16x64",
    "dec_G": "Ld4-G/1x16x64",
    "dec_T": "Ld4-T/1x16x64",
    "cpu_study": "Tid2-Tid4/1x16x64",
}


@pytest.mark.parametrize(("preset", "variant"), EXPECTED_PRESETS.items())
def test_presets_load_and_say_how_to_run(preset, variant):
    cfg = load_config(preset)
    assert cfg.name == preset
    assert cfg.model.variant == variant
    header = [line for line in (CONFIG_DIR / f"{preset}.yaml").read_text().splitlines() if line.startswith("#")]
    assert header and header[0].startswith(f"# {preset}:"), "each preset starts with a comment naming it"
    text = "\n".join(header)
    assert "python -m" in text and "Expect" in text, "the header gives a command and what to expect"


def test_preset_list_is_complete():
    assert set(EXPECTED_PRESETS) <= set(preset_names())


def test_tiny_preset_is_a_few_million_parameters():
    cfg = load_config("tiny")
    with torch.device("meta"):
        total = count_parameters(build_autoencoder(cfg.model.variant))["total"]
    assert 1e6 < total < 10e6
    assert "parameters: encoder" in describe(cfg)


def test_overrides_are_typed_and_change_the_config():
    cfg = load_config("tiny", ["optim.lr=2e-4", "train.steps=7", "data.budgets=[32,64]", "model.local_window=8"])
    assert cfg.optim.lr == 2e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 7
    assert list(cfg.data.budgets) == [32, 64]
    assert cfg.model.local_window == 8


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("optim.lrr=1", "optim.lrr"),  # unknown key
        ("nosuch.section=1", "nosuch"),
        ("optim.lr=fast", "optim.lr='fast'"),  # wrong type
        ("train.steps=1.5", "train.steps"),
        ("optim.lr=-1", "optim.lr=-1.0"),  # out of range
        ("loss.ssim_weight=-0.1", "loss.ssim_weight"),
        ("data.budgets=[0]", "data.budgets"),
        ("data.budget_switch=[1.5]", "data.budget_switch"),
        ("data.augment.flip_prob=2", "data.augment.flip_prob"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("optim.min_lr=1.0", "optim.min_lr"),
        ("model.variant=Ld4-Ld24", "model.variant"),
        ("loss.tile_size=8", "loss.tile_size"),
        ("lr0.001", "key=value"),
    ],
)
def test_bad_values_fail_naming_the_key(override, names):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert names in str(err.value)


def test_unknown_preset_and_missing_file():
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/no/such/file.yaml")


def test_bad_key_in_a_yaml_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  variant: Tid2-Tid4/1x16x16\n  widht: 3\n")
    with pytest.raises(ConfigError, match=r"model\.widht"):
        load_config(path)


def test_hash_is_stable_and_order_independent(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("name: x\nmodel:\n  variant: Tid2-Tid4/1x16x16\noptim:\n  lr: 5e-4\n  warmup_steps: 10\n")
    b.write_text("optim:\n  warmup_steps: 10\n  lr: 0.0005\nmodel:\n  variant: Tid2-Tid4/1x16x16\nname: x\n")
    assert config_hash(load_config(a)) == config_hash(load_config(b))
    assert config_hash(load_config(a)) == config_hash(load_config(a))
    assert len(config_hash(load_config(a))) == 16


@pytest.mark.parametrize(
    "override",
    [
        "optim.lr=2e-3",
        "loss.dino_weight=250",
        "data.budgets=[64,128]",
        "train.seed=1",
        "model.local_window=8",
        "data.augment.rrc_scale=[0.5,1.0]",
        "name=other",
    ],
)
def test_hash_changes_with_any_setting(override):
    assert config_hash(load_config("tiny", [override])) != config_hash(load_config("tiny"))


def test_override_back_to_default_keeps_the_hash():
    base = load_config("tiny")
    same = load_config("tiny", [f"optim.lr={base.optim.lr}", f"train.steps={base.train.steps}"])
    assert config_hash(same) == config_hash(base)
