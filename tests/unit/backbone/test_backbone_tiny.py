"""The built-in tiny backbone: deterministic, idempotent, a normal Hugging Face folder with a real tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from lorafleet.backbone import TINY_VERSION, build_tiny_backbone, default_tiny_dir, fingerprint_directory


def test_tiny_folder_is_a_normal_hf_checkpoint(tiny_dir: Path, data_dir: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    assert tiny_dir == default_tiny_dir(data_dir) and tiny_dir.name == f"tiny-{TINY_VERSION}"
    config = AutoConfig.from_pretrained(tiny_dir)
    assert config.model_type == "llama" and config.hidden_size == 64 and config.num_hidden_layers == 2
    assert config.num_key_value_heads < config.num_attention_heads  # k/v projections are not square
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    text = "Grüße, lorafleet! 🚀"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(tokenizer) == config.vocab_size == 259
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert not any(p.suffix in (".bin", ".pt") for p in tiny_dir.iterdir())


def test_building_is_idempotent_and_deterministic(tiny_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    mtime = (tiny_dir / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_backbone(data_dir) == tiny_dir
    assert (tiny_dir / "model.safetensors").stat().st_mtime_ns == mtime  # not rebuilt
    other = build_tiny_backbone(tmp_path)
    assert (other / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()
    assert fingerprint_directory(other) == fingerprint_directory(tiny_dir)
    assert not [p for p in other.parent.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_overridden_dims_get_their_own_folder(tmp_path: Path, tiny_dir: Path) -> None:
    bigger = build_tiny_backbone(tmp_path, hidden_size=96, num_hidden_layers=1)
    assert bigger.name != tiny_dir.name
    assert json.loads((bigger / "config.json").read_text())["hidden_size"] == 96
    assert fingerprint_directory(bigger).digest != fingerprint_directory(tiny_dir).digest
