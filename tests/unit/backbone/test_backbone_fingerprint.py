"""Fingerprints: stable across library versions and load options, different for other weights or configs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lorafleet.backbone import fingerprint_directory, fingerprint_model, load_backbone
from lorafleet.errors import ValidationError


def _copy(tiny_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(tiny_dir, target)
    return target


def test_volatile_config_keys_do_not_change_the_fingerprint(tiny_dir: Path, tmp_path: Path) -> None:
    copy = _copy(tiny_dir, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    config.update(transformers_version="9.9.9", dtype="bfloat16", _name_or_path="elsewhere", use_cache=False)
    (copy / "config.json").write_text(json.dumps(config, indent=4))
    assert fingerprint_directory(copy) == fingerprint_directory(tiny_dir)
    assert str(fingerprint_directory(copy)).startswith("LlamaForCausalLM:")


def test_weights_and_config_changes_change_the_fingerprint(tiny_dir: Path, tmp_path: Path) -> None:
    original = fingerprint_directory(tiny_dir)
    copy = _copy(tiny_dir, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    assert fingerprint_directory(copy).config_sha256 != original.config_sha256
    shutil.copy(tiny_dir / "config.json", copy / "config.json")
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 0x01
    (copy / "model.safetensors").write_bytes(bytes(data))
    changed = fingerprint_directory(copy)
    assert changed.weights_sha256 != original.weights_sha256 and changed.digest != original.digest


def test_folders_without_weights_are_refused(tmp_path: Path, tiny_dir: Path) -> None:
    with pytest.raises(ValidationError):
        fingerprint_directory(tmp_path)
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(ValidationError, match="safetensors"):
        fingerprint_directory(tmp_path)


def test_in_memory_fingerprint_tracks_weights(tiny_dir: Path) -> None:
    model = load_backbone(tiny_dir, quantization="fp32", device="cpu").model
    first = fingerprint_model(model)
    assert fingerprint_model(model) == first
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0
    assert fingerprint_model(model).weights_sha256 != first.weights_sha256
